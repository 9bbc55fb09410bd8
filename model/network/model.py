"""A Llama with its weights on a mesh: `init` (random weights, or abstract shapes only), the shardings
derived from the parameters' logical names, and the in-memory transforms of a whole state."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from model.network import quant
from model.network.config import LlamaConfig
from model.network.llama import Llama
from sharding.mesh import auto_axes, single_device_mesh
from sharding.rules import RULES, named_sharding, use_mesh


def tree_get(tree, path, *, value: bool = False):
    """`tree[path[0]][path[1]]…`; with `value`, a Variable found there is unwrapped."""
    for k in path:
        tree = tree[k]
    return tree.get_value() if value and isinstance(tree, nnx.Variable) else tree


def is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def logical_axes(state: nnx.State):
    """The tree of logical axis-name tuples, one per parameter."""
    return jax.tree.map(lambda v: tuple(v.get_metadata().get("out_sharding") or (None,) * v.ndim),
                        state, is_leaf=is_variable)


def state_shardings(state: nnx.State, mesh: Mesh, rules=RULES) -> nnx.State:
    """NamedSharding for every parameter of `state` (abstract or concrete), from its logical names.

    A weight dimension that its mesh axes do not divide is an error; a quantization scale's group
    dimension (1/group_size of the weight's) is instead left replicated when it does not divide.
    """
    def one(path, v):
        names = v.get_metadata().get("out_sharding") or (None,) * v.ndim
        where = "/".join(str(getattr(k, "key", k)) for k in path)
        return named_sharding(names, mesh, v.shape, rules, what=where, strict=not where.endswith("/scale"))
    return jax.tree_util.tree_map_with_path(one, state, is_leaf=is_variable)


def abstract_model(cfg: LlamaConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """Shapes, dtypes and logical axes of every parameter; allocates nothing (fine for 405B)."""
    return nnx.split(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _forward(graphdef: nnx.GraphDef, mesh: Mesh, state, tokens, positions=None, segments=None):
    """One jit for every Model: another model of the same structure on the same mesh (every
    `model.load` of one checkpoint) reuses the compiled forward instead of tracing and compiling again."""
    with use_mesh(mesh):
        return nnx.merge(graphdef, state)(tokens, positions, segments)


class Model:
    """A Llama with its weights on a mesh. `m(tokens)` -> float32 logits [B, T, V]."""

    def __init__(self, graphdef: nnx.GraphDef, state: nnx.State, config: LlamaConfig, mesh: Mesh):
        self.graphdef, self.state, self.config, self.mesh = graphdef, state, config, auto_axes(mesh)
        self._forward = functools.partial(_forward, graphdef, self.mesh)

    @property
    def module(self) -> Llama:
        return nnx.merge(self.graphdef, self.state)

    def check_tokens(self, tokens) -> np.ndarray:
        toks = np.asarray(tokens)
        if toks.ndim != 2 or not np.issubdtype(toks.dtype, np.integer):
            raise ValueError(f"tokens must be an integer array [batch, length], got {toks.dtype}{list(toks.shape)}")
        if toks.size and (toks.min() < 0 or toks.max() >= self.config.vocab_size):
            bad = toks.max() if toks.max() >= self.config.vocab_size else toks.min()
            raise ValueError(f"token id {int(bad)} is out of range for vocab_size {self.config.vocab_size}")
        return toks.astype(np.int32)

    def __call__(self, tokens, positions=None, segments=None) -> jax.Array:
        return self._forward(self.state, self.check_tokens(tokens), positions, segments)

    def greedy(self, prompt, max_new_tokens: int) -> np.ndarray:
        """Greedy continuation of each row of `prompt` [B, T] (full recompute, one compile).
        The KV-cache engine in serve/ is the fast path; this is the simple, obviously-right one."""
        toks = self.check_tokens(prompt)
        B, T = toks.shape
        buf = np.zeros((B, T + max_new_tokens), np.int32)
        buf[:, :T] = toks
        for t in range(T, T + max_new_tokens):
            logits = self._forward(self.state, buf)  # causal: later (zero) tokens do not affect position t-1
            buf[:, t] = np.asarray(jnp.argmax(logits[:, t - 1], axis=-1))
        return buf[:, T:]


def init(cfg: LlamaConfig, *, seed: int = 0, mesh: Mesh | None = None) -> Model:
    """A randomly initialised model, created directly in its shardings (never whole on one device)."""
    mesh = auto_axes(mesh or single_device_mesh())
    graphdef, abstract = abstract_model(cfg)
    shardings = state_shardings(abstract, mesh)

    @jax.jit
    def create():
        return nnx.split(Llama(cfg, rngs=nnx.Rngs(seed)))[1]

    state = jax.jit(create, out_shardings=shardings)()
    return Model(graphdef, state, cfg, mesh)


def init_adapters(cfg: LlamaConfig, state: nnx.State, mesh: Mesh, seed: int = 0) -> None:
    """Fills the LoRA adapters of a loaded `state` with fresh values (A random, B zero), in their shardings."""
    def create():  # XLA drops the unused base-weight initialisers
        return nnx.state(Llama(cfg, rngs=nnx.Rngs(seed)), nnx.LoRAParam)

    fresh = jax.jit(create, out_shardings=state_shardings(state.filter(nnx.LoRAParam), mesh))()
    for path, v in fresh.flat_state():
        tree_get(state, path).set_value(v.get_value())



def quantize_state(state: nnx.State, cfg: LlamaConfig, quant_spec) -> tuple[LlamaConfig, nnx.State]:
    """A float model's state (in memory) -> (config with quant, quantized state). Everything but the
    targeted kernels is kept as it is. For models that fit in memory; `model.load(path, quant=…)`
    streams a checkpoint instead."""
    qc = quant.parse(quant_spec)
    qcfg = cfg.replace(quant=qc)
    _, target = abstract_model(qcfg)
    src = dict(nnx.to_flat_state(state))
    for path, var in nnx.to_flat_state(target):
        if path[-1] == "scale" and path[:-1] + ("kernel",) in src and (path[:-1] + ("scale",)) not in src:
            continue  # filled with its kernel below
        w = src[path]
        w = w.get_value() if isinstance(w, nnx.Variable) else w
        if path[-1] == "kernel" and jnp.issubdtype(var.dtype, jnp.integer):
            svar = tree_get(target, path[:-1] + ("scale",))
            n_lead = 1 if (var.get_metadata().get("out_sharding") or (None,))[0] == "layers" else 0
            in_shape, out_shape = quant.layer_dims(qc, var.shape[n_lead:], svar.shape[n_lead:])
            q, sc = quant.quantizer(qc, in_shape, out_shape)(w)
            var.set_value(q)
            svar.set_value(sc)
        else:
            var.set_value(w)
    return qcfg, target


def weight_bytes(cfg: LlamaConfig, mesh: Mesh | None = None, rules=None) -> dict[str, int]:
    """Exact bytes of every parameter ("layers/attn/q/kernel", "layers/attn/q/scale", …) of `cfg`
    (quantized when cfg.quant is set): global bytes, or with `mesh` the bytes of one device's shard
    under the logical rules (the largest shard when a dimension splits unevenly)."""
    _, abstract = abstract_model(cfg)
    shardings = state_shardings(abstract, mesh, rules or RULES) if mesh is not None else None
    out = {}
    for path, v in nnx.to_flat_state(abstract):
        key = "/".join(str(k) for k in path)
        shape = v.shape
        if shardings is not None:
            shape = tree_get(shardings, path, value=True).shard_shape(v.shape)
        out[key] = quant.array_bytes(shape, v.dtype)
    return out
