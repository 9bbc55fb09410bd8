"""The served model: base weights (bf16, int8 or int4; an HF directory, an Orbax checkpoint or a preset
with random weights), a LoRA adapter merged at load or applied on the fly, and the tokenizer.

Adapters come as a PEFT directory (`adapter_config.json` + `adapter_model.safetensors`, what PEFT and
vLLM use) or as this project's checkpoint / training run (convert.peft.read_adapters). Merging adds
`scale · A·B` to each adapted kernel on device, in the kernel's sharding (float bases only: an
integer kernel cannot absorb it without requantizing); `dynamic` keeps the adapters beside the base
weights and applies them in every matmul (model/lora.py), which also works over int8/int4 bases.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

import model as model_lib
from model.formats import hf_format
from model.network import lora as lora_lib
from model.network import quant as quant_lib
from model.network.model import Model, state_shardings
from model.network.config import LlamaConfig
from model.formats.safetensors_io import CheckpointError, SafetensorsFile
from model.formats.tokenizer import load_tokenizer
from serve.config import ModelSpec

log = logging.getLogger("serve.weights")

PEFT_TO_OURS = {v.rsplit(".", 1)[-1]: k for k, v in lora_lib.PEFT_NAMES.items()}  # q_proj -> q


class AdapterError(ValueError):
    """An adapter on disk is not what it must be; the message names the file and tensor."""


def is_peft_dir(path) -> bool:
    return (Path(path) / "adapter_config.json").exists()


def read_peft(path, cfg: LlamaConfig) -> tuple[lora_lib.LoraConfig, dict[tuple[str, ...], np.ndarray]]:
    """A PEFT LoRA directory -> (LoraConfig, {("layers", "attn", "q", "lora_a"): [L, *in, R], ...})."""
    d = Path(path)
    cfg_file = d / "adapter_config.json"
    try:
        pc = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{cfg_file}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if pc.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{cfg_file}: peft_type {pc.get('peft_type')!r} is not supported (LORA only)")
    for key, ok in (("use_dora", lambda v: not v), ("bias", lambda v: v in (None, "none")),
                    ("modules_to_save", lambda v: not v), ("layers_to_transform", lambda v: v is None),
                    ("rank_pattern", lambda v: not v), ("alpha_pattern", lambda v: not v),
                    ("fan_in_fan_out", lambda v: not v)):
        if key in pc and not ok(pc[key]):
            raise AdapterError(f"{cfg_file}: {key}={pc[key]!r} is not supported")
    targets = pc.get("target_modules") or []
    if isinstance(targets, str):
        raise AdapterError(f"{cfg_file}: target_modules as a regular expression is not supported; list the modules")
    unknown = [t for t in targets if t not in PEFT_TO_OURS]
    if unknown:
        raise AdapterError(f"{cfg_file}: target module {unknown[0]!r} is not one of {', '.join(PEFT_TO_OURS)}")
    try:
        r, alpha = int(pc["r"]), float(pc["lora_alpha"])
    except KeyError as e:
        raise AdapterError(f"{cfg_file}: missing field {e.args[0]!r}") from None
    lc = lora_lib.LoraConfig(rank=r, alpha=alpha, targets=tuple(PEFT_TO_OURS[t] for t in targets),
                             rslora=bool(pc.get("use_rslora", False)))
    weights = d / "adapter_model.safetensors"
    if not weights.exists():
        raise AdapterError(f"{d}: no adapter_model.safetensors (pickled adapter_model.bin is never loaded)")
    sf = SafetensorsFile(weights)
    table = {e.path[-2]: e for e in hf_format.entries(cfg) if e.path[-1] == "kernel"}
    flat, used = {}, set()
    for t in lc.targets:
        e = table[t]
        n_out, n_in = e.hf_shape
        in_shape, out_shape = dense_dims(cfg, t)
        dense = e.path[:-1]
        a_layers, b_layers = [], []
        for i in range(cfg.num_layers):
            base = "base_model.model." + e.hf.format(i=i)[:-len(".weight")]
            names = (base + ".lora_A.weight", base + ".lora_B.weight")
            for n in names:
                if n not in sf.tensors:
                    raise AdapterError(f"{weights}: missing tensor {n!r} (target_modules lists {t})")
            A, B = sf.read(names[0]), sf.read(names[1])
            if A.shape != (r, n_in) or B.shape != (n_out, r):
                raise AdapterError(f"{weights}: {names[0]} / lora_B have shapes {list(A.shape)} / {list(B.shape)}, "
                                   f"expected {[r, n_in]} / {[n_out, r]} for this model")
            used.update(names)
            a_layers.append(A.astype(np.float32).T.reshape(*in_shape, r))
            b_layers.append(B.astype(np.float32).T.reshape(r, *out_shape))
        flat[(*dense, "lora_a")] = np.stack(a_layers)
        flat[(*dense, "lora_b")] = np.stack(b_layers)
    extra = sorted(set(sf.tensors) - used)
    if extra:
        raise AdapterError(f"{weights}: unexpected tensor {extra[0]!r} (not a LoRA tensor of the listed targets)")
    return lc, flat


def dense_dims(cfg: LlamaConfig, target: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(in_shape, out_shape) of an adaptable dense layer (as model/llama.py builds them)."""
    D, N, K, H, F = cfg.dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
    return {"q": ((D,), (N, H)), "k": ((D,), (K, H)), "v": ((D,), (K, H)), "o": ((N, H), (D,)),
            "gate": ((D,), (F,)), "up": ((D,), (F,)), "down": ((F,), (D,))}[target]


