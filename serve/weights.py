"""The served model: base weights (bf16, int8 or int4; an HF directory, an Orbax checkpoint or a preset
with random weights) through the job spine's resolver, a LoRA adapter merged at load or applied on the
fly (model/job/adapters.py), and the tokenizer."""

from __future__ import annotations

import logging

from jax.sharding import Mesh

from model.job import adapters, resolve
from model.network.model import Model
from serve.config import ModelSpec

log = logging.getLogger("serve.weights")


def build(spec: ModelSpec, mesh: Mesh) -> tuple[Model, object, str]:
    """(model on `mesh`, tokenizer, served model name)."""
    overrides = dict(scan_layers=spec.scan_layers, remat="none")
    base_cfg = resolve.base_config(spec)
    lc = flat = None
    mode = spec.adapter_mode
    if spec.adapter:
        lc, flat = adapters.read_adapter(spec.adapter, base_cfg.replace(quant=None, lora=None))
        if mode == "auto":
            mode = "dynamic" if spec.quant or base_cfg.quant is not None else "merge"
        if mode == "dynamic":
            overrides["lora"] = lc
    m = resolve.build_model(spec, mesh, seed=spec.seed, **overrides)
    if lc is not None:
        if mode == "dynamic":
            adapters.set_adapters(m, flat)
            log.info("LoRA adapter %s applied on the fly (r=%d, alpha=%s)", spec.adapter, lc.rank, lc.alpha)
        else:
            adapters.merge_adapters(m, lc, flat)
    tok = resolve.tokenizer(spec, spec.tokenizer, m.config)
    return m, tok, spec.name or resolve.served_name(spec)
