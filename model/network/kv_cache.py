"""The KV cache for serving: a pool of fixed-size blocks per layer, shared by all requests.

    kv      [L, num_blocks, block_size, 2K, H]   logical axes ("layers", "kv_blocks", "block", "kv_heads",
                                                 "head_dim"); key head i at 2i, value head i at 2i+1
    int8:   kv int8 plus scale [L, num_blocks, block_size, 2K] float32 (one scale per token and head)

The combined head axis is the layout of `jax.experimental.pallas.ops.tpu.ragged_paged_attention`; it
carries the logical name `kv_heads`, so `sharding/rules.py` splits it over `tensor` like the k/v
projections that produce it (a contiguous split keeps each key/value pair on one device).

On CPU, 16-bit float caches (bfloat16, float16) are stored as their bits (uint16; `KVPool.dtype` says
which float): XLA:CPU updates a 16-bit float array by converting all of it to float32 and back. On TPU
and GPU they are stored as they are: there a bits-to-float conversion of the pool would be a copy of it.

A request owns a list of blocks (its block table, serve/blocks.py); token p of a request lives in block
table[p // block_size] at offset p % block_size. Block 0 is scratch: padding tokens write there and
padding rows of a block table point there, so it never holds a request's keys.

A forward pass with the pool (`Llama.__call__(tokens [1, T], ..., cache=CacheUpdate(...))`) runs one
flattened, ragged batch of T tokens (model/network/paged_attention.py: the step metadata). Each layer
writes its new keys/values at `meta.slot_mapping`, then attends over the blocks of each sequence. A float
or int8 pool is read in place: the stacked pool as one run of L x num_blocks pages, this layer's at page
indices offset by layer x num_blocks (slicing a layer out inside the layer loop would copy it, every layer
of every step: the whole pool read and written once more per step).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from model.network import paged_attention
from model.network.config import LlamaConfig
from model.network.paged_attention import PagedMeta
from sharding.rules import RULES, named_sharding

AXES = ("layers", "kv_blocks", "block", "kv_heads", "head_dim")
SCALE_AXES = AXES[:-1]
DTYPES = ("bfloat16", "float32", "float16", "int8")
SCRATCH = 0  # the scratch block


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVPool:
    kv: jax.Array  # [L, num_blocks, block_size, 2K, H]
    scale: jax.Array | None = None  # [L, num_blocks, block_size, 2K], int8 pools only
    dtype: str = dataclasses.field(default="float32", metadata=dict(static=True))  # what kv holds

    @property
    def quantized(self) -> bool:
        return self.scale is not None

    @property
    def num_blocks(self) -> int:
        return self.kv.shape[1]

    @property
    def block_size(self) -> int:
        return self.kv.shape[2]

    @property
    def nbytes(self) -> int:
        return sum(int(x.size) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(self))


def resolve_dtype(kv_dtype: str, cfg: LlamaConfig) -> str:
    """"auto" is the model's compute dtype."""
    d = cfg.compute_dtype if kv_dtype == "auto" else kv_dtype
    if d not in DTYPES:
        raise ValueError(f"kv_dtype={kv_dtype!r}: expected auto or one of {', '.join(DTYPES)}")
    return d


def abstract(cfg: LlamaConfig, num_blocks: int, block_size: int, dtype: str, platform: str = "cpu") -> KVPool:
    """Shapes and dtypes only (for sizing and ahead-of-time compilation), stored as on `platform`."""
    shape = (cfg.num_layers, num_blocks, block_size, 2 * cfg.num_kv_heads, cfg.head_dim)
    if dtype == "int8":
        return KVPool(jax.ShapeDtypeStruct(shape, jnp.int8), jax.ShapeDtypeStruct(shape[:-1], jnp.float32), dtype)
    return KVPool(jax.ShapeDtypeStruct(shape, _storage(dtype, platform)), dtype=dtype)


def as_bits(platform: str) -> bool:
    """Whether 16-bit float arrays that a step updates or gathers from are handled as their uint16 bits on
    `platform`: on CPU only (XLA:CPU converts a whole 16-bit float array to float32 and back to update or
    gather from it; elsewhere the bits-to-float conversion is what copies the whole array)."""
    return platform == "cpu"


def _storage(dtype: str, platform: str):
    """The array dtype that holds a cache of `dtype` on `platform` (on CPU, 16-bit floats as their bits)."""
    return jnp.uint16 if as_bits(platform) and jnp.dtype(dtype).itemsize == 2 else jnp.dtype(dtype)


