"""How each entry of the one HF table (model/hf_format.py) streams in blocks of HF rows.

The table gives each HF tensor's place in our tree and whole-tensor transforms (`to_ours`,
`to_hf`). Streaming needs the same transforms on a block of HF rows, so this module learns each
entry's structure from the table itself instead of restating it: it runs the entry's `to_ours` on a
probe config whose dimensions are all different and reads off whether it is the identity or a
transpose to [*in, *out] (and how many trailing dimensions of ours the HF rows become). A transform
of any other kind is refused, so a new kind of table entry cannot be streamed wrongly in silence.
No HF name appears here: names and paths come from the table.

A block is a range [a, b) of indices along `axis`, the axis of ours that HF rows run along (axis 0
for identity entries; the first output axis for linear ones). It always spans every other axis, so
blocks line up with chunks whose extent along `axis` divides the block.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from model.formats import hf_format
from model.network.config import LlamaConfig
from model.network.model import tree_get

# Every dimension different, so that a transpose can never look like the identity.
_PROBE = LlamaConfig(vocab_size=17, dim=10, mlp_dim=22, num_layers=1, num_heads=4, num_kv_heads=2,
                     head_dim=3, rope_scaling=None, param_dtype="float32", compute_dtype="float32")


@functools.cache
def _kinds() -> dict[tuple[str, ...], int | None]:
    """path -> None (identity) or the number of trailing dims of ours that HF rows become (linear)."""
    kinds = {}
    for e in hf_format.entries(_PROBE):
        x = np.arange(math.prod(e.hf_shape)).reshape(e.hf_shape)
        y = np.asarray(e.to_ours(x))
        if y.shape == x.shape and np.array_equal(y, x):
            kind = None
        else:
            rows = e.hf_shape[0]
            j = next((j for j in range(1, y.ndim) if math.prod(y.shape[y.ndim - j:]) == rows), None)
            if len(e.hf_shape) != 2 or j is None or not np.array_equal(y.reshape(-1, rows), x.T):
                raise NotImplementedError(f"hf_format entry {e.hf!r} -> {'/'.join(e.path)}: its transform is neither "
                                          f"the identity nor a transpose to [*in, *out]; convert/ cannot stream it")
            kind = j
        if not np.array_equal(np.asarray(e.to_hf(y)), x):
            raise NotImplementedError(f"hf_format entry {e.hf!r}: to_hf is not the inverse of to_ours")
        kinds[e.path] = kind
    return kinds


@dataclasses.dataclass(frozen=True)
class Stream:
    entry: hf_format.Entry
    shape: tuple[int, ...]  # ours, one layer (no `layers` axis)
    linear: bool  # HF [out, in] -> ours [*in, *out]; else the identity
    axis: int  # our axis that HF rows run along
    kv_repeat: int = 1  # source rows repeat each of our heads this many times (405B files with 16 KV heads)

    @property
    def path(self) -> tuple[str, ...]:
        return self.entry.path

    @property
    def stacked(self) -> bool:
        return self.entry.stacked

    @property
    def in_shape(self) -> tuple[int, ...]:
        return self.shape[:self.axis]

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.shape[self.axis:]

    @property
    def rows_per_index(self) -> int:
        """Source HF rows per index of `axis`."""
        return (math.prod(self.shape[self.axis + 1:]) if self.linear else 1) * self.kv_repeat

    @property
    def length(self) -> int:
        return self.shape[self.axis]

    def hf_rows(self, a: int, b: int) -> tuple[int, int]:
        return a * self.rows_per_index, b * self.rows_per_index

    def region_shape(self, a: int, b: int) -> tuple[int, ...]:
        return (*self.shape[:self.axis], b - a, *self.shape[self.axis + 1:])

    def to_ours(self, rows: np.ndarray, a: int, b: int, name: str = "") -> np.ndarray:
        """HF rows [hf_rows(a, b)] (2-D [rows, cols] or the HF shape) -> our region [..., a:b, ...]."""
        if self.kv_repeat > 1:
            cols = rows.shape[-1]
            rows = dedup_heads(rows.reshape(b - a, self.kv_repeat, -1), name, a).reshape(-1, cols)
        if not self.linear:
            return rows.reshape(self.region_shape(a, b))
        return transpose2d(rows.reshape(-1, math.prod(self.in_shape))).reshape(self.region_shape(a, b))

    def to_hf(self, region: np.ndarray) -> np.ndarray:
        """Our region [..., a:b, ...] -> HF rows, 2-D [rows, cols] (1-D tensors stay 1-D)."""
        if not self.linear:
            return region.reshape(-1, *self.entry.hf_shape[1:])
        return transpose2d(region.reshape(math.prod(self.in_shape), -1))


def streams(cfg: LlamaConfig, abstract, source_kv_heads: int | None = None) -> list[Stream]:
    """One Stream per table entry of `cfg`; shapes and logical axes come from `abstract` (the abstract
    model state). With source_kv_heads = r · cfg.num_kv_heads, entries whose row axis is `kv_heads`
    read a source that repeats each KV head r times, de-duplicated while streaming."""
    kinds = _kinds()
    out = []
    for e in hf_format.entries(cfg):
        if e.path not in kinds:
            raise NotImplementedError(f"hf_format entry {e.hf!r}: not present in the probe config")
        var = tree_get(abstract, e.path)
        lead = 1 if e.stacked else 0
        shape = tuple(var.shape[lead:])
        names = tuple(var.get_metadata().get("out_sharding") or (None,) * var.ndim)[lead:]
        j = kinds[e.path]
        axis = 0 if j is None else len(shape) - j
        rep = 1
        if source_kv_heads and source_kv_heads != cfg.num_kv_heads and names[axis] == "kv_heads":
            if source_kv_heads % cfg.num_kv_heads:
                raise ValueError(f"{source_kv_heads} KV heads cannot be de-duplicated to {cfg.num_kv_heads}")
            rep = source_kv_heads // cfg.num_kv_heads
        out.append(Stream(e, shape, j is not None, axis, rep))
    return out


class DuplicateHeadsError(ValueError):
    pass


def dedup_heads(rows: np.ndarray, name: str, head0: int) -> np.ndarray:
    """rows [heads, r, X]: each of our heads repeated r times in the source -> [heads, X] (the first
    copy), after checking bit for bit that every copy equals the first."""
    first = rows[:, 0]
    for c in range(1, rows.shape[1]):
        same = (_bits(first) == _bits(rows[:, c])).all(axis=1)
        if not same.all():
            h = head0 + int(np.argmin(same))
            r = rows.shape[1]
            raise DuplicateHeadsError(
                f"tensor {name!r}: KV head {h * r + c} differs from KV head {h * r}; the file's {r}× repeated "
                f"KV heads are not copies of each other, so they cannot be de-duplicated "
                f"(convert with --kv-heads set to the file's own count to keep them all)")
    return first


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view(_UINT[a.dtype.itemsize])


_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def transpose2d(a: np.ndarray, stripe: int = 16) -> np.ndarray:
    """A contiguous copy of a.T for a 2-D array, in stripes of rows that stay in cache (about 7×
    numpy's plain `ascontiguousarray(a.T)` for 2-byte types on this machine). Bits are moved as
    unsigned integers of the same width, so any dtype (bf16, NaNs) is copied exactly."""
    R, C = a.shape
    dt = a.dtype
    a = np.ascontiguousarray(a).view(_UINT[dt.itemsize])
    out = np.empty((C, R), a.dtype)
    if R == 1 or C == 1:
        out[...] = a.reshape(C, R)
    else:
        for i in range(0, R, stripe):
            out[:, i:i + stripe] = a[i:i + stripe].T
    return out.view(dt)
