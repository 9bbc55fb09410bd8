"""Dense (einsum) layers, as the model builds them.

`Dense` is the plain layer: a kernel [*in, *out] and `einsum(eq, x, kernel)`. Quantization and LoRA are
variants of it, chosen in one place, `make_dense`, when the model is built (from `cfg.quant`, `cfg.lora`):

  QuantizedDense   the integer kernel under the same path `…/kernel`, plus `…/scale`; the product is
                   `quant.matmul` (integer weight in the dot, scales on the output: no dequantized copy)
  LoRADense        adds `…/lora_a`, `…/lora_b` (`nnx.LoRAParam`) and their delta to the base product
  QLoRADense       both: adapters over an integer base
  SlotLoRADense    serving: `slots` adapters side by side, each token applying its own (lora.LoraSlots);
  QSlotLoRADense   the same over an integer base

The variants are subclasses rather than wrappers holding a base layer: an attribute holding a module
adds a level to its parameter paths (`…/q/base/kernel`), and checkpoints and the HF/PEFT name tables
need `…/kernel` to mean the same weight with and without quantization and adapters.

`project(x, *layers)` runs the products of layers that share their input (q, k, v; gate, up). Kernels
packed for the CPU backend (`pack_cpu`; model/network/backends/cpu_kernels.py) run there, all in one
call; every other product is XLA's.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from model.network import lora as lora_lib
from model.network import quant as quant_lib
from model.network.backends import cpu_kernels
from model.network.config import LlamaConfig
from model.network.layers import param
from sharding import rules


class Dense(nnx.Module):
    """`y = einsum(eq, x, kernel)`; the kernel's shape is its input dims followed by its output dims."""

    def __init__(self, name: str, eq: str, in_shape, out_shape, axes, *, cfg: LlamaConfig, rngs: nnx.Rngs,
                 layers: int | None = None):
        self.name = name  # q, k, v, o, gate, up, down or lm_head: what LoRA/quant targets select
        self.eq = eq
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.compute_dtype = jnp.dtype(cfg.compute_dtype)
        std = 1.0 / math.sqrt(math.prod(in_shape))
        self.kernel = param(rngs, nnx.initializers.normal(std), (*in_shape, *out_shape), axes,
                            jnp.dtype(cfg.param_dtype), layers)

    def __call__(self, x: jax.Array) -> jax.Array:
        return project(x, self)[0]

    def product(self, x: jax.Array) -> jax.Array:
        """The product with the layer's weight of x already in the compute dtype."""
        return jnp.einsum(self.eq, x, self.kernel[...].astype(self.compute_dtype))


class QuantizedDense(Dense):
    """`Dense` with an int8/int4 kernel at `kernel` (same shape) and its scales at `scale` (model/network/quant.py)."""

    def __init__(self, name: str, eq: str, in_shape, out_shape, axes, *, quant: quant_lib.QuantConfig, **kw):
        super().__init__(name, eq, in_shape, out_shape, axes, **kw)
        self.quant = quant
        self.in_axes = tuple(axes[:len(self.in_shape)])
        self.kernel, self.scale = quant_lib.quantize_param(self.kernel, quant, self.in_shape, self.out_shape)

    def product(self, x: jax.Array) -> jax.Array:
        return quant_lib.matmul(x, self.kernel[...], self.scale[...], self.quant, self.in_shape, self.out_shape,
                                self.compute_dtype, rules.shards(self.in_axes, self.in_shape))


class LoRADense(Dense):
    """`Dense` plus LoRA adapters `lora_a`, `lora_b` beside its kernel (model/network/lora.py)."""

    def __init__(self, name: str, eq: str, in_shape, out_shape, axes, *, lora: lora_lib.LoraConfig,
                 rngs: nnx.Rngs, layers: int | None = None, **kw):
        super().__init__(name, eq, in_shape, out_shape, axes, rngs=rngs, layers=layers, **kw)
        self.lora = lora
        n = len(self.in_shape)
        self.lora_a, self.lora_b = lora_lib.adapters(lora, self.in_shape, self.out_shape, axes[:n], axes[n:],
                                                     layers, rngs, name)

    def delta(self, x: jax.Array) -> jax.Array:
        """The adapters' contribution for x (in the compute dtype), added to the base product."""
        return lora_lib.delta(x, self.lora_a[...], self.lora_b[...], self.eq, self.lora, self.name)


class QLoRADense(LoRADense, QuantizedDense):
    """LoRA adapters over an integer base (QLoRA): the adapters train, the base stays quantized."""


class SlotLoRADense(LoRADense):
    """`lora_a` [slots, *in, R], `lora_b` [slots, R, *out] (after `layers`): each token of a serving step
    adds its own slot's delta (lora.token_slots); outside a serving step, none."""

    def delta(self, x: jax.Array) -> jax.Array:
        rows = lora_lib.current_token_slots()
        if rows is None:
            return jnp.zeros((), x.dtype)
        return lora_lib.slot_delta(x, self.lora_a[...], self.lora_b[...], self.eq, rows)


