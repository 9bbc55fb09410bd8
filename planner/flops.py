"""The training step's FLOPs per token as the compiler counts them, against the model's.

XLA's cost analysis counts a loop body once, so the scanned step's figure holds one layer's work
whatever the depth (and one micro-batch's with gradient accumulation). The same step compiled with
its layers unrolled at depth 1 and 2 gives the outside part and one layer's part exactly; the step's
FLOPs are outside + layers x layer, per micro-batch, times the micro-batches. Set against the model's
FLOPs per token (forward, activation gradients and the trained weights' gradients, no recomputation),
the ratio shows what the remat policy recomputes and anything else the program wastes.
"""

from __future__ import annotations

import dataclasses

from planner.compile import compile_job
from planner.job import Job, Programs, model_config


def step_flops_per_token(job: Job, mesh, programs: Programs) -> dict:
    """{"compiled_flops_per_token", "model_flops_per_token", "compiled_vs_model"} for a training job."""
    cfg = model_config(job)
    batch = job.batch or mesh.shape["data"] * mesh.shape["fsdp"]
    micro = dataclasses.replace(job, batch=batch // job.accum, accum=1, scan_layers=False)
    per_depth = [compile_job(dataclasses.replace(micro, layers=d), mesh, programs)["flops"] for d in (1, 2)]
    layer = per_depth[1] - per_depth[0]
    outside = per_depth[0] - layer
    devices = mesh.devices.size
    per_token = (outside + cfg.num_layers * layer) * devices / (micro.batch * job.seq)
    model = cfg.train_flops_per_token(job.seq, lora_only=job.mode != "full")
    return {"compiled_flops_per_token": per_token, "model_flops_per_token": model,
            "compiled_vs_model": round(per_token / model, 3)}
