"""`python -m train --config NAME --compile-only`: compile the config's real training step for its
mesh and TPU topology (ahead of time, on this machine) and say whether it fits, per chip.

The job is the one `python -m train` would run: the model preset or checkpoint config, quantized base
(`model.quant`: QLoRA), LoRA adapters, remat policy, `data.batch_size` rows of `data.seq_len` tokens in
`data.grad_accum` micro-batches, over `mesh`. `topology` names the hardware: a TPU slice (v6e-16, …),
compiled with libtpu on any machine; a GPU node (h100x8, …), compiled when its GPUs are attached, else
planned analytically; unset: this machine's own devices. Exit status 0 only if it fits.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("train")


def job_for(cfg):
    """The planner's Job for a TrainConfig."""
    from sharding.plan import Job

    spec = cfg.model
    model = spec.preset
    if spec.checkpoint:
        p = Path(spec.checkpoint)
        model = str(p / "config.json") if (p / "config.json").exists() else str(p)
    quant = spec.quant or "bf16"
    return Job(model=model, mode="qlora" if spec.quant else "lora", quant=quant, batch=cfg.data.batch_size,
               seq=cfg.data.seq_len, lora_rank=cfg.lora.rank, lora_targets=tuple(cfg.lora.targets),
               remat=spec.remat, accum=cfg.data.grad_accum, layers=spec.num_layers)


def compile_only(cfg, out=None) -> int:
    """Compiles (or, for GPU nodes without their GPUs, plans) the step; prints FITS or DOES NOT FIT
    with the per-chip numbers. Returns the exit status: 0 fits, 1 does not fit, 2 bad config."""
    import jax

    from sharding import plan as plan_lib
    from sharding import topology as topo_lib

    out = out or sys.stdout
    job = job_for(cfg)
    try:
        if cfg.topology:
            topo = topo_lib.parse(cfg.topology)
            local_gpus = topo.kind == "gpu" and jax.default_backend() == "gpu" and jax.device_count() == topo.chips
            result = plan_lib.plan(job, topo.name, cfg.mesh, compile=topo.kind == "tpu" or local_gpus)
        else:
            result = _plan_local(job, cfg.mesh)
    except (plan_lib.PlanError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(plan_lib.format_plan(result), file=out)
    print("PLAN " + json.dumps({k: result[k] for k in ("topology", "mesh", "per_device_bytes",
                                                       "compiled_per_device_bytes", "capacity_bytes", "fits",
                                                       "headroom")}), file=out)
    return 0 if result["fits"] else 1


def _plan_local(job, mesh_spec):
    """No topology: this machine's devices (capacity from the runtime where it reports one)."""
    import jax

    from sharding import plan as plan_lib
    from sharding.mesh import AXES, make_mesh

    mesh = make_mesh(mesh_spec)
    sizes = dict(mesh.shape)
    est = plan_lib.estimate(job, plan_lib._abstract(sizes), jax.devices()[0].platform)
    stats = jax.devices()[0].memory_stats() or {}
    capacity = stats.get("bytes_limit")
    if capacity is None:  # CPU: host memory
        import os

        capacity = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    compiled = plan_lib.compile_job(job, mesh)
    cfg = plan_lib.model_config(job)
    basis = compiled["per_device_bytes"]
    return {
        "model": job.model, "params": cfg.num_params(), "layers": cfg.num_layers, "mode": job.mode,
        "quant": job.quant, "topology": f"local ({jax.device_count()} × {jax.devices()[0].device_kind})",
        "chips": jax.device_count(), "device_kind": jax.devices()[0].device_kind,
        "mesh": {a: sizes[a] for a in AXES}, "batch": job.batch, "seq": job.seq, "accum": job.accum,
        "remat": job.remat, "kv_len": None, "lora": {"rank": job.lora_rank, "targets": list(job.lora_targets)},
        "per_device": est, "per_device_bytes": sum(est.values()), "compiled": compiled,
        "compiled_per_device_bytes": basis, "capacity_bytes": capacity, "basis": "compiled",
        "fits": basis <= capacity, "headroom": round(1 - basis / capacity, 4),
        "short_by_bytes": max(0, basis - capacity),
        "analytic_vs_compiled": round(sum(est.values()) / basis - 1, 4),
    }
