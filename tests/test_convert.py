"""Checkpoint conversion (python -m convert): HF <-> Orbax round trips, loading, quantization,
kill -9 and resume, refusals of bad inputs, PEFT export and merge (issue 5)."""

import copy
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import model
from convert.__main__ import main
from convert.hf_to_orbax import convert, default_kv_heads
from model.formats import checkpoint as ckpt
from model.formats.safetensors_io import HFCheckpoint, SafetensorsWriter
from model.network.config import LlamaConfig
from sharding.mesh import make_mesh
from tests import hf_reference

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--block-mb", "0.004", "--chunk-mb", "0.008", "--no-progress"]  # many blocks and chunks per tensor


def cli(capsys, *args) -> tuple[int, str]:
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


def same_tree(a: Path, b: Path, ignore=("_CHECKPOINT_METADATA", "commit_success.txt")) -> None:
    """Same files with the same bytes (Orbax's commit timestamps and path aside)."""
    fa = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    fb = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert fa == fb
    for rel in fa:
        if rel.name not in ignore:
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def same_hf_tensors(a: Path, b: Path) -> None:
    ca, cb = HFCheckpoint(a), HFCheckpoint(b)
    assert ca.names() == cb.names()
    for n in sorted(ca.names()):
        x, y = ca.read(n), cb.read(n)
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), n


def tokens(vocab=512, shape=(2, 9), seed=1):
    return np.random.default_rng(seed).integers(0, vocab, size=shape, dtype=np.int32)


# ---------------------------------------------------------------------------------------------
# Round trips and loading

def test_bf16_round_trip_hf_orbax_hf_is_bit_exact(hf_checkpoint, tmp_path, capsys):
    _, ref = hf_checkpoint()
    ref16 = copy.deepcopy(ref).to(torch.bfloat16)
    hf16 = tmp_path / "hf16"
    ref16.save_pretrained(hf16, max_shard_size="100KB")  # bf16, several files + index, written by transformers
    assert len(list(hf16.glob("*.safetensors"))) > 1
    orbax, back = tmp_path / "orbax", tmp_path / "back"
    assert cli(capsys, "hf-to-orbax", "--hf", hf16, "--out", orbax, *SMALL)[0] == 0
    assert ckpt.is_finished(orbax) and not ckpt.tmp_path(orbax).exists()
    zarr = json.loads((orbax / "layers.mlp.up.kernel" / "zarr.json").read_text())
    assert zarr["data_type"] == "bfloat16" and zarr["shape"][0] == 2
    assert zarr["chunk_grid"]["configuration"]["chunk_shape"][0] == 1  # written layer by layer, in chunks
    rc, err = cli(capsys, "verify", "--orbax", orbax, "--hf", hf16, "--no-progress")
    assert rc == 0
    assert cli(capsys, "orbax-to-hf", "--orbax", orbax, "--out", back, "--max-shard-size", "150KB",
               "--no-progress", "--block-mb", "0.004")[0] == 0
    same_hf_tensors(hf16, back)
    assert json.loads((back / "config.json").read_text())["torch_dtype"] == "bfloat16"
    import transformers
    again, orig = (transformers.AutoModelForCausalLM.from_pretrained(d).eval().float() for d in (back, hf16))
    toks = tokens()
    np.testing.assert_array_equal(hf_reference.logits(again, toks), hf_reference.logits(orig, toks))


def test_converted_checkpoint_loads_like_the_hf_directory_on_any_mesh(hf_checkpoint, tmp_path, capsys):
    path, _ = hf_checkpoint(shards=True)
    orbax = tmp_path / "orbax"
    # chunked for a 2x2 mesh; restored onto other meshes too
    assert cli(capsys, "hf-to-orbax", "--hf", path, "--out", orbax, "--dtype", "float32",
               "--mesh", "fsdp=2,tensor=2", "--no-progress")[0] == 0
    q = json.loads((orbax / "layers.attn.q.kernel" / "zarr.json").read_text())
    assert q["shape"] == [2, 64, 4, 16] and q["chunk_grid"]["configuration"]["chunk_shape"] == [1, 32, 2, 16]
    toks = tokens()
    for spec in ("fsdp=2,tensor=2", "fsdp=8"):  # the mesh it was chunked for, and another
        mesh = make_mesh(spec, devices=jax.devices()[:4] if spec == "fsdp=2,tensor=2" else None) if spec else None
        ours, direct = model.load(orbax, dtype="float32", mesh=mesh), model.load(path, dtype="float32", mesh=mesh)
        assert ours.config == direct.config
        k = ours.state["layers"]["attn"]["k"]["kernel"][...]
        assert k.sharding == direct.state["layers"]["attn"]["k"]["kernel"][...].sharding
        np.testing.assert_array_equal(np.asarray(ours(toks)), np.asarray(direct(toks)))
    bf = model.load(orbax)  # float parameters cast on restore, like the HF path
    assert bf.state["embed"]["embedding"][...].dtype == np.dtype("bfloat16")


