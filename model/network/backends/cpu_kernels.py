"""Kernels for serving on one CPU device, as XLA custom calls built on first use: Dense products
(cpu_gemv.cc), attention over the KV cache (cpu_attention.cc) and the logits' row statistics that sampling
needs (cpu_logits.cc), all beside this file.

XLA:CPU reads float32 weights at memory speed in a matrix-vector product, but not bfloat16, int8 or
int4 ones: it first converts the whole weight to float32 (a copy written and read back: 5 to 40 times
slower, measured on this project's bench shape). These kernels read each weight once in its stored
format, with the weight transposed to [out, in] so that every output is a dot product of two
contiguous rows: bf16 with AVX512-BF16 pair products, int8/int4 with AVX512-VNNI integer dot products
over activations quantized to int8 per block of 128 inputs (as llama.cpp's CPU kernels do).

`enabled(mesh)` is the one decision: one CPU device and the library built. The serving engine asks it
once; when it holds, the engine packs its per-layer weights (`model.network.dense.pack_cpu`, which
uses `covers` and `pack` here): a packed kernel carries `cpu_layout="out_in"` in its metadata, and
every product of that layer (decode and prefill) goes through `gemv`. Layers the kernels do not cover
(other dtypes, int4 groups not a multiple of 128, sizes that do not divide) stay unpacked and use
XLA's dot. The library is compiled with the C++ compiler found on PATH (`-O3 -march=native`) into
~/.cache/llama-jax (or $LLAMA_JAX_CACHE; created 0700), under a key of the sources, compiler, flags, CPU
features and jax/jaxlib versions; a cached library not owned by this user or writable by others is rebuilt.

Attention: XLA runs a decode step's attention as ~10 small ops per layer (gather the keys and values,
convert, transpose, two dots, softmax), each costing more in launch overhead than in arithmetic;
`paged_attention` computes it in one call over the serving engine's block pool and ragged step
(model/network/paged_attention.py, implementation "cpu"): float32, bfloat16 or int8 pools.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import stat
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
from jax.sharding import Mesh

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(n) for n in ("cpu_gemv.cc", "cpu_attention.cc", "cpu_logits.cc")]
HEADERS = [Path(__file__).with_name("cpu_common.h")]
LAYOUT = "out_in"  # metadata value (`cpu_layout`) of a packed kernel
BLOCK = 128  # activation quantization block of the integer kernels
_STATE: dict = {}


def _cache_dir() -> Path:
    return Path(os.environ.get("LLAMA_JAX_CACHE", Path.home() / ".cache" / "llama-jax"))


def _cpu_features() -> str:
    """The CPU's feature flags (the library is built with -march=native): the `flags` (x86) or `Features`
    (Arm) line of /proc/cpuinfo, else the platform's description."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":")[0].strip() in ("flags", "Features"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def _compiler_version(cxx: str) -> str:
    r = subprocess.run([cxx, "--version"], capture_output=True, text=True)
    return r.stdout + r.stderr


def _toolchain() -> tuple[str, list[str]]:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        raise RuntimeError("no C++ compiler on PATH (g++, c++ or clang++)")
    flags = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w",
             *os.environ.get("LLAMA_JAX_CPU_FLAGS", "").split()]
    return cxx, flags


def library_path(cxx: str, flags: list[str]) -> Path:
    """Where the library built from these sources, by this compiler (and its version), with these flags,
    for this CPU's features and this jax/jaxlib lives in the cache."""
    parts = [b"".join(f.read_bytes() for f in SOURCES + HEADERS), cxx.encode(), " ".join(flags).encode(),
             _compiler_version(cxx).encode(), _cpu_features().encode(), jax.__version__.encode(),
             jaxlib.__version__.encode()]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    return _cache_dir() / f"cpu_kernels-{key}.so"


def _private_dir(d: Path) -> None:
    """The cache directory, created 0700; one owned by someone else is refused, and group/other write
    permission on ours is taken away (anyone who can write there could plant a library we load)."""
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.stat(d)
    if st.st_uid != os.getuid():
        raise RuntimeError(f"{d}: the kernel cache directory is owned by uid {st.st_uid}, not this user")
    if st.st_mode & 0o022:
        log.warning("%s: removing group/other write permission from the kernel cache directory", d)
        os.chmod(d, stat.S_IMODE(st.st_mode) & ~0o022)


