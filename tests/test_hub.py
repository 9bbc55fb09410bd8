"""Hugging Face Hub ids (`org/name[@revision]`) wherever a checkpoint is taken, resolved offline from a
pre-filled Hugging Face cache (HF_HUB_OFFLINE=1; no network): train, serve, model.load; a missing
repository is a one-line error naming it (issue 14)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest

import model
from model.formats import hub
from serve.__main__ import main as serve_main
from train.config import load_config
from train.loop import run

ROOT = Path(__file__).resolve().parent.parent
REV_A, REV_B = "a" * 40, "b" * 40  # commit hashes of two revisions of the same repository
FAST = ["data.seq_len=32", "data.batch_size=8", "eval_every=10", "eval_batches=1", "log_every=1",
        "checkpoint.every=10", "optimizer.warmup_steps=1", "steps=2"]


def fill_cache(cache: Path, repo: str, snapshots: dict[str, Path], refs: dict[str, str]) -> None:
    """huggingface_hub's cache layout: models--org--name/{snapshots/<commit>/<files>, refs/<name>}."""
    base = cache / f"models--{repo.replace('/', '--')}"
    for commit, src in snapshots.items():
        snap = base / "snapshots" / commit
        snap.mkdir(parents=True)
        for f in src.iterdir():
            shutil.copy(f, snap / f.name)
    (base / "refs").mkdir(parents=True)
    for name, commit in refs.items():
        (base / "refs" / name).write_text(commit)


@pytest.fixture
def offline_cache(hf_checkpoint, tmp_path, monkeypatch):
    """org/tiny: `main` is model A, commit REV_B (tag v2) is model B (another seed)."""
    (a, _), (b, _) = hf_checkpoint(), hf_checkpoint(seed=1)
    cache = tmp_path / "hub"
    fill_cache(cache, "org/tiny", {REV_A: a, REV_B: b}, {"main": REV_A, "v2": REV_B})
    # huggingface_hub reads HF_HUB_OFFLINE / HF_HUB_CACHE when imported: set both ways (and for subprocesses)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    from model.job import resolve
    resolve.checkpoint_path.cache_clear()
    yield {"a": a, "b": b, "cache": cache}
    resolve.checkpoint_path.cache_clear()


def test_what_is_a_hub_id(tmp_path, monkeypatch):
    assert hub.parse("meta-llama/Llama-3.1-8B-Instruct") == ("meta-llama/Llama-3.1-8B-Instruct", None)
    assert hub.parse("org/name@v1.0") == ("org/name", "v1.0")
    assert hub.parse(f"org/name@{REV_A}") == ("org/name", REV_A)
    for path in ("gs://bucket/ckpt", "./org/name", "/abs/dir", "runs/toy/adapter", "name", "a/../b"):
        assert hub.parse(path) is None, path
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "local").mkdir(parents=True)
    assert hub.parse("org/local") is None  # an existing local directory stays a path


def _logits(m, seed=3):
    tokens = np.random.default_rng(seed).integers(0, 512, size=(1, 7), dtype=np.int32)
    return np.asarray(m(tokens))


def test_load_by_hub_id_and_revision(offline_cache):
    by_id = _logits(model.load("org/tiny", dtype="float32"))
    assert np.array_equal(by_id, _logits(model.load(offline_cache["a"], dtype="float32")))
    for rev in (REV_B, "v2"):  # a commit hash or a tag
        got = _logits(model.load(f"org/tiny@{rev}", dtype="float32"))
        assert np.array_equal(got, _logits(model.load(offline_cache["b"], dtype="float32"))), rev
        assert not np.array_equal(got, by_id)


def test_hub_id_trains_and_serves_offline(offline_cache, tmp_path, capsys):
    out = tmp_path / "run"
    res = run(load_config(None, FAST + ["model.checkpoint=org/tiny", f"output_dir={out}"]))
    assert res["step"] == 2 and np.isfinite(res["loss"])
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/tiny"
    # served by id@revision with the run's adapter (the weights it loads are those of the local directory:
    # test_load_by_hub_id_and_revision)
    rc = serve_main(["generate", "--prompt", "24 31 38", "--max-tokens", "6", f"model.checkpoint=org/tiny@{REV_A}",
                     f"model.adapter={out / 'adapter'}", "engine.max_slots=1", "engine.max_len=64"])
    assert rc == 0 and capsys.readouterr().out.strip()


def test_missing_repo_is_one_clear_line(offline_cache, tmp_path, capsys):
    with pytest.raises(hub.HubError, match=r"^nobody/missing: Hugging Face Hub repository not found"):
        model.load("nobody/missing")
    with pytest.raises(hub.HubError, match=r"org/tiny@v9.*not found"):  # a revision not in the cache
        model.load("org/tiny@v9")
    rc = serve_main(["generate", "--prompt", "x", "model.checkpoint=nobody/missing"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: nobody/missing: ") and "HF_HUB_OFFLINE" in err[-1]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    r = subprocess.run([sys.executable, "-m", "train", "model.checkpoint=nobody/missing", f"output_dir={tmp_path}/r"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: nobody/missing: Hugging Face Hub repository not found")
