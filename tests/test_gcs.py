"""gs:// wherever a path is taken, against a GCS emulator on 127.0.0.1 (tests/gcs_emulator.py; nothing
mocked below HTTP): an HF checkpoint in a bucket -> `python -m convert hf-to-orbax --hf gs://… --out gs://…`
(SIGKILLed mid-way and rerun: the same objects as an uninterrupted run) -> `python -m train` with the
checkpoint, data and output_dir in the bucket, stopped and resumed bit-exactly against a local-disk run ->
its PEFT adapter in the bucket -> `python -m serve generate` with checkpoint and adapter from gs://
answering what the local-disk run answers (issue 14). The stages share one module-scoped bucket."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from convert.__main__ import main as convert_main
from convert.hf_to_orbax import make_plan
from convert.source import HFSource
from model.formats import checkpoint as ckpt
from model.formats import paths
from model.formats.safetensors_io import HFCheckpoint, SafetensorsFile
from model.formats.tokenizer import ByteTokenizer
from serve.__main__ import main as serve_main
from tests.gcs_emulator import Emulator
from train.config import load_config
from train.data import DataError, read_documents
from train.loop import run

ROOT = Path(__file__).resolve().parent.parent
TOY = ROOT / "train" / "data"
SMALL = ["--block-mb", "0.004", "--chunk-mb", "0.008", "--no-progress"]  # many blocks and chunks per tensor
FAST = ["data.seq_len=32", "data.batch_size=8", "eval_every=10", "eval_batches=1", "log_every=1",
        "checkpoint.every=10", "optimizer.warmup_steps=1", "steps=4", "model.dtype=float32"]
GENERATE = ["generate", "--prompt", "24 31 38 45", "--max-tokens", "6", "engine.max_slots=1", "engine.max_len=64"]


def cli_env(em: Emulator) -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu", **em.env)  # XLA_FLAGS kept: 8 devices, as in this process


def cli(em: Emulator, *args, env_extra=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *map(str, args)], cwd=ROOT, env={**cli_env(em), **(env_extra or {})},
                          capture_output=True, text=True, timeout=600)


def objects(em: Emulator, prefix: str) -> dict[str, bytes]:
    """Every object under gs://prefix, by its name relative to it."""
    base = prefix.removeprefix("gs://").rstrip("/") + "/"
    return {f[len(base):]: em.fs.cat_file(f) for f in em.fs.find(prefix)}


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    em = Emulator(tmp_path_factory.mktemp("gcs")).start()
    yield em
    em.stop()


@pytest.fixture(scope="module")
def bucket(gcs, hf_checkpoint):
    """A bucket holding an HF checkpoint (hf/) and the toy task's data (data/)."""
    b = gcs.bucket()
    path, _ = hf_checkpoint()
    gcs.fs.put(f"{path}/", f"{b}/hf/", recursive=True)
    for split in ("train", "eval"):
        gcs.fs.put(str(TOY / f"toy_{split}.jsonl"), f"{b}/data/{split}.jsonl")
    return b


@pytest.fixture(scope="module")
def orbax(gcs, bucket):
    """The uninterrupted conversion, bucket to bucket (in this process)."""
    out = f"{bucket}/ref"
    assert convert_main(["hf-to-orbax", "--hf", f"{bucket}/hf", "--out", out, "--dtype", "float32", *SMALL]) == 0
    return out


def test_safetensors_from_gs_by_ranged_reads(gcs, bucket, hf_checkpoint):
    local, _ = hf_checkpoint()
    a, b = SafetensorsFile(local / "model.safetensors"), SafetensorsFile(f"{bucket}/hf/model.safetensors")
    assert a.tensors == b.tensors and a.header_sha256 == b.header_sha256
    for name in sorted(a.tensors)[:3]:
        assert a.read(name).tobytes() == b.read(name).tobytes()
    assert paths.read_range(f"{bucket}/hf/model.safetensors", 8, 5) == (local / "model.safetensors").read_bytes()[8:13]
    docs, report = read_documents(f"{bucket}/data/eval.jsonl", ByteTokenizer(), 32, "truncate", 0.0)
    assert report.records == len((TOY / "toy_eval.jsonl").read_text().splitlines()) and docs
    with pytest.raises(DataError, match=r"gs://.*/data/missing.jsonl: data file not found"):
        read_documents(f"{bucket}/data/missing.jsonl", ByteTokenizer(), 32, "truncate", 0.0)


