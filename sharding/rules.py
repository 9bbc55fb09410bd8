"""The one table from logical axis names to mesh axes, and the helpers that apply it.

Model code names its dimensions (`embed`, `heads`, `batch`, ...); this module decides where they
live on a mesh. Changing the parallelism strategy is an edit to `RULES` (or a `rules=` argument).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# logical axis -> mesh axes, in priority order. A mesh axis is used at most once per array: when an
# earlier dimension already took it, a later one stays replicated (e.g. activations [batch, length,
# embed] put fsdp on batch, so `embed` is not also split over fsdp there).
RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", ("sequence",)),
    ("cache_length", ()),
    ("layers", ()),
    ("vocab", ("tensor",)),
    ("embed", ("fsdp", "sequence")),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("head_dim", ()),
    ("mlp", ("tensor",)),
    ("lora_rank", ()),
    ("groups", ()),
)


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


def named_sharding(names, mesh: Mesh, shape=None, rules=RULES, what="array") -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, mesh, shape, rules, what))


def tree_shardings(abstract_tree, axes_tree, mesh: Mesh, rules=RULES):
    """Shardings for a tree of ShapeDtypeStructs given a matching tree of logical-name tuples."""
    def one(path, leaf, names):
        return named_sharding(names, mesh, leaf.shape, rules, what=jax.tree_util.keystr(path))
    return jax.tree_util.tree_map_with_path(
        one, abstract_tree, axes_tree, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))


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


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; a no-op when no mesh is active."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, mesh, x.shape, rules, strict=False)))
