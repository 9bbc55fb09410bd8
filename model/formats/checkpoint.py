"""Orbax on-disk format of this model's parameter tree: save, restore into any mesh, and the pieces
the streaming converter (convert/) writes with.

Format (an Orbax PyTree checkpoint, non-OCDBT, zarr v3; Orbax restores it with its ordinary API):

    DIR/
      _METADATA              Orbax tree metadata: one entry per parameter; its `custom_metadata`
                             holds {"format": "llama31", "version": 1, "config": <LlamaConfig as
                             JSON, with quant and lora>} so `model.load(DIR)` needs no other input
      layers.attn.q.kernel/  one zarr v3 array per parameter, named by its tree path joined with
        zarr.json            "." (Orbax's naming); shape [L, D, N, H] for stacked parameters (the
        c/0/0/0/0 …          leading axis is `layers`), logical axes as in model/ (not stored:
                             they are derived from the config when restoring)
      array_metadatas/process_0, _CHECKPOINT_METADATA   Orbax's bookkeeping
      commit_success.txt     written last: a directory without it is not a finished checkpoint

Arrays written by the converter use a regular chunk grid (one layer per chunk along `layers`,
then split so that a chunk stays under a size limit, or the per-device shard shape of a mesh named
at conversion time) and no compression (`bytes` codec), except int4 which uses zstd (zarr stores
one int4 per byte; zstd packs it to ~half a byte). Arrays saved from memory by `save` use Orbax's
own codecs. Either way restore is by Orbax with a sharded `ShapeDtypeStruct` per parameter, so a
checkpoint restores straight into any mesh's shardings (each process reads only its shards), and
a float parameter may be cast on restore (`model.load(DIR, dtype="float32")`).

Unfinished checkpoints: writers work in `DIR.orbax-checkpoint-tmp` (Orbax's marker for a
temporary checkpoint) and rename it to DIR when done; on object stores (gs://) where renames are
not atomic they write DIR in place and `commit_success.txt` last. `is_finished` checks both.

Paths: local, or gs:// (arrays through TensorStore's own GCS driver; the small metadata and marker
files through model/formats/paths.py, etils.epath over gcsfs: the `gcs` extra). tests/test_gcs.py runs
convert, train and serve against a GCS emulator.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath
from flax import nnx

from model.formats import paths
from model.formats.safetensors_io import inside_dir
from model.network.config import LlamaConfig, RopeScaling
from model.network.lora import LoraConfig
from model.network.model import tree_get
from model.network.quant import QuantConfig

FORMAT, VERSION = "llama31", 1
METADATA_FILE = "_METADATA"
COMMIT_FILE = "commit_success.txt"
TMP_SUFFIX = ".orbax-checkpoint-tmp"


class CheckpointFormatError(ValueError):
    """An Orbax checkpoint directory is not what it must be; the message names the directory and parameter."""


# ---------------------------------------------------------------------------------------------
# Paths and names

as_path, is_remote = paths.as_path, paths.is_remote


def param_name(path) -> str:
    """Orbax's name of a parameter: its tree path joined with '.' (the array's directory name)."""
    return ".".join(str(getattr(k, "key", k)) for k in path)


def tmp_path(path) -> epath.Path:
    return as_path(str(path).rstrip("/") + TMP_SUFFIX)


def is_checkpoint(path) -> bool:
    """True for an Orbax checkpoint directory (finished or not); an HF directory is not one."""
    try:
        return (as_path(path) / METADATA_FILE).exists() or (as_path(path) / COMMIT_FILE).exists()
    except (OSError, ValueError):
        return False


def is_finished(path) -> bool:
    p = as_path(path)
    return TMP_SUFFIX not in p.name and (p / COMMIT_FILE).exists() and (p / METADATA_FILE).exists()


def _kvstore(path) -> dict | str:
    s = str(path)
    return s if is_remote(s) else {"driver": "file", "path": s}


# ---------------------------------------------------------------------------------------------
# The config stored alongside the arrays

def config_to_json(cfg: LlamaConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d["eos_token_ids"] = list(cfg.eos_token_ids)
    for k in ("quant", "lora"):
        v = getattr(cfg, k)
        d[k] = None if v is None else {f.name: (list(x) if isinstance(x := getattr(v, f.name), tuple) else x)
                                       for f in dataclasses.fields(v)}
    return d


def config_from_json(d: dict, where: str = "checkpoint") -> LlamaConfig:
    d = dict(d)
    known = {f.name for f in dataclasses.fields(LlamaConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise CheckpointFormatError(f"{where}: unknown config field {unknown[0]!r} (written by a newer version?)")
    if d.get("rope_scaling") is not None:
        d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    d["eos_token_ids"] = tuple(d.get("eos_token_ids", (128001,)))
    if d.get("quant") is not None:
        d["quant"] = QuantConfig(**d["quant"])
    if d.get("lora") is not None:
        d["lora"] = LoraConfig(**d["lora"])
    return LlamaConfig(**d)


def read_metadata(path) -> dict:
    p = as_path(path)
    f = p / METADATA_FILE
    try:
        return json.loads(f.read_text())
    except FileNotFoundError:
        raise CheckpointFormatError(f"{p}: no {METADATA_FILE}: not an Orbax checkpoint") from None
    except json.JSONDecodeError as e:
        raise CheckpointFormatError(f"{f}: invalid JSON ({e})") from None


def read_config(path) -> LlamaConfig:
    """The LlamaConfig stored in a checkpoint (quant and LoRA configs included)."""
    custom = read_metadata(path).get("custom_metadata") or {}
    if custom.get("format") != FORMAT or "config" not in custom:
        raise CheckpointFormatError(f"{path}: an Orbax checkpoint without this project's model config "
                                    f"(custom_metadata.format != {FORMAT!r}); it was not written by "
                                    f"`python -m convert` or model.checkpoint.save")
    if custom.get("version", 0) > VERSION:
        raise CheckpointFormatError(f"{path}: format version {custom['version']} is newer than {VERSION}")
    return config_from_json(custom["config"], where=str(path))


def param_names(path) -> dict[str, tuple[str, ...]]:
    """Orbax name -> tree path of every array in the checkpoint. The names become directory names inside
    `path`, so each must stay inside it: keys that are empty, `.`/`..`, or hold a path separator are refused
    naming the metadata file and the entry."""
    where = as_path(path) / METADATA_FILE
    tree = read_metadata(path).get("tree_metadata", {})
    if not isinstance(tree, dict):
        raise CheckpointFormatError(f"{where}: tree_metadata is not a JSON object")
    out = {}
    for entry, v in tree.items():
        try:
            keys = tuple(k["key"] for k in v["key_metadata"])
        except (KeyError, TypeError):
            raise CheckpointFormatError(f"{where}: tree_metadata entry {entry!r} has no key_metadata keys") from None
        name = ".".join(k if isinstance(k, str) else "" for k in keys)
        if not keys or not all(isinstance(k, str) and k and "/" not in k for k in keys) or not inside_dir(name):
            raise CheckpointFormatError(f"{where}: tree_metadata entry {entry!r}: parameter name {name!r} "
                                        f"(keys {list(keys)!r}) is not a name inside the checkpoint directory")
        out[name] = keys
    return out


# ---------------------------------------------------------------------------------------------
# Writing arrays slice by slice (the converter)

def array_spec(directory, name: str, shape, dtype, chunks, *, create: bool) -> dict:
    """TensorStore spec of one parameter's zarr v3 array inside checkpoint `directory`."""
    dtype = np.dtype(dtype)
    codecs = [{"name": "bytes", "configuration": {"endian": "little"}}]
    if dtype.name == "int4":  # zarr stores int4 one per byte: zstd packs it (~0.5 byte per value)
        codecs.append({"name": "zstd", "configuration": {"level": 1, "checksum": False}})
    spec = {"driver": "zarr3", "kvstore": _kvstore(as_path(directory) / name),
            "store_data_equal_to_fill_value": True}
    if create:
        spec["metadata"] = {
            "shape": [int(s) for s in shape], "data_type": dtype.name,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [int(c) for c in chunks]}},
            "chunk_key_encoding": {"name": "default"}, "codecs": codecs, "fill_value": 0,
        }
    return spec


