"""The training job: learning, exact resume (also after SIGTERM), LoRA invariants, data handling."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

import model
from model.formats.tokenizer import ByteTokenizer
from model.network.lora import LoraConfig
from train import data as data_lib
from train.config import load_config
from train.loop import run

ROOT = Path(__file__).resolve().parent.parent
FAST = ["data.seq_len=64", "data.batch_size=8", "eval_every=10", "data.eval=toy", "eval_batches=1",
        "log_every=1", "checkpoint.every=10", "optimizer.warmup_steps=2"]


def losses(out: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs}


def logged_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


# One schedule for the straight run and the interrupted ones (stop_after cuts them short): the default job
# with adapter dropout, so resuming must restore the dropout RNG too.
RUN = FAST + ["steps=40", "eval_every=20", "lora.dropout=0.1"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """40 uninterrupted steps: the run that must learn, and whose losses resumed runs must reproduce."""
    out = tmp_path_factory.mktemp("straight")
    return out, run(load_config(None, RUN + [f"output_dir={out}"]))


def test_default_job_learns(straight_run):
    out, res = straight_run
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 41))
    assert recs[-1]["loss"] < 0.6 * recs[0]["loss"]
    evals = [r["eval_loss"] for r in recs if "eval_loss" in r]
    assert len(evals) == 2 and evals[1] < evals[0]
    for key in ("learning_rate", "grad_norm", "tokens_per_s", "mfu"):
        assert all(np.isfinite(r[key]) for r in recs)
    assert list((out / "tensorboard").iterdir())
    assert res["step"] == 40 and (out / "adapter" / "adapter_model.safetensors").exists()


def test_exact_resume(tmp_path, straight_run, caplog):
    over = RUN + [f"output_dir={tmp_path}"]
    run(load_config(None, over + ["stop_after=10"]))
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [10]
    assert logged_steps(tmp_path) == list(range(1, 11))
    caplog.set_level("INFO", logger="train")
    try:
        assert run(load_config(None, over + ["stop_after=20"]))["step"] == 20
    finally:  # an assertion, also when the run that did not resume fails on its own
        assert "resumed at step 10 from" in caplog.text
    assert logged_steps(tmp_path) == list(range(1, 21))  # each step once: the rerun did not start over
    resumed, straight = losses(tmp_path), losses(straight_run[0])
    assert [resumed[s] for s in range(1, 21)] == [straight[s] for s in range(1, 21)]  # bitwise


def test_resume_after_sigterm(tmp_path, straight_run, caplog):
    """`python -m train` stopped by SIGTERM saves at the step it stopped; rerun (here in this process, the
    same `run`) resumes there: each step is logged once and every loss is the uninterrupted run's."""
    over = [*RUN, "stop_after=20", f"output_dir={tmp_path}"]
    args = [sys.executable, "-m", "train", *over]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 4:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output
    assert "received SIGTERM" in output and "rerun the same command to resume" in output
    stopped_at = max(losses(tmp_path))
    assert stopped_at < 20
    saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert stopped_at in saved  # saved at the step it stopped, not only at the last `every`
    assert logged_steps(tmp_path) == list(range(1, stopped_at + 1))
    caplog.set_level("INFO", logger="train")
    try:
        assert run(load_config(None, over))["step"] == 20
    finally:
        assert f"resumed at step {stopped_at} from" in caplog.text
    assert logged_steps(tmp_path) == list(range(1, 21))
    resumed, straight = losses(tmp_path), losses(straight_run[0])
    assert [resumed[s] for s in range(1, 21)] == [straight[s] for s in range(1, 21)]


def test_lora_invariants(hf_checkpoint, tmp_path):
    """Step 0 equals the base; training changes adapters only; optimizer state is adapter-sized."""
    path, _ = hf_checkpoint(vocab=512, heads=4, kv_heads=2, head_dim=16)
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in Path(path).iterdir()}
    base = model.load(path, dtype="float32")
    adapted = model.load(path, dtype="float32", lora=LoraConfig(rank=4, alpha=8))
    tokens = np.arange(20, dtype=np.int32).reshape(2, 10)
    np.testing.assert_array_equal(np.asarray(base(tokens)), np.asarray(adapted(tokens)))

    cfg = load_config(None, FAST + ["steps=3", f"output_dir={tmp_path}", f"model.checkpoint={path}",
                                    "model.dtype=float32", "data.tokenizer=bytes", "lora.rank=4"])
    run(cfg)
    from train.checkpoints import restore_latest  # noqa: F401  (restores the saved train state)
    state = restore_latest(tmp_path / "checkpoints")
    lora_leaves = jax.tree.leaves(nnx.to_pure_dict(adapted.state.filter(nnx.LoRAParam)))
    shapes = {x.shape for x in lora_leaves}
    assert {x.shape for x in jax.tree.leaves(state["opt"]) if x.ndim} <= shapes
    assert sum(x.size for x in jax.tree.leaves(state["params"])) == sum(x.size for x in lora_leaves)
    trained_b = state["params"]["layers"]["attn"]["q"]["lora_b"]
    assert np.abs(np.asarray(trained_b)).max() > 0  # adapters moved
    assert digest == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in Path(path).iterdir()}


