"""A plan: the job on a topology (a mesh given or chosen), the analytic estimate, and with `compile`
the compiler's numbers for the job's real step; the smallest slice of a family that fits; and a plan
on this machine's own devices (what `python -m train --compile-only` does without a topology)."""

from __future__ import annotations

import dataclasses
import os

import jax

from planner import remat
from planner.compile import compile_job
from planner.estimate import GiB, abstract_mesh, estimate
from planner.flops import step_flops_per_token
from planner.job import Job, PlanError, Programs, model_config
from planner.search import MESH_HEADROOM, choose_mesh
from sharding import topology as topo_lib
from sharding.mesh import AXES, axis_sizes, make_mesh


def _given_mesh(job: Job, topo, mesh_spec: str) -> dict[str, int]:
    """The axis sizes of `mesh_spec` on `topo`, checked against the slices and the batch."""
    try:
        sizes = axis_sizes(mesh_spec, topo.chips)
    except ValueError as e:
        raise PlanError(str(e)) from None
    if topo.num_slices > 1 and sizes["data"] % topo.num_slices:
        raise PlanError(f"mesh {mesh_spec!r}: {topo.name} has {topo.num_slices} slices; the data axis "
                        f"({sizes['data']}) must be a multiple of {topo.num_slices}")
    batch = job.batch or sizes["data"] * sizes["fsdp"]
    rows = batch // job.accum
    if job.training and rows % (sizes["data"] * sizes["fsdp"]):
        raise PlanError(f"batch: {rows} rows per step is not divisible by mesh axes data x fsdp = "
                        f"{sizes['data'] * sizes['fsdp']}; choose --batch as a multiple of it")
    return sizes


def _devices(topo) -> list:
    """The devices to compile for: libtpu's for a TPU topology, this machine's GPUs for a GPU node."""
    if topo.kind == "tpu":
        return topo.devices()
    devices = jax.devices()
    if devices[0].platform != "gpu" or len(devices) != topo.chips:
        raise PlanError(f"--compile for {topo.name} needs its {topo.chips} GPUs attached (here: "
                        f"{len(devices)} {devices[0].platform} device(s)); without them the plan is "
                        f"analytic only")
    return devices


def _verdict(result: dict, headroom: float) -> None:
    """Fills fits / headroom / shortfall from the compiled figure where there is one, else the estimate."""
    compiled, total, capacity = result["compiled_per_device_bytes"], result["per_device_bytes"], result["capacity_bytes"]
    basis = compiled or total
    result["basis"] = "compiled" if compiled else "analytic"
    result["fits"] = basis <= capacity * (1 - headroom)
    result["headroom"] = round(1 - basis / capacity, 4)
    result["short_by_bytes"] = max(0, int(basis - capacity * (1 - headroom)))
    if compiled:
        result["analytic_vs_compiled"] = round(total / compiled - 1, 4)


def _spec(sizes: dict[str, int]) -> str:
    return ",".join(f"{a}={n}" for a, n in sizes.items())


def plan(job: Job, topology: str, mesh_spec: str | None = None, compile: bool = False, headroom: float = 0.0,
         *, programs: Programs, flops: bool = False, log=None) -> dict:
    """The plan for `job` on `topology` (a name from sharding.topology) as one dict (the --json output).
    `flops` (with `compile`, training): the step's matmul FLOPs per token against the model's
    (planner/flops.py). `job.remat == "auto"`: the cheapest remat policy that fits (planner/remat.py)."""
    job.validate()
    if job.remat == "auto":
        result = remat.search(
            job, lambda j: plan(j, topology, mesh_spec, False, headroom, programs=programs),
            lambda j, a: plan(j, topology, mesh_spec or _spec(a["mesh"]), True, headroom, programs=programs)
            if compile else a, headroom, log)
        if flops and compile and job.training:
            chosen = dataclasses.replace(job, remat=result["remat"])
            result.update(step_flops_per_token(chosen, make_mesh(result["mesh"], _devices(topo_lib.parse(topology))),
                                               programs))
        return result
    try:
        topo = topo_lib.parse(topology)
    except ValueError as e:
        raise PlanError(str(e)) from None
    cfg = model_config(job)
    capacity = topo.hbm_bytes
    if mesh_spec:
        sizes = _given_mesh(job, topo, mesh_spec)
        est = estimate(job, abstract_mesh(sizes))
    else:
        sizes, est = choose_mesh(job, topo.chips, capacity, max(headroom, MESH_HEADROOM), topo.num_slices)
    batch = job.batch or sizes["data"] * sizes["fsdp"]
    result = {
        "model": job.model, "params": cfg.num_params(), "layers": cfg.num_layers,
        "mode": job.mode, "quant": job.quant, "topology": topo.name, "chips": topo.chips,
        "device_kind": topo.family.device_kind, "mesh": {a: sizes[a] for a in AXES},
        "batch": batch, "seq": job.seq, "accum": job.accum, "remat": job.remat,
        "kv_len": (job.kv_len or job.seq) if job.mode == "serve" else None,
        "lora": ({"rank": job.lora_rank, "targets": list(job.lora_targets)} if job.mode in ("lora", "qlora")
                 else None),
        "per_device": est, "per_device_bytes": sum(est.values()),
        "compiled_per_device_bytes": None, "compiled": None,
        "capacity_bytes": capacity,
    }
    if compile:
        mesh = make_mesh({a: sizes[a] for a in AXES}, _devices(topo))
        result["compiled"] = compile_job(job, mesh, programs)
        result["compiled_per_device_bytes"] = result["compiled"]["per_device_bytes"]
        if flops and job.training:
            result.update(step_flops_per_token(job, mesh, programs))
    _verdict(result, headroom)
    if job.training:
        tokens = batch * job.seq
        result["model_flops_per_chip"] = cfg.train_flops_per_token(job.seq, job.mode != "full") * tokens / topo.chips
    return result


