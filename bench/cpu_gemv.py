"""The engine's dense products on one CPU device (model/network/backends/cpu_gemv.cc) against XLA's dot of
the same shape, in the same run: GFLOP/s per weight format and row count. Prints one JSON line each.

    python bench/cpu_gemv.py [--formats bf16 int8 int4] [--rows 1 16 64 256]

The products are those of one bench-shape layer (../shared/reference/anchors.md): gate and up in one call
([1024 -> 2 x 3584]) and down ([3584 -> 1024]). `--copies N` cycles through N copies of the weights so that
they stream from memory as a whole model's do (the default, 8, is ~180 MB in bf16: past any L3 here).
int4 weights have a scale per group of 128 inputs. The peer is XLA's bf16 dot (x bf16 . w bf16, float32
results) on the same weights, for every format.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from model.network.backends import cpu_kernels  # noqa: E402

SHAPES = [(1024, (3584, 3584)), (3584, (1024,))]  # (K, the call's outputs)
GROUP = 128  # int4 quantization group (inputs)


def best_time(f, args_list, repeats: int = 5) -> float:
    """Best of `repeats` of one pass over every argument set (a pass: one call per weight copy)."""
    for args in args_list:
        jax.block_until_ready(f(*args))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for args in args_list:
            out = f(*args)
        jax.block_until_ready(out)
        best = min(best, time.perf_counter() - t0)
    return best


def weights(rng, fmt: str, K: int, N: int):
    w = rng.standard_normal((N, K)).astype(np.float32) * 0.02
    if fmt == "bf16":
        return jnp.asarray(w, jnp.bfloat16), None
    if fmt == "int4":  # groups of GROUP inputs, as the int4 formats quantize
        wg = w.reshape(N, K // GROUP, GROUP)
        s = np.abs(wg).max(-1) / 7
        q = np.clip(np.rint(wg / s[..., None]), -8, 7).reshape(N, K)
        return jnp.asarray(q, jnp.int4), jnp.asarray(s, jnp.float32)
    s = np.abs(w).max(1) / 127
    return jnp.asarray(np.rint(w / s[:, None]), jnp.int8), jnp.asarray(s, jnp.float32)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--formats", nargs="*", default=["bf16", "int8"], choices=["bf16", "int8", "int4"])
    p.add_argument("--rows", nargs="*", type=int, default=[1, 16, 64, 256])
    p.add_argument("--copies", type=int, default=8)
    args = p.parse_args(argv)
    if not cpu_kernels.available():
        raise SystemExit("the CPU kernels could not be built (a C++ compiler is needed)")
    rng = np.random.default_rng(0)
    peer = jax.jit(lambda x, ws: [jnp.dot(x, w.T.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
                                  for w, _ in ws])
    for fmt in args.formats:
        ours = jax.jit(lambda x, ws, g=GROUP if fmt == "int4" else 0: cpu_kernels.gemv(x, ws, g))
        layers = [[[weights(rng, fmt, K, N) for N in Ns] for K, Ns in SHAPES] for _ in range(args.copies)]
        for M in args.rows:
            xs = [jnp.asarray(rng.standard_normal((M, K)), jnp.float32) for K, _ in SHAPES]
            calls = [(xs[i], layer[i]) for layer in layers for i in range(len(SHAPES))]
            flops = sum(2 * M * w.shape[0] * w.shape[1] for _, ws in calls for w, _ in ws)
            t_ours = best_time(ours, calls)
            t_peer = best_time(peer, [(x.astype(jnp.bfloat16), ws) for x, ws in calls])
            print(json.dumps(dict(bench="cpu_gemv", weights=fmt, rows=M, ours_gflop_s=round(flops / t_ours / 1e9, 1),
                                  xla_bf16_dot_gflop_s=round(flops / t_peer / 1e9, 1),
                                  ours_over_xla=round(t_peer / t_ours, 2), cpus=os.cpu_count())), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
