"""Weight-only quantization: int8 per output channel, int4 per group of input rows; no dequantized copies.

A `QuantizedDense` (model/network/dense.py) keeps its integer weight under the same path `…/kernel` (same
shape as the float kernel, [*in, *out], dtype int8 or int4) plus `…/scale`:

  int8 (group_size 0): scale [*out]              y = (x · q) ⊙ s                 (scale on the output)
  int4 (group_size g): scale [I/g, *out]          y = Σ_groups (x_g · q_g) ⊙ s_g   (contract per group)

where I = prod(in dims) is the contraction dimension, split into (groups, group_size) in row-major order
(for `o`, whose input dims are (N, H), groups run over the flattened N·H). Values are symmetric
round-to-nearest: q = round(w / s), s = absmax / qmax with qmax 127 (int8) or 7 (int4), and s rounded to
its storage dtype *before* q is computed, so a bf16 scale costs no accuracy. int4 arrays are stored
packed, two per byte, by XLA on TPU, GPU and CPU.

The matmul keeps the integer weight as the dot operand (`x · q.astype(bf16)`), scales applied to the
output (int8) or to per-group partial sums (int4 while decoding: [tokens, groups, out]); for int4 with
many tokens (prefill, QLoRA training) it scales row chunks of the weight and contracts them. On TPU
and GPU the int->float convert fuses into the dot, so the one-shot int8 form has the temporaries of
a bf16 einsum (measured: 0 bytes on v6e AOT, the same as bf16 on an H200); XLA:CPU materialises it.
Wherever one step's temporaries (converted rows, partial sums, scaled rows) would exceed
`QuantConfig.chunk_bytes` the contraction runs as a loop over row chunks: temporaries are bounded by a
constant, not by the weight size (tests/test_quant.py checks this with `memory_analysis()`).

Parameter shardings: the kernel keeps its logical axes; the scale carries the logical names of the
dims it indexes (the group dim takes the name of the first input dim: `embed` for q/k/v/gate/up,
`heads` for o, `mlp` for down), so scales shard with their weights.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from sharding.rules import active_mesh

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # the block projections: default quant and LoRA targets
QUANTIZABLE = (*TARGETS, "lm_head")  # the LM head only when asked for; the embedding stays float
BITS = {8: jnp.int8, 4: jnp.int4}
QMAX = {8: 127, 4: 7}
SCALE_DTYPES = ("bfloat16", "float32", "float16")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """bits 8 or 4. group_size: rows of the contraction dim per scale; 0 = one scale per output channel;
    None = the default for the width (0 for int8, 128 for int4). chunk_bytes bounds the matmul's
    temporaries per loop step (see module docstring)."""

    bits: int = 8
    group_size: int | None = None
    targets: tuple[str, ...] = TARGETS
    scale_dtype: str = "bfloat16"
    chunk_bytes: int = 64 << 20

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.bits not in BITS:
            raise ValueError(f"quant.bits={self.bits!r} is not supported for layers {', '.join(self.targets)}: "
                             f"expected 8 (int8) or 4 (int4)")
        if self.group_size is None:
            object.__setattr__(self, "group_size", 128 if self.bits == 4 else 0)
        if not isinstance(self.group_size, int) or self.group_size < 0:
            raise ValueError(f"quant.group_size={self.group_size!r}: expected a positive number of rows, "
                             f"or 0 for one scale per output channel")
        bad = [t for t in self.targets if t not in QUANTIZABLE]
        if bad:
            raise ValueError(f"quant.targets: unknown layer {bad[0]!r}; quantizable: {', '.join(QUANTIZABLE)}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"quant.scale_dtype={self.scale_dtype!r}: expected one of {', '.join(SCALE_DTYPES)}")
        if self.chunk_bytes < 1:
            raise ValueError(f"quant.chunk_bytes must be positive, got {self.chunk_bytes}")

    @property
    def dtype(self):
        return BITS[self.bits]

    @property
    def name(self) -> str:
        return f"int{self.bits}" + (f"-g{self.group_size}" if self.group_size else "")


def parse(quant) -> QuantConfig | None:
    """None, "int8", "int4", "int4-g64" (group size), "int8-g128" or a QuantConfig."""
    if quant is None or isinstance(quant, QuantConfig):
        return quant
    if isinstance(quant, str):
        kind, sep, group = quant.lower().partition("-g")
        if kind in ("int8", "int4") and (not sep or group.isdigit()):
            return QuantConfig(bits=int(kind[3:]), group_size=int(group) if sep else None)
    raise ValueError(f"quant={quant!r}: expected 'int8', 'int4', 'int4-g<group size>' or a QuantConfig")


# ---------------------------------------------------------------------------------------------
# Layer set-up (called by model.network.dense)

def for_layer(quant, name: str, eq: str, in_shape, out_shape) -> QuantConfig | None:
    """The QuantConfig that applies to dense layer `name`, or None; refuses shapes it cannot quantize."""
    qc = parse(quant)
    if qc is None or name not in qc.targets:
        return None
    ins, out = eq.replace(" ", "").split("->")
    x_sub, w_sub = ins.split(",")
    n_in = len(in_shape)
    in_sub, out_sub = w_sub[:n_in], w_sub[n_in:]
    if len(w_sub) != n_in + len(out_shape) or not x_sub.endswith(in_sub) or out != x_sub[:-n_in] + out_sub:
        raise ValueError(f"layer {name!r}: einsum {eq!r} is not `…in, in out -> …out`; cannot quantize it")
    I = math.prod(in_shape)
    if qc.group_size and I % qc.group_size:
        dims = "·".join(f"{c}={d}" for c, d in zip(in_sub, in_shape))
        raise ValueError(f"layer {name!r}: int{qc.bits} group_size {qc.group_size} does not divide the contraction "
                         f"dimension {dims} ({I} rows); choose a group size that divides {I}")
    return qc


def scale_shape(qc: QuantConfig, in_shape, out_shape) -> tuple[int, ...]:
    if qc.group_size:
        return (math.prod(in_shape) // qc.group_size, *out_shape)
    return tuple(out_shape)


def scale_axes(qc: QuantConfig, kernel_axes, n_lead: int, n_in: int) -> tuple:
    lead, ins, outs = kernel_axes[:n_lead], kernel_axes[n_lead:n_lead + n_in], kernel_axes[n_lead + n_in:]
    return (*lead, ins[0], *outs) if qc.group_size else (*lead, *outs)


def quantize(w: jax.Array, qc: QuantConfig, in_shape, out_shape) -> tuple[jax.Array, jax.Array]:
    """w [*lead, *in, *out] (any float dtype; leading dims such as `layers` allowed) -> (q, scale).

    q has w's shape and dtype int8/int4; scale is [*lead, *out] or [*lead, groups, *out]."""
    n_in, n_out = len(in_shape), len(out_shape)
    lead = w.shape[:w.ndim - n_in - n_out]
    I, O = math.prod(in_shape), math.prod(out_shape)
    gs = qc.group_size or I
    wf = jnp.asarray(w).astype(jnp.float32).reshape(*lead, I // gs, gs, O)
    absmax = jnp.max(jnp.abs(wf), axis=-2)  # [*lead, G, O]
    s = (absmax / QMAX[qc.bits]).astype(qc.scale_dtype).astype(jnp.float32)
    s = jnp.where(s > 0, s, 1.0)  # an all-zero column: any scale will do
    q = jnp.clip(jnp.round(wf / s[..., None, :]), -QMAX[qc.bits], QMAX[qc.bits]).astype(qc.dtype)
    s = s.astype(qc.scale_dtype)
    q = q.reshape(w.shape)
    s = s.reshape(*lead, *scale_shape(qc, in_shape, out_shape))
    return q, s


@functools.lru_cache(maxsize=256)
def quantizer(qc: QuantConfig, in_shape: tuple, out_shape: tuple, out_shardings=None):
    """`quantize` for one layer shape, jitted once (loading quantizes every layer of a stack with it)."""
    kw = {} if out_shardings is None else dict(out_shardings=out_shardings)
    return jax.jit(lambda w: quantize(w, qc, in_shape, out_shape), **kw)


def dequantize(q: jax.Array, s: jax.Array, qc: QuantConfig, in_shape, out_shape) -> jax.Array:
    """float32 weight [*lead, *in, *out]: for tests and error metrics only, never in the forward pass."""
    n_in, n_out = len(in_shape), len(out_shape)
    lead = q.shape[:q.ndim - n_in - n_out]
    I, O = math.prod(in_shape), math.prod(out_shape)
    gs = qc.group_size or I
    w = q.astype(jnp.float32).reshape(*lead, I // gs, gs, O) * s.astype(jnp.float32).reshape(*lead, I // gs, 1, O)
    return w.reshape(q.shape)


def quantize_param(kernel: nnx.Param, qc: QuantConfig, in_shape, out_shape) -> tuple[nnx.Param, nnx.Param]:
    """A float kernel Param -> (integer kernel Param, scale Param), both with logical axes."""
    axes = tuple(kernel.get_metadata().get("out_sharding"))
    n_lead = kernel.ndim - len(in_shape) - len(out_shape)
    q, s = quantize(kernel[...], qc, in_shape, out_shape)
    return (nnx.Param(q, out_sharding=axes),
            nnx.Param(s, out_sharding=scale_axes(qc, axes, n_lead, len(in_shape))))


def layer_dims(qc: QuantConfig, kernel_shape, scale_shape) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(in_shape, out_shape) of one layer's kernel, from its kernel and scale shapes (no `layers` axis)."""
    n_out = len(scale_shape) - (1 if qc.group_size else 0)
    k = len(kernel_shape) - n_out
    return tuple(kernel_shape[:k]), tuple(kernel_shape[k:])


# ---------------------------------------------------------------------------------------------
# The matmul

def _platform() -> str:
    mesh = active_mesh()  # the mesh being compiled for (may be an AOT TPU topology)
    if mesh is not None and mesh.devices.size:
        return mesh.devices.flat[0].platform
    return jax.default_backend()


FORCE_MODE: str | None = None  # "grouped" or "dequant" for grouped scales: benchmarks only


def plan(qc: QuantConfig, tokens: int, I: int, O: int, compute_dtype, platform: str,
         in_shards: int = 1) -> tuple[str, int]:
    """(mode, steps) for a [tokens, I] x [I, O] quantized matmul.

    modes: "channel" (one scale per output column, applied to the output), "grouped" (contract each
    group, then apply its scales: temporaries [tokens, groups, O]) and "dequant" (scale the integer
    rows, then contract them: temporaries [rows, O]), chosen by which has the smaller temporaries per
    row: "grouped" while tokens <= group_size / 2 (decoding; not on CPU), else "dequant". `steps` > 1 runs the
    contraction as a loop whose steps each take I / steps rows, the fewest steps whose temporaries
    fit `chunk_bytes` among those that leave each of the `in_shards` devices holding the input dim whole
    units of every step (else the partitioner regroups the rows across devices: an all-gather of the
    weight in every call).
    """
    gs = qc.group_size or I
    cbytes = jnp.dtype(compute_dtype).itemsize
    # TPU and GPU fuse the int->float convert into the dot (measured: a one-shot int8 layer has the
    # temporaries of the bf16 einsum); XLA:CPU materialises it
    convert = 0 if platform in ("tpu", "gpu") else cbytes
    if gs == I:
        mode, unit = "channel", channel_unit(I)
    elif FORCE_MODE:
        mode, unit = FORCE_MODE, gs
    else:  # XLA:CPU runs the grouped (batched) form of small dots ~10x slower than one dot
        grouped = 2 * tokens * 4 <= gs * cbytes and platform != "cpu"
        mode, unit = ("grouped" if grouped else "dequant"), gs

    def temp(rows):  # bytes of temporaries of one step of `rows` rows
        if mode == "channel":
            return rows * O * convert
        if mode == "dequant":
            return rows * O * cbytes
        return rows * O * convert + tokens * (rows // gs) * O * 4

    units = I // unit
    local = units // in_shards if units % in_shards == 0 else units
    for steps in _divisors(local):
        if temp(I // steps) <= qc.chunk_bytes:
            return mode, steps
    return mode, local


def channel_unit(I: int) -> int:
    """Rows that a per-channel loop keeps together (contiguous blocks: strided single rows make
    XLA:CPU copy the whole weight): the largest divisor of I up to 128."""
    return max(d for d in _divisors(I) if d <= 128)


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, int(math.isqrt(n)) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def matmul(x: jax.Array, q: jax.Array, s: jax.Array, qc: QuantConfig, in_shape, out_shape,
           compute_dtype, in_shards: int = 1) -> jax.Array:
    """`einsum("…i,io->…o")` of x [*prefix, *in] with the quantized kernel (q [*in, *out], s) -> [*prefix, *out]
    in compute_dtype, accumulated in float32.

    With a loop (see `plan`), step k takes the rows (or groups) k, k + steps, k + 2·steps, …: the
    contraction dim is viewed as [A, steps, unit] and each step slices the middle axis. The leading
    axis A keeps the sharding of the input dim (FSDP `embed`, or `heads`/`mlp` under tensor
    parallelism), so no step needs another device's rows and no weight is all-gathered for the loop; it
    does only if every one of the `in_shards` devices holding the input dim has whole [steps, unit]
    blocks of it (`plan`).

    The gradient (QLoRA differentiates through the frozen base, for x only) is its own loop over the
    same row chunks, `dx_k = dy · w_kᵀ`, with each chunk's rows converted and scaled again: autodiff of
    the loop would save every step's converted rows, i.e. the whole dequantized weight.
    """
    return _matmul(qc, tuple(in_shape), tuple(out_shape), jnp.dtype(compute_dtype), jnp.dtype(x.dtype), in_shards,
                   x, q, s)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4, 5))
def _matmul(qc, in_shape, out_shape, compute_dtype, x_dtype, in_shards, x, q, s):
    return _forward(x, q, s, qc, in_shape, out_shape, compute_dtype, in_shards)


def _matmul_fwd(qc, in_shape, out_shape, compute_dtype, x_dtype, in_shards, x, q, s):
    return _forward(x, q, s, qc, in_shape, out_shape, compute_dtype, in_shards), (q, s)


def _matmul_bwd(qc, in_shape, out_shape, compute_dtype, x_dtype, in_shards, res, dy):
    q, s = res
    dx = _input_grad(dy, q, s, qc, in_shape, out_shape, x_dtype, in_shards)
    return dx, np.zeros(q.shape, jax.dtypes.float0), jnp.zeros_like(s)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _layout(q, s, qc: QuantConfig, tokens: int, I: int, O: int, compute_dtype, in_shards: int, *,
            backward: bool = False):
    """(mode, steps, unit, cdt, platform, q4 [A, steps, unit, O], s3) of the looped matmul (see `matmul`)."""
    platform = _platform()
    # XLA:CPU has no bf16 x bf16 -> f32 dot inside loops ("Unsupported element type for DotThunk")
    # and upcasts bf16 dots anyway: there the operands are float32.
    cdt = jnp.float32 if platform == "cpu" else jnp.dtype(compute_dtype)
    gs = qc.group_size or I
    # the gradient never takes the grouped form (its temporaries grow with the tokens)
    mode, steps = plan(qc, max(tokens, gs) if backward else tokens, I, O, cdt, platform, in_shards)
    unit = channel_unit(I) if mode == "channel" else gs
    A = I // (steps * unit)
    q4 = q.reshape(A, steps, unit, O)
    s3 = s.reshape(A, steps, O) if mode != "channel" else s.reshape(O)
    return mode, steps, unit, cdt, platform, q4, s3


def _forward(x, q, s, qc: QuantConfig, in_shape, out_shape, compute_dtype, in_shards: int) -> jax.Array:
    n_in = len(in_shape)
    prefix = x.shape[:x.ndim - n_in]
    I, O = math.prod(in_shape), math.prod(out_shape)
    out_dtype, f32 = jnp.dtype(compute_dtype), jnp.float32
    mode, steps, unit, cdt, platform, q4, s3 = _layout(q, s, qc, math.prod(prefix), I, O, compute_dtype, in_shards)
    A = I // (steps * unit)
    x4 = x.astype(cdt).reshape(*prefix, A, steps, unit)

    def step(xk, qk, sk):
        """xk [*prefix, A, unit], qk [A, unit, O], sk [A, O] (grouped modes) -> float32 [*prefix, O]."""
        if mode == "channel":
            return jnp.einsum("...ai,aio->...o", xk, qk.astype(cdt), preferred_element_type=f32)
        if mode == "dequant":
            w = qk.astype(cdt) * sk[:, None, :].astype(cdt)
            return jnp.einsum("...ai,aio->...o", xk, w, preferred_element_type=f32)
        z = jnp.einsum("...ai,aio->...ao", xk, qk.astype(cdt), preferred_element_type=f32)
        return jnp.einsum("...ao,ao->...o", z, sk.astype(f32))

    def static(k, x4, q4, s3):
        return step(x4[..., k, :], q4[:, k], None if mode == "channel" else s3[:, k])

    if steps == 1 and mode == "channel":  # one contracting dim: TPU fuses the convert only into this form
        y = jnp.einsum("...i,io->...o", x4.reshape(*prefix, I), q.reshape(I, O).astype(cdt),
                       preferred_element_type=f32)
    elif steps == 1:
        y = static(0, x4, q4, s3)
    elif platform == "cpu":
        # XLA:CPU cannot dynamic-slice packed int4: it would first unpack the whole weight to int8 (a
        # temporary as large as the weight). Each step picks its slice by `switch` over static slices.
        branches = [functools.partial(static, k) for k in range(steps)]
        y = jax.lax.fori_loop(0, steps, lambda k, acc: acc + jax.lax.switch(k, branches, x4, q4, s3),
                              jnp.zeros((*prefix, O), f32))
    else:
        def body(k, acc):
            xk = jax.lax.dynamic_index_in_dim(x4, k, axis=x4.ndim - 2, keepdims=False)
            qk = jax.lax.dynamic_index_in_dim(q4, k, axis=1, keepdims=False)
            sk = None if mode == "channel" else jax.lax.dynamic_index_in_dim(s3, k, axis=1, keepdims=False)
            return acc + step(xk, qk, sk)

        y = jax.lax.fori_loop(0, steps, body, jnp.zeros((*prefix, O), f32))
    if mode == "channel":
        y = y * s3.astype(f32)
    return y.astype(out_dtype).reshape(*prefix, *out_shape)


def _input_grad(dy, q, s, qc: QuantConfig, in_shape, out_shape, x_dtype, in_shards: int) -> jax.Array:
    """dx [*prefix, *in] (x_dtype) for dy [*prefix, *out]: `dy · (q ⊙ s)ᵀ` over the forward's row chunks,
    each chunk's integer rows converted (and scaled) on the spot; temporaries bounded as the forward's."""
    n_out = len(out_shape)
    prefix = dy.shape[:dy.ndim - n_out]
    I, O = math.prod(in_shape), math.prod(out_shape)
    f32 = jnp.float32
    mode, steps, unit, cdt, platform, q4, s3 = _layout(q, s, qc, math.prod(prefix), I, O, dy.dtype, in_shards,
                                                       backward=True)
    A = I // (steps * unit)
    dy = dy.reshape(*prefix, O)
    if mode == "channel":  # per-output scales: scale dy once, the integer rows stay the dot operand
        dy = dy.astype(f32) * s3.astype(f32)
    dy = dy.astype(cdt)

    def chunk(qk, sk):
        """qk [A, unit, O], sk [A, O] -> [*prefix, A, unit] in x_dtype."""
        w = qk.astype(cdt) if mode == "channel" else qk.astype(cdt) * sk[:, None, :].astype(cdt)
        return jnp.einsum("...o,aio->...ai", dy, w, preferred_element_type=f32).astype(x_dtype)

    def static(k):
        return chunk(q4[:, k], None if mode == "channel" else s3[:, k])

    if steps == 1:
        dx = static(0)[..., None, :]
    else:
        def body(k, dx):
            if platform == "cpu":  # static slices of packed int4, as in the forward
                dk = jax.lax.switch(k, [functools.partial(static, j) for j in range(steps)])
            else:
                qk = jax.lax.dynamic_index_in_dim(q4, k, axis=1, keepdims=False)
                sk = None if mode == "channel" else jax.lax.dynamic_index_in_dim(s3, k, axis=1, keepdims=False)
                dk = chunk(qk, sk)
            return jax.lax.dynamic_update_index_in_dim(dx, dk, k, axis=dx.ndim - 2)

        dx = jax.lax.fori_loop(0, steps, body, jnp.zeros((*prefix, A, steps, unit), x_dtype))
    return dx.reshape(*prefix, *in_shape)


# ---------------------------------------------------------------------------------------------
# Bytes (exact, per parameter, scales included): for the memory planner (sharding/plan.py)

def dtype_bits(dtype) -> int:
    dtype = np.dtype(dtype)
    if dtype in (np.dtype(ml_dtypes.int4), np.dtype(ml_dtypes.uint4)):
        return 4
    return dtype.itemsize * 8


def array_bytes(shape, dtype) -> int:
    """Bytes of an array as stored on device: int4 packed two per byte (rounded up to whole bytes)."""
    return -(-math.prod(shape) * dtype_bits(dtype) // 8)
