"""Attention: one interface, one implementation per backend, chosen in one place.

`attend(q, k, v, ...)` takes q [B,T,N,H] and k, v [B,S,K,H] with positions and segment ids for
both sides. A query sees a key when the key's position is not after its own and both belong to the
same segment (packed documents never see each other; segment 0 marks padding / empty cache slots).

Implementations:
  xla    the reference: plain einsums + fp32 softmax; runs everywhere and is the test oracle.
         For long query blocks (T > QUERY_CHUNK) the same computation runs as a scan over query
         chunks, rematerialised per chunk, so the fp32 scores held at once are [B,K,G,QUERY_CHUNK,S]
         rather than [B,K,G,T,S] (forward and backward). Each row's arithmetic is unchanged.
  cudnn  `jax.nn.dot_product_attention(implementation="cudnn")` (flash attention) on NVIDIA GPUs,
         for causal self-attention over whole sequences (training and prefill).
The choice is made by `choose()` from the backend and the config; anything an implementation
cannot do falls back to the reference.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)
IMPLEMENTATIONS = ("auto", "xla", "cudnn")
QUERY_CHUNK = 512  # queries per step of the chunked XLA path


def choose(requested: str, backend: str | None = None) -> str:
    if requested not in IMPLEMENTATIONS:
        raise ValueError(f"attention={requested!r}: expected one of {', '.join(IMPLEMENTATIONS)}")
    if requested != "auto":
        return requested
    backend = backend or jax.default_backend()
    return "cudnn" if backend == "gpu" else "xla"


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


def attend(q_BTNH, k_BSKH, v_BSKH, *, q_pos, k_pos, q_seg, k_seg, impl: str = "xla", causal_self: bool = False):
    """`causal_self`: the caller guarantees k/v are this call's own tokens at positions 0..T-1 of one
    segment each row (no packing, no cache), which is what the flash kernels handle."""
    if impl == "cudnn" and causal_self and q_BTNH.dtype in (jnp.bfloat16, jnp.float16):
        return cudnn_attention(q_BTNH, k_BSKH, v_BSKH)
    T = q_BTNH.shape[1]
    if T > QUERY_CHUNK and T % QUERY_CHUNK == 0:
        return xla_attention_chunked(q_BTNH, k_BSKH, v_BSKH, q_pos, k_pos, q_seg, k_seg, QUERY_CHUNK)
    return xla_attention(q_BTNH, k_BSKH, v_BSKH, q_pos, k_pos, q_seg, k_seg)
