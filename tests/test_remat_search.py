"""Remat by measurement (planner/remat.py) and the step's matmul FLOPs per token (planner/flops.py),
on the 8 CPU devices with the toy model's real training step."""

import dataclasses
import functools

import jax
import pytest

from planner import plan as plan_mod
from planner.compile import compile_job
from planner.flops import Counter, step_flops_per_token
from planner.job import Job, Programs, model_config
from sharding.mesh import make_mesh
from sharding.rules import abstract_arrays
from train.program import BATCH_DTYPES, StepShape, TrainProgram, lower_step, trace_step

PROGRAMS = Programs(lower_train=lower_step, trace_train=trace_step)
JOB = Job(model="toy", mode="lora", batch=8, seq=128, layers=3)


@pytest.fixture(scope="module")
def mesh():
    return make_mesh("fsdp=8")


@pytest.fixture(scope="module", autouse=True)
def compile_once():
    """Each (job, mesh) compiled once for the module: the searches below revisit the same programs."""
    cached = functools.cache(compile_job)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plan_mod, "compile_job", cached)
        yield


def flops(mesh, **kw):
    return step_flops_per_token(dataclasses.replace(JOB, **kw), mesh, PROGRAMS)["program_flops_per_token"]


def test_matmul_count_equals_the_compilers_on_an_unrolled_step(mesh):
    """With the layers unrolled (no loop for XLA's cost analysis to count once), XLA's FLOPs and the jaxpr
    count agree (XLA adds the elementwise work, a fraction of a percent here); scanned, XLA sees one layer."""
    cfg = model_config(dataclasses.replace(JOB, remat="none"))
    got = flops(mesh, remat="none") * JOB.batch * JOB.seq
    unrolled = lower_step(cfg.replace(scan_layers=False), mesh, batch=JOB.batch, seq=JOB.seq).compile()
    scanned = lower_step(cfg, mesh, batch=JOB.batch, seq=JOB.seq).compile()
    assert unrolled.cost_analysis()["flops"] * 8 == pytest.approx(got, rel=0.01)
    assert scanned.cost_analysis()["flops"] * 8 < 0.75 * got


def test_each_layer_counts_and_remat_full_recomputes_the_forward(mesh):
    """Per layer, `full` costs one more forward of the layer than `none`, less what the backward does not
    need (the layer's output projections, o and down, whose results only feed the next layer): 81% of
    the forward counted in the eval program (the loss alone) of the same model."""
    per_layer = {r: flops(mesh, remat=r, layers=3) - flops(mesh, remat=r, layers=2) for r in ("none", "full")}
    assert per_layer["none"] > 0
    assert flops(mesh, remat="none", layers=4) - flops(mesh, remat="none", layers=3) == per_layer["none"]
    forward = forward_flops(mesh, 3) - forward_flops(mesh, 2)
    assert 0.7 * forward < per_layer["full"] - per_layer["none"] < forward


def forward_flops(mesh, layers: int) -> float:
    cfg = model_config(dataclasses.replace(JOB, remat="none", layers=layers))
    p = TrainProgram.abstract(cfg, mesh, StepShape(JOB.batch, JOB.seq))
    params = abstract_arrays(p.abstract_state["params"], p.state_shardings["params"])
    batch = {k: jax.ShapeDtypeStruct((JOB.batch, JOB.seq), BATCH_DTYPES[k], sharding=p.eval_shardings[k])
             for k in p.eval_shardings}
    traced = p.evaluate.trace(params, abstract_arrays(p.abstract_frozen, p.frozen_shardings), batch)
    return Counter().count(traced.jaxpr) / (JOB.batch * JOB.seq)


def test_auto_takes_the_least_recomputation_that_fits(mesh, monkeypatch):
    """With device memory between what `dots` and `attn_proj` compile to, auto skips `none` without
    compiling it (its estimate is far over), compiles `dots` (does not fit) and takes `attn_proj`."""
    sizes = {}
    for policy in ("dots", "attn_proj"):
        sizes[policy] = plan_mod._local(dataclasses.replace(JOB, remat=policy), mesh, PROGRAMS, 0.0)
    capacity = (sizes["dots"]["compiled_per_device_bytes"] + sizes["attn_proj"]["compiled_per_device_bytes"]) // 2
    assert sizes["attn_proj"]["compiled_per_device_bytes"] < capacity < sizes["dots"]["compiled_per_device_bytes"]
    monkeypatch.setattr(plan_mod, "_local_capacity", lambda device: capacity)
    r = plan_mod.plan_local(dataclasses.replace(JOB, remat="auto"), "fsdp=8", programs=PROGRAMS)
    assert r["remat"] == "attn_proj" and r["fits"]
    rows = {t["remat"]: t for t in r["remat_search"]}
    assert list(rows) == ["none", "dots", "attn_proj"]
    assert rows["none"]["compiled_bytes"] is None and "not compiled" in rows["none"]["note"]
    assert rows["dots"]["compiled_bytes"] == sizes["dots"]["compiled_per_device_bytes"] and not rows["dots"]["fits"]
    # with more headroom asked for than attn_proj leaves, full is taken
    r = plan_mod.plan_local(dataclasses.replace(JOB, remat="auto"), "fsdp=8", programs=PROGRAMS,
                            headroom=1 - sizes["attn_proj"]["compiled_per_device_bytes"] / capacity + 0.01)
    assert r["remat"] == "full"


def test_train_compile_only_reports_the_search_and_flops(capsys):
    from train.__main__ import main
    assert main(["--compile-only", "model.remat=auto", "data.batch_size=8", "mesh=fsdp=8"]) == 0
    out = capsys.readouterr().out
    assert "remat auto: none (the least recomputation that fits)" in out
    assert "matmul FLOPs per token: the step's program" in out
    assert '"remat": "none"' in out.splitlines()[-1]


def test_405b_step_counts_the_pallas_kernels_in_every_shard():
    """lora_v6e's step (405B width, 2 layers) traced for its v6e-64 mesh: splash attention runs as Pallas
    kernels inside shard_map, and the count takes each kernel's body times its grid times the shards.
    Without the kernels (or with one shard) the program would come out below the model's FLOPs."""
    pytest.importorskip("libtpu")
    from planner.plan import _devices
    from sharding import topology
    from train.__main__ import _programs, job_for
    from train.config import load_config

    cfg = load_config("lora_v6e", ["model.num_layers=2"])
    mesh = make_mesh(cfg.mesh, _devices(topology.parse(cfg.topology)))
    ratio = {r: step_flops_per_token(dataclasses.replace(job_for(cfg), remat=r), mesh, _programs(cfg))
             for r in ("none", "full")}
    # none: the model's matmuls plus the masked half of causal attention the kernels' grid covers
    assert 1.0 < ratio["none"]["program_vs_model"] < 1.2, ratio
    assert ratio["none"]["uncounted_loops"] == 0
    # full: one more forward (less the output projections), about 0.37 of the model's forward+backward
    assert 1.3 < ratio["full"]["program_vs_model"] < 1.55, ratio
