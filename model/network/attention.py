"""Attention: one interface, one implementation per backend, chosen in one place.

`attend(q, k, v, ...)` takes q [B,T,N,H] and k, v [B,S,K,H] with positions and segment ids for
both sides. A query sees a key when the key's position is not after its own and both belong to the
same segment (packed documents never see each other; segment 0 marks padding / empty cache slots).

Implementations:
  xla    the reference: plain einsums + fp32 softmax; runs everywhere and is the test oracle.
         For long query blocks (T > QUERY_CHUNK) the same computation runs as a scan over query
         chunks, rematerialised per chunk, so the fp32 scores held at once are [B,K,G,QUERY_CHUNK,S]
         rather than [B,K,G,T,S] (forward and backward). Each row's arithmetic is unchanged.
         Self-attention up to QUERY_CHUNK tokens (unless the length is split over a mesh axis) runs in
         query blocks of CAUSAL_BLOCK, each over the keys up to its end only (causal by token index, as
         for splash below).
  cudnn  `jax.nn.dot_product_attention(implementation="cudnn")` (flash attention) on NVIDIA GPUs,
         for causal self-attention over whole sequences (training and prefill).
  splash the Pallas splash-attention kernel (`jax.experimental.pallas.ops.tpu.splash_attention`) on
         TPU, for self-attention over this call's tokens (training and prefill): causal, segment ids of
         packed rows, GQA (query heads share their KV head inside the kernel), no [T, S] scores in HBM
         forward or backward. Under a mesh it runs per device in `shard_map`: batch and heads split as
         the rules split the activations, queries split over `sequence` (contiguous blocks, the mask
         sharded with them), keys/values gathered over `sequence`. Causal by token index: a packed
         segment's positions count up by one from its start, as the data pipeline packs them.
The choice is made by `choose()` from the backend (the platform of the mesh being compiled for, so an
ahead-of-time TPU compile on a CPU machine gets splash) and the config; anything an implementation
cannot do falls back to the reference.
"""

from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sharding.rules import active_mesh, logical_to_spec

log = logging.getLogger(__name__)
IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
QUERY_CHUNK = 512  # queries per step of the chunked XLA path
CAUSAL_BLOCK = 64  # query block of the causal-blocks XLA path (self-attention up to QUERY_CHUNK tokens)
SPLASH_BLOCK = 512  # query / key block of the splash kernel (a multiple of 128 dividing the length)


def platform() -> str:
    """The platform being compiled for: the active mesh's (may be an AOT TPU topology), else the default."""
    mesh = active_mesh()
    if mesh is not None and mesh.devices.size:
        return mesh.devices.flat[0].platform
    return jax.default_backend()


def choose(requested: str, backend: str | None = None) -> str:
    """The implementation for `requested` ("auto" picks by backend: cudnn on GPU, splash on TPU, else xla).
    Called when the model is traced, so that `backend` defaults to the platform being compiled for."""
    if requested not in IMPLEMENTATIONS:
        raise ValueError(f"attention={requested!r}: expected one of {', '.join(IMPLEMENTATIONS)}")
    if requested != "auto":
        return requested
    backend = backend or platform()
    return {"gpu": "cudnn", "tpu": "splash"}.get(backend, "xla")


def xla_attention(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS, q_seg_BT, k_seg_BS):
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32)
    scores = scores * (H ** -0.5)
    visible_BTS = (q_pos_BT[:, :, None] >= k_pos_BS[:, None, :]) & (q_seg_BT[:, :, None] == k_seg_BS[:, None, :])
    scores = jnp.where(visible_BTS[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BSKH.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v_BSKH)
    return out.reshape(B, T, N, H)


def xla_attention_causal_blocks(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS, q_seg_BT, k_seg_BS, block: int):
    """`xla_attention` for self-attention over this call's tokens, in query blocks of `block` that skip the
    keys after the block: a key later in the row than its query is never visible (within a segment positions
    count up with the index; across segments nothing is visible), so only about half of the [T, S] scores
    are computed. Each row's arithmetic is unchanged. Three times faster than one [T, S] block on a CPU at
    T = 512 (forward and backward), as the blocks' scores stay small."""
    T = q_BTNH.shape[1]
    outs = []
    for start in range(0, T, block):
        q, end = slice(start, start + block), slice(0, start + block)
        outs.append(xla_attention(q_BTNH[:, q], k_BSKH[:, end], v_BSKH[:, end], q_pos_BT[:, q], k_pos_BS[:, end],
                                  q_seg_BT[:, q], k_seg_BS[:, end]))
    return jnp.concatenate(outs, axis=1)


def _length_is_split() -> bool:
    mesh = active_mesh()
    return mesh is not None and logical_to_spec(("length",), mesh, strict=False)[0] is not None


def xla_attention_chunked(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS, q_seg_BT, k_seg_BS, chunk: int):
    """`xla_attention` as a scan over `T // chunk` query chunks, each rematerialised in the backward pass.

    Chunks are strided (step i takes queries i, i+n, i+2n, ... with n = T // chunk), so when T is split
    over a mesh axis (sequence parallelism) every device works on its own queries at every step."""
    B, T, N, H = q_BTNH.shape
    n = T // chunk

    def split(a):  # [B, T, ...] -> [n, B, chunk, ...]; query t = c * n + i goes to step i, row c
        return jnp.moveaxis(a.reshape(B, chunk, n, *a.shape[2:]), 2, 0)

    @jax.checkpoint
    def step(carry, xs):
        q, pos, seg = xs
        return carry, xla_attention(q, k_BSKH, v_BSKH, pos, k_pos_BS, seg, k_seg_BS)

    _, out = jax.lax.scan(step, None, (split(q_BTNH), split(q_pos_BT), split(q_seg_BT)))
    return jnp.moveaxis(out, 0, 2).reshape(B, T, N, H)


def cudnn_attention(q_BTNH, k_BSKH, v_BSKH):
    return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, is_causal=True, implementation="cudnn")


