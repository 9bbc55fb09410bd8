"""hf-to-orbax: Hugging Face safetensors -> this project's Orbax checkpoint (model/checkpoint.py).

Streaming: each HF tensor is read in blocks of rows straight from its file (one positioned read per
block), mapped to its place in our tree by the one table (model/hf_format.py, through
convert/layout.py: transpose, head reshape, 16->8 KV-head de-duplication), cast or quantized
(model/quant.py), and written into its region of the parameter's zarr array with TensorStore: a
layer-stacked array is filled layer by layer, block by block, and never exists whole anywhere.
Host memory is a few blocks (64 MiB each by default) whatever the size of the tensors or the
number of layers.

Resumable and atomic: the arrays are written in OUT.orbax-checkpoint-tmp; the job's own state is
in OUT.convert-job (job.json: the source's fingerprint and every option; one marker per HF tensor,
written once all its blocks are committed by TensorStore). A job killed at any moment and started
again with the same arguments rewrites only the tensors without a marker (rewriting a region gives
the same bytes), so it ends with the same checkpoint as an uninterrupted run. The Orbax metadata and
`commit_success.txt` are written, and the directory renamed to OUT, only at the end, so an
unfinished output never looks like a checkpoint; the job state is removed last. A job with other
arguments or another source refuses to mix with an unfinished one.

Multi-host: N processes (jax.distributed) split the tensors into N contiguous runs of about equal
bytes; each writes its share into the same directory; process 0 finalises after a barrier.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import json
import logging
import math
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh
from tqdm import tqdm

from convert.layout import Stream, streams
from convert.source import HFSource
from model.formats import checkpoint as ckpt
from model.formats import paths
from model.job import distributed
from model.network import quant as quant_lib
from model.network.config import LlamaConfig
from model.network.model import abstract_model, tree_get
from sharding.mesh import AXES, parse_spec
from sharding.rules import logical_to_spec

log = logging.getLogger(__name__)
WORKERS = 2  # threads reading and writing blocks (I/O-bound; more only adds memory)

BLOCK_BYTES = 64 << 20  # bytes of source rows read, transformed and written at a time
CHUNK_BYTES = 64 << 20  # largest chunk (file) of a converted array
JOB_SUFFIX = ".convert-job"  # OUT.convert-job/: job.json and one marker per written tensor
KILL_ENV = "LLAMA_CONVERT_TEST_KILL"  # tests only, see _kill_hook


@dataclasses.dataclass(frozen=True)
class Target:
    path: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: tuple[int, ...]

    @property
    def name(self) -> str:
        return ckpt.param_name(self.path)


@dataclasses.dataclass(frozen=True)
class Unit:
    """One HF tensor: where it goes and the blocks (ranges along stream.axis) it is written in."""

    name: str
    stream: Stream
    layer: int | None
    nbytes: int
    blocks: tuple[tuple[int, int], ...]


@dataclasses.dataclass
class Plan:
    cfg: LlamaConfig
    source_kv_heads: int
    targets: dict[tuple[str, ...], Target]
    scales: dict[tuple[str, ...], tuple[str, ...]]  # quantized kernel path -> its scale path
    units: list[Unit]

    def job(self, src: HFSource, block_bytes: int) -> dict:
        return {"version": 1, "config": ckpt.config_to_json(self.cfg), "source_kv_heads": self.source_kv_heads,
                "source": src.fingerprint(), "block_bytes": block_bytes,
                "arrays": {t.name: [list(t.shape), t.dtype.name, list(t.chunks)] for t in self.targets.values()}}


def default_kv_heads(cfg: LlamaConfig) -> int:
    """8 for the 405B files that were uploaded with each of the 8 KV heads repeated twice (16)."""
    if cfg.num_kv_heads == 16 and cfg.num_heads == 128:
        return 8
    return cfg.num_kv_heads


def make_plan(src: HFSource, *, dtype: str = "bfloat16", quant=None, kv_heads: int | None = None,
              mesh: str | dict | None = None, chunk_bytes: int = CHUNK_BYTES,
              block_bytes: int = BLOCK_BYTES) -> Plan:
    cfg_src = src.config
    k = kv_heads or default_kv_heads(cfg_src)
    if cfg_src.num_kv_heads % k or cfg_src.num_heads % k:
        raise ValueError(f"--kv-heads {k}: must divide the file's {cfg_src.num_kv_heads} KV heads "
                         f"and the {cfg_src.num_heads} query heads")
    cfg = cfg_src.replace(num_kv_heads=k, param_dtype=dtype, compute_dtype=dtype, quant=quant_lib.parse(quant))
    _, abstract = abstract_model(cfg)
    amesh = _abstract_mesh(mesh) if mesh else None
    targets, scales, units = {}, {}, []
    for s in streams(cfg, abstract, source_kv_heads=cfg_src.num_kv_heads):
        lead = 1 if s.stacked else 0
        var = tree_get(abstract, s.path)
        target = _target(s.path, var, lead + s.axis, s.stacked, amesh, chunk_bytes, block_bytes)
        targets[s.path] = target
        scale_path = (*s.path[:-1], "scale")
        if s.path[-1] == "kernel" and _has(abstract, scale_path):  # a quantized dense layer
            sv = tree_get(abstract, scale_path)
            row = len(sv.shape) - len(s.out_shape)  # the scale's first output axis
            chunks = list(sv.shape)
            if s.stacked:
                chunks[0] = 1
            chunks[row] = target.chunks[lead + s.axis]
            targets[scale_path] = Target(scale_path, tuple(sv.shape), np.dtype(sv.dtype), tuple(chunks))
            scales[s.path] = scale_path
        # blocks: whole chunks along the row axis, about block_bytes of source each
        c = target.chunks[lead + s.axis]
        per_index = s.rows_per_index * math.prod(s.entry.hf_shape[1:]) * src.dtype(s.entry.hf_names(cfg_src)[0]).itemsize
        step = c * max(1, block_bytes // max(1, c * per_index))
        blocks = tuple((a, min(a + step, s.length)) for a in range(0, s.length, step))
        for i, name in enumerate(s.entry.hf_names(cfg_src)):
            units.append(Unit(name, s, i if s.stacked else None, src.nbytes(name), blocks))
    units.sort(key=lambda u: src.location(u.name))  # file order: sequential reads
    return Plan(cfg, cfg_src.num_kv_heads, targets, scales, units)


def _target(path, var, row_axis, stacked, amesh, chunk_bytes, block_bytes) -> Target:
    dtype = np.dtype(var.dtype)
    itemsize = 0.5 if dtype.name == "int4" else dtype.itemsize
    shard = None
    if amesh is not None:
        names = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
        spec = logical_to_spec(names, amesh, var.shape, what=ckpt.param_name(path))
        shard = [d // math.prod(amesh.shape[a] for a in ((ax,) if isinstance(ax, str) else (ax or ())))
                 for d, ax in zip(var.shape, tuple(spec) + (None,) * (len(var.shape) - len(spec)))]
    chunks = ckpt.chunk_shape(var.shape, itemsize, stacked=stacked, row_axis=row_axis, shard_shape=shard,
                              max_bytes=chunk_bytes, max_row_stripe=block_bytes)
    return Target(tuple(path), tuple(var.shape), dtype, chunks)


def _abstract_mesh(spec):
    sizes = parse_spec(spec)
    if -1 in sizes.values():
        fixed = math.prod(v for v in sizes.values() if v != -1)
        sizes = {k: (jax.device_count() // fixed if v == -1 else v) for k, v in sizes.items()}
    return AbstractMesh(tuple(sizes.get(a, 1) for a in AXES), AXES)


def _has(tree, path) -> bool:
    try:
        tree_get(tree, path)
        return True
    except (KeyError, AttributeError):
        return False


# ---------------------------------------------------------------------------------------------

def job_path(out) -> "ckpt.epath.Path":
    """The job's own state (job.json, one marker per written tensor), beside the output."""
    return ckpt.as_path(str(out).rstrip("/") + JOB_SUFFIX)


