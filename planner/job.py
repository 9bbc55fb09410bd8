"""The job to plan (model, mode, quantization, batch and sequence, LoRA, remat, depth), the Llama
config it runs (through model.job.resolve, as train/ and serve/ build theirs), and `Programs`: the
jobs' functions the planner is given instead of importing them."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import jax

from model.job import resolve
from model.network import lora as lora_lib
from model.network.config import PRESETS, LlamaConfig
from model.network.llama import REMAT_POLICIES

MODES = ("serve", "lora", "qlora", "full")
QUANTS = ("bf16", "int8", "int4")


class PlanError(ValueError):
    """Bad input: the message names what is wrong and what would be valid."""


@dataclasses.dataclass(frozen=True)
class Job:
    model: str = "llama3.1-405b"  # preset name or a Hugging Face config.json (or its directory)
    mode: str = "lora"  # serve | lora | qlora | full
    quant: str = "bf16"  # base weights: bf16 | int8 | int4
    batch: int | None = None  # global rows per (micro-)step; default: one per data x fsdp shard
    seq: int = 4096  # training sequence length / serving prompt (prefill) length
    kv_len: int | None = None  # serving: KV-cache length per sequence (default: seq)
    lora_rank: int = 16
    lora_targets: tuple[str, ...] = lora_lib.TARGETS
    remat: str = "full"  # none | full | dots | attn_proj | auto (planner/remat.py: the cheapest that fits)
    accum: int = 1  # gradient accumulation: micro-batches of batch // accum rows
    layers: int | None = None  # reduced depth (tests, quick checks)

    def validate(self) -> None:
        if self.mode not in MODES:
            raise PlanError(f"--mode {self.mode!r}: expected one of {', '.join(MODES)}")
        if self.quant not in QUANTS:
            raise PlanError(f"--quant {self.quant!r}: expected one of {', '.join(QUANTS)}")
        if self.mode == "qlora" and self.quant == "bf16":
            raise PlanError("--mode qlora needs a quantized base: --quant int4 or int8 (bf16 base: --mode lora)")
        if self.mode == "lora" and self.quant != "bf16":
            raise PlanError(f"--mode lora trains adapters on a bf16 base; with --quant {self.quant} use --mode qlora")
        if self.mode == "full" and self.quant != "bf16":
            raise PlanError("--mode full trains every weight: it needs --quant bf16")
        if self.remat not in (*REMAT_POLICIES, "auto"):
            raise PlanError(f"--remat {self.remat!r}: expected one of {', '.join(REMAT_POLICIES)} or auto")
        for name, v in (("--seq", self.seq), ("--lora-rank", self.lora_rank), ("--accum", self.accum)):
            if v < 1:
                raise PlanError(f"{name} must be >= 1, got {v}")
        if self.batch is not None and (self.batch < 1 or self.batch % self.accum):
            raise PlanError(f"--batch {self.batch} must be a positive multiple of --accum {self.accum}")

    @property
    def training(self) -> bool:
        return self.mode != "serve"


def model_config(job: Job) -> LlamaConfig:
    """The LlamaConfig the job runs: quantized base, adapters, remat policy, depth."""
    quant = None if job.quant == "bf16" else job.quant
    if job.model in PRESETS:
        spec = resolve.ModelSpec(preset=job.model, quant=quant)
    elif Path(job.model).exists():
        spec = resolve.ModelSpec(checkpoint=job.model, quant=quant)
    else:
        raise PlanError(f"unknown model {job.model!r}: give a preset ({', '.join(PRESETS)}) or the path of a "
                        f"Hugging Face config.json")
    if job.remat == "auto":
        raise PlanError("remat=auto is resolved by the planner's search (planner/remat.py) before a config is built")
    overrides = dict(remat=job.remat, lora=None)
    if job.layers:
        overrides["num_layers"] = job.layers
    try:
        if job.mode in ("lora", "qlora"):
            overrides["lora"] = lora_lib.LoraConfig(rank=job.lora_rank, alpha=2.0 * job.lora_rank,
                                                    targets=tuple(job.lora_targets))
        return resolve.model_config(spec, **overrides)
    except (ValueError, FileNotFoundError) as e:
        raise PlanError(str(e)) from None


@dataclasses.dataclass(frozen=True)
class Programs:
    """What the planner needs of the jobs it plans, handed in by an entry point (planner/__main__.py:
    train's and serve's; train/__main__.py: train's own, with the run's optimizer)."""

    # (mcfg, mesh, *, batch, seq, accum) -> the training step lowered from abstract shapes
    lower_train: Callable[..., jax.stages.Lowered]
    # serve.compile_check.lower_step: (mcfg, mesh, *, tokens, seqs, max_len, kv_tokens, kv_dtype, rules)
    lower_serve: Callable[..., jax.stages.Lowered] | None = None
    # (mcfg, mesh, *, batch, seq, accum) -> the training step traced (planner/flops.py counts its jaxpr)
    trace_train: Callable[..., jax.stages.Traced] | None = None
