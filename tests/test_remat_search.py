"""Remat by measurement (planner/remat.py) and the compiled FLOPs per token (planner/flops.py), on the
8 CPU devices with the toy model's real training step."""

import dataclasses
import functools

import pytest

from planner import flops as flops_mod
from planner import plan as plan_mod
from planner.compile import compile_job
from planner.flops import step_flops_per_token
from planner.job import Job, Programs
from sharding.mesh import make_mesh
from train.program import lower_step

PROGRAMS = Programs(lower_train=lower_step)
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
        mp.setattr(flops_mod, "compile_job", cached)
        yield


def test_flops_per_token_counts_every_layer(mesh):
    """The depth-1/depth-2 extrapolation equals the FLOPs the compiler counts in the same step unrolled
    at full depth (the scanned step's cost analysis holds one layer whatever the depth)."""
    job = dataclasses.replace(JOB, remat="none")
    got = step_flops_per_token(job, mesh, PROGRAMS)
    unrolled = compile_job(dataclasses.replace(job, scan_layers=False), mesh, PROGRAMS)["flops"]
    scanned = compile_job(job, mesh, PROGRAMS)["flops"]
    tokens = job.batch * job.seq
    assert got["compiled_flops_per_token"] == pytest.approx(unrolled * 8 / tokens, rel=1e-3)
    assert scanned * 8 / tokens < 0.75 * got["compiled_flops_per_token"]  # what the scan alone would report
    assert got["compiled_vs_model"] == pytest.approx(got["compiled_flops_per_token"] / got["model_flops_per_token"],
                                                     rel=1e-3)


def test_remat_full_recomputes_one_forward_of_the_layers(mesh):
    none = step_flops_per_token(dataclasses.replace(JOB, remat="none"), mesh, PROGRAMS)
    full = step_flops_per_token(dataclasses.replace(JOB, remat="full"), mesh, PROGRAMS)
    extra = full["compiled_flops_per_token"] - none["compiled_flops_per_token"]
    # the model's forward per token (LoRA: train FLOPs = 2 forwards), less the LM head, which is not recomputed
    from planner.job import model_config
    cfg = model_config(dataclasses.replace(JOB, remat="none"))
    head = 2 * cfg.dim * cfg.vocab_size
    forward_layers = none["model_flops_per_token"] / 2 - head
    assert extra == pytest.approx(forward_layers, rel=0.25), (extra, forward_layers)


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
    # with 10% headroom asked for, attn_proj no longer fits either: full is taken
    r = plan_mod.plan_local(dataclasses.replace(JOB, remat="auto"), "fsdp=8", programs=PROGRAMS,
                            headroom=1 - sizes["attn_proj"]["compiled_per_device_bytes"] / capacity + 0.01)
    assert r["remat"] == "full"


def test_train_compile_only_reports_the_search_and_flops(monkeypatch, capsys):
    from train.__main__ import main
    assert main(["--compile-only", "model.remat=auto", "data.batch_size=8", "mesh=fsdp=8"]) == 0
    out = capsys.readouterr().out
    assert "remat auto: none (the least recomputation that fits)" in out
    assert "FLOPs per token: compiled" in out
    assert '"remat": "none"' in out.splitlines()[-1]