def convert(hf_dir, out_dir, *, dtype: str = "bfloat16", quant=None, kv_heads: int | None = None,
            mesh=None, chunk_bytes: int = CHUNK_BYTES, block_bytes: int = BLOCK_BYTES,
            overwrite: bool = False, progress: bool = True):
    """Converts HF checkpoint `hf_dir` to an Orbax checkpoint at `out_dir`; returns its path.
    Every process of a multi-process job calls it with the same arguments."""
    pi, pn = jax.process_index(), jax.process_count()
    out = ckpt.as_path(out_dir)
    work = out if ckpt.is_remote(out) else ckpt.tmp_path(out)
    jobdir = job_path(out)
    t0 = time.time()
    src = HFSource(hf_dir, param_dtype=dtype, compute_dtype=dtype)
    plan = make_plan(src, dtype=dtype, quant=quant, kv_heads=kv_heads, mesh=mesh, chunk_bytes=chunk_bytes,
                     block_bytes=block_bytes)
    job = plan.job(src, block_bytes)
    if ckpt.is_finished(out) and not overwrite:
        if _same_job(jobdir, job):  # killed after its commit, before cleaning up: nothing left to do
            distributed.barrier("convert:finished")
            if pi == 0:
                jobdir.rmtree()
            log.info("%s is already complete", out)
            return out
        raise FileExistsError(f"{out}: already a finished checkpoint (pass --overwrite to replace it)")
    if not ckpt.is_remote(out) and out.exists() and not ckpt.is_finished(out) and not overwrite:
        raise FileExistsError(f"{out}: exists and is not a checkpoint; remove it or pass --overwrite")
    if plan.source_kv_heads != plan.cfg.num_kv_heads:
        log.info("de-duplicating %d KV heads to %d: each of the file's repeated heads is checked equal to its "
                 "copy while converting", plan.source_kv_heads, plan.cfg.num_kv_heads)
    marker_dir = jobdir / "done"
    if pi == 0:
        if overwrite:
            for d in {str(out), str(work), str(jobdir)}:
                if ckpt.as_path(d).exists():
                    ckpt.as_path(d).rmtree()
        _prepare(work, jobdir, job)
        for t in plan.targets.values():  # create every array (or reopen a resumed job's)
            ckpt.open_array(work, t.name, shape=t.shape, dtype=t.dtype, chunks=t.chunks)
    distributed.barrier("convert:prepared")
    if pi != 0 and not _same_job(jobdir, job):
        raise FileExistsError(f"{jobdir}: job description differs from this process's arguments")
    handles = {p: ckpt.open_array(work, t.name, write=True) for p, t in plan.targets.items()}
    done = _markers(marker_dir)
    mine = distributed.share(plan.units, [u.nbytes for u in plan.units], pn, pi)
    todo = [u for u in mine if u.name not in done]
    who = f"process {pi}/{pn}: " if pn > 1 else ""
    if len(todo) < len(mine):
        log.info("%sresuming: %d of %d tensors were already written", who, len(mine) - len(todo), len(mine))
    log.info("%sconverting %d tensors (%.2f GB) from %s into %s", who, len(todo), sum(u.nbytes for u in todo) / 1e9,
             hf_dir, work)
    try:
        _run(src, plan, handles, todo, marker_dir, progress=progress, workers=WORKERS,
             desc="hf-to-orbax" + (f" p{pi}" if pn > 1 else ""))
    finally:
        src.close()
    distributed.barrier("convert:written")
    if pi == 0:
        _finalize(work, out, plan, marker_dir)
        _kill_hook("committed")
        jobdir.rmtree()
    distributed.barrier("convert:committed")
    total = sum(u.nbytes for u in plan.units)
    dt = time.time() - t0
    log.info("%swrote %s: %d tensors, %.2f GB in %.1f s (%.0f MB/s); peak host memory %s", who, out, len(plan.units),
             total / 1e9, dt, total / 1e6 / max(dt, 1e-9), peak_memory())
    return out