def test_verify_report_names_the_tensor(hf_checkpoint, tmp_path, capsys):
    path, _ = hf_checkpoint()
    orbax = tmp_path / "orbax"
    convert(path, orbax, dtype="float32", progress=False)
    arr = ckpt.open_array(orbax, "layers.attn.o.kernel", write=True)
    arr[0, 1, 2, 3].write(np.float32(0.5)).result()
    import io

    from convert.verify import verify
    buf = io.StringIO()
    assert not verify(orbax, path, progress=False, out=buf)
    report = buf.getvalue()
    assert "model.layers.0.self_attn.o_proj.weight" in report and "FAIL" in report
    assert "layers.mlp.up.kernel" in report and "bit-exact" in report


def test_int8_conversion_within_bound_loads_and_exports(hf_checkpoint, tmp_path, capsys):
    path, _ = hf_checkpoint()
    orbax = tmp_path / "orbax"
    assert cli(capsys, "hf-to-orbax", "--hf", path, "--out", orbax, "--quant", "int8", "--dtype", "float32",
               "--no-progress")[0] == 0
    rc, err = cli(capsys, "verify", "--orbax", orbax, "--hf", path, "--no-progress")
    assert rc == 0, err
    ours, direct = model.load(orbax, dtype="float32"), model.load(path, dtype="float32", quant="int8")
    assert ours.config.quant == direct.config.quant
    for name in ("kernel", "scale"):
        a = np.asarray(ours.state["layers"]["mlp"]["down"][name][...]).astype(np.float32)
        b = np.asarray(direct.state["layers"]["mlp"]["down"][name][...]).astype(np.float32)
        assert np.abs(a - b).max() <= (1 if name == "kernel" else 0)  # the same quantizer (up to ties)
    toks = tokens()
    a, b = np.asarray(ours(toks)), np.asarray(direct(toks))
    assert np.abs(a - b).max() <= 1e-2 * np.abs(b).max()
    # exported dequantized
    assert cli(capsys, "orbax-to-hf", "--orbax", orbax, "--out", tmp_path / "deq", "--no-progress")[0] == 0
    assert HFCheckpoint(tmp_path / "deq").read("model.layers.0.mlp.down_proj.weight").dtype == np.dtype("bfloat16")


def test_int4_within_bound_and_stored_packed(hf_checkpoint, tmp_path, capsys):
    path, _ = hf_checkpoint(dim=128, mlp=256, heads=8, kv_heads=2)
    sizes = {}
    for q in ("int8", "int4"):
        convert(path, tmp_path / q, quant=q, progress=False)
        sizes[q] = sum(p.stat().st_size for p in (tmp_path / q / "layers.mlp.gate.kernel").rglob("*") if p.is_file())
    assert sizes["int4"] < 0.65 * sizes["int8"]
    rc, err = cli(capsys, "verify", "--orbax", tmp_path / "int4", "--hf", path, "--no-progress")
    assert rc == 0, err
    assert ckpt.read_config(tmp_path / "int4").quant.group_size == 128


# ---------------------------------------------------------------------------------------------
# kill -9 and resume

