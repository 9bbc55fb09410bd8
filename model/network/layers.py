"""Building blocks: dense (einsum) layers, RMSNorm, embeddings and rotary position embeddings.

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

from model.network import cpu_kernels, lora, quant
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


class Dense(nnx.Module):
    """`y = einsum(eq, x, kernel)`; the kernel's shape is its input dims followed by its output dims.

    Quantization and LoRA (model/quant.py, model/lora.py) extend this layer in place: the base
    weight keeps the path `…/kernel` with or without them.
    """

    def __init__(self, name: str, eq: str, in_shape, out_shape, axes, *, cfg: LlamaConfig, rngs: nnx.Rngs,
                 layers: int | None = None):
        self.name = name  # q, k, v, o, gate, up, down or lm_head: what LoRA/quant targets select
        self.eq = eq
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.compute_dtype = jnp.dtype(cfg.compute_dtype)
        std = 1.0 / math.sqrt(math.prod(in_shape))
        self.kernel = param(rngs, nnx.initializers.normal(std), (*in_shape, *out_shape), axes,
                            jnp.dtype(cfg.param_dtype), layers)
        self.quant = quant.for_layer(cfg.quant, name, eq, self.in_shape, self.out_shape)
        if self.quant is not None:  # integer kernel under the same path, plus its scales
            self.kernel, self.scale = quant.quantize_param(self.kernel, self.quant, self.in_shape, self.out_shape)
        self.has_lora = cfg.lora is not None and name in cfg.lora.targets
        if self.has_lora:
            n = len(self.in_shape)
            lora.add_adapters(self, cfg.lora, self.in_shape, self.out_shape, axes[:n], axes[n:], layers, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return project(x, self)[0]

    def base(self, x: jax.Array) -> jax.Array:
        """The product with the base weight (no LoRA) of x already in the compute dtype."""
        if self.quant is not None:
            return quant.matmul(x, self.kernel[...], self.scale[...], self.quant, self.in_shape, self.out_shape,
                                self.compute_dtype)
        return jnp.einsum(self.eq, x, self.kernel[...].astype(self.compute_dtype))


def project(x: jax.Array, *layers: Dense) -> list[jax.Array]:
    """[layer(x) for layer in layers] for Dense layers sharing their input (q, k, v; gate, up): with kernels
    the serving engine packed for model/cpu_gemv.cc, one call computes them all."""
    x = x.astype(layers[0].compute_dtype)
    ys = cpu_kernels.dense(layers, x)
    if ys is None:
        ys = [d.base(x) for d in layers]
    return [y + lora.delta(d, x, d.eq) if d.has_lora else y for d, y in zip(layers, ys)]


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