def open_array(directory, name: str, *, write: bool = False, shape=None, dtype=None, chunks=None):
    """Opens (or with shape/dtype/chunks, creates or reopens if identical) a parameter's array."""
    create = shape is not None
    spec = array_spec(directory, name, shape, dtype, chunks, create=create)
    try:
        if create:
            return ts.open(spec, create=True, open=True, read=True, write=True).result()
        return ts.open(spec, read=True, write=write).result()
    except ValueError as e:
        raise CheckpointFormatError(f"{directory}: parameter {name!r}: cannot open its array ({e})") from None


def write_metadata(directory, params: dict[tuple[str, ...], tuple[tuple[int, ...], tuple[int, ...]]],
                   cfg: LlamaConfig, extra: dict | None = None) -> None:
    """Writes Orbax's `_METADATA` (with the config in custom_metadata), `array_metadatas` and
    `_CHECKPOINT_METADATA` for arrays {tree path: (shape, chunks)} already written in `directory`.
    Deterministic apart from the timestamps in `_CHECKPOINT_METADATA`."""
    d = as_path(directory)
    tree = {}
    for path, (shape, chunks) in sorted(params.items()):
        tree[str(tuple(path))] = {
            "key_metadata": [{"key": k, "key_type": 2} for k in path],  # 2: a dict key
            "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False, "write_shape": list(chunks)},
        }
    custom = {"format": FORMAT, "version": VERSION, "config": config_to_json(cfg), **(extra or {})}
    meta = {"tree_metadata": tree, "use_ocdbt": False, "use_zarr3": True,
            "store_array_data_equal_to_fill_value": True, "custom_metadata": custom}
    (d / METADATA_FILE).write_text(json.dumps(meta, sort_keys=True))
    (d / "array_metadatas").mkdir(parents=True, exist_ok=True)
    (d / "array_metadatas" / "process_0").write_text(json.dumps({"array_metadatas": [
        {"array_metadata": {"param_name": ".".join(p), "write_shape": list(c), "chunk_shape": list(c),
                            "ext_metadata": None}} for p, (_, c) in sorted(params.items())]}))
    now = time.time_ns()
    (d / "_CHECKPOINT_METADATA").write_text(json.dumps({
        "item_handlers": "orbax.checkpoint._src.handlers.pytree_checkpoint_handler.PyTreeCheckpointHandler",
        "metrics": {}, "performance_metrics": {}, "init_timestamp_nsecs": now, "commit_timestamp_nsecs": now,
        "custom_metadata": {}}))


