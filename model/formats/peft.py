"""LoRA adapters -> PEFT (`lora-to-peft`, and the export at the end of `python -m train`).

PEFT's layout, which PEFT's `PeftModel.from_pretrained` and vLLM load: `adapter_config.json` and
`adapter_model.safetensors` with `base_model.model.<HF module>.lora_A.weight` [r, in] and
`.lora_B.weight` [out, r] per adapted layer, where our adapters are `lora_a` [*in, R] and
`lora_b` [R, *out] (stacked over layers). HF module names come from the one table
(model/hf_format.py): the module of the kernel the adapter belongs to. Output = W x + B A x · scale
with scale = alpha / r, or alpha / sqrt(r) with rsLoRA (`use_rslora`), as in model/lora.py.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from model.formats import checkpoint as ckpt
from model.formats import hf_format, paths
from model.formats.safetensors_io import SafetensorsFile, SafetensorsWriter
from model.network import lora as lora_lib
from model.network.config import LlamaConfig

log = logging.getLogger(__name__)

PEFT_TO_OURS = {v.rsplit(".", 1)[-1]: k for k, v in lora_lib.PEFT_NAMES.items()}  # q_proj -> q

VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


class AdapterError(ValueError):
    """An adapter on disk is not what it must be; the message names the file and tensor."""


def is_peft_dir(path) -> bool:
    return (paths.as_path(path) / "adapter_config.json").exists()


def read_peft(path, cfg: LlamaConfig) -> tuple[lora_lib.LoraConfig, dict[tuple[str, ...], np.ndarray]]:
    """A PEFT LoRA directory -> (LoraConfig, {("layers", "attn", "q", "lora_a"): [L, *in, R], ...})."""
    d = paths.as_path(path)
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


def _flat(adapters) -> dict[tuple[str, ...], np.ndarray]:
    """{path tuple: host array} of an nnx.State, a nested dict, or an already flat {tuple: array}."""
    if isinstance(adapters, dict) and adapters and all(isinstance(k, tuple) for k in adapters):
        return {k: np.asarray(v) for k, v in adapters.items()}
    out = {}
    leaves = jax.tree_util.tree_leaves_with_path(adapters, is_leaf=lambda x: isinstance(x, nnx.Variable))
    for path, v in leaves:
        v = v.get_value() if isinstance(v, nnx.Variable) else v
        keys = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        out[keys[:-1] if keys[-1:] == ("value",) else keys] = np.asarray(v)
    return out


def lora_pairs(flat, cfg: LlamaConfig):
    """[(kernel table entry, lora_a [L?, *in, R], lora_b [L?, R, *out])] for every adapted layer."""
    table = {e.path: e for e in hf_format.entries(cfg)}
    pairs = []
    for path, a in sorted(flat.items()):
        if path[-1] != "lora_a":
            continue
        dense = path[:-1]
        b = flat.get((*dense, "lora_b"))
        e = table.get((*dense, "kernel"))
        if b is None or e is None:
            raise ValueError(f"adapter {'/'.join(path)}: no matching lora_b, or no such layer in the model")
        pairs.append((e, a, b))
    if not pairs:
        raise ValueError("no LoRA adapters (lora_a/lora_b parameters) found")
    return pairs


def export_peft(adapter_state, cfg: LlamaConfig, out_dir, *, base_model: str | None = None,
                dtype: str | None = None) -> Path:
    """Writes `adapter_config.json` + `adapter_model.safetensors` (PEFT's layout, which vLLM loads)
    for the LoRA parameters of `adapter_state` (an nnx.State of LoRAParams, or {path tuple: array})."""
    if cfg.lora is None:
        raise ValueError("the config has no LoRA settings (cfg.lora is None): rank, alpha and rsLoRA are needed")
    lc = cfg.lora
    out = paths.as_path(out_dir)  # local or gs://; adapter_config.json is written last
    out.mkdir(parents=True, exist_ok=True)
    tensors = []
    modules = set()
    for e, a, b in lora_pairs(_flat(adapter_state), cfg):
        n_out, n_in = e.hf_shape
        R = a.shape[-1]
        if R != lc.rank:
            raise ValueError(f"adapter of {'/'.join(e.path)} has rank {R}, the config says {lc.rank}")
        module = e.hf[:-len(".weight")]
        modules.add(module.rsplit(".", 1)[-1])
        layers = range(cfg.num_layers) if e.stacked else [None]
        for i in layers:
            ai, bi = (a, b) if i is None else (a[i], b[i])
            name = "base_model.model." + (module.format(i=i) if i is not None else module)
            A = ai.reshape(n_in, R).T
            B = bi.reshape(R, n_out).T
            if dtype:
                A, B = A.astype(_np_dtype(dtype)), B.astype(_np_dtype(dtype))
            tensors += [(name + ".lora_A.weight", np.ascontiguousarray(A)), (name + ".lora_B.weight", np.ascontiguousarray(B))]
    w = SafetensorsWriter(out / "adapter_model.safetensors", [(n, t.dtype, t.shape) for n, t in tensors],
                          metadata={"format": "pt"})
    for n, t in tensors:
        w.write(n, t)
    w.close()
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lc.rank, "lora_alpha": lc.alpha,
        "lora_dropout": lc.dropout, "target_modules": sorted(modules), "bias": "none", "use_rslora": lc.rslora,
        "use_dora": False, "modules_to_save": None, "fan_in_fan_out": False, "init_lora_weights": True,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        "base_model_name_or_path": base_model, "revision": None, "inference_mode": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    if lc.rank not in VLLM_RANKS:
        log.warning("rank %d is not one of vLLM's max_lora_rank values %s", lc.rank, VLLM_RANKS)
    log.info("wrote PEFT adapter %s (%d tensors, r=%d, alpha=%s, targets %s)", out, len(tensors), lc.rank, lc.alpha,
             ", ".join(sorted(modules)))
    return out


def _np_dtype(name: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def find_adapter_checkpoint(path) -> ckpt.epath.Path:
    """`path` itself if it is a checkpoint holding LoRA parameters, else the newest finished step
    directory below it (a CheckpointManager layout `DIR/<step>/<item>/`) that holds them."""
    p = ckpt.as_path(path)

    def has_lora(d):
        try:
            return ckpt.is_finished(d) and any(k[-1] == "lora_a" for k in ckpt.param_names(d).values())
        except (ckpt.CheckpointFormatError, OSError):
            return False

    if has_lora(p):
        return p
    steps = sorted((d for d in p.iterdir() if d.is_dir() and d.name.isdigit()), key=lambda d: int(d.name), reverse=True) \
        if p.is_dir() else []
    for d in steps + [p]:
        for cand in [d, *sorted(x for x in d.iterdir() if x.is_dir())]:
            if has_lora(cand):
                return cand
    raise ckpt.CheckpointFormatError(f"{path}: no finished checkpoint with LoRA parameters (lora_a/lora_b) here "
                                     f"or in a step directory below it")


def read_adapters(path, config: LlamaConfig | None = None) -> tuple[LlamaConfig, dict]:
    """(config, {path: array}) of the adapters in `path`: a checkpoint in this project's format
    (model.checkpoint.save; it records the config), or a training run's Orbax CheckpointManager
    directory (`python -m train`; newest step), whose model/LoRA config must then be given."""
    try:
        d = find_adapter_checkpoint(path)
    except ckpt.CheckpointFormatError:
        d = None
    if d is not None:
        cfg = ckpt.read_config(d)
        return cfg if config is None else config, ckpt.read_params(d, lambda p: p[-1] in ("lora_a", "lora_b"))
    flat = _train_checkpoint_adapters(path)
    if config is None:
        raise ckpt.CheckpointFormatError(f"{path}: a training checkpoint does not record the model and LoRA "
                                         f"config; pass the run's config (--config configs/….yaml [key=value …])")
    return config, flat


def _train_checkpoint_adapters(path) -> dict:
    """LoRA parameters of the newest step of a `python -m train` run (DIR, DIR/checkpoints)."""
    p = ckpt.as_path(path)
    for base in (p, p / "checkpoints"):
        if not base.is_dir():
            continue
        steps = sorted((d for d in base.iterdir() if d.is_dir() and d.name.isdigit()), key=lambda d: int(d.name))
        for step in reversed(steps):
            item = step / "state"
            if not (item / ckpt.METADATA_FILE).exists() or ckpt.TMP_SUFFIX in step.name:
                continue
            tree = ocp.PyTreeCheckpointer().restore(item)
            flat = {}
            for kp, leaf in jax.tree_util.tree_leaves_with_path(tree):
                keys = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in kp)
                if keys and keys[-1] == "value":
                    keys = keys[:-1]
                if keys and keys[0] == "params" and keys[-1] in ("lora_a", "lora_b"):
                    flat[keys[1:]] = np.asarray(leaf)
            if flat:
                log.info("adapters from %s (step %s)", item, step.name)
                return flat
    raise ckpt.CheckpointFormatError(f"{path}: no finished checkpoint with LoRA parameters (lora_a/lora_b): "
                                     f"neither this project's format nor a `python -m train` run directory")


def lora_to_peft(ckpt_dir, out_dir, *, base_model: str | None = None, dtype: str | None = None,
                 config: LlamaConfig | None = None) -> Path:
    cfg, flat = read_adapters(ckpt_dir, config)
    return export_peft(flat, cfg, out_dir, base_model=base_model, dtype=dtype)


