"""Building blocks: parameters, RMSNorm, embeddings and rotary position embeddings (dense layers: dense.py).

Dimension alphabet, used in einsum strings and names throughout `model/`:
  B batch, T query length, S key length, D model dim, N query heads, K KV heads,
  G query heads per KV head, H head dim, F MLP dim, V vocab, L layers, R LoRA rank.

Parameters carry logical axis names (`out_sharding` metadata); `sharding/rules.py` maps them to a mesh.
Layer-stacked parameters (`layers=L`) get a leading `layers` axis and are run by a scan.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.network.config import LlamaConfig

# Logical names are metadata only: shardings are derived from them explicitly (sharding/rules.py).
nnx.use_eager_sharding(False)


def _stacked(shape, axes, layers):
    if layers is None:
        return tuple(shape), tuple(axes)
    return (layers, *shape), ("layers", *axes)


def param(rngs: nnx.Rngs | None, init, shape, axes, dtype, layers=None) -> nnx.Param:
    shape, axes = _stacked(shape, axes, layers)
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=axes)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, cfg: LlamaConfig, layers: int | None = None):
        self.eps = cfg.norm_eps
        shape, axes = _stacked((dim,), ("embed",), layers)
        self.scale = nnx.Param(jnp.ones(shape, jnp.dtype(cfg.param_dtype)), out_sharding=axes)

    def __call__(self, x: jax.Array) -> jax.Array:
        # As transformers: normalise in fp32, cast back to the input dtype, then scale.
        xf = x.astype(jnp.float32)
        y = (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)).astype(x.dtype)
        return y * self.scale[...].astype(x.dtype)


class Embed(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.compute_dtype = jnp.dtype(cfg.compute_dtype)
        self.embedding = param(rngs, nnx.initializers.normal(0.02), (cfg.vocab_size, cfg.dim),
                               ("vocab", "embed"), jnp.dtype(cfg.param_dtype))

    def __call__(self, tokens_BT: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], tokens_BT, axis=0).astype(self.compute_dtype)

    def attend(self, x_BTD: jax.Array) -> jax.Array:  # tied LM head
        return jnp.einsum("BTD,VD->BTV", x_BTD, self.embedding[...].astype(self.compute_dtype))


def rope_frequencies(cfg: LlamaConfig) -> np.ndarray:
    """Inverse frequencies [H/2], with llama3 scaling when configured.

    Computed on the host, step by step in float32 as transformers does, and handed to XLA as a
    constant: an in-graph version gets rewritten by the compiler, and a 1-ulp change of a frequency
    moves the angle at position 100,000 by ~0.01 rad.
    """
    H, f32 = cfg.head_dim, np.float32
    inv_freq = f32(1.0) / (f32(cfg.rope_theta) ** (np.arange(0, H, 2).astype(f32) / f32(H)))
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq
    old = f32(rs.original_max_position_embeddings)
    low_wl, high_wl = old / f32(rs.low_freq_factor), old / f32(rs.high_freq_factor)
    wavelen = f32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_wl, inv_freq / f32(rs.factor), inv_freq)
    smooth = (old / wavelen - f32(rs.low_freq_factor)) / f32(rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (f32(1) - smooth) * scaled / f32(rs.factor) + smooth * scaled
    medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
    return np.where(medium, smoothed, scaled).astype(f32)


def apply_rope(x_BTNH: jax.Array, positions_BT: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Half-split ("rotate_half") RoPE, the Hugging Face layout, computed in fp32."""
    freqs = positions_BT[..., None].astype(jnp.float32) * inv_freq  # [B, T, H/2]
    cos, sin = jnp.cos(freqs)[:, :, None, :], jnp.sin(freqs)[:, :, None, :]
    x = x_BTNH.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTNH.dtype)
