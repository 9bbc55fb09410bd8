"""Safetensors read and write, one tensor at a time.

Our own reader and writer of the (simple, documented) safetensors layout, rather than the
`safetensors` package's numpy API, because (1) numpy has no bfloat16 there and (2) its writer needs
every tensor of a file in memory at once; streaming conversion of a 405B checkpoint needs neither.
Every header is validated where it enters, with errors that name the file and the tensor.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES = {
    "BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16), "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "I16": np.dtype(np.int16), "I32": np.dtype(np.int32), "I64": np.dtype(np.int64),
    "BOOL": np.dtype(np.bool_), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
NAMES = {v: k for k, v in DTYPES.items()}
PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt", ".pkl")
MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint on disk is not what it must be; the message names the file and tensor."""


class SafetensorsFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                raw = f.read(8)
                if len(raw) < 8:
                    raise CheckpointError(f"{self.path}: truncated file ({size} bytes): no safetensors header")
                (n,) = struct.unpack("<Q", raw)
                if n > MAX_HEADER or n + 8 > size:
                    raise CheckpointError(f"{self.path}: corrupt safetensors header (declares {n} header bytes, "
                                          f"file has {size})")
                header = json.loads(f.read(n))
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.path}: corrupt safetensors header: {e}") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header: not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        self.tensors: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except KeyError as e:
                raise CheckpointError(f"{self.path}: tensor {name!r}: unsupported or missing header field {e}") from None
            except (TypeError, ValueError):
                raise CheckpointError(f"{self.path}: tensor {name!r}: malformed header entry {info!r}") from None
            expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if end - begin != expected or begin < 0:
                raise CheckpointError(f"{self.path}: tensor {name!r}: header gives {end - begin} bytes for "
                                      f"shape {list(shape)} {info['dtype']} ({expected} expected)")
            if self._data_start + end > size:
                raise CheckpointError(f"{self.path}: truncated file: tensor {name!r} ends at byte "
                                      f"{self._data_start + end}, file has {size}")
            self.tensors[name] = (dtype, shape, begin, end)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self.tensors[name][0]

    def read(self, name: str) -> np.ndarray:
        dtype, shape, begin, end = self.tensors[name]
        with open(self.path, "rb") as f:
            f.seek(self._data_start + begin)
            buf = f.read(end - begin)
        if len(buf) != end - begin:
            raise CheckpointError(f"{self.path}: truncated while reading tensor {name!r}")
        return np.frombuffer(buf, dtype=dtype).reshape(shape)


class SafetensorsWriter:
    """Writes one safetensors file tensor by tensor: the header is laid out first from the declared
    (name, dtype, shape) list, then each tensor is written in order. Writes to `path + ".partial"`
    and renames on close, so a killed writer never leaves a file that looks finished."""

    def __init__(self, path: str | Path, specs: list[tuple[str, np.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".partial")
        header, offset = {}, 0
        for name, dtype, shape in specs:
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            header[name] = {"dtype": NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        if metadata:
            header["__metadata__"] = metadata
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data aligned to 8 bytes, as the reference writer does
        self._order = [s[0] for s in specs]
        self._specs = {n: (np.dtype(d), tuple(s)) for n, d, s in specs}
        self._next = 0
        self._f = open(self.tmp, "wb")
        self._f.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, array: np.ndarray) -> None:
        if self._order[self._next] != name:
            raise ValueError(f"{self.path}: expected tensor {self._order[self._next]!r} next, got {name!r}")
        dtype, shape = self._specs[name]
        array = np.ascontiguousarray(array)
        if array.dtype != dtype or array.shape != shape:
            raise ValueError(f"{self.path}: tensor {name!r} is {array.dtype}{list(array.shape)}, declared {dtype}{list(shape)}")
        self._f.write(array.tobytes())
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._order):
            raise ValueError(f"{self.path}: closed after {self._next} of {len(self._order)} tensors")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp, self.path)


class HFCheckpoint:
    """The safetensors files of a Hugging Face checkpoint directory, indexed by tensor name."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise CheckpointError(f"{self.dir}: not a directory")
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: invalid index ({e})") from None
            files = sorted(set(weight_map.values()))
        elif (self.dir / "model.safetensors").exists():
            weight_map, files = None, ["model.safetensors"]
        else:
            pickles = sorted(p.name for p in self.dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
            hint = (f" Found {', '.join(pickles)}: pickle-based formats are never loaded (they can run code). "
                    "Convert them to safetensors with transformers (`save_pretrained(..., safe_serialization=True)`)."
                    if pickles else "")
            raise CheckpointError(f"{self.dir}: no model.safetensors or model.safetensors.index.json.{hint}")
        self.files = {f: SafetensorsFile(self.dir / f) for f in files}
        self.where: dict[str, str] = {}
        for fname, sf in self.files.items():
            for name in sf.tensors:
                if name in self.where:
                    raise CheckpointError(f"{self.dir}: tensor {name!r} appears in both {self.where[name]} and {fname}")
                self.where[name] = fname
        if weight_map is not None:
            for name, fname in weight_map.items():
                if self.where.get(name) != fname:
                    raise CheckpointError(f"{index}: lists tensor {name!r} in {fname}, but that file does not hold it")

    def names(self) -> set[str]:
        return set(self.where)

    def file_of(self, name: str) -> Path:
        return self.dir / self.where[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.files[self.where[name]].shape(name)

    def read(self, name: str) -> np.ndarray:
        return self.files[self.where[name]].read(name)
