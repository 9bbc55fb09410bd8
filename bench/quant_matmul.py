"""One quantized dense layer on the local backend: compiled temporaries, argument bytes, time per call
and error, against the bf16 einsum of the same shape (the peer) and against a one-shot form.

    python bench/quant_matmul.py [--sizes 8192x8192,8192x28672] [--tokens 8,512] [--iters 50]

"default" is quant.matmul as the model runs it (a loop over row chunks where the backend does not fuse
the int->float convert into the dot); "oneshot" is the same with an unlimited chunk budget (one
step: the whole converted weight may become a temporary); "grouped"/"dequant" force that int4 form.
Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from model.network import quant  # noqa: E402
from model.network.quant import QuantConfig  # noqa: E402


def timed(f, *args, iters: int) -> float:
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="8192x8192,8192x28672")
    p.add_argument("--tokens", default="8,512")
    p.add_argument("--iters", type=int, default=50)
    a = p.parse_args()
    dev = jax.devices()[0]
    for size in a.sizes.split(","):
        I, O = (int(v) for v in size.split("x"))
        key = jax.random.key(0)
        w = jax.random.normal(key, (I, O), jnp.float32) / np.sqrt(I)
        for T in (int(t) for t in a.tokens.split(",")):
            x = jax.random.normal(jax.random.key(1), (1, T, I), jnp.float32).astype(jnp.bfloat16)
            wb = w.astype(jnp.bfloat16)
            peer = jax.jit(lambda x, w: jnp.einsum("bti,io->bto", x, w))
            c = peer.lower(x, wb).compile()
            mem = c.memory_analysis()
            base = dict(bench="quant_matmul", device=dev.device_kind, backend=jax.default_backend(), I=I, O=O,
                        tokens=T)
            peer_s = timed(c, x, wb, iters=a.iters)
            print(json.dumps(dict(base, impl="bf16_einsum", temp_bytes=mem.temp_size_in_bytes,
                                  argument_bytes=mem.argument_size_in_bytes, seconds=peer_s)), flush=True)
            for name, qc in (("int8", QuantConfig(bits=8)), ("int4-g128", QuantConfig(bits=4))):
                q, s = jax.jit(lambda w: quant.quantize(w, qc, (I,), (O,)))(w)
                ref = jnp.einsum("bti,io->bto", x.astype(jnp.float32),
                                 quant.dequantize(q, s, qc, (I,), (O,)))
                variants = [("default", qc, None), ("oneshot", QuantConfig(bits=qc.bits, chunk_bytes=1 << 62), None)]
                if qc.group_size:
                    variants += [(m, qc, m) for m in ("grouped", "dequant")]
                for variant, qcv, force in variants:
                    quant.FORCE_MODE = force
                    f = jax.jit(lambda x, q, s, qcv=qcv: quant.matmul(x, q, s, qcv, (I,), (O,), jnp.bfloat16))
                    c = f.lower(x, q, s).compile()
                    mem = c.memory_analysis()
                    y = c(x, q, s)
                    err = float(jnp.max(jnp.abs(y.astype(jnp.float32) - ref)) / jnp.max(jnp.abs(ref)))
                    mode, steps = quant.plan(qcv, T, I, O, jnp.bfloat16, jax.default_backend())
                    quant.FORCE_MODE = None
                    sec = timed(c, x, q, s, iters=a.iters)
                    print(json.dumps(dict(base, impl=f"{name}_{variant}", mode=mode, steps=steps,
                                          temp_bytes=mem.temp_size_in_bytes,
                                          argument_bytes=mem.argument_size_in_bytes,
                                          dequantized_weight_bytes=I * O * 2, seconds=sec,
                                          vs_bf16=sec / peer_s, max_rel_error=err)), flush=True)


if __name__ == "__main__":
    main()
