"""Paths: local or object storage (gs://, s3://), one abstraction for every file this project reads or
writes outside Orbax's arrays.

etils.epath, because Orbax (CheckpointManager, PyTree checkpoints) already takes and returns epath
paths: checkpoints, metadata, markers, configs and adapters then go through the same code. For gs:// its
backend is fsspec's gcsfs (the `gcs` extra). Arrays never go through it: TensorStore's own GCS driver
writes and reads them (model/formats/checkpoint.py).

What object storage lacks is supplied here: positioned reads (`read_range`: one ranged GET, so a
safetensors header or a block of rows is read without fetching the file), atomic replacement
(`write_bytes_atomic`, `publish`: one object upload is atomic on GCS, where a rename is a copy), append
(`Mirror`: a local file uploaded whole), and local copies of small files for readers that need a local
path (`local_copy`: config.json, tokenizer files).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import fsspec  # etils.epath's backend for gs:// (gcsfs, imported by fsspec on first use)
from etils import epath

REMOTE_SCHEMES = ("gs://", "s3://")
CACHE_ENV = "LLAMA_JAX_CACHE"  # where local copies of remote small files go (default ~/.cache/llama-jax)
logging.getLogger("fsspec").setLevel(logging.WARNING)  # at INFO it narrates the read-ahead cache of every open


def is_remote(path) -> bool:
    return str(path).startswith(REMOTE_SCHEMES)


def as_path(path) -> epath.Path:
    """A local or gs:// path. Never `pathlib.Path("gs://b/x")`: it folds the `//`."""
    return epath.Path(path)


def absolute(path) -> epath.Path:
    """An absolute path (a remote one is already: epath's `absolute()` would prefix it with the cwd)."""
    return as_path(path) if is_remote(path) else as_path(path).absolute()


def _fs(path):
    """The fsspec filesystem of a remote path (gcsfs for gs://)."""
    return fsspec.filesystem(str(path).split("://", 1)[0])


def size(path) -> int:
    if is_remote(path):
        try:
            return int(_fs(path).size(str(path)))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such object") from None
    return os.stat(path).st_size


def read_range(path, offset: int, length: int) -> bytes:
    """`length` bytes of file `path` from byte `offset` (fewer at its end): one ranged GET on object storage."""
    if length <= 0:
        return b""
    if is_remote(path):
        try:
            return _fs(path).cat_file(str(path), start=offset, end=offset + length)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such object") from None
    with open(path, "rb") as f:
        return os.pread(f.fileno(), length, offset)


def write_bytes_atomic(path, data: bytes) -> None:
    """Replaces `path` whole or not at all: a temporary file renamed (local), or one object upload (remote)."""
    if is_remote(path):
        as_path(path).write_bytes(data)
        return
    p = Path(path)
    tmp = p.with_name(p.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)


def staging_file(final) -> Path:
    """Where to write a file that becomes `final` when `publish`ed: beside it (local) or a local temporary file."""
    if not is_remote(final):
        p = Path(final)
        return p.with_name(p.name + ".partial")
    fd, name = tempfile.mkstemp(prefix="upload-", suffix="-" + str(final).rsplit("/", 1)[-1])
    os.close(fd)
    return Path(name)


def publish(staged: Path, final) -> None:
    """Gives a finished staged file its final name: a rename, or one upload (atomic per object) then removal."""
    if is_remote(final):
        _fs(final).put_file(str(staged), str(final))
        os.unlink(staged)
    else:
        os.replace(staged, final)


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "llama-jax")


def local_copy(directory, names) -> Path:
    """A local directory holding those of `names` (small files: config.json, tokenizer files) that exist in
    `directory`: the directory itself when local, else copies under the cache (refreshed on every call)."""
    if not is_remote(directory):
        return Path(directory)
    src = str(directory).rstrip("/")
    dst = cache_dir() / "remote" / hashlib.sha256(src.encode()).hexdigest()[:16]
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        f = as_path(src) / name
        if f.exists():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(dst / name, f.read_bytes())
        elif (dst / name).exists():
            (dst / name).unlink()
    return dst


class Mirror:
    """A file that is appended to (metrics.jsonl) or written by a library that needs a local directory
    (TensorBoard events): local paths are used as they are; a remote one is kept in a local directory and
    uploaded whole by `sync` (earlier content is fetched first, so a resumed run appends)."""

    def __init__(self, path, *, fetch: bool = True):
        self.remote = str(path).rstrip("/") if is_remote(path) else None
        if self.remote is None:
            self.local = Path(path)
            return
        self.local = Path(tempfile.mkdtemp(prefix="mirror-")) / self.remote.rsplit("/", 1)[-1]
        if fetch and as_path(self.remote).exists():
            _fs(self.remote).get(self.remote, str(self.local), recursive=as_path(self.remote).is_dir())

    def sync(self) -> None:
        if self.remote is None or not self.local.exists():
            return
        if self.local.is_dir():
            for f in sorted(p for p in self.local.rglob("*") if p.is_file()):
                _fs(self.remote).put_file(str(f), f"{self.remote}/{f.relative_to(self.local).as_posix()}")
        else:
            _fs(self.remote).put_file(str(self.local), self.remote)

    def close(self) -> None:
        self.sync()
        if self.remote is not None:
            shutil.rmtree(self.local.parent, ignore_errors=True)