def read_adapter(path, cfg: LlamaConfig) -> tuple[lora_lib.LoraConfig, dict]:
    """A PEFT directory, this project's checkpoint (it records its LoRA config), or a `python -m train`
    run directory (LoRA config from the run's config.yaml)."""
    if is_peft_dir(path):
        return read_peft(path, cfg)
    from model.formats.peft import find_adapter_checkpoint, read_adapters  # this project's checkpoint formats
    from model.formats import checkpoint as ckpt

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
    import yaml

    from model.job import settings

    p = Path(path)
    for d in (p, *p.parents[:2]):
        f = d / "config.yaml"
        if f.exists():
            values = yaml.safe_load(f.read_text()) or {}
            if isinstance(values.get("lora"), dict):
                return settings.build(lora_lib.LoraConfig, values["lora"], f"{f}: lora")
    return None


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def merge_adapters(m: Model, lc: lora_lib.LoraConfig, flat: dict) -> None:
    """kernel += scale · A·B for every adapted dense layer, on device in the kernel's sharding."""
    shardings = state_shardings(m.state, m.mesh)
    for path in sorted(p for p in flat if p[-1] == "lora_a"):
        dense = path[:-1]
        var = _get(m.state, (*dense, "kernel"))
        if jnp.issubdtype(var.dtype, jnp.integer):
            raise AdapterError(f"cannot merge the adapter of {'/'.join(dense)} into an integer (quantized) kernel; "
                               f"use model.adapter_mode=dynamic")
        a, b = flat[path], flat[(*dense, "lora_b")]
        if a.shape[:-1] + b.shape[2:] != tuple(var.shape) or a.shape[-1] != b.shape[1]:
            raise AdapterError(f"adapter of {'/'.join(dense)} has shapes {a.shape}, {b.shape}; kernel is {var.shape}")
        sh = _get(shardings, (*dense, "kernel"))
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
        var = _get(m.state, path)
        if tuple(var.shape) != tuple(value.shape):
            raise AdapterError(f"adapter tensor {'/'.join(path)} has shape {value.shape}, the model expects {var.shape}")
        sh = _get(shardings, path)
        sh = sh.get_value() if isinstance(sh, nnx.Variable) else sh
        host = np.asarray(value).astype(var.dtype)
        var.set_value(jax.make_array_from_callback(host.shape, sh, lambda idx, h=host: h[idx]))


def build(spec: ModelSpec, mesh: Mesh) -> tuple[Model, object, str]:
    """(model on `mesh`, tokenizer, served model name)."""
    overrides = dict(attention=spec.attention, scan_layers=spec.scan_layers, remat="none")
    qc = quant_lib.parse(spec.quant)
    if spec.checkpoint:
        from model.formats import checkpoint as ckpt

        base_cfg = ckpt.read_config(spec.checkpoint) if ckpt.is_checkpoint(spec.checkpoint) else \
            LlamaConfig.from_hf(spec.checkpoint)
    else:
        base_cfg = LlamaConfig.preset(spec.preset)
        if spec.num_layers:
            base_cfg = base_cfg.replace(num_layers=spec.num_layers)
    lc = flat = None
    mode = spec.adapter_mode
    if spec.adapter:
        lc, flat = read_adapter(spec.adapter, base_cfg.replace(quant=None, lora=None))
        if mode == "auto":
            mode = "dynamic" if qc is not None or (spec.checkpoint and base_cfg.quant is not None) else "merge"
    dyn = dict(lora=lc) if mode == "dynamic" and lc is not None else {}
    if spec.checkpoint:
        m = model_lib.load(spec.checkpoint, dtype=spec.dtype, quant=qc, mesh=mesh, **overrides, **dyn)
    else:
        dtype = "float32" if spec.preset == "toy" else spec.dtype
        cfg = base_cfg.replace(param_dtype=dtype, compute_dtype=dtype, quant=qc, **overrides, **dyn)
        m = model_lib.init(cfg, seed=spec.seed, mesh=mesh)
    if lc is not None:
        if mode == "dynamic":
            set_adapters(m, flat)
            log.info("LoRA adapter %s applied on the fly (r=%d, alpha=%s)", spec.adapter, lc.rank, lc.alpha)
        else:
            merge_adapters(m, lc, flat)
    if spec.tokenizer:
        tok = load_tokenizer(spec.tokenizer)
    elif spec.checkpoint:
        try:
            tok = load_tokenizer(spec.checkpoint)
        except FileNotFoundError:
            if m.config.vocab_size == 512:
                tok = load_tokenizer("bytes")
            else:
                raise CheckpointError(f"{spec.checkpoint}: no tokenizer.json or tokenizer.model; set "
                                      f"model.tokenizer") from None
    elif spec.preset == "toy":
        tok = load_tokenizer("bytes")
    else:
        raise ValueError(f"model.tokenizer is required to serve preset {spec.preset!r} without a checkpoint")
    name = spec.name or (Path(spec.checkpoint.rstrip("/")).name if spec.checkpoint else spec.preset)
    return m, tok, name
