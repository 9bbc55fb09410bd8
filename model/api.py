"""Public entry points: `init` (random weights, or abstract shapes only) and `load` (a checkpoint
straight into a mesh's shardings), both returning a `Model`."""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from model import hf_format
from model import quant as quantization
from model.config import LlamaConfig
from model.llama import Llama
from model.safetensors_io import CheckpointError, HFCheckpoint
from sharding.mesh import single_device_mesh
from sharding.rules import RULES, named_sharding, use_mesh

log = logging.getLogger(__name__)


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


class Model:
    """A Llama with its weights on a mesh. `m(tokens)` -> float32 logits [B, T, V]."""

    def __init__(self, graphdef: nnx.GraphDef, state: nnx.State, config: LlamaConfig, mesh: Mesh):
        self.graphdef, self.state, self.config, self.mesh = graphdef, state, config, mesh
        self._forward = jax.jit(self._apply)

    def _apply(self, state, tokens, positions=None, segments=None):
        with use_mesh(self.mesh):
            return nnx.merge(self.graphdef, state)(tokens, positions, segments)

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
    mesh = mesh or single_device_mesh()
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
        _get(state, path).set_value(v.get_value())


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _device_put(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
    # Each process supplies only the shards it addresses: works for one host or many.
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


@jax.jit(donate_argnums=0)
def _set_layer(stacked, layer, i):
    return jax.lax.dynamic_update_index_in_dim(stacked, layer, i, 0)


def load(path: str | Path, *, dtype: str = "bfloat16", quant=None, mesh: Mesh | None = None,
         **config_overrides) -> Model:
    """Loads a Hugging Face checkpoint directory into `mesh` (one device when None).

    Tensors are read one at a time; a layer-stacked parameter is filled layer by layer in place, so
    host memory holds at most one HF tensor and no device ever holds an unsharded array.
    `quant` ("int8", "int4", "int4-g64" or a model.quant.QuantConfig) quantizes the targeted dense
    kernels tensor by tensor as they arrive (on device, in their shardings).
    """
    from model import checkpoint  # an Orbax checkpoint (python -m convert, model.checkpoint.save)?
    if checkpoint.is_checkpoint(path):
        return checkpoint.load(path, dtype=dtype, quant=quant, mesh=mesh, **config_overrides)
    path = Path(path)
    qc = quantization.parse(quant)
    if qc is not None:
        config_overrides["quant"] = qc
    cfg = LlamaConfig.from_hf(path, param_dtype=dtype, compute_dtype=dtype, **config_overrides)
    ckpt = HFCheckpoint(path)
    check_hf_tensors(ckpt, cfg)
    mesh = mesh or single_device_mesh()
    graphdef, abstract = abstract_model(cfg)
    shardings = state_shardings(abstract, mesh)
    target = jnp.dtype(dtype)
    state = abstract  # filled in place below
    for entry in hf_format.entries(cfg):
        var = _get(state, entry.path)
        sharding = _get(shardings, entry.path)
        if entry.path[-1] == "kernel" and "scale" in _get(state, entry.path[:-1]):
            _load_quantized(entry, ckpt, cfg, state, shardings, mesh)
            continue
        if not entry.stacked:
            var.set_value(_device_put(entry.to_ours(ckpt.read(entry.hf)).astype(target), sharding))
            continue
        layer_sharding = NamedSharding(mesh, jax.sharding.PartitionSpec(*sharding.spec[1:]))
        stacked = jax.jit(lambda: jnp.zeros(var.shape, target), out_shardings=sharding)()
        for i, name in enumerate(entry.hf_names(cfg)):
            layer = _device_put(entry.to_ours(ckpt.read(name)).astype(target), layer_sharding)
            stacked = _set_layer(stacked, layer, i)
        var.set_value(stacked)
    if cfg.lora is not None:
        init_adapters(cfg, state, mesh)
    log.info("loaded %s (%d parameters) onto a %s mesh", path, cfg.num_params(), dict(mesh.shape))
    return Model(graphdef, state, cfg, mesh)


def _zeros(shape, dtype, sharding):
    return jax.jit(jnp.zeros, static_argnums=(0, 1), out_shardings=sharding)(tuple(shape), jnp.dtype(dtype))


def _load_quantized(entry, ckpt, cfg, state, shardings, mesh) -> None:
    """A quantized dense kernel: each HF tensor (one layer) is quantized on device, in its shardings,
    as it arrives; no float copy of more than one layer's tensor ever exists."""
    qc = quantization.parse(cfg.quant)
    kvar, svar = _get(state, entry.path), _get(state, (*entry.path[:-1], "scale"))
    ksh, ssh = _get(shardings, entry.path), _get(shardings, (*entry.path[:-1], "scale"))
    lead = 1 if entry.stacked else 0
    kshape, sshape = kvar.shape[lead:], svar.shape[lead:]
    in_shape, out_shape = quantization.layer_dims(qc, kshape, sshape)

    def layer_of(sh):
        return NamedSharding(mesh, jax.sharding.PartitionSpec(*sh.spec[lead:]))

    kl, sl = layer_of(ksh), layer_of(ssh)
    quantize = quantization.quantizer(qc, in_shape, out_shape, (kl, sl))
    if not entry.stacked:
        q, s = quantize(_device_put(entry.to_ours(ckpt.read(entry.hf)), kl))
        kvar.set_value(q)
        svar.set_value(s)
        return
    qs = _zeros(kvar.shape, kvar.dtype, ksh)
    ss = _zeros(svar.shape, svar.dtype, ssh)
    for i, name in enumerate(entry.hf_names(cfg)):
        q, s = quantize(_device_put(entry.to_ours(ckpt.read(name)), kl))
        qs, ss = _set_layer(qs, q, i), _set_layer(ss, s, i)
    kvar.set_value(qs)
    svar.set_value(ss)


def check_hf_tensors(ckpt: HFCheckpoint, cfg: LlamaConfig) -> None:
    """Every expected tensor present once with its shape, nothing unexpected; errors name tensor and file."""
    expected = hf_format.expected_names(cfg)
    present = ckpt.names()
    missing = sorted(set(expected) - present)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{ckpt.dir}: missing tensor {missing[0]!r}{more}; config.json expects it")
    ignored = {"model.rotary_emb.inv_freq"} | ({"lm_head.weight"} if cfg.tie_embeddings else set())
    extra = sorted(present - set(expected) - ignored)
    if extra:
        raise CheckpointError(f"{ckpt.file_of(extra[0])}: unexpected tensor {extra[0]!r} (not part of a Llama with this config.json)")
    for name, shape in expected.items():
        if ckpt.shape(name) != shape:
            raise CheckpointError(f"{ckpt.file_of(name)}: tensor {name!r} has shape {list(ckpt.shape(name))}, "
                                  f"config.json implies {list(shape)}")