def test_bad_records_reported_and_limit_enforced(tmp_path):
    good = json.dumps({"text": "hello"})
    lines = [good, "{not json", json.dumps({"text": ""}), json.dumps({"prompt": "a"}), good,
             json.dumps({"messages": [{"role": "user", "content": "hi"}]}), good, good]
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(data_lib.DataError) as e:
        data_lib.read_documents(f, ByteTokenizer(), 64, "truncate", max_bad_fraction=0.1)
    msg = str(e.value)
    assert "4 skipped" in msg and "line 2: invalid JSON" in msg and "line 3: 'text' must be a non-empty string" in msg
    assert "line 4: 'prompt' and 'completion' must both be strings" in msg and "line 6: no assistant turn" in msg
    docs, report = data_lib.read_documents(f, ByteTokenizer(), 64, "truncate", max_bad_fraction=0.6)
    assert len(docs) == 4 and len(report.bad) == 4


def test_undecodable_and_deeply_nested_lines_are_bad_records(tmp_path):
    """A stray non-UTF-8 byte or a JSON line nested past the parser's limit is one bad record, skipped and
    reported by line and counted toward max_bad_fraction, not an abort of the whole read."""
    good = json.dumps({"text": "hello"}).encode()
    lines = [good, b'{"text": "caf\xe9"}', good, b"[" * 100_000 + b"]" * 100_000, good, good, b'{"text": "\xff\xfe"}', good]
    f = tmp_path / "d.jsonl"
    f.write_bytes(b"\n".join(lines) + b"\n")
    docs, report = data_lib.read_documents(f, ByteTokenizer(), 64, "truncate", max_bad_fraction=0.5)
    assert len(docs) == 5 and report.records == 8
    assert [line for line, _ in report.bad] == [2, 4, 7]
    why = dict(report.bad)
    assert "not UTF-8 (byte 0xe9" in why[2] and "nested too deeply" in why[4] and "not UTF-8 (byte 0xff" in why[7]
    with pytest.raises(data_lib.DataError, match=r"3 of 8 records are bad"):
        data_lib.read_documents(f, ByteTokenizer(), 64, "truncate", max_bad_fraction=0.3)


def test_overlong_truncated_or_dropped(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "x" * 100}) + "\n" + json.dumps({"text": "short"}) + "\n")
    docs, rep = data_lib.read_documents(f, ByteTokenizer(), 32, "truncate", 0.0)
    assert rep.truncated == 1 and len(docs[0].tokens) == 33
    docs, rep = data_lib.read_documents(f, ByteTokenizer(), 32, "drop", 0.0)
    assert rep.dropped == 1 and len(docs) == 1


def test_chat_and_completion_loss_masks():
    tok = ByteTokenizer()
    d = data_lib.tokenize_record({"messages": [{"role": "user", "content": "Q"},
                                               {"role": "assistant", "content": "A"}]}, tok)
    learned = bytes(int(t) for t, m in zip(d.tokens, d.loss_mask) if m and t < 256)
    assert learned == b"A" and d.tokens[d.loss_mask][-1] == tok.eot_id
    d = data_lib.tokenize_record({"prompt": "P", "completion": "C"}, tok)
    assert [int(t) for t in d.tokens[d.loss_mask]] == [ord("C"), tok.special["<|end_of_text|>"]]


def test_packing_segments_positions_and_host_shares():
    tok = ByteTokenizer()
    docs = [data_lib.tokenize_record({"text": "a" * n}, tok) for n in (5, 9, 3, 20, 7, 11, 4, 6)]
    rows = data_lib.pack(docs, np.arange(len(docs)), 24)
    for r in range(len(rows["inputs"])):
        seg, pos = rows["segments"][r], rows["positions"][r]
        for s in set(seg[seg > 0]):
            assert (pos[seg == s] == np.arange((seg == s).sum())).all()  # each document from position 0
        assert (rows["weights"][r][seg == 0] == 0).all()
    one = data_lib.Batches(docs, seq_len=24, batch_size=4, seed=3, accum=2)
    two = [data_lib.Batches(docs, seq_len=24, batch_size=4, seed=3, accum=2, process_index=i, process_count=2)
           for i in range(2)]
    a, b0, b1 = next(one), next(two[0]), next(two[1])
    np.testing.assert_array_equal(a["inputs"], np.concatenate([b0["inputs"], b1["inputs"]], axis=1))


def test_qlora_int4_base_trains(tmp_path):
    from sharding.mesh import make_mesh
    from train.checkpoints import restore_latest
    from train.loop import build_model

    cfg = load_config(None, FAST + ["steps=25", f"output_dir={tmp_path}", "model.quant=int4", "eval_every=25"])
    m = build_model(cfg, make_mesh(cfg.mesh))
    assert m.state["layers"]["mlp"]["up"]["kernel"][...].dtype == jax.numpy.int4
    run(cfg)
    loss = losses(tmp_path)
    assert loss[25] < 0.6 * loss[1]
    assert "kernel" not in json.dumps(jax.tree_util.tree_map(lambda x: 0, restore_latest(tmp_path / "checkpoints")))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
