"""verify: compares every tensor of an Orbax checkpoint with the HF checkpoint it came from.

Float parameters must match bit for bit (after the same cast the converter applies, when --dtype
differed from the file's). Quantized kernels are dequantized and each weight must lie within the
rounding bound of its scale: |w - q·s| <= s/2 (round to nearest; s already rounded to its storage
dtype, so clipping at ±qmax adds at most qmax·2^-8·s, which is below s/2 for int8 and int4).
Reads block by block like the converter, so it runs in the same memory.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys

import numpy as np
from tqdm import tqdm

from convert.layout import streams
from convert.readers import OrbaxReader
from convert.source import HFSource
from model.formats import checkpoint as ckpt
from model.network import quant
from model.network.model import abstract_model

log = logging.getLogger(__name__)

BLOCK_BYTES = 64 << 20


@dataclasses.dataclass
class Row:
    param: str
    tensors: int = 0
    exact: bool = True  # float: all bits equal
    max_err: float = 0.0
    max_ratio: float = 0.0  # quantized: max |err| / scale (must be <= 0.5)
    quantized: bool = False
    first_bad: str | None = None

    @property
    def ok(self) -> bool:
        return self.first_bad is None


def verify(orbax_dir, hf_dir, *, block_bytes: int = BLOCK_BYTES, progress: bool = True, out=None) -> bool:
    out = out or sys.stdout
    reader = OrbaxReader(orbax_dir)
    cfg = reader.cfg
    src = HFSource(hf_dir, param_dtype="float32", compute_dtype="float32")
    _, abstract = abstract_model(cfg.replace(lora=None))
    rows: dict[str, Row] = {}
    problems = []
    ss = streams(cfg, abstract, source_kv_heads=src.config.num_kv_heads)
    expected = {ckpt.param_name(s.path) for s in ss}
    expected |= {ckpt.param_name((*s.path[:-1], "scale")) for s in ss if reader.quantized(s)}
    stored = {n for n, p in reader.names.items() if p[-1] not in ("lora_a", "lora_b")}
    for n in sorted(stored - expected):
        problems.append(f"extra parameter {n!r} in {orbax_dir}")
    for n in sorted(expected - stored):
        problems.append(f"missing parameter {n!r} in {orbax_dir}")
    if problems:
        return _report(rows, problems, out)
    total = sum(src.nbytes(s.entry.hf.format(i=i) if s.stacked else s.entry.hf)
                for s in ss for i in (range(cfg.num_layers) if s.stacked else [None]))
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="verify", disable=not progress,
               dynamic_ncols=True, mininterval=0.5)
    for s in ss:
        pname = ckpt.param_name(s.path)
        row = rows[pname] = Row(pname, quantized=reader.quantized(s))
        stored_dtype = np.dtype(reader.array(s.path).dtype.numpy_dtype)
        for layer in range(cfg.num_layers) if s.stacked else [None]:
            name = s.entry.hf.format(i=layer) if s.stacked else s.entry.hf
            row.tensors += 1
            per_index = src.nbytes(name) // s.length
            c = reader.chunk(s)
            step = max(1, block_bytes // max(1, per_index * c)) * c
            for a in range(0, s.length, step):
                b = min(a + step, s.length)
                theirs = s.to_ours(src.read_rows(name, *s.hf_rows(a, b)), a, b, name)
                if row.quantized:
                    _check_quant(row, name, theirs, reader, s, layer, a, b)
                else:
                    _check_exact(row, name, theirs.astype(stored_dtype, copy=False), reader.read_raw(s, layer, a, b))
                bar.update(per_index * (b - a))
    bar.close()
    src.close()
    return _report(rows, problems, out)


def _check_exact(row: Row, name: str, want: np.ndarray, got: np.ndarray) -> None:
    u = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[want.dtype.itemsize]
    same = want.view(u) == got.view(u)
    if not same.all():
        row.exact = False
        diff = np.abs(want.astype(np.float64) - got.astype(np.float64))
        row.max_err = max(row.max_err, float(np.nanmax(diff)) if diff.size else 0.0)
        if row.first_bad is None:
            idx = tuple(int(i) for i in np.argwhere(~same)[0])
            row.first_bad = f"tensor {name!r}: first differing element at {idx} (our layout)"


def _check_quant(row, name, theirs, reader, s, layer, a, b) -> None:
    q = reader.read_raw(s, layer, a, b)
    sc = reader.read_scale(s, layer, a, b)
    deq = np.asarray(quant.dequantize(q, sc, reader.cfg.quant, s.in_shape, q.shape[s.axis:]))
    w = theirs.astype(np.float32)
    err = np.abs(w - deq)
    # the scale of every weight, broadcast to the weight's shape
    qc = reader.cfg.quant
    I, O = math.prod(s.in_shape), math.prod(q.shape[s.axis:])
    gs = qc.group_size or I
    scale = np.broadcast_to(sc.astype(np.float32).reshape(I // gs, 1, O), (I // gs, gs, O)).reshape(q.shape)
    ratio = err / np.where(scale > 0, scale, 1)
    row.max_err = max(row.max_err, float(err.max()))
    row.max_ratio = max(row.max_ratio, float(ratio.max()))
    bound = 0.5 * (1 + 2 ** -7)
    if ratio.max() > bound and row.first_bad is None:
        idx = tuple(int(i) for i in np.unravel_index(int(ratio.argmax()), ratio.shape))
        row.first_bad = (f"tensor {name!r}: error {float(err[idx]):.3g} at {idx} is {float(ratio[idx]):.3f} × its "
                         f"scale (bound {bound:.3f})")


def _report(rows: dict[str, Row], problems: list[str], out) -> bool:
    width = max([len(r.param) for r in rows.values()] + [10])
    for r in rows.values():
        if r.quantized:
            what = f"max |err| {r.max_err:.3g} = {r.max_ratio:.3f} × scale (bound 0.5)"
        else:
            what = "bit-exact" if r.exact else f"DIFFERS, max |err| {r.max_err:.3g}"
        print(f"{r.param:<{width}}  {r.tensors:4d} tensors  {'ok  ' if r.ok else 'FAIL'}  {what}", file=out)
    bad = [r for r in rows.values() if not r.ok]
    for r in bad:
        problems.append(r.first_bad)
    n = sum(r.tensors for r in rows.values())
    if problems:
        for p in problems:
            print(f"FAIL: {p}", file=out)
        print(f"verify: {len(problems)} problem(s) in {n} tensors compared", file=out)
        return False
    print(f"verify: all {n} tensors match", file=out)
    return True
