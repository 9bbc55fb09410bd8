"""Compiling a lowered program, remembered when its devices are a TPU slice this machine does not have.

    compiled = aot_compile.compile(lowered, devices)
    compiled.memory_analysis(), compiled.cost_analysis(), compiled.as_text()

On attached devices this is `lowered.compile()` (JAX's persistent compilation cache applies there). For
compile-only devices (sharding/topology.py on a machine without the chips), JAX's cache cannot load an
executable back (libtpu deserializes only through a client), so every `--compile-only` of a 405B config
compiled again, for minutes. What a plan reads from such a compile — the memory analysis, the cost
analysis, the optimized HLO — depends only on the lowered program, the chips and the compiler, so it is
kept under $LLAMA_JAX_CACHE/aot (default ~/.cache/llama-jax/aot) with a key hashed from all of them and
returned as a `Recorded` with the same three methods. LLAMA_JAX_AOT_CACHE=0 turns it off. A refusal
(the program does not fit) is not kept: the compiler gives it fast.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib.metadata
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import jax

log = logging.getLogger("sharding.aot_compile")

MEMORY_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
                 "generated_code_size_in_bytes", "peak_memory_in_bytes")


@dataclasses.dataclass(frozen=True)
class Memory:
    argument_size_in_bytes: int
    output_size_in_bytes: int
    alias_size_in_bytes: int
    temp_size_in_bytes: int
    generated_code_size_in_bytes: int
    peak_memory_in_bytes: int


@dataclasses.dataclass(frozen=True)
class Recorded:
    """What a compile for a topology gave, as the compiled object's methods give it."""

    memory: Memory
    cost: dict
    text: str
    compile_seconds: float = dataclasses.field(compare=False)  # of the compile that recorded it

    def memory_analysis(self) -> Memory:
        return self.memory

    def cost_analysis(self) -> dict:
        return dict(self.cost)

    def as_text(self) -> str:
        return self.text


def cache_dir() -> Path | None:
    if os.environ.get("LLAMA_JAX_AOT_CACHE", "1") == "0":
        return None
    return Path(os.environ.get("LLAMA_JAX_CACHE") or Path.home() / ".cache" / "llama-jax") / "aot"


def _versions() -> str:
    out = [jax.__version__]
    for dist in ("jaxlib", "libtpu"):
        try:
            out.append(f"{dist}={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{dist}=none")
    return " ".join(out)


def key(lowered: jax.stages.Lowered, devices) -> str:
    """A hash of the program, the chips it targets (kind, count, ids and coordinates), the compiler's
    versions and the flags that change what it does."""
    devs = list(getattr(devices, "flat", devices))
    chips = [(d.id, getattr(d, "coords", None), getattr(d, "core_on_chip", None)) for d in devs]
    xla_flags = " ".join(sorted(set(os.environ.get("XLA_FLAGS", "").split())))  # a flag given twice is one
    h = hashlib.sha256()
    for part in (lowered.as_text(), devs[0].platform, devs[0].device_kind, repr(chips), _versions(),
                 os.environ.get("LIBTPU_INIT_ARGS", ""), xla_flags):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def _compile_only(devices) -> bool:
    devs = list(getattr(devices, "flat", devices))
    return devs[0].platform == "tpu" and jax.default_backend() != "tpu"


def cost(compiled) -> dict:
    """A compiled program's cost analysis as one dict (some backends give a list of one)."""
    c = compiled.cost_analysis()
    return (c[0] if isinstance(c, (list, tuple)) and c else c) or {}


def _record(compiled, seconds: float) -> Recorded:
    ma = compiled.memory_analysis()
    memory = Memory(**{f: int(getattr(ma, f, 0) or 0) for f in MEMORY_FIELDS})
    return Recorded(memory, {k: float(v) for k, v in cost(compiled).items()}, compiled.as_text(), round(seconds, 1))


def _load(path: Path) -> Recorded | None:
    try:
        d = json.loads(gzip.decompress(path.read_bytes()))
        return Recorded(Memory(**d["memory"]), d["cost"], d["text"], d["compile_seconds"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("ignoring unreadable AOT cache entry %s (%s)", path, e)
        return None


def _store(path: Path, rec: Recorded):
    path.parent.mkdir(parents=True, exist_ok=True)
    data = gzip.compress(json.dumps({"memory": dataclasses.asdict(rec.memory), "cost": rec.cost, "text": rec.text,
                                     "compile_seconds": rec.compile_seconds}).encode(), compresslevel=3)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name, suffix=".tmp", delete=False) as f:
        f.write(data)
    os.replace(f.name, path)  # whole or absent: a reader never sees half an entry


def compile(lowered: jax.stages.Lowered, devices):
    """`lowered.compile()`, or for compile-only TPU devices its `Recorded` analyses (from the cache when this
    program was compiled before for the same chips and compiler)."""
    where = cache_dir()
    if where is None or not _compile_only(devices):
        return lowered.compile()
    path = where / f"{key(lowered, devices)}.json.gz"
    if path.exists() and (rec := _load(path)) is not None:
        log.info("compiled program from the AOT cache (%s; its compile took %s s)", path.name[:16], rec.compile_seconds)
        return rec
    t = time.perf_counter()
    rec = _record(lowered.compile(), time.perf_counter() - t)
    try:
        _store(path, rec)
    except OSError as e:  # a read-only or full cache directory costs the next run a compile, nothing more
        log.warning("could not keep the compile in the AOT cache %s (%s)", where, e)
    return rec
