"""Decode-time matrix-vector products on CPU as XLA custom calls (model/cpu_gemv.cc, built on first use).

XLA:CPU reads float32 weights at memory speed in a matrix-vector product, but not bfloat16, int8 or
int4 ones: it first converts the whole weight to float32 (a copy written and read back: 5 to 40 times
slower, measured on this project's bench shape). These kernels read each weight once in its stored
format and convert it in registers, so decoding one token costs what reading the weights costs.

They are used only where they apply, and only when asked for (`with cpu_gemv.enabled(): …`, which the
serving engine does while tracing its step): the platform being compiled for is CPU, one device (the
custom call has no partitioning rule), a few rows (decode, not prefill), and a Dense layer whose kernel
is float32, bfloat16, int8 (per-channel scales) or int4 (group scales). Anything else, or a machine
where the library cannot be built, keeps the XLA path. The library is compiled with the C++ compiler
found on PATH (`-O3 -march=native -fopenmp`) into ~/.cache/llama-jax (or $LLAMA_JAX_CACHE).
"""

from __future__ import annotations

import contextlib
import contextvars
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

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_suffix(".cc")
MAX_ROWS = 16  # rows (tokens) per call; larger products are compute-bound and stay with XLA
_ENABLED: contextvars.ContextVar[bool] = contextvars.ContextVar("cpu_gemv", default=False)
_STATE: dict = {}


@contextlib.contextmanager
def enabled(on: bool = True):
    """Within this context (while a step is traced), Dense layers may use the CPU kernels."""
    token = _ENABLED.set(on)
    try:
        yield
    finally:
        _ENABLED.reset(token)


def _cache_dir() -> Path:
    return Path(os.environ.get("LLAMA_JAX_CACHE", Path.home() / ".cache" / "llama-jax"))


def build() -> Path:
    """Compiles the kernel library (once per source, compiler flags and jaxlib version) and returns its path."""
    import jaxlib

    include = Path(jaxlib.__file__).parent / "include"
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        raise RuntimeError("no C++ compiler on PATH (g++, c++ or clang++)")
    flags = ["-O3", "-march=native", "-fopenmp", "-std=c++17", "-shared", "-fPIC", "-w",
             *os.environ.get("LLAMA_JAX_GEMV_FLAGS", "").split()]  # e.g. -DPANEL=128 (tuning)
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + " ".join([cxx, *flags, jaxlib.__version__]).encode()).hexdigest()[:16]
    out = _cache_dir() / f"cpu_gemv-{key}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        cmd = [cxx, *flags, f"-I{include}", str(SOURCE), "-o", str(tmp)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"building {SOURCE.name} failed ({' '.join(cmd)}):\n{r.stderr[-2000:]}")
        os.replace(tmp, out)
    return out


def available() -> bool:
    """Builds and registers the kernels on first call; False (logged once) where that is not possible."""
    if "ok" not in _STATE:
        try:
            lib = ctypes.cdll.LoadLibrary(str(build()))
            jax.ffi.register_ffi_target("llama_jax_gemv", jax.ffi.pycapsule(lib.llama_jax_gemv), platform="cpu")
            jax.ffi.register_ffi_target("llama_jax_gemv_int4", jax.ffi.pycapsule(lib.llama_jax_gemv_int4),
                                        platform="cpu")
            _STATE.update(ok=True, lib=lib)
        except Exception as e:  # no compiler, unsupported platform: XLA's path it is
            log.warning("CPU matrix-vector kernels unavailable, using XLA's dot: %s", e)
            _STATE["ok"] = False
    return _STATE["ok"]


def _on_one_cpu() -> bool:
    from sharding.rules import active_mesh

    mesh = active_mesh()
    if mesh is not None:
        return mesh.devices.size == 1 and mesh.devices.flat[0].platform == "cpu"
    return jax.default_backend() == "cpu"


def gemv(x2, w2, scale2=None, group: int = 0):
    """y [M, N] float32 = x [M, K] · w [K, N] (w float32, bfloat16, int8 with scale [N], or int4 with
    scale [K / group, N]); the custom call itself, for tests and benchmarks."""
    if not available():
        raise RuntimeError("the CPU matrix-vector kernels could not be built (see the log)")
    M, N = x2.shape[0], w2.shape[1]
    out = jax.ShapeDtypeStruct((M, N), jnp.float32)
    s = jnp.zeros((0,), jnp.float32) if scale2 is None else scale2
    if w2.dtype == jnp.int4:
        return jax.ffi.ffi_call("llama_jax_gemv_int4", out)(x2.astype(jnp.float32), w2, s, group=int(group))
    return jax.ffi.ffi_call("llama_jax_gemv", out)(x2.astype(jnp.float32), w2, s)


def dense(layer, x: jax.Array) -> jax.Array | None:
    """The base product of `layer` (a model.layers.Dense) for input x, or None when the kernels do not
    apply (see the module docstring). LoRA, if any, is added by the caller as usual."""
    if not _ENABLED.get():
        return None
    n_in = len(layer.in_shape)
    prefix = x.shape[:x.ndim - n_in]
    M, K, N = math.prod(prefix), math.prod(layer.in_shape), math.prod(layer.out_shape)
    if M > MAX_ROWS or not _on_one_cpu():
        return None
    kernel = layer.kernel[...]
    qc = layer.quant
    scale, group = None, 0
    if qc is None:
        if kernel.dtype not in (jnp.float32, jnp.bfloat16):
            return None
    elif kernel.dtype == jnp.int8 and not qc.group_size:
        scale = layer.scale[...].reshape(N)
    elif kernel.dtype == jnp.int4 and qc.group_size and N % 2 == 0:
        scale, group = layer.scale[...].reshape(K // qc.group_size, N), qc.group_size
    else:
        return None
    if scale is not None and scale.dtype not in (jnp.float32, jnp.bfloat16):
        scale = scale.astype(jnp.float32)
    if not available():
        return None
    y = gemv(x.reshape(M, K), kernel.reshape(K, N), scale, group)
    return y.astype(layer.compute_dtype).reshape(*prefix, *layer.out_shape)
