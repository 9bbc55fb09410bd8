"""The compile-only check a job's entry point runs (`python -m train --compile-only`): the job's real
step compiled for its topology (a TPU slice with libtpu on any machine; a GPU node when its GPUs are
attached, else planned analytically) or, with no topology, for this machine's own devices; prints
FITS or DOES NOT FIT with the per-chip numbers."""

from __future__ import annotations

import sys

import jax

from planner import report
from planner.job import Job, PlanError, Programs
from planner.plan import plan, plan_local
from sharding import topology as topo_lib


def compile_only(job: Job, topology: str | None, mesh_spec: str | None, programs: Programs, out=None,
                 headroom: float = 0.0) -> int:
    """Prints the plan and its `PLAN {...}` line to `out`; returns the exit status: 0 fits, 1 does not
    fit, 2 bad input (the message on stderr). A training job's report has its compiled FLOPs per token;
    `job.remat == "auto"` searches the policies (planner/remat.py) and reports each one tried."""
    out = out or sys.stdout
    log = (lambda m: print(m, file=sys.stderr, flush=True))
    try:
        if topology:
            topo = topo_lib.parse(topology)
            local_gpus = topo.kind == "gpu" and jax.default_backend() == "gpu" and jax.device_count() == topo.chips
            result = plan(job, topo.name, mesh_spec, compile=topo.kind == "tpu" or local_gpus, headroom=headroom,
                          programs=programs, flops=job.training, log=log)
        else:
            result = plan_local(job, mesh_spec, programs=programs, headroom=headroom, flops=job.training, log=log)
    except (PlanError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.format_plan(result), file=out)
    print(report.summary_line(result), file=out)
    return 0 if result["fits"] else 1