def commit(work_dir, final_dir) -> epath.Path:
    """Marks `work_dir` finished and gives it its final name (atomic rename where the filesystem has one)."""
    work, final = as_path(work_dir), as_path(final_dir)
    (work / COMMIT_FILE).write_text(f"Checkpoint commit was successful to {final}")
    if str(work) != str(final):
        work.rename(final)
    return final


# ---------------------------------------------------------------------------------------------
# Save from memory and restore into shardings

def _pure(state: nnx.State) -> dict:
    return nnx.to_pure_dict(state) if hasattr(nnx, "to_pure_dict") else state.to_pure_dict()


def save(state: nnx.State, cfg: LlamaConfig, path, *, overwrite: bool = False) -> epath.Path:
    """Saves a (sharded, possibly multi-host) state with its config; any subset of the model's
    parameters may be saved (e.g. only the LoRA adapters). Every process must call it."""
    path = as_path(path)
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"{path} already exists (pass overwrite=True to replace it)")
        if jax.process_index() == 0:
            path.rmtree()
    custom = {"format": FORMAT, "version": VERSION, "config": config_to_json(cfg)}
    ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_zarr3=True))
    ckptr.save(path, args=ocp.args.PyTreeSave(_pure(state), custom_metadata=custom))
    ckptr.close()
    return path


