"""Attention over the paged KV pool (model/network/kv_cache.py) for one ragged serving step: one interface,
one implementation per backend, chosen in one place.

    attend(q [T, N, H], kv [num_blocks, block_size, 2K, H], scale [num_blocks, block_size, 2K] | None,
           meta: PagedMeta, impl) -> [T, N, H]

`kv` is one layer of the pool in its float dtype (or int8 with `scale`), already holding this step's
keys/values; key head k at combined head 2k, value head k at 2k+1. `meta` is the step in the convention of
`jax.experimental.pallas.ops.tpu.ragged_paged_attention`: T tokens flattened into one row (a bucket;
padding at the end), S sequences (rows past `num_seqs` are padding); sequence i's queries are tokens
cu_q_lens[i] .. cu_q_lens[i+1]-1 and are the last q_len_i of its kv_lens[i] keys; key j of sequence i
is at block page_indices[i, j // block_size], offset j % block_size. Outputs of padding tokens are
undefined.

Implementations:
  xla   the reference (the test oracle; runs everywhere, any mesh): a loop over chunks of query tokens; a
        chunk whose tokens all belong to one sequence (a prompt chunk) gathers that sequence's blocks once,
        any other chunk (decode tokens) gathers each token's own; then exactly `attention.xla_attention`
        (fp32 scores and softmax), so outputs equal the dense attention's up to summation order.
  pallas  TPU: JAX's ragged paged attention Pallas kernel (backends/tpu_paged.py; float pools, head_dim a
        multiple of 128), per device under shard_map on a mesh; in interpret mode it is tested on CPU.
  cpu   one CPU device: backends/cpu_attention.cc (float32, bfloat16 or int8 pools) in one custom call.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from model.network.attention import xla_attention
from model.network.backends import cpu_kernels, tpu_paged

IMPLEMENTATIONS = ("xla", "pallas", "cpu")
GATHER_ELEMENTS = 1 << 23  # keys x combined heads x head dim the reference gathers at once (per query chunk)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedMeta:
    """Where a step's tokens write and what each sequence attends to (T tokens, S sequences, P pages). int32."""

    slot_mapping: jax.Array  # [T]: block * block_size + offset where each token's k/v is written (padding: block 0)
    kv_lens: jax.Array  # [S]: keys per sequence including this step's tokens (0 for padding rows)
    page_indices: jax.Array  # [S, P]: each sequence's blocks in order (padding: block 0)
    cu_q_lens: jax.Array  # [S + 1]: cumulative query tokens per sequence
    num_seqs: jax.Array  # [1]: sequences in use

    @classmethod
    def abstract(cls, T: int, S: int, P: int) -> PagedMeta:
        i32 = jnp.int32
        return cls(jax.ShapeDtypeStruct((T,), i32), jax.ShapeDtypeStruct((S,), i32),
                   jax.ShapeDtypeStruct((S, P), i32), jax.ShapeDtypeStruct((S + 1,), i32),
                   jax.ShapeDtypeStruct((1,), i32))


def choose(mesh, kv_dtype: str | None = None, head_dim: int | None = None, cpu_kernels_on: bool = False) -> str:
    """The implementation for a step on `mesh` over a pool of `kv_dtype` (None: not known, the reference);
    `cpu_kernels_on`: the engine runs the CPU kernels (one CPU device, serve/layout.py)."""
    if kv_dtype is None:
        return "xla"
    if cpu_kernels_on and cpu_kernels.paged_attention_applies(kv_dtype):
        return "cpu"
    if mesh.devices.flat[0].platform == "tpu" and head_dim and tpu_paged.applies(kv_dtype, head_dim):
        return "pallas"
    return "xla"


def attend(q_TNH, kv, scale, meta: PagedMeta, impl: str = "xla", layer=None):
    """`layer` given: `kv` and `scale` are the whole stacked pool [L, ...] and `layer` the one to read (the CPU
    kernel reads it in place, bfloat16 as bits; the others get it sliced out, a float or int8 pool)."""
    if impl == "cpu" and layer is not None:
        return cpu_kernels.paged_attention(q_TNH, kv, scale, meta, layer)
    if layer is not None:
        kv, scale = kv[layer], None if scale is None else scale[layer]
    if impl == "xla":
        return xla_attend(q_TNH, kv, scale, meta)
    if impl == "pallas":  # TPU: JAX's ragged paged attention kernel (float pools, head_dim % 128 == 0)
        return tpu_paged.attend(q_TNH, kv, scale, meta)
    if impl == "cpu":  # one CPU device: backends/cpu_attention.cc
        return cpu_kernels.paged_attention(q_TNH, kv, scale, meta)
    raise ValueError(f"paged attention impl={impl!r}: expected one of {', '.join(IMPLEMENTATIONS)}")


def token_layout(meta: PagedMeta, T: int):
    """(sequence [T], position [T]) of every token (padding tokens: a clamped sequence, any position)."""
    t = jnp.arange(T, dtype=jnp.int32)
    S = meta.kv_lens.shape[0]
    seq = jnp.minimum(jnp.searchsorted(meta.cu_q_lens[1:], t, side="right"), S - 1).astype(jnp.int32)
    q_len = meta.cu_q_lens[seq + 1] - meta.cu_q_lens[seq]
    return seq, meta.kv_lens[seq] - q_len + (t - meta.cu_q_lens[seq])


def read_pages(kv, scale, pages, dtype):
    """kv[pages] as (k, v) [..., P * block_size, K, H] in `dtype` (int8 pools dequantized)."""
    x = kv[pages]  # [..., P, bs, 2K, H]
    *lead, P, bs, K2, H = x.shape
    if scale is not None:
        x = x.astype(jnp.float32) * scale[pages][..., None]
    x = x.astype(dtype).reshape(*lead, P * bs, K2 // 2, 2, H)
    return x[..., 0, :], x[..., 1, :]


def xla_attend(q_TNH, kv, scale, meta: PagedMeta):
    T, N, H = q_TNH.shape
    keys = meta.page_indices.shape[1] * kv.shape[1]
    k_pos = jnp.arange(keys, dtype=jnp.int32)
    seq, pos = token_layout(meta, T)
    C = T
    while C > 1 and C % 2 == 0 and C * keys * kv.shape[2] * H > GATHER_ELEMENTS:
        C //= 2

    def one_sequence(q, s, p):  # every query of the chunk is in sequence s[0]: its blocks once
        k, v = read_pages(kv, scale, meta.page_indices[s[0]], q.dtype)
        k_seg = (k_pos < meta.kv_lens[s[0]]).astype(jnp.int32)
        return xla_attention(q[None], k[None], v[None], p[None], k_pos[None], jnp.ones_like(p)[None], k_seg[None])[0]

    def per_token(q, s, p):  # each query its own sequence's blocks
        k, v = read_pages(kv, scale, meta.page_indices[s], q.dtype)
        k_seg = (k_pos[None] < meta.kv_lens[s][:, None]).astype(jnp.int32)
        return xla_attention(q[:, None], k, v, p[:, None], jnp.broadcast_to(k_pos, (q.shape[0], keys)),
                             jnp.ones_like(p)[:, None], k_seg)[:, 0]

    def chunk(xs):
        q, s, p = xs
        if q.shape[0] == 1:
            return per_token(q, s, p)
        return jax.lax.cond(jnp.all(s == s[0]), one_sequence, per_token, q, s, p)

    if C == T:
        return chunk((q_TNH, seq, pos))
    n = T // C
    out = jax.lax.map(chunk, (q_TNH.reshape(n, C, N, H), seq.reshape(n, C), pos.reshape(n, C)))
    return out.reshape(T, N, H)
