"""Remat by measurement: `remat: auto` takes the policy that recomputes least among those whose
compiled step fits with the headroom asked for.

Policies in order of recomputation (and so of memory, the other way round): none (keep every
activation), dots (keep the matmul outputs, recompute the elementwise work), attn_proj (keep the
attention projections), full (keep each layer's input, recompute the layer). A policy whose analytic
estimate is over the limit by more than the estimate's known error is ruled out without compiling it;
the others are compiled in order until one fits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from planner.job import Job

ORDER = ("none", "dots", "attn_proj", "full")  # least recomputation first
ANALYTIC_SLACK = 0.10  # the estimate is within 10% of the compiler (BENCHMARKS.md): beyond it, no compile


def search(job: Job, analytic: Callable[[Job], dict], compiled: Callable[[Job, dict], dict],
           headroom: float, log=None) -> dict:
    """The plan of the first policy in ORDER that fits; `analytic(job)` plans without compiling,
    `compiled(job, analytic_plan)` compiles on the analytic plan's mesh. The result carries
    `remat_search`: one row per policy tried."""
    tries, last = [], None
    for policy in ORDER:
        j = dataclasses.replace(job, remat=policy)
        a = analytic(j)
        limit = a["capacity_bytes"] * (1 - headroom)
        row = {"remat": policy, "analytic_bytes": a["per_device_bytes"], "compiled_bytes": None, "fits": False}
        tries.append(row)
        if a["per_device_bytes"] > limit * (1 + ANALYTIC_SLACK):
            row["note"] = "analytic estimate over the limit by more than its error: not compiled"
            _log(log, row)
            last = last or a
            continue
        last = compiled(j, a)
        row["compiled_bytes"], row["fits"] = last["compiled_per_device_bytes"], last["fits"]
        _log(log, row)
        if last["fits"]:
            break
    return {**last, "remat_search": tries}


def _log(log, row: dict) -> None:
    if log is None:
        return
    gib = 1 << 30
    got = (f"compiled {row['compiled_bytes'] / gib:.2f} GiB -> {'fits' if row['fits'] else 'does not fit'}"
           if row["compiled_bytes"] is not None else row.get("note", ""))
    log(f"remat {row['remat']}: analytic {row['analytic_bytes'] / gib:.2f} GiB, {got}")
