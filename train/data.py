"""JSONL records -> tokenized documents -> packed fixed-length rows with segment ids and positions.

Records: {"text"}, {"prompt", "completion"} (loss on the completion) or {"messages": [...]} (rendered
with the checkpoint's chat template, or the built-in Llama 3.1 format; loss on the assistant turns' content
and end tokens, found by rendering prefixes: model/formats/chat_template.py; "tools" and "documents" fields of
the record go to the template). Bad records are skipped and reported by line;
too many stop the run. Packing and the per-epoch shuffle are deterministic from the seed and
computed identically on every host; each host then materialises only its own rows of each batch.
The iterator's state is (epoch, batch index) and goes into checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np

from model.formats import paths
from model.formats.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class DataError(ValueError):
    pass


@dataclasses.dataclass
class Document:
    tokens: np.ndarray  # int32 [n]
    loss_mask: np.ndarray  # bool [n]: token i is a prediction target


def tokenize_record(rec, tok: Tokenizer) -> Document:
    """Raises ValueError with the reason when the record is malformed."""
    if not isinstance(rec, dict):
        raise ValueError("record is not a JSON object")
    eos = tok.special["<|end_of_text|>"]
    if "messages" in rec:
        extra = {k: rec[k] for k in ("tools", "documents") if rec.get(k) is not None}
        ids, mask = tok.chat_document(rec["messages"], **extra)
        if not any(mask):
            raise ValueError("no assistant turn to learn from")
    elif "prompt" in rec or "completion" in rec:
        p, c = rec.get("prompt"), rec.get("completion")
        if not isinstance(p, str) or not isinstance(c, str):
            raise ValueError("'prompt' and 'completion' must both be strings")
        if not c.strip():
            raise ValueError("empty completion")
        pi, ci = tok.encode(p, bos=True), tok.encode(c) + [eos]
        ids, mask = pi + ci, [False] * len(pi) + [True] * len(ci)
    elif "text" in rec:
        t = rec["text"]
        if not isinstance(t, str) or not t.strip():
            raise ValueError("'text' must be a non-empty string")
        ids = tok.encode(t, bos=True) + [eos]
        mask = [False] + [True] * (len(ids) - 1)
    else:
        raise ValueError("expected a 'text', 'prompt'/'completion' or 'messages' field")
    return Document(np.asarray(ids, np.int32), np.asarray(mask, bool))


@dataclasses.dataclass
class Report:
    path: str
    records: int = 0
    bad: list = dataclasses.field(default_factory=list)  # (line, reason)
    truncated: int = 0
    dropped: int = 0

    def summary(self) -> str:
        s = f"{self.path}: {self.records} records, {len(self.bad)} skipped, {self.truncated} truncated, {self.dropped} dropped (too long)"
        for line, why in self.bad[:10]:
            s += f"\n  line {line}: {why}"
        if len(self.bad) > 10:
            s += f"\n  ... and {len(self.bad) - 10} more"
        return s


def _parse_line(raw: bytes):
    """One JSONL line -> its value; ValueError with the reason (bad UTF-8, bad JSON, nesting too deep)."""
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON ({e.msg})") from None
    except RecursionError:
        raise ValueError("invalid JSON (nested too deeply)") from None


def read_documents(path: str | Path, tok: Tokenizer, seq_len: int, overlong: str, max_bad_fraction: float):
    """Documents of at most seq_len + 1 tokens (one row of inputs plus the shifted target)."""
    report, docs = Report(str(path)), []
    try:  # local or gs://; decoded line by line: one bad byte is one bad record, not a failed read
        f = paths.as_path(path).open("rb")
    except FileNotFoundError:
        raise DataError(f"{path}: data file not found") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            report.records += 1
            try:
                doc = tokenize_record(_parse_line(raw), tok)
            except ValueError as e:
                report.bad.append((lineno, str(e)))
                continue
            if len(doc.tokens) > seq_len + 1:
                if overlong == "drop":
                    report.dropped += 1
                    continue
                report.truncated += 1
                doc = Document(doc.tokens[: seq_len + 1], doc.loss_mask[: seq_len + 1])
            if doc.loss_mask[1:].any():
                docs.append(doc)
    log.info(report.summary())
    if report.records and len(report.bad) / report.records > max_bad_fraction:
        raise DataError(f"{report.summary()}\n{path}: {len(report.bad)} of {report.records} records are bad, "
                        f"more than max_bad_fraction={max_bad_fraction}; fix the file or raise the limit")
    if not docs:
        raise DataError(f"{path}: no usable records")
    return docs, report


def pack(docs: list[Document], order: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
    """Greedy in-order packing into rows: inputs, targets, loss weights, segment ids (0 = padding), positions."""
    rows, cur, used = [], [], 0
    for i in order:
        n = len(docs[i].tokens) - 1
        if used + n > seq_len and cur:
            rows.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        rows.append(cur)
    R = len(rows)
    out = {k: np.zeros((R, seq_len), np.int32) for k in ("inputs", "targets", "segments", "positions")}
    out["weights"] = np.zeros((R, seq_len), np.float32)
    for r, row in enumerate(rows):
        at = 0
        for s, i in enumerate(row, 1):
            d = docs[i]
            n = len(d.tokens) - 1
            out["inputs"][r, at:at + n] = d.tokens[:-1]
            out["targets"][r, at:at + n] = d.tokens[1:]
            out["weights"][r, at:at + n] = d.loss_mask[1:]
            out["segments"][r, at:at + n] = s
            out["positions"][r, at:at + n] = np.arange(n)
            at += n
    return out


class Batches:
    """Deterministic, resumable stream of global batches; yields this host's rows only."""

    def __init__(self, docs, *, seq_len: int, batch_size: int, seed: int, accum: int = 1, process_index: int = 0,
                 process_count: int = 1, shuffle: bool = True):
        if batch_size % (accum * process_count):
            raise DataError(f"data.batch_size={batch_size} must be divisible by grad_accum={accum} × "
                            f"{process_count} host(s)")
        self.docs, self.seq_len, self.batch_size, self.seed, self.shuffle = docs, seq_len, batch_size, seed, shuffle
        self.accum = accum
        micro = batch_size // accum  # each micro-batch is split across hosts
        self.lo, self.hi = process_index * micro // process_count, (process_index + 1) * micro // process_count
        self.epoch, self.index = 0, 0
        self._rows = None

    def _epoch_rows(self):
        if self._rows is None or self._rows[0] != self.epoch:
            order = np.arange(len(self.docs))
            if self.shuffle:
                order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.docs))
            rows = pack(self.docs, order, self.seq_len)
            if len(rows["inputs"]) < self.batch_size:
                raise DataError(f"the data packs into {len(rows['inputs'])} rows of {self.seq_len} tokens, "
                                f"fewer than one batch of {self.batch_size}")
            self._rows = (self.epoch, rows)
        return self._rows[1]

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows = self._epoch_rows()
        if (self.index + 1) * self.batch_size > len(rows["inputs"]):
            self.epoch, self.index = self.epoch + 1, 0
            rows = self._epoch_rows()
        start = self.index * self.batch_size
        self.index += 1
        out = {}
        for k, v in rows.items():
            b = v[start:start + self.batch_size].reshape(self.accum, -1, self.seq_len)[:, self.lo:self.hi]
            out[k] = b[0] if self.accum == 1 else b
        return out
