"""The one table between Hugging Face tensor names and this model's parameter tree.

Each entry says where an HF tensor lives in our tree and how to get there (transpose, head
reshape, stacking of per-layer tensors along the leading `layers` axis). Export runs the same
table backwards. HF's q/k rows are already in the half-split RoPE layout that model/layers.py
uses, so no RoPE permutation is needed in either direction.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

from model.network.config import LlamaConfig


@dataclasses.dataclass(frozen=True)
class Entry:
    path: tuple[str, ...]  # keys into our nnx state, e.g. ("layers", "attn", "q", "kernel")
    hf: str  # HF tensor name; "{i}" is the layer index for stacked entries
    stacked: bool
    hf_shape: tuple[int, ...]  # one HF tensor (one layer)
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]

    def hf_names(self, cfg: LlamaConfig) -> list[str]:
        return [self.hf.format(i=i) for i in range(cfg.num_layers)] if self.stacked else [self.hf]


def _linear(path, hf, in_shape, out_shape, stacked=True) -> Entry:
    """torch Linear stores [out, in]; we store [*in_shape, *out_shape]."""
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    return Entry(path, hf, stacked, (n_out, n_in),
                 to_ours=lambda w: w.T.reshape(*in_shape, *out_shape),
                 to_hf=lambda w: w.reshape(n_in, n_out).T)


def _same(path, hf, shape, stacked=True) -> Entry:
    return Entry(path, hf, stacked, tuple(shape), to_ours=lambda w: w, to_hf=lambda w: w)


def entries(cfg: LlamaConfig) -> list[Entry]:
    D, N, K, H, F, V = cfg.dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim, cfg.vocab_size
    L = "model.layers.{i}."
    table = [
        _same(("embed", "embedding"), "model.embed_tokens.weight", (V, D), stacked=False),
        _same(("layers", "attn_norm", "scale"), L + "input_layernorm.weight", (D,)),
        _linear(("layers", "attn", "q", "kernel"), L + "self_attn.q_proj.weight", (D,), (N, H)),
        _linear(("layers", "attn", "k", "kernel"), L + "self_attn.k_proj.weight", (D,), (K, H)),
        _linear(("layers", "attn", "v", "kernel"), L + "self_attn.v_proj.weight", (D,), (K, H)),
        _linear(("layers", "attn", "o", "kernel"), L + "self_attn.o_proj.weight", (N, H), (D,)),
        _same(("layers", "mlp_norm", "scale"), L + "post_attention_layernorm.weight", (D,)),
        _linear(("layers", "mlp", "gate", "kernel"), L + "mlp.gate_proj.weight", (D,), (F,)),
        _linear(("layers", "mlp", "up", "kernel"), L + "mlp.up_proj.weight", (D,), (F,)),
        _linear(("layers", "mlp", "down", "kernel"), L + "mlp.down_proj.weight", (F,), (D,)),
        _same(("norm", "scale"), "model.norm.weight", (D,), stacked=False),
    ]
    if not cfg.tie_embeddings:
        table.append(_linear(("lm_head", "kernel"), "lm_head.weight", (D,), (V,), stacked=False))
    return table


def expected_names(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    return {name: e.hf_shape for e in entries(cfg) for name in e.hf_names(cfg)}
