"""A Hugging Face checkpoint directory as a converter reads it: validated up front, then read in
blocks of rows straight from the files (no tensor is ever read whole).

Validation (errors name the file and the tensor; `python -m convert` exits non-zero with them):
pickle formats refused with a hint; missing, extra or duplicated tensors (across files, inside one
file's header, or in the index); shapes that do not match config.json; dtypes that do not match
config.json's `dtype`/`torch_dtype`. Headers (truncated files, corrupt or malformed entries, overlapping
byte ranges) and index file names are checked by the one reader, model/formats/safetensors_io.py.
"""

from __future__ import annotations

import json
import os

import numpy as np

from model.formats import hub, paths
from model.formats.load import check_hf_tensors
from model.formats.safetensors_io import DTYPES, CheckpointError, HFCheckpoint
from model.network.config import LlamaConfig

_TORCH_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "float": "F32", "half": "F16"}


class HFSource:
    def __init__(self, directory, **config_overrides):
        """`directory`: local, gs:// (read by ranged reads, never fetched whole) or a Hub id `org/name[@rev]`."""
        self.dir = paths.as_path(hub.resolve(directory))
        self.remote = paths.is_remote(self.dir)
        self.ckpt = HFCheckpoint(self.dir)
        local = paths.local_copy(self.dir, ["config.json"])
        self.config = LlamaConfig.from_hf(local, **config_overrides)
        self._hf_config = json.loads((local / "config.json").read_text())
        check_hf_tensors(self.ckpt, self.config)
        self._check_dtypes()
        self._fds: dict[str, int] = {}
        self._data_start = {f: sf.data_start for f, sf in self.ckpt.files.items()}

    # -- validation (the rest is model/formats/safetensors_io.py's: headers, index, overlaps) ------
    def _check_dtypes(self) -> None:
        want = self._hf_config.get("dtype") or self._hf_config.get("torch_dtype")
        if want is None:
            return
        code = _TORCH_DTYPES.get(str(want).replace("torch.", ""))
        if code is None:
            raise CheckpointError(f"{self.dir / 'config.json'}: unsupported dtype {want!r}")
        for name in sorted(self.ckpt.names()):
            have = self.dtype(name)
            if have != DTYPES[code]:
                raise CheckpointError(f"{self.ckpt.file_of(name)}: tensor {name!r} is {_code(have)}, "
                                      f"config.json says dtype {want!r} ({code})")

    # -- identity of the source (for resuming) ---------------------------------------------
    def fingerprint(self) -> dict:
        """File names, sizes and header hashes: a resumed job must read the same source."""
        out = {}
        for fname in sorted(self.ckpt.files):
            sf = self.ckpt.files[fname]
            out[fname] = {"size": paths.size(self.dir / fname), "header_sha256": sf.header_sha256}
        return out

    # -- reading ---------------------------------------------------------------------------
    def dtype(self, name: str) -> np.dtype:
        return self.ckpt.files[self.ckpt.where[name]].dtype(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.ckpt.shape(name)

    def nbytes(self, name: str) -> int:
        _, _, begin, end = self.ckpt.files[self.ckpt.where[name]].tensors[name]
        return end - begin

    def location(self, name: str) -> tuple[str, int]:
        """(file, byte offset): the order in which tensors are read, for sequential disk access."""
        fname = self.ckpt.where[name]
        return fname, self.ckpt.files[fname].tensors[name][2]

    def read_rows(self, name: str, r0: int, r1: int) -> np.ndarray:
        """Rows [r0, r1) of tensor `name` (its first axis), read with one positioned read."""
        fname = self.ckpt.where[name]
        dtype, shape, begin, _ = self.ckpt.files[fname].tensors[name]
        row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        n = (r1 - r0) * row
        offset = self._data_start[fname] + begin + r0 * row
        if self.remote:  # one ranged GET
            data = paths.read_range(self.dir / fname, offset, n)
            if len(data) != n:
                raise CheckpointError(f"{self.dir / fname}: truncated while reading tensor {name!r}")
            return np.frombuffer(data, np.uint8).view(dtype).reshape(r1 - r0, *shape[1:])
        buf = np.empty(n, np.uint8)
        fd = self._fds.get(fname)
        if fd is None:
            fd = self._fds[fname] = os.open(self.dir / fname, os.O_RDONLY)
        got = 0
        view = memoryview(buf)
        while got < n:
            k = os.preadv(fd, [view[got:]], offset + got)
            if k <= 0:
                raise CheckpointError(f"{self.dir / fname}: truncated while reading tensor {name!r}")
            got += k
        return buf.view(dtype).reshape(r1 - r0, *shape[1:])

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _code(dtype: np.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}.get(np.dtype(dtype), str(dtype))
