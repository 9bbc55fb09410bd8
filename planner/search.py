"""Meshes worth trying for a job, and the simplest that fits: pure FSDP first, then tensor parallelism
over heads/MLP/vocab, then sequence parallelism (what cuts saved activations at long sequences)."""

from __future__ import annotations

from planner.estimate import abstract_mesh, estimate
from planner.job import Job, PlanError, model_config

MESH_HEADROOM = 0.10  # the default mesh is the simplest whose estimate leaves this much HBM free


def candidate_meshes(job: Job, chips: int, num_slices: int = 1) -> list[dict[str, int]]:
    """Meshes worth trying, simplest first: pure FSDP, then tensor parallelism (up to the KV heads),
    then sequence parallelism. `data` spans the slices of a multi-slice topology."""
    cfg = model_config(job)
    out = []
    pows = [2 ** i for i in range(0, 12) if 2 ** i <= chips]
    for seq_ax in pows:
        if job.seq % seq_ax or seq_ax > 16:
            continue
        for tensor in pows:
            if cfg.num_kv_heads % tensor or tensor > 8:
                continue
            rest = chips // (seq_ax * tensor * num_slices)
            if rest < 1 or chips % (seq_ax * tensor * num_slices):
                continue
            out.append({"data": num_slices, "fsdp": rest, "sequence": seq_ax, "tensor": tensor})
    if job.training:  # FSDP first; then tensor and sequence parallelism, which cut activations
        out.sort(key=lambda m: (m["sequence"] * m["tensor"], m["sequence"], m["tensor"]))
    else:  # serving: tensor parallelism first (weights stay put), FSDP to shard what is left
        out.sort(key=lambda m: (m["sequence"], -m["tensor"]))
    return out


def choose_mesh(job: Job, chips: int, capacity: int, headroom: float,
                num_slices: int = 1) -> tuple[dict[str, int], dict[str, int]]:
    """(mesh sizes, estimate): the first candidate that fits with `headroom`, else the smallest."""
    best = None
    errors = []
    for sizes in candidate_meshes(job, chips, num_slices):
        mesh = abstract_mesh(sizes)
        batch = job.batch or sizes["data"] * sizes["fsdp"]
        rows = batch // job.accum
        if rows % (sizes["data"] * sizes["fsdp"]):
            errors.append(f"batch {rows} rows is not divisible by data x fsdp = {sizes['data'] * sizes['fsdp']}")
            continue
        try:
            est = estimate(job, mesh)
        except PlanError as e:
            errors.append(str(e))
            continue
        total = sum(est.values())
        if total <= capacity * (1 - headroom):
            return sizes, est
        if best is None or total < sum(best[1].values()):
            best = (sizes, est)
    if best is None:
        raise PlanError(f"no mesh of {chips} devices can hold this job: {errors[0] if errors else 'no candidates'}")
    return best
