"""Optional Weights & Biases logging (wandb.enabled=true): an offline run writes W&B's own run files with
the metrics of metrics.jsonl, and a resumed run continues the same W&B run."""

import json
import struct
import sys

import pytest

from train.config import WandbConfig, load_config
from train.loop import run
from train.metrics import _wandb

pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")  # the `wandb` extra (in `test` too)

FAST = ["data.seq_len=64", "data.batch_size=8", "data.eval=", "log_every=1", "checkpoint.every=10",
        "optimizer.warmup_steps=1", "steps=4", "wandb.enabled=true"]


def _records(path):
    """The records of a .wandb file: a 7-byte header (":W&B", magic, version), then LevelDB-log framing
    (32 KiB blocks; records of checksum, length, type; FIRST/MIDDLE/LAST pieces) around protobuf Records."""
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind == 0:
            continue
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):  # FULL or LAST
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec


def _history(run_file) -> list[dict]:
    rows = []
    for rec in _records(run_file):
        if rec.WhichOneof("record_type") == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return rows


def test_offline_run_logs_the_metrics_and_resumes_the_same_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    over = FAST + [f"output_dir={tmp_path}"]
    run(load_config(None, over + ["stop_after=2"]))
    run(load_config(None, over))  # resumes at step 2
    want = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in want] == [1, 2, 3, 4]

    run_id = (tmp_path / "wandb_run_id").read_text()
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(f"-{run_id}") for r in runs)  # one W&B run, continued
    got = [row for r in runs for row in _history(r / f"run-{run_id}.wandb")]
    assert [row["_step"] for row in got] == [1, 2, 3, 4]
    for row, rec in zip(got, want):
        for key in ("loss", "learning_rate", "grad_norm", "tokens_per_s", "mfu"):
            assert row[f"train/{key}"] == rec[key], (key, row, rec)
    assert not any(k.startswith("train/step") for row in got for k in row)


def test_missing_package_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(ImportError, match=r'pip install -e "\.\[wandb\]"'):
        _wandb(WandbConfig(enabled=True), tmp_path, tmp_path, {})