def _trusted(path: Path) -> bool:
    """A cached library is loaded only if it is a regular file (not a link) of this user that nobody
    else may write."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022


def _compile(cmd: list[str]) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"building the CPU kernels failed ({' '.join(cmd)}):\n{r.stderr[-2000:]}")


def build() -> Path:
    """Compiles the kernel library (once per source, compiler and its flags and version, CPU features and
    jax/jaxlib version) into the cache and returns its path. A cached file that is not this user's, or
    that others may write, is not trusted: it is rebuilt and atomically replaced."""
    include = jax.ffi.include_dir()  # xla/ffi/api headers of the installed jaxlib
    cxx, flags = _toolchain()
    out = library_path(cxx, flags)
    _private_dir(out.parent)
    if _trusted(out):
        return out
    if os.path.lexists(out):
        log.warning("%s: not owned by this user or writable by others; rebuilding it", out)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    _compile([cxx, *flags, f"-I{include}", *map(str, SOURCES), "-o", str(tmp)])
    os.chmod(tmp, 0o700)
    os.replace(tmp, out)
    if not _trusted(out):
        raise RuntimeError(f"{out}: changed by someone else while it was being built")
    return out


def available() -> bool:
    """Builds and registers the kernels on first call; False (logged once) where there is no C++ compiler.
    With a compiler, a failed build or load is an error (RuntimeError/OSError), never a quiet fallback."""
    if "ok" not in _STATE:
        try:
            _toolchain()
        except RuntimeError as e:
            log.warning("%s: serving on one CPU device uses XLA's ops instead of the CPU kernels, about 40 times "
                        "slower per decoded token (measured on bench/serve.py's shape: bf16 0.7 vs 29.5 tok/s, int8 "
                        "0.9 vs 40.2); install one (e.g. apt-get install g++) or set CXX, and restart", e)
            _STATE["ok"] = False
            return False
        lib = ctypes.cdll.LoadLibrary(str(build()))
        for name in ("llama_jax_gemv", "llama_jax_paged_attention", "llama_jax_logit_stats"):
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
        _STATE.update(ok=True, lib=lib)
    return _STATE["ok"]


def enabled(mesh: Mesh) -> bool:
    """The one decision: the kernels serve computations on `mesh` when it is a single CPU device and the
    library is built (on first call). Elsewhere (accelerators, several devices) XLA's ops run."""
    devices = mesh.devices
    return devices.size == 1 and devices.flat[0].platform == "cpu" and available()


# ---------------------------------------------------------------------------------------------
# Dense products (cpu_gemv.cc)

def covers(kernel_dtype, scale_dtype, group: int, compute_dtype, K: int, N: int) -> bool:
    """Whether the kernels take a [K, N] product with this weight: float kernels in the compute dtype
    (scale_dtype None), int8 with one scale per output, or int4 with groups of a multiple of BLOCK rows."""
    kernel_dtype = jnp.dtype(kernel_dtype)
    if N % 4:
        return False
    if scale_dtype is None:
        if kernel_dtype != jnp.dtype(compute_dtype):
            return False
        return (kernel_dtype == jnp.float32 and K % 16 == 0) or (kernel_dtype == jnp.bfloat16 and K % 32 == 0)
    if jnp.dtype(scale_dtype) not in (jnp.float32, jnp.bfloat16):
        return False
    if kernel_dtype == jnp.int8:
        return not group and K % BLOCK == 0
    return kernel_dtype == jnp.int4 and group > 0 and group % BLOCK == 0 and K % group == 0


