"""Export: Orbax -> Hugging Face safetensors (orbax-to-hf), LoRA adapters -> PEFT (lora-to-peft), and
base + adapters -> a merged HF checkpoint (merge-lora).

orbax-to-hf runs the one table (model/hf_format.py) backwards, block by block: a block of one layer
of a parameter is read from its zarr array, turned into HF rows and appended to the output file, so
host memory is a few blocks whatever the model size (the same bound as hf-to-orbax). Output:
`model-0000k-of-0000n.safetensors` files of at most --max-shard-size (or one `model.safetensors`),
`model.safetensors.index.json`, `config.json`. Files are written to `.partial` names and renamed
when complete; the directory is written as OUT.export-tmp and renamed at the end; a killed export
started again skips the files already complete. A quantized checkpoint is exported dequantized
(the int weights times their scales, in --dtype): that is lossy against the original weights.

PEFT adapters (lora-to-peft): `adapter_config.json` + `adapter_model.safetensors` with tensors named
see convert/peft.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from convert.layout import Stream, streams
from convert.readers import HFReader, OrbaxReader
from convert.source import HFSource
from model.formats import checkpoint as ckpt
from model.formats import paths
from model.formats.peft import lora_pairs, read_adapters
from model.formats.safetensors_io import SafetensorsWriter
from model.job import distributed
from model.network.config import LlamaConfig
from model.network.model import abstract_model

log = logging.getLogger(__name__)

BLOCK_BYTES = 64 << 20


class BlockWriter(SafetensorsWriter):
    """A SafetensorsWriter whose tensors may arrive as consecutive blocks of rows (so no tensor has
    to exist whole in memory). Uses the parent's header layout and its order and size checks."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self._left = None

    def write_block(self, name: str, rows: np.ndarray) -> None:
        dtype, shape = self._specs[name]
        if self._left is None:
            if self._order[self._next] != name:
                raise ValueError(f"{self.path}: expected tensor {self._order[self._next]!r} next, got {name!r}")
            self._left = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        rows = np.ascontiguousarray(rows)
        if rows.dtype != dtype or rows.shape[1:] != shape[1:]:
            raise ValueError(f"{self.path}: block of {name!r} is {rows.dtype}{list(rows.shape)}, tensor is "
                             f"{dtype}{list(shape)}")
        data = rows.reshape(-1).view(np.uint8)
        if data.size > self._left:
            raise ValueError(f"{self.path}: too many rows for tensor {name!r}")
        self._f.write(data)
        self._left -= data.size
        if self._left == 0:
            self._left = None
            self._next += 1


def hf_order(cfg: LlamaConfig, ss: list[Stream]) -> list[tuple[str, Stream, int | None]]:
    """HF tensors in the usual file order: what precedes the layers in the table, layer by layer,
    then the rest."""
    first = [s for s in ss[:next((i for i, s in enumerate(ss) if s.stacked), len(ss))] if not s.stacked]
    layers = [s for s in ss if s.stacked]
    rest = [s for s in ss if not s.stacked and s not in first]
    out = [(s.entry.hf, s, None) for s in first]
    out += [(s.entry.hf.format(i=i), s, i) for i in range(cfg.num_layers) for s in layers]
    out += [(s.entry.hf, s, None) for s in rest]
    return out


def float_streams(cfg: LlamaConfig) -> list[Stream]:
    _, abstract = abstract_model(cfg.replace(quant=None, lora=None))
    return streams(cfg, abstract)


def parse_size(s: str | int) -> int:
    if isinstance(s, int):
        return s
    t = s.strip().upper().replace("IB", "B")
    for unit, mult in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if t.endswith(unit):
            return int(float(t[:-len(unit)]) * mult)
    return int(t)