def peak_memory() -> str:
    """This process's peak resident memory (Linux VmHWM: since exec, unlike ru_maxrss after a fork)."""
    try:
        with open("/proc/self/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        return f"{kb * 1024 / 1e9:.2f} GB"
    except (OSError, StopIteration, ValueError):
        return "unknown"


def _same_job(jobdir, job: dict) -> bool:
    try:
        return json.loads((jobdir / "job.json").read_text()) == job
    except FileNotFoundError:
        return False


def _prepare(work, jobdir, job: dict) -> None:
    jf = jobdir / "job.json"
    if jf.exists():
        old = json.loads(jf.read_text())
        if old != job:
            diff = sorted(k for k in set(old) | set(job) if old.get(k) != job.get(k))
            raise FileExistsError(f"{work}: holds an unfinished conversion with different {', '.join(diff)}; "
                                  f"resume it with its own arguments, or pass --overwrite to start over")
        return
    if work.exists() and any(work.iterdir()):
        raise FileExistsError(f"{work}: a temporary checkpoint directory without its job description "
                              f"({jf}); remove it or pass --overwrite")
    (jobdir / "done").mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    paths.write_bytes_atomic(jf, json.dumps(job, indent=1, sort_keys=True).encode())


def _markers(marker_dir) -> set[str]:
    """Names of the tensors whose blocks are all committed (object storage has no empty directories)."""
    try:
        return {p.name for p in marker_dir.iterdir()}
    except FileNotFoundError:
        return set()


def _kill_hook(point) -> None:
    """Tests only: SIGKILL this process at a chosen point (`LLAMA_CONVERT_TEST_KILL=blocks:N`, after N
    blocks are written; `=finalize`, after the metadata, before the commit; `=committed`, after the
    commit, before the job state is removed)."""
    how = os.environ.get(KILL_ENV, "")
    if how and (how == point or (isinstance(point, int) and how.startswith("blocks:") and point >= int(how[7:]))):
        os.kill(os.getpid(), signal.SIGKILL)


def _prepare_block(src: HFSource, plan: Plan, u: Unit, a: int, b: int) -> list[tuple]:
    """Reads, transforms and casts (or quantizes) one block -> [(target path, index, array)]."""
    s = u.stream
    rows = src.read_rows(u.name, *s.hf_rows(a, b))
    region = s.to_ours(rows, a, b, u.name)
    del rows
    lead = (u.layer,) if s.stacked else ()
    index = (*lead, *(slice(None),) * s.axis, slice(a, b))
    if s.path in plan.scales:
        q, sc = _quantizer(plan.cfg.quant, s.in_shape, region.shape[s.axis:])(region)
        scale_t = plan.targets[plan.scales[s.path]]
        row = len(scale_t.shape) - len(s.out_shape) - len(lead)
        return [(s.path, index, np.asarray(q)),
                (scale_t.path, (*lead, *(slice(None),) * row, slice(a, b)), np.asarray(sc))]
    t = plan.targets[s.path]
    return [(s.path, index, region if region.dtype == t.dtype else region.astype(t.dtype))]


@functools.lru_cache(maxsize=64)
def _quantizer(qc, in_shape, out_shape):
    """model.quant.quantize of one block shape, compiled once (blocks of a tensor mostly share a shape)."""

    return jax.jit(lambda w: quant_lib.quantize(jnp.asarray(w, jnp.float32), qc, in_shape, out_shape))


def _run(src, plan, handles, todo: list[Unit], marker_dir, *, progress: bool, desc: str, workers: int) -> None:
    tasks = iter([(u, a, b) for u in todo for a, b in u.blocks])
    left = {u.name: len(u.blocks) for u in todo}
    written = {"blocks": 0, "tensors": 0}
    bar = tqdm(total=sum(u.nbytes for u in todo), unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
               disable=not progress, dynamic_ncols=True, mininterval=0.5)
    bar.set_postfix_str(f"tensors 0/{len(todo)}")
    prepared: collections.deque = collections.deque()
    committing: collections.deque = collections.deque()

    def submit(pool) -> bool:
        t = next(tasks, None)
        if t is not None:
            prepared.append((t, pool.submit(_prepare_block, src, plan, *t)))
        return t is not None

    def finish():
        (u, a, b), futures = committing.popleft()
        for f in futures:
            f.result()  # the block is on disk (TensorStore commit)
        written["blocks"] += 1
        left[u.name] -= 1
        bar.update(u.nbytes * (b - a) // u.stream.length)
        if left[u.name] == 0:
            (marker_dir / u.name).write_text("")
            written["tensors"] += 1
            bar.set_postfix_str(f"tensors {written['tensors']}/{len(todo)}")
        _kill_hook(written["blocks"])

    # At most `workers + 1` blocks alive at once (being read and transformed, or being written):
    # host memory is a fixed number of blocks, whatever the tensors and however long the job.
    live = workers + 1
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        while len(prepared) + len(committing) < live and submit(pool):
            pass
        while prepared or committing:
            if prepared:
                (u, a, b), fut = prepared.popleft()
                try:
                    parts = fut.result()
                except Exception:
                    for _, f in prepared:
                        f.cancel()
                    raise
                committing.append(((u, a, b), [handles[path][index].write(arr).commit for path, index, arr in parts]))
                del parts
            if len(committing) > 1 or not prepared:  # one write overlaps the next blocks' reading
                finish()
            while len(prepared) + len(committing) < live and submit(pool):
                pass
    bar.close()


def _finalize(work, out, plan: Plan, marker_dir) -> None:
    done = _markers(marker_dir)
    missing = [u.name for u in plan.units if u.name not in done]
    if missing:
        raise RuntimeError(f"{work}: {len(missing)} tensors were not written (first: {missing[0]!r}); "
                           f"a process of the job failed? Run the job again to finish it")
    if not ckpt.is_remote(work):  # TensorStore's temporary files of writes interrupted by a kill
        for t in plan.targets.values():
            for root, _, files in os.walk(str(work / t.name)):
                for f in files:
                    if f.endswith(".__lock"):
                        os.unlink(os.path.join(root, f))
    ckpt.write_metadata(work, {t.path: (t.shape, t.chunks) for t in plan.targets.values()}, plan.cfg,
                        extra={"source_kv_heads": plan.source_kv_heads})
    _kill_hook("finalize")
    ckpt.commit(work, out)