def _run(args, env_extra=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu", **(env_extra or {}))
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-m", "convert", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_sigkill_at_any_point_then_rerun_gives_the_same_checkpoint(hf_checkpoint, tmp_path, capsys):
    path, _ = hf_checkpoint(shards=True)
    args = ["hf-to-orbax", "--hf", path, "--dtype", "bfloat16", *SMALL]
    ref = tmp_path / "ref"
    assert cli(capsys, *args, "--out", ref)[0] == 0
    out = tmp_path / "out"
    job = Path(str(out) + ".convert-job")

    from convert.hf_to_orbax import make_plan
    from convert.source import HFSource
    plan = make_plan(HFSource(path), block_bytes=int(0.004 * 2**20), chunk_bytes=int(0.008 * 2**20))
    blocks = [len(u.blocks) for u in plan.units]
    kill_at = sum(blocks[:len(blocks) // 2]) + 1  # half the tensors, then part of the next one
    assert blocks[len(blocks) // 2] > 1
    r = _run([*args, "--out", out], {"LLAMA_CONVERT_TEST_KILL": f"blocks:{kill_at}"})
    assert r.returncode == -9, r.stderr
    assert not out.exists() and ckpt.tmp_path(out).exists() and not ckpt.is_finished(ckpt.tmp_path(out))
    written = {p.name for p in (job / "done").iterdir()}
    assert len(written) == len(blocks) // 2
    with pytest.raises(FileNotFoundError, match=r"out: no config.json"):  # nothing at the final path
        model.load(out)
    # another job refuses to mix with the unfinished one
    rc, err = cli(capsys, "hf-to-orbax", "--hf", path, "--dtype", "float32", *SMALL, "--out", out)
    assert rc == 2 and "unfinished conversion" in err and "config" in err

    r = _run([*args, "--out", out], {"LLAMA_CONVERT_TEST_KILL": "finalize"})  # metadata written, no commit
    assert r.returncode == -9, r.stderr
    assert "resuming" in r.stderr and f"{len(written)} of 21 tensors were already written" in r.stderr
    assert not out.exists() and (ckpt.tmp_path(out) / "_METADATA").exists()
    with pytest.raises(ckpt.CheckpointFormatError, match=r"not a finished checkpoint .*interrupted conversion"):
        model.load(ckpt.tmp_path(out))  # complete metadata, no commit: still refused

    r = _run([*args, "--out", out], {"LLAMA_CONVERT_TEST_KILL": "committed"})  # committed, job state left
    assert r.returncode == -9, r.stderr
    assert ckpt.is_finished(out) and job.exists()

    r = _run([*args, "--out", out])
    assert r.returncode == 0, r.stderr
    assert not job.exists() and not ckpt.tmp_path(out).exists()
    same_tree(ref, out)


# ---------------------------------------------------------------------------------------------
# Refusals: non-zero exit, message naming file and tensor

def _tensors(path: Path) -> dict:
    c = HFCheckpoint(path)
    return {n: c.read(n) for n in sorted(c.names())}


def _write_hf(dst: Path, src: Path, tensors: dict, config_edit=None, files=1):
    dst.mkdir(parents=True)
    cfg = json.loads((src / "config.json").read_text())
    if config_edit:
        config_edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    names = list(tensors)
    if files == 1:
        w = SafetensorsWriter(dst / "model.safetensors", [(n, tensors[n].dtype, tensors[n].shape) for n in names])
        for n in names:
            w.write(n, tensors[n])
        w.close()
        return dst / "model.safetensors"
    per = -(-len(names) // files)
    weight_map = {}
    for k in range(files):
        part = names[k * per:(k + 1) * per]
        fname = f"model-{k + 1:05d}-of-{files:05d}.safetensors"
        w = SafetensorsWriter(dst / fname, [(n, tensors[n].dtype, tensors[n].shape) for n in part])
        for n in part:
            w.write(n, tensors[n])
            weight_map[n] = fname
        w.close()
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return dst


REFUSALS = ["missing", "extra", "duplicated", "duplicated_in_header", "shape", "dtype", "truncated",
            "corrupt_header", "pickle", "kv_heads_differ"]


@pytest.mark.parametrize("case", REFUSALS)
def test_refuses_bad_checkpoints_naming_file_and_tensor(hf_checkpoint, tmp_path, capsys, case):
    src, _ = hf_checkpoint()
    t = _tensors(src)
    bad = tmp_path / "bad"
    up1 = "model.layers.1.mlp.up_proj.weight"
    if case == "missing":
        del t[up1]
        _write_hf(bad, src, t)
        expect = [up1, "missing"]
    elif case == "extra":
        t["model.layers.0.self_attn.q_norm.weight"] = np.ones(16, np.float32)
        _write_hf(bad, src, t)
        expect = ["model.safetensors", "model.layers.0.self_attn.q_norm.weight", "unexpected"]
    elif case == "duplicated":
        _write_hf(bad, src, t, files=2)
        # the second file also carries a tensor of the first
        first = json.loads((bad / "model.safetensors.index.json").read_text())["weight_map"]
        name = next(n for n, f in first.items() if f.startswith("model-00001"))
        extra = _tensors(bad)
        part2 = {n: extra[n] for n, f in first.items() if f.startswith("model-00002")}
        part2[name] = extra[name]
        w = SafetensorsWriter(bad / "model-00002-of-00002.safetensors", [(n, a.dtype, a.shape) for n, a in part2.items()])
        for n, a in part2.items():
            w.write(n, a)
        w.close()
        expect = [name, "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    elif case == "duplicated_in_header":
        f = _write_hf(bad, src, t)
        raw = f.read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        header = raw[8:8 + n].decode().rstrip()
        # repeat the norm's entry under the same name (json.loads alone would silently keep one)
        start = header.index('"model.norm.weight"')
        entry = header[start:header.index("}", start) + 1]
        header = header[:-1] + "," + entry + "}"
        header += " " * (-len(header) % 8)
        f.write_bytes(struct.pack("<Q", len(header)) + header.encode() + raw[8 + n:])
        expect = ["model.safetensors", "model.norm.weight", "twice"]
    elif case == "shape":
        t[up1] = t[up1][:-1]
        _write_hf(bad, src, t)
        expect = [up1, "shape", "config.json"]
    elif case == "dtype":
        t[up1] = t[up1].astype(np.float16)
        _write_hf(bad, src, t)
        expect = ["model.safetensors", up1, "F16", "dtype"]
    elif case == "truncated":
        f = _write_hf(bad, src, t)
        f.write_bytes(f.read_bytes()[:-100])
        expect = ["model.safetensors", "truncated", "model.norm.weight"]  # the last tensor in the file
    elif case == "corrupt_header":
        f = _write_hf(bad, src, t)
        raw = bytearray(f.read_bytes())
        raw[8:20] = b"\x00garbage!!\xff\xfe"
        f.write_bytes(bytes(raw))
        expect = ["model.safetensors", "corrupt safetensors header"]
    elif case == "pickle":
        bad.mkdir()
        shutil.copy(src / "config.json", bad / "config.json")
        torch.save({"x": torch.zeros(2)}, bad / "pytorch_model.bin")
        expect = ["pytorch_model.bin", "pickle", "safetensors"]
    elif case == "kv_heads_differ":
        _write_hf(bad, src, _repeat_kv(t, 2, perturb="model.layers.1.self_attn.v_proj.weight"),
                  config_edit=lambda c: c.update(num_key_value_heads=4))
        expect = ["model.layers.1.self_attn.v_proj.weight", "KV head 3 differs from KV head 2"]
    extra_args = ["--kv-heads", "2"] if case == "kv_heads_differ" else []
    out = tmp_path / "out"
    rc, err = cli(capsys, "hf-to-orbax", "--hf", bad, "--out", out, "--no-progress", *extra_args)
    assert rc == 2, err
    for word in expect:
        assert word in err, (word, err)
    assert not out.exists()


def _repeat_kv(t: dict, r: int, head_dim=16, perturb=None) -> dict:
    """The tensors with every KV head repeated r times (the 405B upload with 16 KV heads)."""
    out = dict(t)
    for n, a in t.items():
        if n.endswith(("k_proj.weight", "v_proj.weight")):
            heads = a.reshape(-1, head_dim, a.shape[-1])
            rep = np.repeat(heads, r, axis=0)
            if n == perturb:
                rep[3, 0, 0] += 1.0  # head 3 is no longer a copy of head 2
            out[n] = rep.reshape(-1, a.shape[-1])
    return out


def test_repeated_kv_heads_are_deduplicated(hf_checkpoint, tmp_path, capsys):
    src, _ = hf_checkpoint()
    dup = tmp_path / "kv4"
    _write_hf(dup, src, _repeat_kv(_tensors(src), 2), config_edit=lambda c: c.update(num_key_value_heads=4))
    orbax = tmp_path / "orbax"
    rc, err = cli(capsys, "hf-to-orbax", "--hf", dup, "--out", orbax, "--kv-heads", "2", "--dtype", "float32",
                  "--no-progress")
    assert rc == 0 and "de-duplicating 4 KV heads to 2" in err
    m = model.load(orbax, dtype="float32")
    assert m.config.num_kv_heads == 2
    toks = tokens()
    np.testing.assert_array_equal(np.asarray(m(toks)), np.asarray(model.load(src, dtype="float32")(toks)))
    assert cli(capsys, "verify", "--orbax", orbax, "--hf", dup, "--no-progress")[0] == 0
    # the rule for the real files: 405B with 16 KV heads -> 8; everything else kept
    assert default_kv_heads(LlamaConfig.preset("llama3.1-405b", num_kv_heads=16)) == 8
    assert default_kv_heads(LlamaConfig.preset("llama3.1-405b")) == 8
    assert default_kv_heads(LlamaConfig.preset("llama3.1-8b")) == 8
    assert default_kv_heads(LlamaConfig.preset("toy", num_kv_heads=2)) == 2


def test_existing_output_is_not_overwritten(hf_checkpoint, tmp_path, capsys):
    path, _ = hf_checkpoint()
    out = tmp_path / "out"
    convert(path, out, progress=False)
    rc, err = cli(capsys, "hf-to-orbax", "--hf", path, "--out", out, "--no-progress", "--dtype", "float32")
    assert rc == 2 and "already a finished checkpoint" in err
    assert cli(capsys, "hf-to-orbax", "--hf", path, "--out", out, "--no-progress", "--dtype", "float32",
               "--overwrite")[0] == 0
    assert ckpt.read_config(out).param_dtype == "float32"


# ---------------------------------------------------------------------------------------------
# LoRA -> PEFT, merge

def _lora_model(path, rslora: bool, lc=None):
    from model.network.lora import LoraConfig

    lc = lc or LoraConfig(rank=8, alpha=16.0, rslora=rslora)
    m = model.load(path, dtype="float32", lora=lc)
    rng = np.random.default_rng(7)
    from flax import nnx
    for p, v in nnx.to_flat_state(m.state):
        if p[-1] == "lora_b":  # random nonzero (a fresh adapter has B = 0)
            v.set_value(jnp.asarray(rng.normal(0, 0.05, v.shape), jnp.float32))
    return m


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_export_gives_our_logits_in_peft(hf_checkpoint, tmp_path, capsys, rslora):
    import peft
    from flax import nnx

    from model.formats.peft import export_peft

    path, ref = hf_checkpoint()
    m = _lora_model(path, rslora)
    adapters = m.state.filter(nnx.LoRAParam)
    out = tmp_path / "peft"
    export_peft(adapters, m.config, out, base_model="toy")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["use_rslora"] == rslora and cfg["target_modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    toks = tokens()
    ours = np.asarray(m(toks))
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(ref), out).eval()
    theirs = hf_reference.logits(pm, toks)
    base = hf_reference.logits(ref, toks)
    assert np.abs(theirs - base).max() > 1e-2 * np.abs(base).max()  # the adapter does change the output
    assert np.abs(ours - theirs).max() <= 1e-5 * np.abs(theirs).max()
    if rslora:
        return

    # from a checkpoint directory (model.checkpoint.save of the adapters), through the CLI
    saved = tmp_path / "adapters"
    ckpt.save(adapters, m.config, saved)
    assert cli(capsys, "lora-to-peft", "--ckpt", saved, "--out", tmp_path / "peft2", "--base-model", "toy")[0] == 0
    assert (tmp_path / "peft2" / "adapter_model.safetensors").read_bytes() == (out / "adapter_model.safetensors").read_bytes()
    assert json.loads((tmp_path / "peft2" / "adapter_config.json").read_text()) == cfg

    # merged into the base: transformers alone gives the adapted logits
    merged = tmp_path / "merged"
    assert cli(capsys, "merge-lora", "--base", path, "--ckpt", saved, "--out", merged, "--dtype", "float32",
               "--no-progress")[0] == 0
    import transformers
    mm = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
    assert np.abs(hf_reference.logits(mm, toks) - theirs).max() <= 1e-4 * np.abs(theirs).max()


def test_lora_to_peft_from_a_training_run(hf_checkpoint, tmp_path, capsys):
    """A `python -m train` run directory (Orbax CheckpointManager steps, written by train/checkpoints.py,
    no model config inside) exports, given the run's config, to the adapter of its newest step."""
    from flax import nnx

    from model.formats.peft import export_peft
    from train import checkpoints

    path, _ = hf_checkpoint()
    over = [f"model.checkpoint={path}", "model.dtype=float32", "lora.rank=8", "lora.alpha=16"]
    from model.network.lora import LoraConfig
    m = _lora_model(path, False, LoraConfig(rank=8, alpha=16.0))
    params = m.state.filter(nnx.LoRAParam)
    mgr = checkpoints.manager(tmp_path / "run" / "checkpoints", keep=2)
    for step in (10, 20):  # the newest step is exported
        p = params if step == 20 else jax.tree.map(lambda x: x * 0, params)
        state = {"params": p, "opt": {}, "step": jnp.asarray(step), "rng": jnp.zeros(2, jnp.uint32)}
        checkpoints.save(mgr, step, state, {"epoch": 0})
    mgr.wait_until_finished()
    rc, err = cli(capsys, "lora-to-peft", "--ckpt", tmp_path / "run", "--out", tmp_path / "peft")
    assert rc == 2 and "--config" in err  # the run's checkpoints do not record the model config
    assert cli(capsys, "lora-to-peft", "--ckpt", tmp_path / "run", "--out", tmp_path / "peft", "--config", *over)[0] == 0
    export_peft(params, m.config, tmp_path / "direct")
    assert (tmp_path / "peft" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "direct" / "adapter_model.safetensors").read_bytes()
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["lora_alpha"] == 16.0
