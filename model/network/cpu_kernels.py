"""Kernels for serving on one CPU device, as XLA custom calls built on first use: Dense products
(model/cpu_gemv.cc) and attention over the KV cache (model/cpu_attention.cc).

XLA:CPU reads float32 weights at memory speed in a matrix-vector product, but not bfloat16, int8 or
int4 ones: it first converts the whole weight to float32 (a copy written and read back: 5 to 40 times
slower, measured on this project's bench shape). These kernels read each weight once in its stored
format, with the weight transposed to [out, in] so that every output is a dot product of two
contiguous rows: bf16 with AVX512-BF16 pair products, int8/int4 with AVX512-VNNI integer dot products
over activations quantized to int8 per block of 128 inputs (as llama.cpp's CPU kernels do).

The serving engine opts in by packing its per-layer weights (`pack`): a packed Dense kernel carries
`cpu_layout="out_in"` in its metadata and every product of that layer (decode and prefill) goes through
the kernels. Layers the kernels do not cover (other dtypes, int4 groups not a multiple of 128, sizes
that do not divide) stay unpacked and use XLA's dot. The library is compiled with the C++ compiler
found on PATH (`-O3 -march=native`) into ~/.cache/llama-jax (or $LLAMA_JAX_CACHE).

Attention: XLA runs a decode step's attention as ~10 small ops per layer (gather the slot's keys and
values, convert, transpose, two dots, softmax), each costing more in launch overhead than in
arithmetic; the engine's cache (`kv_cache.CacheUpdate(cpu_kernels=True)`) computes it in one call.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import shutil
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(n) for n in ("cpu_gemv.cc", "cpu_attention.cc")]
LAYOUT = "out_in"  # metadata value of a packed kernel
BLOCK = 128  # activation quantization block of the integer kernels
_STATE: dict = {}


def _cache_dir() -> Path:
    return Path(os.environ.get("LLAMA_JAX_CACHE", Path.home() / ".cache" / "llama-jax"))


def build() -> Path:
    """Compiles the kernel library (once per source, compiler flags and jaxlib version) and returns its path."""
    import jaxlib

    include = Path(jaxlib.__file__).parent / "include"
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        raise RuntimeError("no C++ compiler on PATH (g++, c++ or clang++)")
    flags = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w",
             *os.environ.get("LLAMA_JAX_CPU_FLAGS", "").split()]
    src = b"".join(f.read_bytes() for f in SOURCES)
    key = hashlib.sha256(src + " ".join([cxx, *flags, jaxlib.__version__]).encode()).hexdigest()[:16]
    out = _cache_dir() / f"cpu_kernels-{key}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        cmd = [cxx, *flags, f"-I{include}", *map(str, SOURCES), "-o", str(tmp)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"building the CPU kernels failed ({' '.join(cmd)}):\n{r.stderr[-2000:]}")
        os.replace(tmp, out)
    return out


def available() -> bool:
    """Builds and registers the kernels on first call; False (logged once) where that is not possible."""
    if "ok" not in _STATE:
        try:
            lib = ctypes.cdll.LoadLibrary(str(build()))
            for name in ("llama_jax_gemv", "llama_jax_attention"):
                jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
            _STATE.update(ok=True, lib=lib)
        except Exception as e:  # no compiler, unsupported platform: XLA's path it is
            log.warning("CPU kernels unavailable, serving with XLA's ops: %s", e)
            _STATE["ok"] = False
    return _STATE["ok"]


def gemv(x2, weights, group: int = 0) -> list[jax.Array]:
    """[x [M, K] · wtᵀ for wt, scale in weights], float32 [M, N]: one call for products sharing x. wt [N, K]
    is float32, bfloat16 (x is cast to it), int8 with scale [N] or int4 with scale [N, K / group]."""
    if not available():
        raise RuntimeError("the CPU kernels could not be built (see the log)")
    x_dtype = jnp.bfloat16 if weights[0][0].dtype == jnp.bfloat16 else jnp.float32
    args = [a for wt, scale in weights for a in (wt, jnp.zeros((0,), jnp.float32) if scale is None else scale)]
    outs = [jax.ShapeDtypeStruct((x2.shape[0], wt.shape[0]), jnp.float32) for wt, _ in weights]
    return jax.ffi.ffi_call("llama_jax_gemv", outs)(x2.astype(x_dtype), *args, group=int(group))


def _dims(layer) -> tuple[int, int]:
    return math.prod(layer.in_shape), math.prod(layer.out_shape)


def supports(layer) -> bool:
    """Whether the kernels cover this Dense layer (one layer's kernel, no `layers` axis)."""
    K, N = _dims(layer)
    kernel, qc = layer.kernel[...], layer.quant
    if kernel.ndim != len(layer.in_shape) + len(layer.out_shape) or N % 4:
        return False
    if qc is None:
        if kernel.dtype != layer.compute_dtype:
            return False
        return (kernel.dtype == jnp.float32 and K % 16 == 0) or (kernel.dtype == jnp.bfloat16 and K % 32 == 0)
    if layer.scale[...].dtype not in (jnp.float32, jnp.bfloat16):
        return False
    if kernel.dtype == jnp.int8:
        return not qc.group_size and K % BLOCK == 0
    return kernel.dtype == jnp.int4 and qc.group_size > 0 and qc.group_size % BLOCK == 0 and K % qc.group_size == 0


def is_packed(layer) -> bool:
    return layer.kernel.get_metadata().get("cpu_layout") == LAYOUT


def pack(graphdef, state):
    """`state` with every Dense kernel the kernels support transposed to [out, in] and marked (int4 scales
    to [out, in / group]); the arrays are new, the input state is left as it was."""
    from model.network.layers import Dense

    module = nnx.merge(graphdef, state, copy=True)
    for _, node in nnx.iter_graph(module):
        if isinstance(node, Dense) and not is_packed(node) and supports(node):
            K, N = _dims(node)
            meta = node.kernel.get_metadata()
            node.kernel = nnx.Param(jnp.asarray(node.kernel[...]).reshape(K, N).T.copy(), **{**meta, "cpu_layout": LAYOUT})
            if node.quant is not None and node.quant.group_size:
                smeta = node.scale.get_metadata()
                node.scale = nnx.Param(node.scale[...].reshape(K // node.quant.group_size, N).T.copy(), **smeta)
    return nnx.split(module)[1]


def dense(layers, x: jax.Array) -> list[jax.Array] | None:
    """The base products of Dense `layers` that share input x, in one call, when all their kernels are
    packed alike; else None (XLA's dot). LoRA, if any, is added by the caller as usual."""
    first = layers[0]
    if not all(is_packed(d) and d.kernel[...].dtype == first.kernel[...].dtype and d.in_shape == first.in_shape
               and (d.quant.group_size if d.quant else 0) == (first.quant.group_size if first.quant else 0)
               for d in layers):
        return None
    prefix = x.shape[:x.ndim - len(first.in_shape)]
    K = math.prod(first.in_shape)
    weights = []
    for d in layers:
        N = math.prod(d.out_shape)
        scale = None if d.quant is None else d.scale[...].reshape(N, -1) if d.quant.group_size else d.scale[...].reshape(N)
        weights.append((d.kernel[...], scale))
    ys = gemv(x.reshape(math.prod(prefix), K), weights, first.quant.group_size if first.quant else 0)
    return [y.astype(d.compute_dtype).reshape(*prefix, *d.out_shape) for d, y in zip(layers, ys)]


def attention(q_BTNH, cache, layer, rows, positions, segments, kv_len: int) -> jax.Array:
    """Attention of q over positions [0, kv_len) of cache slots `rows` in `layer` of a float32 or bfloat16
    KVCache (already holding this step's keys/values); the engine's XLA path, in one call. -> [B, T, N, H]
    in q's dtype."""
    out = jax.ShapeDtypeStruct(q_BTNH.shape, jnp.float32)
    y = jax.ffi.ffi_call("llama_jax_attention", out)(
        q_BTNH.astype(jnp.float32), cache.k, cache.v, jnp.asarray(layer, jnp.int32), rows.astype(jnp.int32),
        positions.astype(jnp.int32), segments.astype(jnp.int32), kv_len=int(kv_len),
        round_probs=int(q_BTNH.dtype == jnp.bfloat16))
    return y.astype(q_BTNH.dtype)


def attention_applies(cache) -> bool:
    """Caches the attention kernel reads: float32, or bfloat16 held as bits."""
    return not cache.quantized and cache.dtype in ("float32", "bfloat16")
