"""The training step's parts: LoRA (only adapters differentiated and optimised) or full fine-tuning.

The optimizer and its schedule, the trainable/frozen split, the loss, the step and eval functions,
the train state and its shardings. train/program.py puts them together once (TrainProgram): the
jitted donating step the loop runs, and the same step lowered from abstract shapes for any mesh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from model.network import lora
from model.network.config import LlamaConfig
from sharding.rules import named_sharding, use_mesh
from train.config import OptimizerConfig

BATCH_KEYS = ("inputs", "targets", "weights", "segments", "positions")


def optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    decay = max(total_steps - cfg.warmup_steps, 1)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, max(cfg.warmup_steps, 1), cfg.warmup_steps + decay,
        end_value=cfg.learning_rate * cfg.min_lr_ratio)
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay),
    ), schedule


def trainable_filter(cfg: LlamaConfig):
    return nnx.LoRAParam if cfg.lora is not None else nnx.Param


def split_trainable(cfg: LlamaConfig, state: nnx.State) -> tuple[nnx.State, nnx.State]:
    """(trainable, frozen): adapters and the base with LoRA; everything and nothing without."""
    trainable, frozen = nnx.split_state(state, trainable_filter(cfg), ...)
    return trainable, frozen


def batch_shardings(mesh: Mesh, batch: int, seq: int, accum: int = 1) -> dict:
    names = ("batch", "length") if accum == 1 else (None, "batch", "length")
    shape = (batch, seq) if accum == 1 else (accum, batch // accum, seq)
    return {k: named_sharding(names, mesh, shape, what=f"batch[{k!r}]") for k in BATCH_KEYS}


def loss_and_count(graphdef, trainable, frozen, batch, key):
    module = nnx.merge(graphdef, trainable, frozen)
    with lora.dropout_key(key):
        logits = module(batch["inputs"], batch["positions"], batch["segments"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    w = batch["weights"]
    return (ce * w).sum(), w.sum()


def make_step_fn(graphdef, tx: optax.GradientTransformation, mesh: Mesh, accum: int, dropout: bool):
    """step(train_state, frozen, batch) -> (train_state, metrics). With accum > 1 the batch arrays
    are [accum, rows, T] and gradients are summed over micro-batches before one update."""
    grad_fn = jax.value_and_grad(loss_and_count, argnums=1, has_aux=True)

    def step(state, frozen, batch):
        with use_mesh(mesh):
            params, step_no = state["params"], state["step"]
            key = jax.random.fold_in(state["rng"], step_no) if dropout else None

            def micro(carry, mb):
                g_sum, l_sum, n_sum, i = carry
                k = None if key is None else jax.random.fold_in(key, i)
                (loss, n), g = grad_fn(graphdef, params, frozen, mb, k)
                return (jax.tree.map(jnp.add, g_sum, g), l_sum + loss, n_sum + n, i + 1), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            if accum == 1:
                (grads, loss, count, _), _ = micro((zeros, 0.0, 0.0, 0), batch)
            else:
                (grads, loss, count, _), _ = jax.lax.scan(micro, (zeros, 0.0, 0.0, 0), batch)
            count = jnp.maximum(count, 1.0)
            grads = jax.tree.map(lambda g: (g / count).astype(g.dtype), grads)  # keep bf16 grads bf16
            grad_norm = optax.tree.norm(grads)
            updates, opt_state = tx.update(grads, state["opt"], params)
            params = optax.apply_updates(params, updates)
            new = dict(state, params=params, opt=opt_state, step=step_no + 1)
            return new, {"loss": loss / count, "grad_norm": grad_norm, "tokens": count}

    return step


def eval_fn(graphdef, mesh):
    def evaluate(params, frozen, batch):
        with use_mesh(mesh):
            loss, n = loss_and_count(graphdef, params, frozen, batch, None)
        return loss, n
    return jax.jit(evaluate)


def init_train_state(params: nnx.State, tx, seed: int) -> dict:
    return {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(seed))}


def train_state_shardings(tx, abstract_state: dict, params_sharding, mesh: Mesh) -> dict:
    """Optimizer moments shard like their parameters; counters and the rng are replicated."""
    replicated = NamedSharding(mesh, P())
    like_params = jax.tree.map(lambda v, s: v.replace(value=s), abstract_state["params"], params_sharding,
                               is_leaf=lambda x: isinstance(x, nnx.Variable))
    opt = optax.tree_map_params(tx, lambda _, s: s, abstract_state["opt"], like_params,
                                transform_non_params=lambda _: replicated)
    return {"params": like_params, "opt": opt, "step": replicated, "rng": replicated}
