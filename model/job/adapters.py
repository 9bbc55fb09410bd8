"""LoRA adapters for a loaded model, from any of the three places they come from: a PEFT directory
(`adapter_config.json` + `adapter_model.safetensors`, what PEFT and vLLM use), this project's
checkpoint, or a `python -m train` run directory (rank/alpha/targets from its config.yaml).

Merging adds `scale · A·B` to each adapted kernel on device, in the kernel's sharding (float bases only:
an integer kernel cannot absorb it without requantizing); setting them keeps the adapters beside the
base weights, applied in every matmul (model/network/lora.py), which also works over int8/int4 bases.
"""

from __future__ import annotations

import logging
import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import nnx

from model.formats import checkpoint as ckpt
from model.formats import hub, paths
from model.formats.peft import (
    AdapterError,
    find_adapter_checkpoint,
    is_peft_dir,
    read_adapters,
    read_peft,
)
from model.job import settings
from model.network import lora as lora_lib
from model.network.config import LlamaConfig
from model.network.model import Model, state_shardings, tree_get

log = logging.getLogger(__name__)


def read_adapter(path, cfg: LlamaConfig) -> tuple[lora_lib.LoraConfig, dict]:
    """A PEFT directory, this project's checkpoint (it records its LoRA config), or a `python -m train`
    run directory (LoRA config from the run's config.yaml); local, gs://, or a Hub id `org/name[@rev]`."""
    path = hub.resolve(path)
    if is_peft_dir(path):
        return read_peft(path, cfg)
    try:
        find_adapter_checkpoint(path)
        acfg, flat = read_adapters(path)
    except ckpt.CheckpointFormatError:  # a training run: its config.yaml says rank, alpha, targets
        lc = _run_lora_config(path)
        if lc is None:
            raise AdapterError(f"{path}: not a PEFT directory (adapter_config.json), not a checkpoint with LoRA "
                               f"parameters, and no training run config.yaml beside it") from None
        acfg, flat = read_adapters(path, cfg.replace(lora=lc))
    if acfg.lora is None:
        raise AdapterError(f"{path}: the checkpoint's config has no LoRA settings (rank, alpha)")
    flat = {tuple(k): np.asarray(v) for k, v in flat.items()}
    return acfg.lora, flat


def _run_lora_config(path) -> lora_lib.LoraConfig | None:
    """The `lora` section of the config.yaml that `python -m train` writes into its run directory."""
    p = paths.as_path(path)
    for d in (p, *p.parents[:2]):
        f = d / "config.yaml"
        if f.exists():
            values = yaml.safe_load(f.read_text()) or {}
            if isinstance(values.get("lora"), dict):
                return settings.build(lora_lib.LoraConfig, values["lora"], f"{f}: lora")
    return None


def merge_adapters(m: Model, lc: lora_lib.LoraConfig, flat: dict) -> None:
    """kernel += scale · A·B for every adapted dense layer, on device in the kernel's sharding."""
    shardings = state_shardings(m.state, m.mesh)
    for path in sorted(p for p in flat if p[-1] == "lora_a"):
        dense = path[:-1]
        var = tree_get(m.state, (*dense, "kernel"))
        if jnp.issubdtype(var.dtype, jnp.integer):
            raise AdapterError(f"cannot merge the adapter of {'/'.join(dense)} into an integer (quantized) kernel; "
                               f"use model.adapter_mode=dynamic")
        a, b = flat[path], flat[(*dense, "lora_b")]
        if a.shape[:-1] + b.shape[2:] != tuple(var.shape) or a.shape[-1] != b.shape[1]:
            raise AdapterError(f"adapter of {'/'.join(dense)} has shapes {a.shape}, {b.shape}; kernel is {var.shape}")
        sh = tree_get(shardings, (*dense, "kernel"))
        sh = sh.get_value() if isinstance(sh, nnx.Variable) else sh
        merge = jax.jit(_merged, static_argnums=3, out_shardings=sh, donate_argnums=0)
        var.set_value(merge(var.get_value(), jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), lc.scale))
    log.info("merged LoRA adapter (r=%d, alpha=%s, targets %s) into the base weights", lc.rank, lc.alpha,
             ",".join(lc.targets))


def _merged(w, a, b, scale: float):
    """w [L, *in, *out] + scale · a [L, *in, R] · b [L, R, *out], in float32, one layer at a time (a
    405B kernel's full delta would be as large as the kernel in float32)."""
    R = a.shape[-1]

    def body(i, w):
        d = (a[i].reshape(-1, R) @ b[i].reshape(R, -1)) * scale
        return w.at[i].set((w[i].astype(jnp.float32) + d.reshape(w.shape[1:])).astype(w.dtype))

    return jax.lax.fori_loop(0, w.shape[0], body, w)


def set_adapters(m: Model, flat: dict) -> None:
    """Fills the model's LoRA parameters (cfg.lora set) with the adapter's values, in their shardings."""
    shardings = state_shardings(m.state, m.mesh)
    for path, value in flat.items():
        var = tree_get(m.state, path)
        if tuple(var.shape) != tuple(value.shape):
            raise AdapterError(f"adapter tensor {'/'.join(path)} has shape {value.shape}, the model expects {var.shape}")
        sh = tree_get(shardings, path)
        sh = sh.get_value() if isinstance(sh, nnx.Variable) else sh
        host = np.asarray(value).astype(var.dtype)
        var.set_value(jax.make_array_from_callback(host.shape, sh, lambda idx, h=host: h[idx]))
