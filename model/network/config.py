"""Llama 3.1 model configuration: presets, Hugging Face `config.json` import, parameter counts."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax.numpy as jnp

from model.network.quant import parse as parse_quant


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """llama3 frequency scaling (transformers `_compute_llama3_parameters`)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    dim: int  # D
    num_layers: int  # L
    num_heads: int  # N
    num_kv_heads: int  # K
    head_dim: int  # H
    mlp_dim: int  # F
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = RopeScaling()
    norm_eps: float = 1e-5
    max_seq_len: int = 131072
    tie_embeddings: bool = False
    param_dtype: str = "bfloat16"
    compute_dtype: str = "bfloat16"
    remat: str = "full"  # none | full | dots | attn_proj (REMAT_POLICIES in model/network/llama.py)
    attention: str = "auto"  # auto | xla | cudnn | splash
    scan_layers: bool = True
    quant: object | None = None  # model.network.quant.QuantConfig: int8/int4 base weights
    lora: object | None = None  # model.network.lora.LoraConfig: adapters on selected dense layers
    bos_token_id: int = 128000
    eos_token_ids: tuple[int, ...] = (128001,)

    def __post_init__(self):
        if self.quant is not None:  # "int8", "int4", "int4-g64" -> model.network.quant.QuantConfig
            object.__setattr__(self, "quant", parse_quant(self.quant))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        for name in ("param_dtype", "compute_dtype"):
            try:
                jnp.dtype(getattr(self, name))
            except TypeError:
                raise ValueError(f"{name}={getattr(self, name)!r} is not a dtype name") from None

    def replace(self, **kw) -> LlamaConfig:
        return dataclasses.replace(self, **kw)

    @property
    def q_per_kv(self) -> int:  # G
        return self.num_heads // self.num_kv_heads

    def num_params(self) -> int:
        D, F, V = self.dim, self.mlp_dim, self.vocab_size
        NH, KH = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        per_layer = D * NH * 2 + D * KH * 2 + 3 * D * F + 2 * D
        embeddings = V * D * (1 if self.tie_embeddings else 2)
        return self.num_layers * per_layer + embeddings + D

    def train_flops_per_token(self, seq: int, lora_only: bool) -> float:
        """Matmul FLOPs per trained token: forward 2N, activation gradients 2N, weight gradients 2N
        (only for trained weights: skipped for a frozen LoRA base); attention scores causal over `seq`."""
        D, L = self.dim, self.num_layers
        dense = self.num_params() - self.vocab_size * D * (0 if self.tie_embeddings else 1) - (2 * L + 1) * D
        attn = 2 * 2 * L * self.num_heads * self.head_dim * seq / 2  # QK^T and PV, causal half
        fwd = 2 * dense + attn
        return fwd * (2 if lora_only else 3)

    @classmethod
    def preset(cls, name: str, **overrides) -> LlamaConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)}")
        return PRESETS[name].replace(**overrides)

    @classmethod
    def from_hf(cls, path: str | Path, **overrides) -> LlamaConfig:
        """Reads a transformers `config.json` (or the directory holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            hf = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face checkpoint directory)") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None

        def need(key):
            if key not in hf:
                raise ValueError(f"{path}: missing field {key!r}")
            return hf[key]

        arch = hf.get("model_type", "llama")
        if arch != "llama":
            raise ValueError(f"{path}: model_type {arch!r} is not supported (expected 'llama')")
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise ValueError(f"{path}: attention_bias/mlp_bias are not supported by Llama 3.1")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{path}: hidden_act {hf['hidden_act']!r} is not supported (expected 'silu')")
        heads = need("num_attention_heads")
        dim = need("hidden_size")
        scaling = hf.get("rope_scaling")
        rope_theta = hf.get("rope_theta")
        if isinstance(hf.get("rope_parameters"), dict):  # transformers >= 5 spelling
            params = hf["rope_parameters"]
            rope_theta = params.get("rope_theta", rope_theta)
            scaling = params if params.get("rope_type", "default") != "default" else scaling
        rope = None
        if scaling:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind == "llama3":
                try:
                    rope = RopeScaling(
                        factor=float(scaling["factor"]),
                        low_freq_factor=float(scaling["low_freq_factor"]),
                        high_freq_factor=float(scaling["high_freq_factor"]),
                        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
                    )
                except KeyError as e:
                    raise ValueError(f"{path}: rope_scaling is missing field {e.args[0]!r}") from None
            elif kind != "default":
                raise ValueError(f"{path}: unknown rope_type {kind!r} in rope_scaling (supported: 'llama3', 'default')")
        eos = hf.get("eos_token_id", 128001)
        kw = dict(
            vocab_size=need("vocab_size"),
            dim=dim,
            num_layers=need("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads", heads),
            head_dim=hf.get("head_dim") or dim // heads,
            mlp_dim=need("intermediate_size"),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=rope,
            norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            max_seq_len=int(hf.get("max_position_embeddings", 131072)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=int(hf.get("bos_token_id", 128000)),
            eos_token_ids=tuple(eos) if isinstance(eos, list) else (int(eos),),
        )
        kw.update(overrides)
        return cls(**kw)

    def to_hf(self) -> dict:
        """The transformers `config.json` for this config (export)."""
        rope = None
        if self.rope_scaling is not None:
            rope = dict(rope_type="llama3", **dataclasses.asdict(self.rope_scaling))
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "intermediate_size": self.mlp_dim,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rope_theta": self.rope_theta,
            "rope_scaling": rope,
            "rms_norm_eps": self.norm_eps,
            "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) > 1 else self.eos_token_ids[0],
            "torch_dtype": "bfloat16",
        }


_LLAMA31 = dict(vocab_size=128256, head_dim=128, num_kv_heads=8)

PRESETS: dict[str, LlamaConfig] = {
    "llama3.1-8b": LlamaConfig(dim=4096, mlp_dim=14336, num_layers=32, num_heads=32, **_LLAMA31),
    "llama3.1-70b": LlamaConfig(dim=8192, mlp_dim=28672, num_layers=80, num_heads=64, **_LLAMA31),
    "llama3.1-405b": LlamaConfig(dim=16384, mlp_dim=53248, num_layers=126, num_heads=128, **_LLAMA31),
    # Small enough to train in a minute on a laptop CPU; float32 (its dtype is the jobs' default for it),
    # with the byte-level tokenizer (PRESET_TOKENIZERS).
    "toy": LlamaConfig(
        vocab_size=512, dim=128, mlp_dim=384, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
        max_seq_len=2048, param_dtype="float32", compute_dtype="float32", bos_token_id=256,
        eos_token_ids=(257,),
    ),
}

# The tokenizer a preset comes with, for jobs that run it without a checkpoint: "bytes" is
# model/formats/tokenizer.py's ByteTokenizer (256 bytes + Llama 3's 256 special tokens).
PRESET_TOKENIZERS: dict[str, str] = {"toy": "bytes"}
