"""Safetensors read and write, one tensor at a time.

Our own reader and writer of the (simple, documented) safetensors layout, rather than the
`safetensors` package's numpy API, because (1) numpy has no bfloat16 there and (2) its writer needs
every tensor of a file in memory at once; streaming conversion of a 405B checkpoint needs neither.
Every header is validated where it enters, with errors that name the file and the tensor.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct

import ml_dtypes
import numpy as np

from model.formats import paths

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


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class SafetensorsFile:
    """One safetensors file, its header validated in full on opening (the one reader every path uses:
    model.load, convert, PEFT): a sane header length, a JSON object without repeated names, for each
    tensor a known dtype, a shape of non-negative integers, data offsets whose span is exactly
    prod(shape)·itemsize (Python integers: no overflow), inside the file and overlapping no other."""

    def __init__(self, path):
        self.path = paths.as_path(path)  # local or gs:// (ranged reads: a remote file is never fetched whole)
        raw, size = self._read_header()
        self.header_len = len(raw)
        self.header_sha256 = hashlib.sha256(raw).hexdigest()
        header = self._parse(raw)
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header: __metadata__ is not a JSON object")
        self.metadata = metadata
        self.data_start = self._data_start = 8 + len(raw)
        self.tensors: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {
            name: self._entry(name, info, size) for name, info in header.items()}
        self._check_overlaps()

    def _read_header(self) -> tuple[bytes, int]:
        try:
            size = paths.size(self.path)
            raw = paths.read_range(self.path, 0, 8)
            if len(raw) < 8:
                raise CheckpointError(f"{self.path}: truncated file ({size} bytes): no safetensors header")
            (n,) = struct.unpack("<Q", raw)
            if n < 2 or n > MAX_HEADER or n + 8 > size:
                raise CheckpointError(f"{self.path}: corrupt safetensors header (declares {n} header bytes, "
                                      f"file has {size}; at most {MAX_HEADER} allowed)")
            return paths.read_range(self.path, 8, n), size
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: file not found") from None

    def _parse(self, raw: bytes) -> dict:
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys(f"{self.path}", "in the header "))
        except CheckpointError:
            raise
        except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, integers of >4300 digits, deep nesting
            raise CheckpointError(f"{self.path}: corrupt safetensors header: {e}") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header: not a JSON object")
        return header

    def _entry(self, name: str, info, size: int) -> tuple[np.dtype, tuple[int, ...], int, int]:
        where = f"{self.path}: tensor {name!r}"
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise CheckpointError(f"{where}: malformed header entry {info!r} (needs dtype, shape, data_offsets)")
        code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(code, str) or code not in DTYPES:
            raise CheckpointError(f"{where}: unsupported dtype {code!r} (known: {', '.join(DTYPES)})")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise CheckpointError(f"{where}: data_offsets {offsets!r} are not two integers 0 <= begin <= end")
        dtype, (begin, end) = DTYPES[code], offsets
        expected = math.prod(shape) * dtype.itemsize  # Python integers: cannot overflow
        if end - begin != expected:
            raise CheckpointError(f"{where}: header gives {end - begin} bytes for shape {shape} {code} "
                                  f"({expected} expected)")
        if self._data_start + end > size:
            raise CheckpointError(f"{self.path}: truncated file: tensor {name!r} ends at byte "
                                  f"{self._data_start + end}, file has {size}")
        return dtype, tuple(shape), begin, end

    def _check_overlaps(self) -> None:
        spans = sorted((begin, end, name) for name, (_, _, begin, end) in self.tensors.items() if end > begin)
        for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise CheckpointError(f"{self.path}: corrupt safetensors header: tensors {n0!r} and {n1!r} "
                                      f"overlap (bytes {b0}-{e0} and {b1}-{e1})")

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self.tensors[name][0]

    def read(self, name: str) -> np.ndarray:
        dtype, shape, begin, end = self.tensors[name]
        buf = paths.read_range(self.path, self._data_start + begin, end - begin)
        if len(buf) != end - begin:
            raise CheckpointError(f"{self.path}: truncated while reading tensor {name!r}")
        return np.frombuffer(buf, dtype=dtype).reshape(shape)


class SafetensorsWriter:
    """Writes one safetensors file tensor by tensor: the header is laid out first from the declared
    (name, dtype, shape) list, then each tensor is written in order. Writes to `path + ".partial"`
    (a local temporary file for gs://) and renames (uploads) on close, so a killed writer never leaves a
    file that looks finished."""

    def __init__(self, path, specs: list[tuple[str, np.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = paths.as_path(path)
        self.tmp = paths.staging_file(path)
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
        paths.publish(self.tmp, self.path)


class HFCheckpoint:
    """The safetensors files of a Hugging Face checkpoint directory, indexed by tensor name."""

    def __init__(self, directory):
        self.dir = paths.as_path(directory)
        if not self.dir.is_dir():
            raise CheckpointError(f"{self.dir}: not a directory")
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            weight_map = read_index(index)
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

    def file_of(self, name: str):
        return self.dir / self.where[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.files[self.where[name]].shape(name)

    def read(self, name: str) -> np.ndarray:
        return self.files[self.where[name]].read(name)


def _unique_keys(where: str, place: str):
    """A json `object_pairs_hook` that refuses a key given twice (a tensor listed twice), naming `where`."""
    def hook(pairs):
        seen = set()
        for k, _ in pairs:
            if k in seen:
                raise CheckpointError(f"{where}: tensor {k!r} is listed twice {place}(duplicated tensor)")
            seen.add(k)
        return dict(pairs)
    return hook


def read_index(index) -> dict[str, str]:
    """The `weight_map` of a `model.safetensors.index.json`: tensor name -> a file name inside the index's
    directory (absolute paths, `..`, separators or repeated names are refused, naming the entry)."""
    try:
        weight_map = json.loads(index.read_text(), object_pairs_hook=_unique_keys(f"{index}", ""))["weight_map"]
    except CheckpointError:
        raise
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise CheckpointError(f"{index}: invalid index ({type(e).__name__}: {e})") from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: invalid index (weight_map is not a JSON object)")
    for name, fname in weight_map.items():
        if not inside_dir(fname):
            raise CheckpointError(f"{index}: weight_map entry {name!r}: file {fname!r} is not a file name inside "
                                  f"the checkpoint directory")
    return weight_map


def inside_dir(name) -> bool:
    """Whether `name` (from a file's metadata) names an entry inside the directory that holds the file:
    a non-empty relative path without `..`, `.`-only or empty parts (checked lexically: symlinks, as in the
    Hugging Face cache, are followed as the directory's owner laid them out)."""
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        return False
    parts = name.split("/")
    return not name.startswith("/") and all(p not in ("", ".", "..") for p in parts)
