"""The one table from logical axis names to mesh axes, and the helpers that apply it.

Model code names its dimensions (`embed`, `heads`, `batch`, ...); this module decides where they
live on a mesh. Changing the parallelism strategy is an edit to `RULES` (or a `rules=` argument).

Parameters: `embed` is split over fsdp (and sequence), `heads`/`kv_heads`/`mlp`/`vocab` over tensor,
so every large weight is sharded over the whole mesh and FSDP all-gathers one layer at a time.
Activations: `batch` over data x fsdp, `length` over sequence, heads/mlp/vocab over tensor.
Serving (`SERVE_RULES`) differs in one entry: the batch is split over data only, so weights stay put
(2-D weight-stationary) and a KV cache [layers, batch, cache_length, kv_heads, head_dim] splits its
batch over data, its length over sequence and its heads over tensor.

Sharded creation and restoration: `abstract_arrays` pairs abstract shapes with their shardings
(what `jax.jit(...).lower` and Orbax restore take), so no process ever holds an unsharded copy of a
large array (`jax.jit(init, out_shardings=…)` creates; model/formats/checkpoint.py restores).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Sequence

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

# logical axis -> mesh axes, in priority order. A mesh axis is used at most once per array: when an
# earlier dimension already took it, a later one stays replicated (e.g. activations [batch, length,
# embed] put fsdp on batch, so `embed` is not also split over fsdp there).
RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", ("sequence",)),
    ("cache_length", ("sequence",)),
    ("kv_blocks", ()),  # the serving block pool (model/network/kv_cache.py): blocks and their tokens
    ("block", ()),
    ("layers", ()),
    ("vocab", ("tensor",)),
    ("embed", ("fsdp", "sequence")),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("head_dim", ()),
    ("mlp", ("tensor",)),
    ("lora_rank", ("fsdp", "sequence")),  # best effort (see BEST_EFFORT): adapters and their Adam state
    ("groups", ()),
)


# Logical axes whose mesh axes are used only as far as they divide the dimension (the longest prefix
# that does), instead of being an error: a LoRA rank of 8 on fsdp=16 stays replicated.
BEST_EFFORT = frozenset({"lora_rank"})

# Serving: the same table except that the batch is split over `data` only. Weights stay where they
# are (2-D weight-stationary: D over fsdp, heads/MLP/vocab over tensor) and activations move instead
# (partial sums reduced over fsdp), so a decode step never all-gathers a weight. The KV cache splits
# its heads over tensor and its length over sequence, and is replicated over fsdp.
SERVE_RULES = tuple((name, ("data",)) if name == "batch" else (name, axes) for name, axes in RULES)


def rules_for(mode: str):
    """The rules table for a job: "serve" or a training mode ("lora", "qlora", "full")."""
    return SERVE_RULES if mode == "serve" else RULES


def _lookup(rules, name):
    for logical, mesh_axes in rules:
        if logical == name:
            return mesh_axes
    raise KeyError(f"logical axis {name!r} has no rule; known: {', '.join(r[0] for r in rules)}")


def logical_to_spec(names: Sequence[str | None], mesh: Mesh, shape: Sequence[int] | None = None,
                    rules=RULES, what: str = "array", strict: bool = True) -> P:
    """PartitionSpec for an array whose dimensions carry `names`, on `mesh`.

    With `shape`, a dimension that its mesh axes do not divide is an error naming both (or, with
    strict=False, stays replicated: activations such as a batch of 1 while decoding).
    """
    used: set[str] = set()
    spec = []
    for i, name in enumerate(names):
        axes = []
        if name is not None:
            for ax in _lookup(rules, name):
                if ax in mesh.shape and mesh.shape[ax] > 1 and ax not in used:
                    axes.append(ax)
        if shape is not None and axes and name in BEST_EFFORT:
            while axes and shape[i] % math.prod(mesh.shape[a] for a in axes):
                axes.pop()
        if shape is not None and axes:
            size = math.prod(mesh.shape[a] for a in axes)
            if shape[i] % size and not strict:
                axes = []
            elif shape[i] % size:
                raise ValueError(
                    f"{what}: dimension {i} ({name!r}, size {shape[i]}) is not divisible by mesh axes "
                    f"{'×'.join(axes)} = {size}; choose a mesh whose {'/'.join(axes)} size divides {shape[i]}"
                )
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return P(*spec)


def named_sharding(names, mesh: Mesh, shape=None, rules=RULES, what="array", strict: bool = True) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, mesh, shape, rules, what, strict))


def shard_shape(names, shape, mesh, rules=RULES, what="array") -> tuple[int, ...]:
    """Shape of one device's shard; `mesh` may be a jax.sharding.AbstractMesh (no devices needed)."""
    spec = logical_to_spec(names, mesh, shape, rules, what)
    out = []
    for dim, axes in zip(shape, (*spec, *(None,) * (len(shape) - len(spec)))):
        axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
        out.append(-(-dim // math.prod(mesh.shape[a] for a in axes)))
    return tuple(out)


def abstract_arrays(abstract_tree, shardings):
    """ShapeDtypeStructs carrying their shardings: the arguments of an ahead-of-time `lower`, or the
    target of an Orbax restore that reads each shard straight onto its device. Works on plain trees
    and on nnx.State trees (Variables keep their metadata)."""
    def is_var(x):
        return hasattr(x, "get_metadata") and hasattr(x, "replace")

    def one(x, s):
        s = s.get_value() if is_var(s) else s
        sds = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
        return x.replace(value=sds) if is_var(x) else sds

    return jax.tree.map(one, abstract_tree, shardings, is_leaf=is_var)


_ACTIVE: contextvars.ContextVar[tuple[Mesh, tuple] | None] = contextvars.ContextVar("mesh_rules", default=None)


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None, rules=RULES):
    """Within this context, `constrain` pins activations to `mesh` by the rules."""
    token = _ACTIVE.set(None if mesh is None else (mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_mesh() -> Mesh | None:
    active = _ACTIVE.get()
    return None if active is None else active[0]


def shards(names: Sequence[str | None], shape: Sequence[int]) -> int:
    """Devices that the dimensions named split over on the active mesh, by its rules (1 without one)."""
    active = _ACTIVE.get()
    if active is None:
        return 1
    mesh, rules = active
    spec = logical_to_spec(names, mesh, shape, rules, strict=False)
    return math.prod(mesh.shape[a] for axes in spec if axes for a in ((axes,) if isinstance(axes, str) else axes))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; a no-op when no mesh is active."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, mesh, x.shape, rules, strict=False)))