def _splash_blocks(T: int, S: int) -> splash.BlockSizes:
    bq, bkv = math.gcd(T, SPLASH_BLOCK), math.gcd(S, SPLASH_BLOCK)
    return splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                             block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)


def splash_supported(q_BTNH, k_BSKH) -> bool:
    T, S = q_BTNH.shape[1], k_BSKH.shape[1]
    return T == S and T % 128 == 0 and q_BTNH.shape[2] % k_BSKH.shape[2] == 0


def splash_attention(q_BTNH, k_BSKH, v_BSKH, q_seg_BT, k_seg_BS, *, interpret: bool = False):
    """Causal self-attention with segment ids by the splash kernel; `interpret` runs the Pallas kernel
    in interpret mode (any backend: the tests' CPU check against `xla_attention`)."""
    B, T, N, H = q_BTNH.shape
    S = k_BSKH.shape[1]
    mesh = active_mesh()
    if mesh is not None and mesh.size == 1:
        mesh = None
    q = (q_BTNH.astype(jnp.float32) * H ** -0.5).astype(q_BTNH.dtype)
    q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k_BSKH, v_BSKH))  # [B, heads, length, H]
    q_spec = kv_spec = qs_spec = ks_spec = P()
    head_shards = seq_shards = 1
    if mesh is not None:
        q_spec = logical_to_spec(("batch", "heads", "length", "head_dim"), mesh, q.shape, what="splash queries")
        kv_spec = logical_to_spec(("batch", "kv_heads", None, "head_dim"), mesh, k.shape, what="splash keys")
        qs_spec, ks_spec = P(q_spec[0], q_spec[2]), P(kv_spec[0], None)
        if q_spec[1] != kv_spec[1]:
            raise ValueError(f"splash attention: query heads split {q_spec[1]} but KV heads {kv_spec[1]}; choose "
                             f"a tensor size dividing the {k.shape[1]} KV heads, or attention=xla")
        head_shards, seq_shards = (math.prod(mesh.shape[a] for a in _axes(s)) for s in (q_spec[1], q_spec[2]))
    mask = splash.MultiHeadMask([splash.CausalMask((T, S))] * N)
    kernel = splash.make_splash_mha(mask=mask, block_sizes=_splash_blocks(T, S), head_shards=head_shards,
                                    q_seq_shards=seq_shards, interpret=interpret)

    def local(q, k, v, q_seg, k_seg, kernel):
        seg = splash.SegmentIds(q_seg, k_seg)
        return jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=s))(q, k, v, seg)

    if mesh is None:
        out = local(q, k, v, q_seg_BT, k_seg_BS, kernel)
    else:
        kernel_spec = kernel.manual_sharding_spec(NamedSharding(mesh, P(q_spec[1], q_spec[2])))
        out = jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, qs_spec, ks_spec, kernel_spec),
                            out_specs=q_spec, check_vma=False)(q, k, v, q_seg_BT, k_seg_BS, kernel)
    return jnp.swapaxes(out, 1, 2)


def _axes(spec_entry) -> tuple[str, ...]:
    return () if spec_entry is None else (spec_entry,) if isinstance(spec_entry, str) else tuple(spec_entry)


def attend(q_BTNH, k_BSKH, v_BSKH, *, q_pos, k_pos, q_seg, k_seg, impl: str = "xla", causal_self: bool = False,
           self_attention: bool = False):
    """`causal_self`: the caller guarantees k/v are this call's own tokens at positions 0..T-1 of one
    segment each row (no packing, no cache), which is what the flash kernels handle. `self_attention`:
    k/v are this call's own tokens (no cache), rows possibly packed (splash handles the segments)."""
    if impl == "cudnn" and causal_self and q_BTNH.dtype in (jnp.bfloat16, jnp.float16):
        return cudnn_attention(q_BTNH, k_BSKH, v_BSKH)
    if impl == "splash" and (self_attention or causal_self) and splash_supported(q_BTNH, k_BSKH):
        return splash_attention(q_BTNH, k_BSKH, v_BSKH, q_seg, k_seg, interpret=platform() != "tpu")
    T = q_BTNH.shape[1]
    if self_attention and T <= QUERY_CHUNK and T % CAUSAL_BLOCK == 0 and T > CAUSAL_BLOCK and not _length_is_split():
        return xla_attention_causal_blocks(q_BTNH, k_BSKH, v_BSKH, q_pos, k_pos, q_seg, k_seg, CAUSAL_BLOCK)
    if T > QUERY_CHUNK and T % QUERY_CHUNK == 0:
        return xla_attention_chunked(q_BTNH, k_BSKH, v_BSKH, q_pos, k_pos, q_seg, k_seg, QUERY_CHUNK)
    return xla_attention(q_BTNH, k_BSKH, v_BSKH, q_pos, k_pos, q_seg, k_seg)
