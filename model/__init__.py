"""Llama 3.1 in Flax NNX: config, network, checkpoint formats, tokenizer.

    from model.formats import load

    from model.network.model import init

    from model.network.config import LlamaConfig
    m = load("path/to/hf_checkpoint", dtype="float32")
    logits = m(tokens)          # int32 [B, T] -> float32 [B, T, V]
"""

from model.formats.load import load
from model.network.config import PRESETS, LlamaConfig
from model.network.model import (
    Model,
    abstract_model,
    init,
    logical_axes,
    state_shardings,
)

__all__ = ["LlamaConfig", "Model", "PRESETS", "abstract_model", "init", "load", "logical_axes", "state_shardings"]
