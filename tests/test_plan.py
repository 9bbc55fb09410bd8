"""The memory planner: exact weight bytes, categories, fits / does not fit, bad input named, and one
ahead-of-time TPU compile of the real training step (405B width, reduced depth) so the compiled path
cannot silently break."""

import functools
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from planner import __main__ as cli
from planner import plan as planning
from planner.job import Job
from planner.report import format_plan
from sharding import topology

ROOT = Path(__file__).resolve().parent.parent
# the planner as its command line wires it: with train's and serve's programs
plan = functools.partial(planning.plan, programs=cli.PROGRAMS)
smallest = functools.partial(planning.smallest, programs=cli.PROGRAMS)

GiB = 1 << 30
B405_BF16 = 811_706_777_600  # llama31.md: 405B bf16 bytes


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_topology_names():
    t = topology.parse("v6e-16")
    assert (t.chips, t.shape, t.kind, t.libtpu_name) == (16, (4, 4), "tpu", "v6e:4x4")
    assert topology.parse("2xv6e-256").chips == 512 and topology.parse("2xv6e-256").num_slices == 2
    assert topology.parse("v5p-128").chips == 64  # v5p counts TensorCores: 2 per chip
    assert topology.parse("v6e:4x8").name == "v6e-32"
    assert topology.parse("h100x8").hbm_bytes > 79 * GiB
    assert topology.parse("h200x16").chips == 16


def test_peak_flops_by_device_kind():
    """One table (sharding/topology.py) for runtime chips: a v5p reports "TPU v5", a v5e "TPU v5 lite";
    train's MFU divides by the same numbers."""
    from train.metrics import peak_flops

    v5p, v5e = topology.FAMILIES["v5p"].peak_flops, topology.FAMILIES["v5e"].peak_flops
    assert v5p != v5e
    assert topology.peak_flops("TPU v5") == topology.peak_flops("TPU v5p") == v5p
    assert topology.peak_flops("TPU v5 lite") == topology.peak_flops("TPU v5e") == v5e
    assert topology.peak_flops("TPU v6 lite") == topology.FAMILIES["v6e"].peak_flops
    assert topology.peak_flops("NVIDIA H100 80GB HBM3") == topology.FAMILIES["h100"].peak_flops
    assert topology.peak_flops("cpu") is None
    assert peak_flops(types.SimpleNamespace(device_kind="TPU v5")) == v5p
    assert peak_flops(types.SimpleNamespace(device_kind="TPU v5 lite")) == v5e


