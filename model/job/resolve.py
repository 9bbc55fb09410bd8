"""The one resolver from a job's model spec to its config, tokenizer and weights (train, serve, convert
and the planner all go through it).

A spec names a checkpoint (a Hugging Face directory or this project's Orbax checkpoint: local, gs://, or a
Hugging Face Hub id `org/name[@revision]`, fetched into the Hugging Face cache) or a preset (random
weights); what a job adds (remat, adapters, …) comes as config overrides.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

from jax.sharding import Mesh

from model.formats import checkpoint, hub, paths
from model.formats.load import load
from model.formats.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer
from model.network import quant
from model.network.config import PRESET_TOKENIZERS, LlamaConfig
from model.network.model import Model, init


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The `model:` section every job config shares; jobs extend it with their own fields."""

    preset: str = "toy"  # a preset name (model/network/config.py), used when no checkpoint is given
    checkpoint: str | None = None  # HF directory, Orbax checkpoint (local or gs://) or Hub id org/name[@rev]
    dtype: str | None = None  # float weights and compute; default: the preset's (toy: float32), else bfloat16
    quant: str | None = None  # None | int8 | int4 | int4-g<N>: weight-only quantization of the base
    attention: str = "auto"  # auto | xla | cudnn | splash
    num_layers: int | None = None  # reduced-depth variants of a preset (compile checks, benches)
    vocab_size: int | None = None  # a preset with another vocabulary size (tests)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "tokenizer.model", "original/tokenizer.model")


@functools.lru_cache(maxsize=16)
def checkpoint_path(name: str) -> str:
    """Where checkpoint `name` is: the path itself (local or gs://), or a Hub id's snapshot directory."""
    return str(hub.resolve(name))


def base_config(spec: ModelSpec) -> LlamaConfig:
    """The architecture, read from the checkpoint (nothing but its config) or the preset."""
    if spec.checkpoint:
        path = checkpoint_path(spec.checkpoint)
        if checkpoint.is_checkpoint(path):
            return checkpoint.read_config(path)
        return LlamaConfig.from_hf(paths.local_copy(path, ["config.json"]))
    resized = {k: v for k, v in (("num_layers", spec.num_layers), ("vocab_size", spec.vocab_size)) if v}
    return LlamaConfig.preset(spec.preset, **resized)


def dtype_of(spec: ModelSpec) -> str:
    if spec.dtype:
        return spec.dtype
    return "bfloat16" if spec.checkpoint else LlamaConfig.preset(spec.preset).param_dtype


def model_config(spec: ModelSpec, **overrides) -> LlamaConfig:
    """The LlamaConfig the job runs (dtype, quantized base, the job's `overrides`), without reading weights."""
    dtype = dtype_of(spec)
    cfg = base_config(spec).replace(param_dtype=dtype, compute_dtype=dtype, attention=spec.attention)
    return cfg.replace(quant=quant.parse(spec.quant) if spec.quant else cfg.quant, **overrides)


def build_model(spec: ModelSpec, mesh: Mesh, *, seed: int = 0, **overrides) -> Model:
    """The model on `mesh`: a checkpoint streamed into its shardings (quantized tensor by tensor when
    spec.quant is set), or a preset with random weights created in its shardings."""
    if spec.checkpoint:
        return load(checkpoint_path(spec.checkpoint), dtype=dtype_of(spec), quant=spec.quant, mesh=mesh,
                    attention=spec.attention, **overrides)
    return init(model_config(spec, **overrides), seed=seed, mesh=mesh)


def tokenizer(spec: ModelSpec, path: str | None = None, cfg: LlamaConfig | None = None) -> Tokenizer:
    """`path` ("bytes", a file or a directory) when given; else the checkpoint's own; else the preset's.
    A checkpoint without tokenizer files whose vocabulary is the byte tokenizer's (a toy model saved by
    this project) gets the byte tokenizer."""
    if path:
        return load_tokenizer(path)
    if spec.checkpoint:
        try:
            return load_tokenizer(paths.local_copy(checkpoint_path(spec.checkpoint), TOKENIZER_FILES))
        except FileNotFoundError:
            if (cfg or base_config(spec)).vocab_size == ByteTokenizer.VOCAB_SIZE:
                return ByteTokenizer()
            raise FileNotFoundError(f"{spec.checkpoint}: no tokenizer.json or tokenizer.model; name a tokenizer "
                                    f"in the config") from None
    if spec.preset in PRESET_TOKENIZERS:
        return load_tokenizer(PRESET_TOKENIZERS[spec.preset])
    raise FileNotFoundError(f"preset {spec.preset!r} has no tokenizer of its own; name one in the config "
                            f"(a tokenizer.json / tokenizer.model file or a checkpoint directory)")


def served_name(spec: ModelSpec) -> str:
    return Path(spec.checkpoint.rstrip("/")).name if spec.checkpoint else spec.preset
