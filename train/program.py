"""TrainProgram: everything a training run compiles, built once. The model's graph, the trainable /
frozen split, the optimizer and its schedule, the shardings of the train state and of the batches,
the abstract train state, the jitted step (donating its state) and the eval function.

The loop builds it from the model it created (`TrainProgram.build`); `--compile-only` and the planner
build the same program from abstract shapes (`TrainProgram.abstract`, `lower_step`) and lower it for
any mesh, a TPU topology compiled ahead of time included.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from model.network.config import LlamaConfig
from model.network.model import abstract_model, state_shardings
from sharding.rules import abstract_arrays
from train.config import OptimizerConfig
from train.step import (
    BATCH_KEYS,
    batch_shardings,
    eval_fn,
    init_train_state,
    make_step_fn,
    optimizer,
    split_trainable,
    train_state_shardings,
)

BATCH_DTYPES = dict(inputs=jnp.int32, targets=jnp.int32, weights=jnp.float32, segments=jnp.int32, positions=jnp.int32)


@dataclasses.dataclass(frozen=True)
class StepShape:
    """The batch one step takes: `batch` global rows of `seq` tokens in `accum` micro-batches."""
    batch: int
    seq: int
    accum: int = 1

    def global_shape(self) -> tuple[int, ...]:
        """[rows, T], or [accum, rows // accum, T] with micro-batches."""
        return (self.batch, self.seq) if self.accum == 1 else (self.accum, self.batch // self.accum, self.seq)


@dataclasses.dataclass(frozen=True)
class TrainProgram:
    """One training run's compiled program (see the module docstring); `build` or `abstract` make one."""
    config: LlamaConfig
    graphdef: nnx.GraphDef
    mesh: Mesh
    shape: StepShape
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    seed: int
    abstract_state: dict  # {"params", "opt", "step", "rng"} as shapes
    state_shardings: dict
    abstract_frozen: nnx.State  # the frozen base (LoRA) or nothing (full fine-tuning), as shapes
    frozen_shardings: nnx.State
    batch_shardings: dict  # a training batch's ([accum,] rows, T)
    eval_shardings: dict  # an eval batch's (rows, T)
    step: Callable  # jitted: (train_state, frozen, batch) -> (train_state, metrics); donates train_state
    evaluate: Callable  # jitted: (params, frozen, batch) -> (summed loss, target tokens)

    @classmethod
    def build(cls, config: LlamaConfig, graphdef: nnx.GraphDef, state: nnx.State, mesh: Mesh, shape: StepShape,
              optimizer_cfg: OptimizerConfig = OptimizerConfig(), total_steps: int = 1000,
              seed: int = 0) -> TrainProgram:
        """The program for a model's `state` (real arrays or abstract shapes) on `mesh`."""
        tx, schedule = optimizer(optimizer_cfg, total_steps)
        trainable, frozen = split_trainable(config, state)
        abstract_state = jax.eval_shape(lambda p: init_train_state(p, tx, seed), trainable)
        s_sh = train_state_shardings(tx, abstract_state, state_shardings(trainable, mesh), mesh)
        dropout = config.lora is not None and config.lora.dropout > 0
        step = jax.jit(make_step_fn(graphdef, tx, mesh, shape.accum, dropout), donate_argnums=0,
                       out_shardings=(s_sh, None))
        return cls(config=config, graphdef=graphdef, mesh=mesh, shape=shape, tx=tx, schedule=schedule, seed=seed,
                   abstract_state=abstract_state, state_shardings=s_sh,
                   abstract_frozen=jax.eval_shape(lambda f: f, frozen), frozen_shardings=state_shardings(frozen, mesh),
                   batch_shardings=batch_shardings(mesh, shape.batch, shape.seq, shape.accum),
                   eval_shardings=batch_shardings(mesh, shape.batch, shape.seq), step=step,
                   evaluate=eval_fn(graphdef, mesh))

    @classmethod
    def abstract(cls, config: LlamaConfig, mesh: Mesh, shape: StepShape,
                 optimizer_cfg: OptimizerConfig = OptimizerConfig(), total_steps: int = 1000,
                 seed: int = 0) -> TrainProgram:
        """The program from abstract shapes only (no weights anywhere; fine for 405B on any mesh)."""
        graphdef, abstract = abstract_model(config)
        return cls.build(config, graphdef, abstract, mesh, shape, optimizer_cfg, total_steps, seed)

    def split(self, state: nnx.State) -> tuple[nnx.State, nnx.State]:
        """(trainable, frozen) of the model's state."""
        return split_trainable(self.config, state)

    def init_state(self, trainable: nnx.State) -> dict:
        """The fresh train state, created in its shardings."""
        return jax.jit(lambda p: init_train_state(p, self.tx, self.seed), out_shardings=self.state_shardings)(trainable)

    def device_batch(self, host: dict[str, np.ndarray], *, eval: bool = False) -> dict[str, jax.Array]:
        """This process's rows of a batch -> global arrays in the batch shardings (multi-host safe)."""
        accum = 1 if eval else self.shape.accum
        shardings = self.eval_shardings if eval else self.batch_shardings
        return {k: jax.make_array_from_process_local_data(shardings[k], v, _global_shape(v, self.shape.batch, accum))
                for k, v in host.items()}

    def flops_per_token(self) -> float:
        """Model FLOPs per trained token (for MFU)."""
        return self.config.train_flops_per_token(self.shape.seq, lora_only=self.config.lora is not None)

    def trace(self) -> jax.stages.Traced:
        """The step traced from abstract shapes for this program's mesh."""
        glob = self.shape.global_shape()
        batch = {k: jax.ShapeDtypeStruct(glob, BATCH_DTYPES[k], sharding=self.batch_shardings[k]) for k in BATCH_KEYS}
        return self.step.trace(abstract_arrays(self.abstract_state, self.state_shardings),
                               abstract_arrays(self.abstract_frozen, self.frozen_shardings), batch)

    def lower(self) -> jax.stages.Lowered:
        """The step lowered from abstract shapes for this program's mesh."""
        return self.trace().lower()


def _global_shape(local: np.ndarray, rows: int, accum: int) -> tuple[int, ...]:
    """A process's [local rows, T] (or [accum, local rows, T]) -> the global array's shape."""
    if accum == 1 or local.ndim == 2:
        return (rows, *local.shape[1:])
    return (local.shape[0], rows // accum, *local.shape[2:])


def lower_step(cfg: LlamaConfig, mesh: Mesh, *, batch: int, seq: int, accum: int = 1,
               optimizer_cfg: OptimizerConfig | None = None, total_steps: int = 1000) -> jax.stages.Lowered:
    """The real training step for `mesh`, lowered from abstract shapes: the planner's (and
    `--compile-only`'s) view of train."""
    return trace_step(cfg, mesh, batch=batch, seq=seq, accum=accum, optimizer_cfg=optimizer_cfg,
                      total_steps=total_steps).lower()


def trace_step(cfg: LlamaConfig, mesh: Mesh, *, batch: int, seq: int, accum: int = 1,
               optimizer_cfg: OptimizerConfig | None = None, total_steps: int = 1000) -> jax.stages.Traced:
    """The real training step for `mesh`, traced from abstract shapes (its jaxpr: planner/flops.py)."""
    program = TrainProgram.abstract(cfg, mesh, StepShape(batch, seq, accum), optimizer_cfg or OptimizerConfig(),
                                    total_steps)
    return program.trace()
