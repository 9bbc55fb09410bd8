"""python -m planner: what slice a Llama job needs, and whether it fits, in numbers the XLA compiler
confirms. (`python -m sharding.plan` is the same command.)

    python -m planner --model llama3.1-405b --mode qlora --quant int4 --topology v6e-16 --compile
    python -m planner --model llama3.1-405b --mode serve --quant int8 --topology h200x8
    python -m planner --model llama3.1-405b --mode lora --topology v6e --smallest --compile
    python -m planner --model path/to/config.json --mode full --topology v5p-128 --json

Per device it counts, by category: weights (the frozen or trained base, exact shard bytes, int4
packed), LoRA params, gradients, optimizer state (AdamW: two moments in the trained dtype), saved
activations (what the remat policy keeps for the backward pass, per layer), KV cache (serving) and
compiler temporaries (one layer's all-gathered weights with its prefetch, one layer's recomputed
activations and their gradients, one attention chunk's scores, the LM head's gathered weight and
float32 logits). `--compile` lowers and compiles this project's real step (train's TrainProgram for
lora/qlora/full; for serve the engine's step, a prefill of --seq tokens into a --kv-len cache) for
the TPU topology on this machine (libtpu, no TPU needed) and prints the compiler's per-chip peak
memory (memory_analysis) and FLOPs (cost_analysis) beside the estimate. GPU topologies get the
analytic plan (a compile needs the GPUs themselves: run --compile on the node, where jax.devices()
are those GPUs).

The mesh: `--mesh fsdp=4,sequence=4` or, by default, the simplest that fits with `--headroom`
(pure FSDP first, then tensor parallelism over heads/MLP/vocab, then sequence parallelism, which
is what cuts saved activations at long sequences).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax

from planner.job import Job, PlanError, Programs
from planner.plan import plan, smallest
from planner.report import format_plan
from serve.compile_check import lower_step as lower_serve
from train.program import lower_step as lower_train
from train.program import trace_step as trace_train

# The entry point is where the planner meets the jobs it plans: their real steps, lowered.
PROGRAMS = Programs(lower_train=lower_train, lower_serve=lower_serve, trace_train=trace_train)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m planner", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama3.1-405b", help="preset name or Hugging Face config.json")
    p.add_argument("--mode", default="lora", help="serve | lora | qlora | full")
    p.add_argument("--quant", default=None, help="bf16 | int8 | int4 (default: int4 for qlora, else bf16)")
    p.add_argument("--topology", default="v6e-16",
                   help="v6e-8 … v6e-256, 2xv6e-256, v5p-128, v5e-16, h100x8, h200x8, …; with --smallest a family")
    p.add_argument("--mesh", default=None, help="axis sizes, e.g. fsdp=4,sequence=4 (default: the simplest that fits)")
    p.add_argument("--batch", type=int, default=None, help="global rows per step (default: one per data x fsdp)")
    p.add_argument("--seq", type=int, default=4096, help="sequence length (serve: prompt length)")
    p.add_argument("--kv-len", type=int, default=None, help="serve: KV-cache positions per sequence (default: --seq)")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-targets", default="q,k,v,o,gate,up,down")
    p.add_argument("--remat", default="full",
                   help="none | full | dots | attn_proj | auto (the least recomputation that fits; needs --compile "
                        "to be decided by the compiler)")
    p.add_argument("--accum", type=int, default=1, help="gradient accumulation micro-batches")
    p.add_argument("--layers", type=int, default=None, help="reduced depth (quick checks)")
    p.add_argument("--headroom", type=float, default=0.0, help="fraction of HBM to keep free for FITS (e.g. 0.1)")
    p.add_argument("--compile", action="store_true", help="compile the real step for the TPU topology (AOT)")
    p.add_argument("--flops", action="store_true",
                   help="with --compile, training: the step's matmul FLOPs per token (counted in its jaxpr, "
                        "recomputation included) against the model's")
    p.add_argument("--smallest", action="store_true", help="the smallest slice of --topology's family that fits")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if "JAX_PLATFORMS" not in os.environ:  # the default backend stays local; TPU devices come from libtpu
        jax.config.update("jax_platforms", "cpu")
    quant = args.quant or ("int4" if args.mode == "qlora" else "bf16")
    job = Job(model=args.model, mode=args.mode, quant=quant, batch=args.batch, seq=args.seq, kv_len=args.kv_len,
              lora_rank=args.lora_rank, lora_targets=tuple(t for t in args.lora_targets.split(",") if t),
              remat=args.remat, accum=args.accum, layers=args.layers)
    log = None if args.json else (lambda m: print(m, file=sys.stderr, flush=True))
    try:
        if args.smallest:
            r = smallest(job, args.topology, args.compile, args.headroom, args.mesh, log, programs=PROGRAMS)
        else:
            r = plan(job, args.topology, args.mesh, args.compile, args.headroom, programs=PROGRAMS, flops=args.flops,
                     log=log)
    except PlanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(r) if args.json else format_plan(r))
    return 0 if r["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())