def pack(kernel, scale, group: int, K: int, N: int):
    """(kernel [*in, *out], scale) -> the kernels' layout: the kernel as [N, K], a grouped scale as
    [N, K / group] (a per-channel scale is kept as it is). New arrays; the inputs are left as they were."""
    wt = jnp.asarray(kernel).reshape(K, N).T.copy()
    if scale is not None and group:
        scale = jnp.asarray(scale).reshape(K // group, N).T.copy()
    return wt, scale


def is_packed(layer) -> bool:
    """Whether a dense layer's `kernel` Param is in the kernels' layout (see `pack`)."""
    return layer.kernel.get_metadata().get("cpu_layout") == LAYOUT


def gemv(x2, weights, group: int = 0) -> list[jax.Array]:
    """[x [M, K] · wtᵀ for wt, scale in weights], float32 [M, N]: one call for products sharing x. wt [N, K]
    is float32, bfloat16 (x is cast to it), int8 with scale [N] or int4 with scale [N, K / group]."""
    if not available():
        raise RuntimeError("the CPU kernels could not be built (see the log)")
    x_dtype = jnp.bfloat16 if weights[0][0].dtype == jnp.bfloat16 else jnp.float32
    args = [a for wt, scale in weights for a in (wt, jnp.zeros((0,), jnp.float32) if scale is None else scale)]
    outs = [jax.ShapeDtypeStruct((x2.shape[0], wt.shape[0]), jnp.float32) for wt, _ in weights]
    return jax.ffi.ffi_call("llama_jax_gemv", outs)(x2.astype(x_dtype), *args, group=int(group))


# ---------------------------------------------------------------------------------------------
# Attention over the KV cache (cpu_attention.cc)

def paged_attention_applies(dtype: str) -> bool:
    """Pools the paged attention kernel reads (`KVPool.dtype`): float32, bfloat16 (held as bits) or int8."""
    return dtype in ("float32", "bfloat16", "int8")


def paged_attention(q_TNH, kv, scale, meta, layer=0) -> jax.Array:
    """model/network/paged_attention.py's `attend` in one call: q [T, N, H] over the pool `kv`
    [L, num_blocks, block_size, 2K, H] at `layer` (or one layer, [num_blocks, block_size, 2K, H]) holding
    float32, bfloat16 (or its uint16 bits) or int8 with `scale` [..., 2K] float32; `meta` a PagedMeta.
    Passing the whole pool and the layer index saves XLA a copy of the layer. -> [T, N, H] in q's dtype;
    tokens past cu_q_lens[num_seqs] get zeros."""
    if kv.ndim == 4:
        kv, scale, layer = kv[None], None if scale is None else scale[None], 0
    if kv.dtype == jnp.bfloat16:
        kv = jax.lax.bitcast_convert_type(kv, jnp.uint16)
    if (kv.dtype == jnp.int8) != (scale is not None) or kv.dtype not in (jnp.float32, jnp.uint16, jnp.int8):
        raise ValueError(f"cpu paged attention: pool {kv.dtype} with scale {None if scale is None else scale.dtype}: "
                         "expected float32, bfloat16 (bits) or int8 with a float32 scale")
    scale = jnp.zeros((0,), jnp.float32) if scale is None else scale.astype(jnp.float32)
    i32 = [jnp.asarray(x, jnp.int32) for x in (layer, meta.kv_lens, meta.page_indices, meta.cu_q_lens, meta.num_seqs)]
    out = jax.ShapeDtypeStruct(q_TNH.shape, jnp.float32)
    y = jax.ffi.ffi_call("llama_jax_paged_attention", out)(
        q_TNH.astype(jnp.float32), kv, scale, *i32, round_probs=int(q_TNH.dtype == jnp.bfloat16))
    return y.astype(q_TNH.dtype)


# ---------------------------------------------------------------------------------------------
# Sampling's statistics of the logits (cpu_logits.cc)

def logit_stats(x_BV):
    """serve/sampling.py's `logit_stats` in one call: logits [B, V] (bfloat16 read as they are, else as
    float32) -> (first index of the largest value [B] int32, the largest value [B], log Σ exp(x − max) [B])."""
    B = x_BV.shape[0]
    outs = (jax.ShapeDtypeStruct((B,), jnp.int32), jax.ShapeDtypeStruct((B,), jnp.float32),
            jax.ShapeDtypeStruct((B,), jnp.float32))
    x = x_BV if x_BV.dtype == jnp.bfloat16 else x_BV.astype(jnp.float32)
    return jax.ffi.ffi_call("llama_jax_logit_stats", outs)(x)
