"""The KV cache for serving: keys and values of every layer, slot and position, preallocated.

    k, v      [L, B, S, K, H]   logical axes ("layers", "batch", "cache_length", "kv_heads", "head_dim")
    int8:     k, v int8 plus k_scale, v_scale [L, B, S, K] float32 (one scale per token and KV head)

16-bit float caches (bfloat16, float16) are stored as their bits (uint16; `KVCache.dtype` says which
float): XLA:CPU updates a 16-bit float array by converting all of it to float32 and back, which would
cost a full pass over the cache for every token written. Integer updates are in place everywhere.

B is the number of batch slots (one request each), S the cache length per slot. KV heads carry the
logical name `kv_heads`, so `sharding/rules.py` splits them over the `tensor` mesh axis like the k/v
projection weights that produce them: each device attends with its own heads and nothing moves.

A forward pass with a cache (`Llama.__call__(..., cache=CacheUpdate(...))`) runs B' rows of T new
tokens. Row b is cache slot `rows[b]`; its tokens sit at `positions[b, t]`. Each layer first writes
its new keys/values at those positions (tokens of segment 0 are padding and are not written), then
attends over the first `kv_len` positions of the slot (a static bucket: the step compiles once per
bucket, not once per request). Positions beyond a token's own are masked by causality, so stale
entries left by an earlier request in the slot are never seen; key positions past the slot's last
written token carry segment 0 (empty).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from model.network.attention import attend
from model.network.backends import cpu_kernels
from model.network.config import LlamaConfig
from sharding.rules import RULES, constrain, named_sharding

AXES = ("layers", "batch", "cache_length", "kv_heads", "head_dim")
SCALE_AXES = AXES[:-1]
DTYPES = ("bfloat16", "float32", "float16", "int8")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k: jax.Array  # [L, B, S, K, H]
    v: jax.Array
    k_scale: jax.Array | None = None  # [L, B, S, K], int8 caches only
    v_scale: jax.Array | None = None
    dtype: str = dataclasses.field(default="float32", metadata=dict(static=True))  # what k and v hold

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    @property
    def slots(self) -> int:
        return self.k.shape[1]

    @property
    def length(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        return sum(int(x.size) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(self))


def resolve_dtype(kv_dtype: str, cfg: LlamaConfig) -> str:
    """"auto" is the model's compute dtype."""
    d = cfg.compute_dtype if kv_dtype == "auto" else kv_dtype
    if d not in DTYPES:
        raise ValueError(f"kv_dtype={kv_dtype!r}: expected auto or one of {', '.join(DTYPES)}")
    return d


def abstract(cfg: LlamaConfig, slots: int, length: int, dtype: str) -> KVCache:
    """Shapes and dtypes only (for sizing and ahead-of-time compilation)."""
    shape = (cfg.num_layers, slots, length, cfg.num_kv_heads, cfg.head_dim)
    if dtype == "int8":
        kv, sc = jax.ShapeDtypeStruct(shape, jnp.int8), jax.ShapeDtypeStruct(shape[:-1], jnp.float32)
        return KVCache(kv, kv, sc, sc, dtype=dtype)
    kv = jax.ShapeDtypeStruct(shape, _storage(dtype))
    return KVCache(kv, kv, dtype=dtype)


def _storage(dtype: str):
    """The array dtype that holds a cache of `dtype` (16-bit floats as their bits)."""
    return jnp.uint16 if jnp.dtype(dtype).itemsize == 2 else jnp.dtype(dtype)


def shardings(cache: KVCache, mesh: Mesh, rules=RULES) -> KVCache:
    def one(x, axes):
        return None if x is None else named_sharding(axes, mesh, x.shape, rules, what="kv cache")
    return KVCache(one(cache.k, AXES), one(cache.v, AXES), one(cache.k_scale, SCALE_AXES),
                   one(cache.v_scale, SCALE_AXES), dtype=cache.dtype)


def create(cfg: LlamaConfig, slots: int, length: int, dtype: str, mesh: Mesh, rules=RULES) -> KVCache:
    """A zero cache, created directly in its shardings."""
    abs_ = abstract(cfg, slots, length, dtype)
    return jax.jit(lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abs_),
                   out_shardings=shardings(abs_, mesh, rules))()


def _quantize(x_BTKH):
    xf = x_BTKH.astype(jnp.float32)
    scale = jnp.max(jnp.abs(xf), axis=-1) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(xf / scale[..., None]), -127, 127).astype(jnp.int8)
    return q, scale