class QSlotLoRADense(SlotLoRADense, QuantizedDense):
    """Adapter slots over an integer base."""


def make_dense(name: str, eq: str, in_shape, out_shape, axes, *, cfg: LlamaConfig, rngs: nnx.Rngs,
               layers: int | None = None) -> Dense:
    """The dense layer `name` of the model `cfg` describes: quantized if it is a `cfg.quant` target, with
    adapters if it is a `cfg.lora` target. `axes`: logical names of the kernel's dims; `layers`: stacked."""
    qc = quant_lib.for_layer(cfg.quant, name, eq, in_shape, out_shape)
    lc = cfg.lora if cfg.lora is not None and name in cfg.lora.targets else None
    kw = dict(cfg=cfg, rngs=rngs, layers=layers)
    if qc is not None:
        kw["quant"] = qc
    if lc is not None:
        kw["lora"] = lc
    if isinstance(lc, lora_lib.LoraSlots):
        cls = QSlotLoRADense if qc is not None else SlotLoRADense
    else:
        cls = {(False, False): Dense, (True, False): QuantizedDense,
               (False, True): LoRADense, (True, True): QLoRADense}[qc is not None, lc is not None]
    return cls(name, eq, in_shape, out_shape, axes, **kw)


def project(x: jax.Array, *layers: Dense) -> list[jax.Array]:
    """[layer(x) for layer in layers] for dense layers sharing their input (q, k, v; gate, up): with
    kernels packed for the CPU backend, one call computes all the base products."""
    x = x.astype(layers[0].compute_dtype)
    ys = _cpu_products(layers, x)
    if ys is None:
        ys = [d.product(x) for d in layers]
    return [y + d.delta(x) if isinstance(d, LoRADense) else y for d, y in zip(layers, ys)]


# ---------------------------------------------------------------------------------------------
# The CPU backend's layout (model/network/backends/cpu_kernels.py): packing and the packed product

def _stored(d: Dense) -> tuple[jax.Array, jax.Array | None, int]:
    """(kernel, scale or None, group size) as the layer stores them."""
    if isinstance(d, QuantizedDense):
        return d.kernel[...], d.scale[...], d.quant.group_size
    return d.kernel[...], None, 0


def _pack(d: Dense) -> None:
    """Puts a one-layer (unstacked) kernel the CPU kernels cover in their layout, marked `cpu_layout`."""
    kernel, scale, group = _stored(d)
    K, N = math.prod(d.in_shape), math.prod(d.out_shape)
    if kernel.ndim != len(d.in_shape) + len(d.out_shape) or not cpu_kernels.covers(
            kernel.dtype, None if scale is None else scale.dtype, group, d.compute_dtype, K, N):
        return
    wt, st = cpu_kernels.pack(kernel, scale, group, K, N)
    d.kernel = nnx.Param(wt, **{**d.kernel.get_metadata(), "cpu_layout": cpu_kernels.LAYOUT})
    if group:
        d.scale = nnx.Param(st, **d.scale.get_metadata())


def pack_cpu(graphdef: nnx.GraphDef, state: nnx.State) -> nnx.State:
    """`state` with every dense kernel the CPU kernels cover transposed to [out, in] and marked (int4 scales
    to [out, in / group]); the arrays are new, the input state is left as it was. For a mesh where
    `cpu_kernels.enabled` holds."""
    module = nnx.merge(graphdef, state, copy=True)
    for _, node in nnx.iter_graph(module):
        if isinstance(node, Dense) and not cpu_kernels.is_packed(node):
            _pack(node)
    return nnx.split(module)[1]


def _cpu_products(layers, x: jax.Array) -> list[jax.Array] | None:
    """The base products of `layers` (sharing input x) by the CPU kernels in one call, when all their kernels
    are packed alike; else None (XLA's dot). LoRA, if any, is added by the caller as usual."""
    first = layers[0]
    stored = [_stored(d) for d in layers]
    dtype, group = stored[0][0].dtype, stored[0][2]
    if not all(cpu_kernels.is_packed(d) and w.dtype == dtype and g == group and d.in_shape == first.in_shape
               for d, (w, _, g) in zip(layers, stored)):
        return None
    prefix = x.shape[:x.ndim - len(first.in_shape)]
    weights = []
    for d, (w, s, _) in zip(layers, stored):
        N = math.prod(d.out_shape)
        weights.append((w, None if s is None else s.reshape(N, -1) if group else s.reshape(N)))
    ys = cpu_kernels.gemv(x.reshape(math.prod(prefix), math.prod(first.in_shape)), weights, group)
    return [y.astype(d.compute_dtype).reshape(*prefix, *d.out_shape) for d, y in zip(layers, ys)]
