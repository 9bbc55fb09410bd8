"""The training job's config: one frozen dataclass per concern. YAML in configs/ only sets values."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from model.job import resolve, settings
from model.network.lora import LoraConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclasses.dataclass(frozen=True)
class ModelSpec(resolve.ModelSpec):
    """The shared model spec (model/job/resolve.py: preset, checkpoint, dtype, quant, attention, …) plus:"""

    remat: str = "full"  # none | full | dots | attn_proj | auto (the least recomputation that fits: planner/remat.py)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    train: str = "toy"  # JSONL path, or "toy": the bundled generated task (train/toy_data.py)
    eval: str | None = "toy"
    tokenizer: str | None = None  # tokenizer.json / tokenizer.model / "bytes"; default: the checkpoint's
    seq_len: int = 128
    batch_size: int = 16  # global rows per step (before gradient accumulation)
    grad_accum: int = 1
    seed: int = 0
    overlong: str = "truncate"  # truncate | drop
    max_bad_fraction: float = 0.01


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 3e-3
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float = 1.0


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 50  # steps
    keep: int = 3


@dataclasses.dataclass(frozen=True)
class WandbConfig:
    """Weights & Biases logging beside metrics.jsonl and TensorBoard (process 0; `pip install -e ".[wandb]"`).
    WANDB_API_KEY, WANDB_MODE (offline: files only) and the other WANDB_* variables are honoured."""

    enabled: bool = False
    project: str = "llama-jax"
    entity: str | None = None
    name: str | None = None  # default: the output directory's name


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: ModelSpec = ModelSpec()
    lora: LoraConfig = LoraConfig()
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    wandb: WandbConfig = WandbConfig()
    mesh: str = "fsdp=-1"  # axis=size pairs; see sharding/mesh.py
    topology: str | None = None  # compile for this TPU topology (e.g. v6e-16) with --compile-only
    # fraction of device memory to keep free: --compile-only's verdict and model.remat=auto's choice (in the
    # config, so every worker of a pod run takes the same; `--headroom` on the command line sets it too)
    headroom: float = 0.0
    steps: int = 100  # total; the learning-rate schedule spans these
    stop_after: int | None = None  # end this run at this step (checkpointed; rerun to continue)
    log_every: int = 5
    eval_every: int = 25
    eval_batches: int = 4
    output_dir: str = "runs/toy"
    seed: int = 0
    profile_steps: tuple[int, ...] = ()  # (first, last): write a profiler trace of these steps

    def __post_init__(self):
        if not 0.0 <= self.headroom < 1.0:
            raise ValueError(f"headroom must be a fraction in [0, 1), got {self.headroom}")


def load_config(path: str | None, overrides: list[str] = ()) -> TrainConfig:
    """`path` None is the embedded default, configs/toy_cpu.yaml."""
    return settings.load(TrainConfig, path or "toy_cpu", overrides, search_dir=CONFIG_DIR)