def restore(path, abstract: nnx.State, shardings: nnx.State, optional=lambda path, var: False):
    """Restores the parameters of `abstract` (shapes, dtypes) from checkpoint `path` straight into
    `shardings`; float parameters are cast to the abstract dtype. Extra arrays in the checkpoint
    are ignored; a missing one, or one of another shape, is an error naming it, unless
    `optional(path, variable)`: those are left abstract. Returns (state, paths left abstract)."""
    path = as_path(path)
    if not is_finished(path):
        raise CheckpointFormatError(f"{path}: not a finished checkpoint (no {COMMIT_FILE}, or a temporary "
                                    f"directory): an interrupted conversion? Run it again to complete it")
    stored = param_names(path)
    flat_abs = dict(nnx.to_flat_state(abstract))
    flat_sh = dict(nnx.to_flat_state(shardings))
    target, args, skipped = {}, {}, []
    for p, v in flat_abs.items():
        name = param_name(p)
        if name not in stored and optional(p, v):
            skipped.append(p)
            continue
        if name not in stored:
            raise CheckpointFormatError(f"{path}: missing parameter {name!r} (the config expects it)")
        arr = open_array(path, name)
        want_dtype = np.dtype(v.dtype)
        if tuple(arr.shape) != tuple(v.shape):
            raise CheckpointFormatError(f"{path}: parameter {name!r} has shape {list(arr.shape)}, the config "
                                        f"implies {list(v.shape)}")
        have = np.dtype(arr.dtype.numpy_dtype)
        if have != want_dtype and not (np.issubdtype(have, np.floating) or have.name == "bfloat16"):
            raise CheckpointFormatError(f"{path}: parameter {name!r} is {have.name}, expected {want_dtype.name}")
        sh = flat_sh[p]
        sh = sh.get_value() if isinstance(sh, nnx.Variable) else sh
        _set(target, p, jax.ShapeDtypeStruct(v.shape, want_dtype, sharding=sh))
        _set(args, p, ocp.ArrayRestoreArgs(sharding=sh, dtype=want_dtype, global_shape=tuple(v.shape)))
    ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_zarr3=True))
    restored = ckptr.restore(path, args=ocp.args.PyTreeRestore(item=target, restore_args=args,
                                                               partial_restore=True))
    state = jax.tree.map(lambda x: x, abstract)  # a copy of the tree, filled below
    for p, v in nnx.to_flat_state(state):
        if p not in skipped:
            v.set_value(tree_get(restored, p))
    return state, skipped


def read_params(path, select=lambda path: True) -> dict[tuple[str, ...], np.ndarray]:
    """Host numpy copies of the arrays whose tree path satisfies `select` (small trees: adapters)."""
    return {p: open_array(path, name).read().result() for name, p in param_names(path).items() if select(p)}


def _set(tree: dict, path, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def chunk_shape(shape, itemsize: float, *, stacked: bool, row_axis: int, shard_shape=None,
                max_bytes: int = 64 << 20, max_row_stripe: int = 64 << 20) -> tuple[int, ...]:
    """Chunks of a converted array: the shard shape of the target mesh (or the whole array), one layer
    deep when stacked, halved along its largest dimension until under `max_bytes`, and thin enough
    along `row_axis` (the axis the converter writes in blocks) that one row of chunks spanning every
    other dimension stays under `max_row_stripe` bytes."""
    c = list(shard_shape or shape)
    lead = 1 if stacked else 0
    if stacked:
        c[0] = 1

    def half(n):
        return n // 2 if n % 2 == 0 else -(-n // 2)

    while math.prod(c) * itemsize > max_bytes:
        dims = [i for i in range(lead, len(c)) if c[i] > 1]
        if not dims:
            break
        big = max(c[i] for i in dims)
        i = row_axis if c[row_axis] == big else next(i for i in dims if c[i] == big)
        c[i] = half(c[i])
    others = math.prod(s for i, s in enumerate(shape) if i != row_axis and i >= lead)
    while c[row_axis] > 1 and c[row_axis] * others * itemsize > max_row_stripe:
        c[row_axis] = half(c[row_axis])
    return tuple(int(x) for x in c)
