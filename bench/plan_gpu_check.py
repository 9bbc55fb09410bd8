"""The memory planner against a real GPU: plan, compile and run the LoRA / QLoRA training step of a
preset on this machine's GPU(s) with random weights, and print the analytic estimate, the compiler's
peak (memory_analysis) and the runtime's peak (memory_stats) side by side, one JSON line per job.

    python bench/plan_gpu_check.py --model llama3.1-8b --batch 4 --seq 4096 [--quant int4] [--steps 3]

Runs anywhere JAX has devices (CPU works with --model toy); GPU numbers are what it is for.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import model  # noqa: E402
from planner.estimate import abstract_mesh, estimate  # noqa: E402
from planner.job import Job, model_config  # noqa: E402
from sharding.mesh import make_mesh  # noqa: E402
from train.config import OptimizerConfig  # noqa: E402
from train.program import StepShape, TrainProgram  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama3.1-8b")
    ap.add_argument("--quant", default="bf16")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--mesh", default="fsdp=-1")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--layers", type=int, default=None)
    args = ap.parse_args()

    mode = "lora" if args.quant == "bf16" else "qlora"
    job = Job(model=args.model, mode=mode, quant=args.quant, batch=args.batch, seq=args.seq, layers=args.layers)
    mesh = make_mesh(args.mesh)
    dev = jax.devices()[0]
    est = estimate(job, abstract_mesh(dict(mesh.shape)))
    cfg = model_config(job)
    row = {"bench": "plan_gpu_check", "device": dev.device_kind, "devices": jax.device_count(), "model": args.model,
           "mode": mode, "quant": args.quant, "batch": args.batch, "seq": args.seq, "mesh": dict(mesh.shape),
           "analytic": est, "analytic_total": sum(est.values())}

    t0 = time.perf_counter()
    m = model.init(cfg, mesh=mesh)
    jax.block_until_ready(m.state)
    row["init_s"] = round(time.perf_counter() - t0, 1)
    program = TrainProgram.build(cfg, m.graphdef, m.state, mesh, StepShape(args.batch, args.seq), OptimizerConfig(),
                                 100)
    trainable, frozen = program.split(m.state)
    state = program.init_state(trainable)
    del trainable
    b_sh = program.batch_shardings
    rng = np.random.default_rng(0)
    toks = rng.integers(0, cfg.vocab_size, (args.batch, args.seq + 1)).astype(np.int32)
    host = {"inputs": toks[:, :-1], "targets": toks[:, 1:], "weights": np.ones((args.batch, args.seq), np.float32),
            "segments": np.ones((args.batch, args.seq), np.int32),
            "positions": np.broadcast_to(np.arange(args.seq, dtype=np.int32), (args.batch, args.seq)).copy()}
    batch = {k: jax.device_put(v, b_sh[k]) for k, v in host.items()}
    t0 = time.perf_counter()
    compiled = program.step.lower(state, frozen, batch).compile()
    row["compile_s"] = round(time.perf_counter() - t0, 1)
    ma = compiled.memory_analysis()
    row["compiled_peak"] = int(getattr(ma, "peak_memory_in_bytes", 0) or 0)
    row["compiled_arg_temp"] = int(ma.argument_size_in_bytes + ma.temp_size_in_bytes + ma.output_size_in_bytes
                                   - ma.alias_size_in_bytes)
    times, losses = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, frozen, batch)
        losses.append(float(metrics["loss"]))
        times.append(time.perf_counter() - t0)
    stats = dev.memory_stats() or {}
    row["runtime_peak"] = stats.get("peak_bytes_in_use")
    row["bytes_limit"] = stats.get("bytes_limit")
    row["step_s"] = [round(t, 3) for t in times]
    row["loss"] = [round(x, 3) for x in losses]
    row["tokens_per_s"] = round(args.batch * args.seq / min(times), 1)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
