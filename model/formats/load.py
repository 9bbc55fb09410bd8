"""`load`: a Hugging Face or Orbax checkpoint straight into a mesh's shardings, as a `Model`."""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from model.formats import checkpoint, hf_format, hub, paths
from model.formats.safetensors_io import CheckpointError, HFCheckpoint
from model.network import quant as quantization
from model.network.config import LlamaConfig
from model.network.model import (
    Model,
    abstract_model,
    init_adapters,
    state_shardings,
    tree_get,
)
from sharding.mesh import auto_axes, single_device_mesh

log = logging.getLogger(__name__)


def _device_put(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
    # Each process supplies only the shards it addresses: works for one host or many.
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


@jax.jit(donate_argnums=0)
def _set_layer(stacked, layer, i):
    return jax.lax.dynamic_update_index_in_dim(stacked, layer, i, 0)


def load(path: str | Path, *, dtype: str = "bfloat16", quant=None, mesh: Mesh | None = None,
         **config_overrides) -> Model:
    """Loads a Hugging Face checkpoint directory or an Orbax checkpoint (local, gs://, or a Hub id
    `org/name[@revision]`) into `mesh` (one device when None).

    Tensors are read one at a time; a layer-stacked parameter is filled layer by layer in place, so
    host memory holds at most one HF tensor and no device ever holds an unsharded array.
    `quant` ("int8", "int4", "int4-g64" or a model.quant.QuantConfig) quantizes the targeted dense
    kernels tensor by tensor as they arrive (on device, in their shardings).
    """
    path = hub.resolve(path)  # a Hub id `org/name[@revision]` -> its snapshot in the Hugging Face cache
    if checkpoint.is_checkpoint(path):  # an Orbax checkpoint (python -m convert, model.checkpoint.save)
        return _load_orbax(path, dtype=dtype, quant=quant, mesh=mesh, **config_overrides)
    path = paths.as_path(path)  # local or gs:// (tensors by ranged reads)
    qc = quantization.parse(quant)
    if qc is not None:
        config_overrides["quant"] = qc
    cfg = LlamaConfig.from_hf(paths.local_copy(path, ["config.json"]), param_dtype=dtype, compute_dtype=dtype,
                              **config_overrides)
    ckpt = HFCheckpoint(path)
    check_hf_tensors(ckpt, cfg)
    mesh = auto_axes(mesh or single_device_mesh())  # jax.make_mesh's Explicit axes become Auto
    graphdef, abstract = abstract_model(cfg)
    shardings = state_shardings(abstract, mesh)
    target = jnp.dtype(dtype)
    state = abstract  # filled in place below
    for entry in hf_format.entries(cfg):
        var = tree_get(state, entry.path)
        sharding = tree_get(shardings, entry.path)
        if entry.path[-1] == "kernel" and "scale" in tree_get(state, entry.path[:-1]):
            _load_quantized(entry, ckpt, cfg, state, shardings, mesh)
            continue
        if not entry.stacked:
            var.set_value(_device_put(entry.to_ours(ckpt.read(entry.hf)).astype(target), sharding))
            continue
        layer_sharding = NamedSharding(mesh, jax.sharding.PartitionSpec(*sharding.spec[1:]))
        stacked = jax.jit(lambda: jnp.zeros(var.shape, target), out_shardings=sharding)()
        for i, name in enumerate(entry.hf_names(cfg)):
            layer = _device_put(entry.to_ours(ckpt.read(name)).astype(target), layer_sharding)
            stacked = _set_layer(stacked, layer, i)
        var.set_value(stacked)
    if cfg.lora is not None:
        init_adapters(cfg, state, mesh)
    log.info("loaded %s (%d parameters) onto a %s mesh", path, cfg.num_params(), dict(mesh.shape))
    return Model(graphdef, state, cfg, mesh)


def _load_orbax(path, *, dtype: str = "bfloat16", quant=None, mesh=None, **config_overrides):
    """`model.load(path)` for an Orbax checkpoint: config from the checkpoint, arrays straight into
    `mesh` (one device when None). Float parameters come out in `dtype` (the compute dtype too).
    A quantized checkpoint loads quantized; `quant`, if given, must be what it was converted with."""
    cfg = checkpoint.read_config(path)
    if quant is not None:
        if quantization.parse(quant) != cfg.quant:
            have = cfg.quant.name if cfg.quant is not None else "not quantized"
            raise checkpoint.CheckpointFormatError(f"{path}: quant={quant!r} requested, but the checkpoint is {have}; "
                                        f"quantize when converting (python -m convert hf-to-orbax --quant …)")
    cfg = cfg.replace(param_dtype=dtype, compute_dtype=dtype, **config_overrides)
    mesh = auto_axes(mesh or single_device_mesh())  # jax.make_mesh's Explicit axes become Auto
    graphdef, abstract = abstract_model(cfg)
    # LoRA adapters asked for (cfg.lora) but not in the checkpoint start fresh, as with an HF directory
    state, fresh = checkpoint.restore(path, abstract, state_shardings(abstract, mesh),
                           optional=lambda p, v: isinstance(v, nnx.LoRAParam))
    if fresh:
        init_adapters(cfg, state, mesh)
    return Model(graphdef, state, cfg, mesh)


def _zeros(shape, dtype, sharding):
    return jax.jit(jnp.zeros, static_argnums=(0, 1), out_shardings=sharding)(tuple(shape), jnp.dtype(dtype))


def _load_quantized(entry, ckpt, cfg, state, shardings, mesh) -> None:
    """A quantized dense kernel: each HF tensor (one layer) is quantized on device, in its shardings,
    as it arrives; no float copy of more than one layer's tensor ever exists."""
    qc = quantization.parse(cfg.quant)
    kvar, svar = tree_get(state, entry.path), tree_get(state, (*entry.path[:-1], "scale"))
    ksh, ssh = tree_get(shardings, entry.path), tree_get(shardings, (*entry.path[:-1], "scale"))
    lead = 1 if entry.stacked else 0
    kshape, sshape = kvar.shape[lead:], svar.shape[lead:]
    in_shape, out_shape = quantization.layer_dims(qc, kshape, sshape)

    def layer_of(sh):
        return NamedSharding(mesh, jax.sharding.PartitionSpec(*sh.spec[lead:]))

    kl, sl = layer_of(ksh), layer_of(ssh)
    quantize = quantization.quantizer(qc, in_shape, out_shape, (kl, sl))
    if not entry.stacked:
        q, s = quantize(_device_put(entry.to_ours(ckpt.read(entry.hf)), kl))
        kvar.set_value(q)
        svar.set_value(s)
        return
    qs = _zeros(kvar.shape, kvar.dtype, ksh)
    ss = _zeros(svar.shape, svar.dtype, ssh)
    for i, name in enumerate(entry.hf_names(cfg)):
        q, s = quantize(_device_put(entry.to_ours(ckpt.read(name)), kl))
        qs, ss = _set_layer(qs, q, i), _set_layer(ss, s, i)
    kvar.set_value(qs)
    svar.set_value(ss)


def check_hf_tensors(ckpt: HFCheckpoint, cfg: LlamaConfig) -> None:
    """Every expected tensor present once with its shape, nothing unexpected; errors name tensor and file."""
    expected = hf_format.expected_names(cfg)
    present = ckpt.names()
    missing = sorted(set(expected) - present)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{ckpt.dir}: missing tensor {missing[0]!r}{more}; config.json expects it")
    ignored = {"model.rotary_emb.inv_freq"} | ({"lm_head.weight"} if cfg.tie_embeddings else set())
    extra = sorted(present - set(expected) - ignored)
    if extra:
        raise CheckpointError(f"{ckpt.file_of(extra[0])}: unexpected tensor {extra[0]!r} (not part of a Llama with this config.json)")
    for name, shape in expected.items():
        if ckpt.shape(name) != shape:
            raise CheckpointError(f"{ckpt.file_of(name)}: tensor {name!r} has shape {list(ckpt.shape(name))}, "
                                  f"config.json implies {list(shape)}")