def test_planner_and_old_command_print_the_same():
    argv = ["--mode", "serve", "--quant", "int8", "--topology", "v6e-16", "--mesh", "fsdp=2,tensor=8"]
    outs = [subprocess.run([sys.executable, "-m", name, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
            for name in ("planner", "sharding.plan")]
    assert [o.returncode for o in outs] == [0, 0], outs[0].stderr[-2000:] + outs[1].stderr[-2000:]
    assert "FITS (analytic)" in outs[0].stdout and outs[0].stdout == outs[1].stdout


def test_unknown_topology_and_model_list_valid_names(capsys):
    with pytest.raises(ValueError, match=r"unknown topology 'v6e-12'.*v6e-\{1,4,8,16,32,64,128,256\}.*h100x"):
        topology.parse("v6e-12")
    code, _, err = run_cli(capsys, "--topology", "tpu9000", "--mode", "serve")
    assert code == 2 and "unknown topology 'tpu9000'" in err and "v5p-" in err and "2xv6e-256" in err
    code, _, err = run_cli(capsys, "--model", "llama4-2t", "--topology", "v6e-16")
    assert code == 2 and "unknown model 'llama4-2t'" in err and "llama3.1-405b" in err and "config.json" in err


def test_mesh_that_does_not_divide_names_dimension_and_axis(capsys):
    code, _, err = run_cli(capsys, "--mode", "serve", "--quant", "int8", "--topology", "v6e-16", "--mesh", "tensor=16")
    assert code == 2 and "kv_heads" in err and "size 8" in err and "tensor" in err
    code, _, err = run_cli(capsys, "--topology", "v6e-16", "--mesh", "fsdp=16", "--batch", "8")
    assert code == 2 and "not divisible by mesh axes data x fsdp = 16" in err
    code, _, err = run_cli(capsys, "--topology", "v6e-16", "--mesh", "fsdp=3,tensor=-1")
    assert code == 2 and "not divisible by 3" in err


def test_job_that_does_not_fit_says_by_how_much(capsys):
    code, out, _ = run_cli(capsys, "--mode", "lora", "--topology", "v6e-8")
    assert code == 1
    assert "DOES NOT FIT (analytic): needs" in out and "GiB more per chip" in out
    code, out, _ = run_cli(capsys, "--mode", "lora", "--topology", "v6e-8", "--json")
    r = json.loads(out)
    assert code == 1 and r["fits"] is False and r["short_by_bytes"] > 20 * GiB
    assert r["short_by_bytes"] == r["per_device_bytes"] - r["capacity_bytes"]


def test_json_fields_and_exact_weight_bytes(capsys):
    code, out, _ = run_cli(capsys, "--mode", "serve", "--topology", "v6e-64", "--mesh", "fsdp=8,tensor=8", "--json")
    r = json.loads(out)
    for field in ("params", "per_device_bytes", "compiled_per_device_bytes", "capacity_bytes", "fits", "per_device"):
        assert field in r
    assert r["params"] == 405_853_388_800 and r["compiled_per_device_bytes"] is None
    assert r["per_device_bytes"] == sum(r["per_device"].values())
    assert r["capacity_bytes"] == topology.FAMILIES["v6e"].hbm_bytes
    # every weight is split 64 ways except the norms (replicated over tensor): the shards add up
    assert abs(r["per_device"]["weights"] * 64 / B405_BF16 - 1) < 0.001
    assert code == (0 if r["fits"] else 1)


def test_quantized_and_training_categories():
    from model.network.config import LlamaConfig
    from model.network.model import weight_bytes

    int4 = plan(Job(mode="serve", quant="int4"), "v6e-16", "fsdp=2,tensor=8")
    int8 = plan(Job(mode="serve", quant="int8"), "v6e-16", "fsdp=2,tensor=8")
    w4, w8 = int4["per_device"]["weights"] * 16, int8["per_device"]["weights"] * 16
    # the checkpoint's exact bytes (int4 packed two per byte + bf16 scales, bf16 embeddings) split 16 ways;
    # the norms (replicated over tensor) add under 0.1%
    for w, q in ((w4, "int4"), (w8, "int8")):
        exact = sum(weight_bytes(LlamaConfig.preset("llama3.1-405b", quant=q)).values())
        assert 0 <= w / exact - 1 < 1e-3, (q, w, exact)
    full = plan(Job(mode="full"), "v6e-256", "fsdp=64,tensor=4")
    d = full["per_device"]
    assert d["gradients"] == d["weights"] and d["optimizer_state"] == 2 * d["weights"] and d["lora_params"] == 0
    lora = plan(Job(mode="lora", lora_rank=16), "v6e-64", "fsdp=16,sequence=4")
    d = lora["per_device"]
    assert 0 < d["lora_params"] < 0.02 * d["weights"] and d["optimizer_state"] == 2 * d["lora_params"]
    # saved activations: one [tokens, D] bf16 tensor per layer with remat=full
    assert d["activations"] == 126 * (16 // 16) * (4096 // 4) * 16384 * 2
    dots = plan(Job(mode="lora", remat="dots"), "v6e-64", "fsdp=16,sequence=4")
    assert dots["per_device"]["activations"] > 3 * d["activations"]
    # fits: the per-chip total against the chip's HBM (v6e: 31.2 GiB); saving every dot does not fit
    for r, fits in ((int4, True), (int8, True), (full, True), (lora, True), (dots, False)):
        assert r["per_device_bytes"] == sum(r["per_device"].values())
        assert r["capacity_bytes"] == topology.FAMILIES["v6e"].hbm_bytes
        assert r["fits"] is fits and (r["per_device_bytes"] <= r["capacity_bytes"]) is fits, r


def test_bad_job_input(capsys):
    for argv, msg in ((["--mode", "qlora", "--quant", "bf16"], "qlora needs a quantized base"),
                      (["--mode", "full", "--quant", "int4"], "--mode full"),
                      (["--mode", "train"], "--mode 'train'"),
                      (["--remat", "some"], "--remat 'some'"),
                      (["--lora-targets", "q,x"], "unknown target 'x'")):
        code, _, err = run_cli(capsys, *argv, "--topology", "v6e-16")
        assert code == 2 and msg in err, (argv, err)


def test_smallest_slices():
    q = smallest(Job(mode="qlora", quant="int4"), "v6e", headroom=0.1)
    assert q["topology"] == "v6e-16" and q["fits"]
    full = smallest(Job(mode="full"), "v6e", headroom=0.1)
    assert full["chips"] >= 128
    gpu = smallest(Job(mode="serve", quant="int4"), "h100")
    assert gpu["topology"] in ("h100x4", "h100x8") and gpu["fits"]


def test_hf_config_json_model(tmp_path):
    from model.network.config import PRESETS

    (tmp_path / "config.json").write_text(json.dumps(PRESETS["llama3.1-8b"].to_hf()))
    r = plan(Job(model=str(tmp_path / "config.json"), mode="lora"), "h100x1", "fsdp=1", headroom=0.0)
    assert r["params"] == 8_030_261_248


def test_aot_tpu_compile_of_the_training_step():
    """The real LoRA step of a 405B-width, 1-layer model, compiled for v6e-4 with libtpu on this CPU
    machine: the compiler's argument bytes are exactly the analytic weights + adapters + optimizer
    state, and its per-chip peak is near the analytic total (full-depth jobs agree within a few
    percent, BENCHMARKS.md; at one layer the embedding and LM head dominate, where the estimate is
    coarsest)."""
    pytest.importorskip("libtpu")
    job = Job(mode="lora", layers=1, seq=128, batch=1)
    r = plan(job, "v6e-4", "tensor=4", compile=True)
    c, d = r["compiled"], r["per_device"]
    state = d["weights"] + d["lora_params"] + d["optimizer_state"]
    assert abs(c["argument_bytes"] / state - 1) < 0.01, (c, d)
    assert abs(r["analytic_vs_compiled"]) < 0.15, r
    assert c["flops"] > 0 and c["output_bytes"] - c["alias_bytes"] < 4096 and r["fits"]  # state donated


def test_compiler_refusal_is_a_compiled_does_not_fit():
    """A job too big for the slice: the TPU compiler refuses it (fast, before optimising), and the plan
    reports the compiler's figure and the shortfall."""
    pytest.importorskip("libtpu")
    r = plan(Job(mode="full", layers=8), "v6e-8", "fsdp=8", compile=True)
    assert r["fits"] is False and r["basis"] == "compiled" and "exceeds available HBM" in r["compiled"]["error"]
    assert r["short_by_bytes"] == r["compiled_per_device_bytes"] - r["capacity_bytes"] > 0
    assert "DOES NOT FIT (compiled): needs" in format_plan(r)


def test_full_finetuning_keeps_the_optimizer_state_dtype_so_it_is_donated():
    """bf16 weights: gradients, moments and updates stay bf16, so every output of the step aliases its
    donated input (an fp32 drift would double the optimizer state's memory)."""
    import jax

    from model.network.config import LlamaConfig
    from sharding.mesh import make_mesh
    from train.program import lower_step

    cfg = LlamaConfig.preset("toy", param_dtype="bfloat16", compute_dtype="bfloat16")
    lowered = lower_step(cfg, mesh=make_mesh("fsdp=8"), batch=8, seq=32)
    outs = jax.tree.leaves(lowered.out_info[0])
    ins = jax.tree.leaves(lowered.in_avals[0][0])
    assert [o.dtype for o in outs] == [i.dtype for i in ins]
    ma = lowered.compile().memory_analysis()
    assert ma.output_size_in_bytes - ma.alias_size_in_bytes < 1024  # all but the metrics and counters


def test_planner_lowers_the_jobs_real_steps_at_the_jobs_shapes():
    """Through the Programs the CLI hands the planner: train's step takes [accum, rows/accum, seq]
    batches and donates its state; serve's engine step takes batch x seq prompt tokens flattened into one
    ragged step, a [batch, kv_len / block_size] block table, and donates the block pool."""
    import jax

    from planner.compile import lower_job
    from sharding.mesh import make_mesh

    mesh = make_mesh("fsdp=4,tensor=2")
    train = lower_job(Job(model="toy", mode="lora", batch=8, seq=32, accum=2), mesh, cli.PROGRAMS)
    state, _, batch = train.args_info[0]
    assert {a.shape for a in batch.values()} == {(2, 4, 32)}
    assert all(a.donated for a in jax.tree.leaves(state))
    serve = lower_job(Job(model="toy", mode="serve", batch=4, seq=16, kv_len=64), mesh, cli.PROGRAMS)
    _, pool, batch = serve.args_info[0]
    assert batch.tokens.shape == (64,) and batch.meta.page_indices.shape == (4, 64 // 16)
    assert all(a.donated for a in jax.tree.leaves(pool))
    assert jax.tree.leaves(pool)[0].shape[1:3] == (4 * 64 // 16 + 1, 16)  # blocks (+ scratch) of 16 tokens


@pytest.mark.parametrize("name", ["lora_v6e", "qlora_v6e", "lora_8b_h100", "qlora_405b_h100x8"])
def test_shipped_configs_plan_to_fit(name):
    """Each shipped hardware config names a valid topology and mesh, and its analytic plan fits with
    >= 10% headroom (the compiled check is `python -m train --config NAME --compile-only`)."""
    from train.__main__ import job_for
    from train.config import load_config

    cfg = load_config(name)
    r = plan(job_for(cfg), cfg.topology, cfg.mesh, headroom=0.10)
    assert r["fits"], format_plan(r)
    assert r["batch"] == cfg.data.batch_size and r["seq"] == cfg.data.seq_len


def test_compile_only_on_local_devices_and_gpu_plan(capsys):
    from train.__main__ import compile_only
    from train.config import load_config

    cfg = load_config("toy_cpu", ["mesh=fsdp=4,tensor=2", "data.batch_size=8", "data.seq_len=64",
                                  "model.vocab_size=256"])
    assert compile_only(cfg) == 0
    out = capsys.readouterr().out
    assert "FITS (compiled)" in out and "compiled (XLA peak)" in out and "fsdp=4 × tensor=2" in out
    gpu = load_config("qlora_405b_h100x8")
    assert compile_only(gpu) == 0  # no GPUs here: the analytic plan
    out = capsys.readouterr().out
    assert "FITS (analytic)" in out and "h100x8" in out
    too_big = load_config("qlora_405b_h100x8", ["topology=h100x1", "mesh=fsdp=1"])
    assert compile_only(too_big) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out


@pytest.mark.parametrize("kv_dtype,per_token", [("bfloat16", 126 * 2 * 128 * 2), ("int8", 126 * 2 * (128 + 4))])
def test_serve_block_pool_per_chip(kv_dtype, per_token):
    """The serving memory plan's pool (serve/compile_check.py): 405B on v6e-8 (tensor=8), 16 x 4096 tokens in
    blocks of 16 plus a scratch block; each chip holds every block with its one KV head (of 8): per token
    126 layers x key and value x 128 (x 2 bytes bf16; int8: 1 byte and a float32 scale each)."""
    from model.network.config import LlamaConfig
    from serve.compile_check import analytic, pool_blocks
    from sharding.mesh import axis_sizes

    blocks = pool_blocks(16 * 4096, 16)
    assert blocks == 4097
    p = analytic(LlamaConfig.preset("llama3.1-405b"), axis_sizes("tensor=8", 8), blocks, 16, kv_dtype)
    assert p["kv_pool_bytes"] == blocks * 16 * per_token and p["block_bytes"] == 16 * per_token


def test_serve_compile_only_reports_the_pool_on_an_h100_node(capsys):
    """Without the GPUs attached: the exact plan, the pool in blocks and tokens, and the room beside it."""
    from serve.compile_check import compile_only
    from serve.config import load_config

    assert compile_only(load_config("serve_405b_int4_h100x8", [])) == 0
    out = capsys.readouterr().out
    r = json.loads(out.split("PLAN ", 1)[1])
    per_token = 126 * 2 * 128 * 2  # one KV head per GPU, bfloat16
    assert r["pool"]["blocks"] == 32 * 16384 // 16 + 1 and r["pool"]["tokens"] == 32 * 16384
    assert r["kv_pool_bytes"] == r["pool"]["blocks"] * 16 * per_token and r["basis"] == "analytic"
    room = (r["capacity_bytes"] - r["weights_bytes"]) // (16 * per_token)
    assert r["pool"]["room_blocks"] == room and r["pool"]["room_tokens"] == (room - 1) * 16
    assert f"KV pool {r['pool']['blocks']} blocks x 16 tokens" in out