def test_convert_bucket_to_bucket_killed_and_rerun_is_identical(gcs, bucket, orbax, hf_checkpoint, tmp_path, capsys):
    local = tmp_path / "local"  # the oracle: the same conversion from and to local disk (tests/test_convert.py)
    assert convert_main(["hf-to-orbax", "--hf", str(hf_checkpoint()[0]), "--out", str(local), "--dtype", "float32",
                         *SMALL]) == 0
    want = objects(gcs, orbax)
    assert sorted(want) == sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    for name, data in want.items():
        if name not in ("_CHECKPOINT_METADATA", "commit_success.txt"):
            assert data == (local / name).read_bytes(), name
    out = f"{bucket}/orbax"
    plan = make_plan(HFSource(f"{bucket}/hf", param_dtype="float32", compute_dtype="float32"), dtype="float32",
                     block_bytes=int(0.004 * 2**20), chunk_bytes=int(0.008 * 2**20))
    blocks = [len(u.blocks) for u in plan.units]
    kill_at = sum(blocks[:len(blocks) // 2]) + 1  # half the tensors, then part of the next one
    args = ["convert", "hf-to-orbax", "--hf", f"{bucket}/hf", "--out", out, "--dtype", "float32", *SMALL]
    r = cli(gcs, *args, env_extra={"LLAMA_CONVERT_TEST_KILL": f"blocks:{kill_at}"})
    assert r.returncode == -9, r.stderr
    assert not ckpt.is_finished(out) and not ckpt.is_checkpoint(out)
    assert len(gcs.fs.ls(f"{out}.convert-job/done")) == len(blocks) // 2
    r = cli(gcs, *args)
    assert r.returncode == 0, r.stderr
    assert f"resuming: {len(blocks) // 2} of {len(blocks)} tensors were already written" in r.stderr
    assert not gcs.fs.exists(f"{out}.convert-job")
    got = objects(gcs, out)
    assert sorted(got) == sorted(want)
    for name in want:
        if name not in ("_CHECKPOINT_METADATA", "commit_success.txt"):  # commit time, the path
            assert got[name] == want[name], name
    assert convert_main(["verify", "--orbax", out, "--hf", f"{bucket}/hf", "--no-progress"]) == 0
    assert "all 21 tensors match" in capsys.readouterr().out
    # and back: orbax-to-hf bucket to bucket gives the source's bytes (float32 both ways)
    assert convert_main(["orbax-to-hf", "--orbax", out, "--out", f"{bucket}/hf-again", "--no-progress"]) == 0
    src, back = HFCheckpoint(hf_checkpoint()[0]), HFCheckpoint(f"{bucket}/hf-again")
    assert back.names() == src.names() and gcs.fs.exists(f"{bucket}/hf-again/config.json")
    for name in sorted(src.names()):
        assert back.read(name).tobytes() == src.read(name).tobytes(), name
    assert not gcs.fs.exists(f"{bucket}/hf-again.export-job.json")


@pytest.fixture(scope="module")
def local_run(gcs, orbax, tmp_path_factory):
    """The same training on local disk: the bucket's checkpoint copied down, data from train/data."""
    d = tmp_path_factory.mktemp("local")
    gcs.fs.get(f"{orbax}/", f"{d}/orbax/", recursive=True)
    run(load_config(None, FAST + [f"model.checkpoint={d}/orbax", f"data.train={TOY}/toy_train.jsonl",
                                  f"data.eval={TOY}/toy_eval.jsonl", f"output_dir={d}/run"]))
    return d


def _losses(text: str) -> dict[int, tuple]:
    return {r["step"]: (r["loss"], r.get("eval_loss")) for r in map(json.loads, text.splitlines())}


def test_train_in_the_bucket_stopped_and_resumed_bit_exactly(gcs, bucket, orbax, local_run):
    out = f"{bucket}/run"
    over = FAST + [f"model.checkpoint={orbax}", f"data.train={bucket}/data/train.jsonl",
                   f"data.eval={bucket}/data/eval.jsonl", f"output_dir={out}"]
    r = cli(gcs, "train", *over, "stop_after=2")
    assert r.returncode == 0, r.stderr
    assert gcs.fs.ls(f"{out}/checkpoints") == [f"{out.removeprefix('gs://')}/checkpoints/2"]
    assert not gcs.fs.exists(f"{out}/adapter")
    run(load_config(None, over))  # resumes from the bucket's step 2
    want = _losses((local_run / "run" / "metrics.jsonl").read_text())
    assert _losses(gcs.fs.cat_file(f"{out}/metrics.jsonl").decode()) == want  # bitwise, steps 1-4
    assert len(want) == 4 and want[4][1] is not None
    assert gcs.fs.find(f"{out}/tensorboard") and gcs.fs.exists(f"{out}/config.yaml")
    assert sorted(p.rsplit("/", 1)[-1] for p in gcs.fs.ls(f"{out}/checkpoints")) == ["2", "4"]
    f = "adapter_model.safetensors"
    assert gcs.fs.cat_file(f"{out}/adapter/{f}") == (local_run / "run" / "adapter" / f).read_bytes()
    got, want = (json.loads(t) for t in (gcs.fs.cat_file(f"{out}/adapter/adapter_config.json"),
                                         (local_run / "run" / "adapter" / "adapter_config.json").read_text()))
    assert got.pop("base_model_name_or_path") == orbax and want.pop("base_model_name_or_path") != orbax
    assert got == want


def test_serve_checkpoint_and_adapter_from_the_bucket(gcs, bucket, orbax, local_run, capsys):
    adapter = f"{bucket}/run/adapter"
    if not gcs.fs.exists(adapter):
        pytest.skip("needs the adapter of test_train_in_the_bucket_stopped_and_resumed_bit_exactly")
    r = cli(gcs, "serve", *GENERATE, f"model.checkpoint={orbax}", f"model.adapter={adapter}")
    assert r.returncode == 0, r.stderr
    assert serve_main([*GENERATE, f"model.checkpoint={local_run}/orbax",
                       f"model.adapter={local_run}/run/adapter"]) == 0
    local = capsys.readouterr().out
    assert r.stdout == local and local.strip()