def _family(family: str):
    """(slices prefix, Family) of a family name such as "v6e", "h100" or "2xv6e"."""
    slices, _, fam = family.lower().rpartition("x") if family.lower()[0].isdigit() else ("", "", family.lower())
    fam = fam.split("-")[0]
    if fam not in topo_lib.FAMILIES:
        raise PlanError(f"unknown topology family {family!r}; families: {', '.join(topo_lib.FAMILIES)} "
                        f"(valid names: {topo_lib.names_hint()})")
    return (f"{slices}x" if slices else ""), topo_lib.FAMILIES[fam]


def smallest(job: Job, family: str, compile: bool = False, headroom: float = 0.0, mesh_spec: str | None = None,
             log=None, *, programs: Programs) -> dict:
    """The plan on the smallest slice of `family` (e.g. "v6e", "h100", "2xv6e") that fits."""
    prefix, f = _family(family)
    sep = "x" if f.kind == "gpu" else "-"
    last = None
    for size in f.sizes:
        name = f"{prefix}{f.name}{sep}{size}"
        try:
            analytic = plan(job, name, mesh_spec, compile=False, headroom=headroom, programs=programs)
        except PlanError:
            continue  # this size cannot hold the mesh (e.g. batch or heads do not divide)
        last = analytic
        if log:
            log(f"{name}: analytic {analytic['per_device_bytes'] / GiB:.2f} GiB of "
                f"{analytic['capacity_bytes'] / GiB:.2f} GiB -> {'fits' if analytic['fits'] else 'does not fit'}")
        if not analytic["fits"]:
            continue
        if not compile or f.kind != "tpu":
            return analytic
        spec = ",".join(f"{k}={v}" for k, v in analytic["mesh"].items())
        compiled = plan(job, name, spec, compile=True, headroom=headroom, programs=programs)
        if log:
            log(f"{name}: compiled {compiled['compiled_per_device_bytes'] / GiB:.2f} GiB -> "
                f"{'fits' if compiled['fits'] else 'does not fit'}")
        if compiled["fits"]:
            return compiled
        last = compiled
    if last is None:
        raise PlanError(f"no {family} slice can hold this job")
    last = dict(last)
    last["note"] = f"no {family} slice up to {last['topology']} fits"
    return last


def _local_capacity(device) -> int:
    """The runtime's bytes_limit where it reports one; on CPU, host memory."""
    capacity = (device.memory_stats() or {}).get("bytes_limit")
    if capacity is None:
        capacity = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return capacity


def plan_local(job: Job, mesh_spec: str | None, *, programs: Programs, headroom: float = 0.0,
               flops: bool = False, log=None) -> dict:
    """No topology: the job compiled on this machine's devices (capacity from the runtime)."""
    mesh = make_mesh(mesh_spec)
    if job.remat == "auto":
        result = remat.search(job, lambda j: _local(j, mesh, None, headroom),
                              lambda j, a: _local(j, mesh, programs, headroom), headroom, log)
        if flops:
            result.update(step_flops_per_token(dataclasses.replace(job, remat=result["remat"]), mesh, programs))
        return result
    result = _local(job, mesh, programs, headroom)
    if flops and job.training:
        result.update(step_flops_per_token(job, mesh, programs))
    return result


def _local(job: Job, mesh, programs: Programs | None, headroom: float) -> dict:
    """The plan on `mesh` of local devices: compiled with `programs`, analytic only without."""
    sizes = dict(mesh.shape)
    device = jax.devices()[0]
    est = estimate(job, abstract_mesh(sizes))
    capacity = _local_capacity(device)
    compiled = compile_job(job, mesh, programs) if programs else None
    cfg = model_config(job)
    basis = compiled["per_device_bytes"] if compiled else sum(est.values())
    return {
        "model": job.model, "params": cfg.num_params(), "layers": cfg.num_layers, "mode": job.mode,
        "quant": job.quant, "topology": f"local ({jax.device_count()} × {device.device_kind})",
        "chips": jax.device_count(), "device_kind": device.device_kind,
        "mesh": {a: sizes[a] for a in AXES}, "batch": job.batch, "seq": job.seq, "accum": job.accum,
        "remat": job.remat, "kv_len": None, "lora": {"rank": job.lora_rank, "targets": list(job.lora_targets)},
        "per_device": est, "per_device_bytes": sum(est.values()), "compiled": compiled,
        "compiled_per_device_bytes": compiled and basis, "capacity_bytes": capacity,
        "basis": "compiled" if compiled else "analytic",
        "fits": basis <= capacity * (1 - headroom), "headroom": round(1 - basis / capacity, 4),
        "short_by_bytes": max(0, int(basis - capacity * (1 - headroom))),
        "analytic_vs_compiled": round(sum(est.values()) / basis - 1, 4) if compiled else None,
    }
