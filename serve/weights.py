"""The served model: base weights (bf16, int8 or int4; an HF directory, an Orbax checkpoint or a preset
with random weights) through the job spine's resolver, a LoRA adapter merged at load or applied on the
fly (model/job/adapters.py), adapter slots for serving several adapters per step (serve/adapters.py), and
the tokenizer.

`model.adapter` stays what it was (one adapter for every request, merged into a float base for free, or
dynamic); `model.lora_modules` are the adapters chosen per request. Both together: the single adapter must
merge (a float base), since the model has one kind of LoRA layer."""

from __future__ import annotations

import logging

from jax.sharding import Mesh

from model.job import adapters, resolve
from model.network.lora import LoraSlots
from model.network.model import Model
from serve.config import ModelSpec, ServeConfig

log = logging.getLogger("serve.weights")


def adapter_slots(cfg: ServeConfig) -> LoraSlots | None:
    """The adapter slots the served model needs: with model.lora_modules or server.runtime_lora."""
    if not (cfg.model.lora_modules or cfg.server.runtime_lora):
        return None
    n = len(cfg.model.lora_modules)
    if n > cfg.engine.max_loras:
        raise ValueError(f"model.lora_modules names {n} adapters, above engine.max_loras={cfg.engine.max_loras}")
    names = set(served_names(cfg.model))
    clash = [k for k in cfg.model.lora_modules if k in names or not k]
    if clash:
        raise ValueError(f"model.lora_modules: adapter name {clash[0]!r} is empty or a name of the base model")
    return LoraSlots(rank=cfg.engine.max_lora_rank, slots=cfg.engine.max_loras, dtype=resolve.dtype_of(cfg.model))


def served_names(spec: ModelSpec) -> list[str]:
    """The base model's names clients may send: model.served_names, else model.name or the default."""
    return list(spec.served_names) or [spec.name or resolve.served_name(spec)]


def load_modules(engine, spec: ModelSpec) -> None:
    """The adapters of model.lora_modules into the engine's slots (an error names the module)."""
    for name, path in spec.lora_modules.items():
        engine.load_adapter(name, path)


def build(spec: ModelSpec, mesh: Mesh, slots: LoraSlots | None = None) -> tuple[Model, object, str]:
    """(model on `mesh`, tokenizer, served model name); with `slots`, the model has adapter slots."""
    overrides = dict(scan_layers=spec.scan_layers, remat="none")
    base_cfg = resolve.base_config(spec)
    lc = flat = None
    mode = spec.adapter_mode
    if spec.adapter:
        lc, flat = adapters.read_adapter(spec.adapter, base_cfg.replace(quant=None, lora=None))
        if mode == "auto":
            mode = "dynamic" if spec.quant or base_cfg.quant is not None else "merge"
        if mode == "dynamic" and slots is not None:
            raise ValueError("model.adapter applied dynamically cannot be combined with adapter slots "
                             "(model.lora_modules / server.runtime_lora): merge it (adapter_mode=merge, a float "
                             "base) or serve it as one of model.lora_modules")
        if mode == "dynamic":
            overrides["lora"] = lc
    if slots is not None:
        overrides["lora"] = slots
    m = resolve.build_model(spec, mesh, seed=spec.seed, **overrides)
    if lc is not None:
        if mode == "dynamic":
            adapters.set_adapters(m, flat)
            log.info("LoRA adapter %s applied on the fly (r=%d, alpha=%s)", spec.adapter, lc.rank, lc.alpha)
        else:
            adapters.merge_adapters(m, lc, flat)
    tok = resolve.tokenizer(spec, spec.tokenizer, m.config)
    return m, tok, served_names(spec)[0]
