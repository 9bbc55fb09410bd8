"""The training step's FLOPs per token as its program asks for them, against the model's.

XLA's cost analysis counts a loop body once (the layer scan, gradient accumulation, the int4 matmul's
chunk loop) and gives a Pallas kernel no FLOPs, so the count is taken from the step's jaxpr: every
matmul (dot_general) after differentiation and rematerialisation, a scan's body times its length, a
Pallas kernel's body times its grid (every block, so causal splash attention counts the masked blocks
it skips at run time), a shard_map body times its shards, the costlier branch of a cond.
Against the model's FLOPs per token (forward, activation gradients and the trained weights' gradients,
no recomputation), the ratio shows what the remat policy recomputes and any other matmul the program
adds. Tracing needs no compile, so a 405B step is counted in seconds.
"""

from __future__ import annotations

import math

from jax.extend import core

from planner.job import Job, Programs, model_config


def step_flops_per_token(job: Job, mesh, programs: Programs) -> dict:
    """{"program_flops_per_token", "model_flops_per_token", "program_vs_model", "uncounted_loops"}."""
    cfg = model_config(job)
    batch = job.batch or mesh.shape["data"] * mesh.shape["fsdp"]
    counter = Counter()
    flops = counter.count(programs.trace_train(cfg, mesh, batch=batch, seq=job.seq, accum=job.accum).jaxpr)
    per_token = flops / (batch * job.seq)
    model = cfg.train_flops_per_token(job.seq, lora_only=job.mode != "full")
    return {"program_flops_per_token": per_token, "model_flops_per_token": model,
            "program_vs_model": round(per_token / model, 3), "uncounted_loops": counter.while_loops}


class Counter:
    """Matmul FLOPs of a jaxpr, loops unrolled by count. A while loop (no static trip count) counts once
    and is tallied in `while_loops`."""

    def __init__(self):
        self.while_loops = 0

    def count(self, jaxpr) -> float:
        jaxpr = getattr(jaxpr, "jaxpr", jaxpr)  # a ClosedJaxpr's Jaxpr
        return sum(self._eqn(e) for e in jaxpr.eqns)

    def _eqn(self, eqn) -> float:
        name, p = eqn.primitive.name, eqn.params
        if name == "dot_general":
            (contract, _), _ = p["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            return 2.0 * eqn.outvars[0].aval.size * math.prod(lhs[d] for d in contract)
        if name == "scan":
            return p["length"] * self.count(p["jaxpr"])
        if name == "cond":
            return max(self.count(b) for b in p["branches"])
        if name == "while":
            self.while_loops += 1
            return self.count(p["body_jaxpr"])
        if name == "pallas_call":
            return math.prod(p["grid_mapping"].grid) * self.count(p["jaxpr"])
        if name == "shard_map":
            axes = p.get("newly_manual_axes") or p.get("manual_axes") or p.get("axis_names") or ()
            return math.prod(p["mesh"].shape[a] for a in axes) * self.count(p["jaxpr"])
        return sum(self.count(v) for v in p.values() if isinstance(v, (core.Jaxpr, core.ClosedJaxpr)))