def shardings(pool: KVPool, mesh: Mesh, rules=RULES) -> KVPool:
    def one(x, axes):
        return None if x is None else named_sharding(axes, mesh, x.shape, rules, what="kv cache")
    return KVPool(one(pool.kv, AXES), one(pool.scale, SCALE_AXES), dtype=pool.dtype)


def create(cfg: LlamaConfig, num_blocks: int, block_size: int, dtype: str, mesh: Mesh, rules=RULES) -> KVPool:
    """A zero pool, created directly in its shardings."""
    abs_ = abstract(cfg, num_blocks, block_size, dtype, mesh.devices.flat[0].platform)
    return jax.jit(lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abs_),
                   out_shardings=shardings(abs_, mesh, rules))()


def quantize(x):
    """x [..., H] -> (int8 [..., H], float32 scale [...]): symmetric, one scale per vector."""
    xf = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(xf), axis=-1) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)
    return jnp.clip(jnp.round(xf / scale[..., None]), -127, 127).astype(jnp.int8), scale


def write(pool: KVPool, layer, k_TKH, v_TKH, slot_mapping_T) -> KVPool:
    """The pool with token t's key/value written to slot slot_mapping[t] (block * block_size + offset) of
    `layer` (a traced index inside a scan)."""
    T, K, H = k_TKH.shape
    new = jnp.stack([k_TKH, v_TKH], axis=2).reshape(T, 2 * K, H)  # key head i at 2i, value at 2i+1
    bs = pool.block_size
    block, off = slot_mapping_T // bs, slot_mapping_T % bs
    if pool.quantized:
        q, s = quantize(new)
        return KVPool(pool.kv.at[layer, block, off].set(q), pool.scale.at[layer, block, off].set(s), pool.dtype)
    if pool.kv.dtype == jnp.uint16:
        new = jax.lax.bitcast_convert_type(new.astype(pool.dtype), jnp.uint16)
    return KVPool(pool.kv.at[layer, block, off].set(new.astype(pool.kv.dtype)), dtype=pool.dtype)


@dataclasses.dataclass(frozen=True)
class CacheUpdate:
    """What a forward pass over the pool needs besides tokens and positions: the pool, the step's metadata,
    the attention implementation (paged_attention.IMPLEMENTATIONS), for the unrolled layout the block
    weights one layer at a time (`layer_params`), and whether 16-bit floats go as bits (`as_bits`)."""

    cache: KVPool
    meta: PagedMeta
    impl: str = "xla"
    layer_params: tuple | None = None
    bits: bool = True

    def layer(self, cache: KVPool, layer, positions_BT=None, segments_BT=None) -> LayerCache:
        return LayerCache(cache, layer, self.meta, self.impl)


@dataclasses.dataclass(frozen=True)
class LayerCache:
    """One layer's view of the pool inside the layer loop (`layer` may be a traced index)."""

    cache: KVPool
    layer: jax.Array | int
    meta: PagedMeta
    impl: str

    def attend(self, q_BTNH, k_BTKH, v_BTKH, impl: str = "xla"):
        """Writes this step's keys/values (batch 1 of T flattened tokens), then attends; returns (output
        [1, T, N, H], updated pool). The model's own `impl` (dense attention) is not used here."""
        c = write(self.cache, self.layer, k_BTKH[0], v_BTKH[0], self.meta.slot_mapping)
        if self.impl == "cpu":  # the kernel reads the layer in the stacked pool, 16-bit floats as bits
            return paged_attention.attend(q_BTNH[0], c.kv, c.scale, self.meta, self.impl, self.layer)[None], c
        if c.kv.dtype == jnp.uint16:  # CPU storage: this layer's blocks as floats (a copy, made to convert)
            kv = jax.lax.bitcast_convert_type(c.kv[self.layer], jnp.dtype(c.dtype))
            return paged_attention.attend(q_BTNH[0], kv, None, self.meta, self.impl)[None], c
        nb = c.num_blocks

        def pages(a):  # [L, num_blocks, ...] -> [L * num_blocks, ...]: a bitcast, nothing copied
            return None if a is None else a.reshape(-1, *a.shape[2:])

        meta = dataclasses.replace(self.meta, page_indices=self.meta.page_indices + self.layer * nb)
        return paged_attention.attend(q_BTNH[0], pages(c.kv), pages(c.scale), meta, self.impl)[None], c