@dataclasses.dataclass(frozen=True)
class CacheUpdate:
    """What a cached forward pass needs besides tokens and positions (see the module docstring).

    rows [B'] int32: the cache slot of each batch row. kv_len: positions attended over (static).
    layer_params: the block weights one layer at a time (unstacked), to run as an unrolled loop instead
    of the scan over the stacked weights: on CPU, a scan copies each layer's slice of every stacked
    weight before using it, which triples a decode step's memory traffic."""

    cache: KVCache
    rows: jax.Array
    kv_len: int
    layer_params: tuple | None = None
    # attention by backends/cpu_attention.cc: set where `cpu_kernels.enabled(mesh)` holds (the engine)
    cpu_kernels: bool = False

    def layer(self, cache: KVCache, layer, positions_BT, segments_BT) -> LayerCache:
        return LayerCache(cache, layer, self.rows, positions_BT, segments_BT, self.kv_len, self.cpu_kernels)


@dataclasses.dataclass(frozen=True)
class LayerCache:
    """One layer's view of the cache inside the layer scan (`layer` may be a traced index)."""

    cache: KVCache
    layer: jax.Array | int
    rows: jax.Array  # [B]
    positions: jax.Array  # [B, T]
    segments: jax.Array  # [B, T]; 0 = padding (not written)
    kv_len: int
    cpu_kernels: bool = False

    def attend(self, q_BTNH, k_BTKH, v_BTKH, impl: str):
        """Writes this step's keys/values, then attends q over the first kv_len positions of each row's
        slot; returns (output [B, T, N, H], updated cache)."""
        if self.cpu_kernels and cpu_kernels.attention_applies(self.cache):
            c = self.write(k_BTKH, v_BTKH)
            out = cpu_kernels.attention(q_BTNH, c, self.layer, self.rows, self.positions, self.segments, self.kv_len)
            return out, c
        k, v, k_pos, k_seg, c = self.update(k_BTKH, v_BTKH)
        return attend(q_BTNH, k, v, q_pos=self.positions, k_pos=k_pos, q_seg=self.segments, k_seg=k_seg, impl=impl), c

    def write(self, k_BTKH, v_BTKH) -> KVCache:
        """The cache with this step's keys/values written (padding tokens are not)."""
        c, i, rows, S = self.cache, self.layer, self.rows, self.cache.length
        write = jnp.where(self.segments > 0, self.positions, S)  # S is out of bounds: dropped
        r = rows[:, None]

        bits = c.k.dtype == jnp.uint16  # a 16-bit float cache held as bits

        def put(buf, new):
            if bits:
                new = jax.lax.bitcast_convert_type(new.astype(c.dtype), jnp.uint16)
            return buf.at[i, r, write].set(new.astype(buf.dtype), mode="drop")

        if c.quantized:
            (kq, ks), (vq, vs) = _quantize(k_BTKH), _quantize(v_BTKH)
            return KVCache(put(c.k, kq), put(c.v, vq), put(c.k_scale, ks), put(c.v_scale, vs), dtype=c.dtype)
        return KVCache(put(c.k, k_BTKH), put(c.v, v_BTKH), dtype=c.dtype)

    def update(self, k_BTKH, v_BTKH):
        """Writes this step's keys/values, then returns (k [B,S,K,H], v, k_pos [B,S], k_seg [B,S], cache)
        over the first kv_len positions of each row's slot."""
        c, i, rows = self.write(k_BTKH, v_BTKH), self.layer, self.rows
        bits = c.k.dtype == jnp.uint16

        def get(buf, like):
            x = buf[i, rows, :self.kv_len]
            return (jax.lax.bitcast_convert_type(x, jnp.dtype(c.dtype)) if bits else x).astype(like.dtype)

        n = self.kv_len
        if c.quantized:
            k = (c.k[i, rows, :n].astype(jnp.float32) * c.k_scale[i, rows, :n][..., None]).astype(k_BTKH.dtype)
            v = (c.v[i, rows, :n].astype(jnp.float32) * c.v_scale[i, rows, :n][..., None]).astype(v_BTKH.dtype)
        else:
            k, v = get(c.k, k_BTKH), get(c.v, v_BTKH)
        names = ("batch", "cache_length", "kv_heads", "head_dim")
        k, v = constrain(k, names), constrain(v, names)
        k_pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (rows.shape[0], n))
        last = jnp.max(jnp.where(self.segments > 0, self.positions, -1), axis=1)  # [B]
        k_seg = (k_pos <= last[:, None]).astype(jnp.int32)  # 0: empty (never written for this request)
        return k, v, k_pos, k_seg, c
