"""A Hugging Face checkpoint directory as a converter reads it: validated up front, then read in
blocks of rows straight from the files (no tensor is ever read whole).

Validation (errors name the file and the tensor; `python -m convert` exits non-zero with them):
pickle formats refused with a hint; missing, extra or duplicated tensors (across files, inside one
file's header, or in the index); shapes that do not match config.json; dtypes that do not match
config.json's `dtype`/`torch_dtype`; truncated files and corrupt headers (model/safetensors_io.py),
overlapping tensor byte ranges.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np

from model.formats.load import check_hf_tensors
from model.formats.safetensors_io import DTYPES, CheckpointError, HFCheckpoint
from model.network.config import LlamaConfig

_TORCH_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "float": "F32", "half": "F16"}


class HFSource:
    def __init__(self, directory, **config_overrides):
        self.dir = Path(directory)
        if str(directory).startswith(("gs://", "s3://")):
            raise CheckpointError(f"{directory}: Hugging Face directories are read from local disk only "
                                  f"(copy it first, e.g. `gcloud storage cp -r {directory} .`); Orbax paths may be gs://")
        self.ckpt = HFCheckpoint(self.dir)
        self.config = LlamaConfig.from_hf(self.dir, **config_overrides)
        self._hf_config = json.loads((self.dir / "config.json").read_text())
        self._check_duplicate_keys()
        self._check_overlaps()
        check_hf_tensors(self.ckpt, self.config)
        self._check_dtypes()
        self._fds: dict[str, int] = {}
        self._data_start = {f: 8 + self._header_len(self.dir / f) for f in self.ckpt.files}

    # -- validation ------------------------------------------------------------------------
    @staticmethod
    def _header_len(path: Path) -> int:
        with open(path, "rb") as f:
            return struct.unpack("<Q", f.read(8))[0]

    def _header_bytes(self, path: Path) -> bytes:
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            return f.read(n)

    def _check_duplicate_keys(self) -> None:
        def pairs_hook(where):
            def hook(pairs):
                seen = set()
                for k, _ in pairs:
                    if k in seen:
                        raise CheckpointError(f"{where}: tensor {k!r} is listed twice (duplicated tensor)")
                    seen.add(k)
                return dict(pairs)
            return hook

        for fname in self.ckpt.files:
            path = self.dir / fname
            json.loads(self._header_bytes(path), object_pairs_hook=pairs_hook(path))
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            json.loads(index.read_text(), object_pairs_hook=pairs_hook(index))

    def _check_overlaps(self) -> None:
        for fname, sf in self.ckpt.files.items():
            spans = sorted((begin, end, name) for name, (_, _, begin, end) in sf.tensors.items() if end > begin)
            for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
                if b1 < e0:
                    raise CheckpointError(f"{self.dir / fname}: corrupt safetensors header: tensors {n0!r} and "
                                          f"{n1!r} overlap (bytes {b0}-{e0} and {b1}-{e1})")

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
            path = self.dir / fname
            out[fname] = {"size": path.stat().st_size, "header_sha256": hashlib.sha256(self._header_bytes(path)).hexdigest()}
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
        buf = np.empty(n, np.uint8)
        fd = self._fds.get(fname)
        if fd is None:
            fd = self._fds[fname] = os.open(self.dir / fname, os.O_RDONLY)
        offset, got = self._data_start[fname] + begin + r0 * row, 0
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
