"""Lowering a job's real step (through the `Programs` it was given: train's step for lora/qlora/full,
serve's engine step for serve) and compiling it; the compiler's per-device numbers (memory_analysis,
cost_analysis), or its refusal (RESOURCE_EXHAUSTED) as a figure."""

from __future__ import annotations

import re
import time

import jax

from planner.estimate import GiB
from planner.job import Job, PlanError, Programs, model_config
from sharding import aot_compile
from sharding.rules import SERVE_RULES

_REFUSAL = re.compile(r"RESOURCE_EXHAUSTED.*?required for [^(]*\(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)",
                      re.S)


def lower_job(job: Job, mesh, programs: Programs) -> jax.stages.Lowered:
    """The job's real step on `mesh`, lowered from abstract shapes (no weights anywhere)."""
    cfg = model_config(job)
    batch = job.batch or mesh.shape["data"] * mesh.shape["fsdp"]
    if not job.training:
        if programs.lower_serve is None:
            raise PlanError("this planner was given no serving step to compile (Programs.lower_serve)")
        # one step prefilling `seq` tokens of each of `batch` sequences (flattened) over a block pool of
        # batch x kv_len tokens
        kv_len = job.kv_len or job.seq
        return programs.lower_serve(cfg, mesh, tokens=batch * job.seq, seqs=batch, max_len=kv_len,
                                    kv_tokens=batch * kv_len, kv_dtype="auto", rules=SERVE_RULES)
    return programs.lower_train(cfg, mesh, batch=batch, seq=job.seq, accum=job.accum)


def compiled_numbers(compiled, platform: str = "tpu") -> dict:
    """Per-device bytes (memory_analysis) and FLOPs (cost_analysis) of a compiled program. XLA:CPU's
    peak is not a peak (the same few hundred KiB whatever the program), so on CPU the total is
    arguments + outputs - aliased + temporaries."""
    ma = compiled.memory_analysis()
    cost = aot_compile.cost(compiled)
    arg, out, alias, temp = (ma.argument_size_in_bytes, ma.output_size_in_bytes, ma.alias_size_in_bytes,
                             ma.temp_size_in_bytes)
    peak = (getattr(ma, "peak_memory_in_bytes", 0) or 0) if platform != "cpu" else 0
    total = max(peak, 0) or (arg + out - alias + temp)
    return {
        "per_device_bytes": int(total),
        "argument_bytes": int(arg), "output_bytes": int(out), "alias_bytes": int(alias), "temp_bytes": int(temp),
        "generated_code_bytes": int(ma.generated_code_size_in_bytes),
        "peak_bytes": int(peak),
        "flops": float(cost.get("flops", 0.0)),
        "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
    }


def _refused(error: Exception, seconds: dict) -> dict | None:
    """The compiler's figure when it refused the program for not fitting its HBM, else None."""
    m = _REFUSAL.search(str(error))
    if not m:
        return None
    need = int(float(m.group(1)) * GiB)
    return {"per_device_bytes": need, "argument_bytes": None, "output_bytes": None, "alias_bytes": None,
            "temp_bytes": None, "generated_code_bytes": None, "peak_bytes": need, "flops": None,
            "bytes_accessed": None, **seconds, "error": f"compiler: {m.group(0).split(': ', 1)[-1]}"}


def compile_job(job: Job, mesh, programs: Programs) -> dict:
    """Lowers and compiles the job's real step on `mesh`; the compiler's per-device numbers."""
    t0 = time.perf_counter()
    lowered = lower_job(job, mesh, programs)
    t1 = time.perf_counter()
    try:
        compiled = aot_compile.compile(lowered, mesh.devices)
    except Exception as e:  # the TPU compiler refuses a program that does not fit its HBM
        refused = _refused(e, {"lower_seconds": round(t1 - t0, 1),
                               "compile_seconds": round(time.perf_counter() - t1, 1)})
        if refused is None:
            raise
        return refused
    seconds = getattr(compiled, "compile_seconds", round(time.perf_counter() - t1, 1))  # a cached compile's own
    return {**compiled_numbers(compiled, mesh.devices.flat[0].platform), "lower_seconds": round(t1 - t0, 1),
            "compile_seconds": seconds}