def write_hf(reader, cfg: LlamaConfig, out, *, dtype: str = "bfloat16", max_shard_size="5GB",
             delta=None, block_bytes: int = BLOCK_BYTES, overwrite: bool = False, progress: bool = True,
             job_id: dict | None = None) -> Path:
    """Writes the HF checkpoint of everything `reader` holds (plus `delta(stream, layer, a, b)` added
    to each region, for merging adapters) to directory `out`."""
    out = paths.as_path(out)
    remote = paths.is_remote(out)  # no atomic rename: written in place, config.json last
    work = out if remote else out.with_name(out.name + ".export-tmp")
    jobfile = out.with_name(out.name + ".export-job.json")
    pi, pn = jax.process_index(), jax.process_count()
    odt = np.dtype(dtype) if dtype != "bfloat16" else np.dtype(__import__("ml_dtypes").bfloat16)
    tensors = hf_order(cfg, float_streams(cfg))
    shard_max = parse_size(max_shard_size)
    files, cur, size = [], [], 0
    for t in tensors:
        n = math.prod(t[1].entry.hf_shape) * odt.itemsize
        if cur and size + n > shard_max:
            files.append(cur)
            cur, size = [], 0
        cur.append(t)
        size += n
    files.append(cur)
    names = ["model.safetensors"] if len(files) == 1 else \
        [f"model-{k + 1:05d}-of-{len(files):05d}.safetensors" for k in range(len(files))]
    job = {"version": 1, "dtype": dtype, "files": {n: [t[0] for t in f] for n, f in zip(names, files)},
           "source": job_id or {}, "delta": delta is not None}
    finished = (out / "config.json").exists() if remote else out.exists()
    if finished and not overwrite:
        raise FileExistsError(f"{out}: exists (pass --overwrite to replace it)")
    if pi == 0:
        _prepare(out if finished else None, work, jobfile, job, overwrite)
    distributed.barrier("export:prepared")
    mine = distributed.share(list(zip(names, files)), [sum(math.prod(t[1].entry.hf_shape) for t in f) for f in files],
                             pn, pi)
    todo = [(n, f) for n, f in mine if not (work / n).exists()]
    total = sum(math.prod(t[1].entry.hf_shape) * odt.itemsize for _, f in todo for t in f)
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="orbax-to-hf", disable=not progress,
               dynamic_ncols=True, mininterval=0.5)
    for fname, ftensors in todo:
        specs = [(name, odt, s.entry.hf_shape) for name, s, _ in ftensors]
        w = BlockWriter(work / fname, specs, metadata={"format": "pt"})
        for name, s, layer in ftensors:
            row_bytes = math.prod(s.entry.hf_shape) // s.length * odt.itemsize
            c = reader.chunk(s)
            step = max(1, block_bytes // max(1, row_bytes * c)) * c
            for a in range(0, s.length, step):
                b = min(a + step, s.length)
                region = reader.read(s, layer, a, b)
                if delta is not None:
                    d = delta(s, layer, a, b)
                    if d is not None:
                        region = region.astype(np.float32) + d
                w.write_block(name, s.to_hf(region).astype(odt, copy=False))
                bar.update(row_bytes * (b - a))
        w.close()
    bar.close()
    distributed.barrier("export:written")
    if pi == 0:
        weight_map = {t[0]: n for n, f in zip(names, files) for t in f}
        if len(names) > 1:
            index = {"metadata": {"total_size": sum(math.prod(t[1].entry.hf_shape) * odt.itemsize for t in tensors)},
                     "weight_map": dict(sorted(weight_map.items()))}
            (work / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        hf_cfg = cfg.to_hf()
        hf_cfg["torch_dtype"] = hf_cfg["dtype"] = dtype
        (work / "config.json").write_text(json.dumps(hf_cfg, indent=2))
        if not remote:
            work.rename(out)
        jobfile.unlink()
    distributed.barrier("export:committed")
    return out


def _prepare(finished, work, jobfile, job: dict, overwrite: bool) -> None:
    """Clears a finished output being overwritten; resumes the unfinished export of the same job, or starts one."""
    if finished is not None:
        finished.rmtree()
    if jobfile.exists() and json.loads(jobfile.read_text()) != job:
        if not overwrite:
            raise FileExistsError(f"{work}: holds an unfinished export with other arguments; resume it with "
                                  f"its own arguments, or pass --overwrite to start over")
        jobfile.unlink()
    if not jobfile.exists():
        if work.exists():
            work.rmtree()
        work.mkdir(parents=True)
        paths.write_bytes_atomic(jobfile, json.dumps(job, sort_keys=True).encode())


def orbax_to_hf(orbax_dir, out, *, dtype: str | None = None, **kw) -> Path:
    reader = OrbaxReader(orbax_dir)
    cfg = reader.cfg
    dtype = dtype or ("bfloat16" if cfg.quant is not None else cfg.param_dtype)
    if cfg.quant is not None:
        log.warning("%s is quantized (%s): exporting the dequantized weights in %s", orbax_dir, cfg.quant.name, dtype)
    t0 = time.time()
    meta = (ckpt.as_path(orbax_dir) / ckpt.METADATA_FILE).read_text()
    out = write_hf(reader, cfg.replace(quant=None), out, dtype=dtype,
                   job_id={"orbax_metadata_sha256": hashlib.sha256(meta.encode()).hexdigest()}, **kw)
    log.info("wrote %s in %.1f s", out, time.time() - t0)
    return out


def merge_lora(base, ckpt_dir, out, *, dtype: str = "bfloat16", config: LlamaConfig | None = None, **kw) -> Path:
    """HF checkpoint of base (Orbax or HF directory) + scale · A B for every adapted layer."""

    lcfg, flat = read_adapters(ckpt_dir, config)
    if lcfg.lora is None:
        raise ValueError(f"{ckpt_dir}: the checkpoint's config has no LoRA settings")
    if ckpt.is_checkpoint(base):
        reader = OrbaxReader(base)
    else:
        reader = HFReader(HFSource(base, param_dtype="float32", compute_dtype="float32"))
    cfg = reader.cfg
    pairs = {e.path: (a, b) for e, a, b in lora_pairs(flat, cfg)}
    scale = lcfg.lora.scale

    def delta(s: Stream, layer, a0, b0):
        if s.path not in pairs:
            return None
        A, B = pairs[s.path]
        A, B = (A, B) if layer is None else (A[layer], B[layer])
        n_in = math.prod(s.in_shape)
        if A.shape[:-1] != s.in_shape or B.shape[1:] != s.out_shape:
            raise ValueError(f"adapter of {'/'.join(s.path)} has shapes {A.shape}, {B.shape}; the base layer is "
                             f"{s.in_shape} -> {s.out_shape}")
        Bb = B[:, a0:b0].reshape(A.shape[-1], -1).astype(np.float32)
        d = (A.reshape(n_in, -1).astype(np.float32) @ Bb) * np.float32(scale)
        return d.reshape(s.region_shape(a0, b0))

    return write_hf(reader, cfg.replace(quant=None, lora=None), out, dtype=dtype, delta=delta,
                    job_id={"base": str(base), "adapters": str(ckpt_dir)}, **kw)
