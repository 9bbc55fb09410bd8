"""The engine's device step: one jitted function for prefill and decode,

    (weights, cache, Batch) -> ((tokens, log-probs, top ids, top log-probs), cache)

with the cache donated (updated in place). `Batch` holds the per-row inputs (a pytree of [B, T] and [B]
arrays); `StepShape` the static ones (attended cache length, top log-probs, tokens per call), and
`Program` what is fixed for an engine (the network, its mesh and rules, whether the CPU kernels run).
The batch's shapes come from buckets (serve/scheduler.py), so `DeviceStep` compiles once per bucket,
never per request; `compiled_shapes` lists the buckets seen.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.network import kv_cache
from serve import layout
from serve.sampling import SamplingRows
from sharding.rules import use_mesh

log = logging.getLogger("serve.step")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Batch:
    """One step's rows. B rows (the batch bucket; rows past the requests are padding) of T new tokens."""

    tokens: jax.Array  # [B, T] int32
    positions: jax.Array  # [B, T] int32: each token's position in its slot
    segments: jax.Array  # [B, T] int32: 1 for a token, 0 for padding (nothing is written to the cache)
    rows: jax.Array  # [B] int32: each row's cache slot
    last: jax.Array  # [B] int32: the token whose logits are sampled
    sampling: SamplingRows

    @classmethod
    def abstract(cls, B: int, T: int) -> Batch:
        bt, b = jax.ShapeDtypeStruct((B, T), jnp.int32), jax.ShapeDtypeStruct((B,), jnp.int32)
        return cls(bt, bt, bt, b, b, SamplingRows.abstract(B))

    def next(self, tokens_B) -> Batch:
        """The decode batch one token later: the sampled tokens are the new inputs."""
        return dataclasses.replace(self, tokens=tokens_B[:, None], positions=self.positions + 1,
                                   sampling=self.sampling.next())


@dataclasses.dataclass(frozen=True)
class StepShape:
    """The static inputs: one compiled program per value (with the batch's B and T)."""

    kv_len: int  # cache positions attended over
    num_top: int = 0  # top log-probs computed per token
    steps: int = 1  # tokens per row per call (decode only): each sampled token is fed back as the next input


@dataclasses.dataclass(frozen=True)
class Program:
    """What is fixed for an engine."""

    graphdef: nnx.GraphDef
    mesh: jax.sharding.Mesh
    rules: object
    cpu_kernels: bool = False  # products and cache attention by the CPU kernels (serve/layout.py)


def step_fn(program: Program, weights, cache, batch: Batch, shape: StepShape):
    """The engine's one step (prefill chunk or decode): writes the new tokens' keys/values to `cache`, samples
    one token per row at `batch.last`; returns ((tokens, their log-probs, top ids, top log-probs), cache).
    `weights` is in a layout of serve/layout.py. `shape.steps` > 1 (decode only): that many tokens per row,
    each sampled token fed back as the next input; the outputs get a leading [steps] axis."""
    layers = layout.block_layers(weights)
    with use_mesh(program.mesh, program.rules):
        module = nnx.merge(program.graphdef, layout.module_state(weights))

        def one(cache, batch: Batch):
            update = kv_cache.CacheUpdate(cache, batch.rows, shape.kv_len, layers, cpu_kernels=program.cpu_kernels)
            logits, cache = module(batch.tokens, batch.positions, batch.segments, cache=update, logits_at=batch.last)
            return batch.sampling.sample(logits[:, 0], shape.num_top), cache

        if shape.steps == 1:
            return one(cache, batch)

        outs = []
        for _ in range(shape.steps):  # unrolled: in a while loop XLA:CPU copied the cache at every layer's write
            out, cache = one(cache, batch)
            outs.append(out)
            batch = batch.next(out[0])
    return tuple(jnp.stack(o) for o in zip(*outs)), cache


class DeviceStep:
    """`step_fn` jitted for one engine's weights and cache, and the shapes it compiled."""

    def __init__(self, program: Program, weights, cache_shardings):
        self.program = program
        # The step takes the weights as a flat list: flattening nnx Variables at every call costs ~1 ms.
        self.weight_leaves, self._weight_tree = jax.tree.flatten(weights)
        self.jitted = jax.jit(self._fn, static_argnames="shape", donate_argnames="cache",
                              out_shardings=(None, cache_shardings))
        self.compiled_shapes: set[tuple[int, int, int, int, int]] = set()  # (B, T, kv_len, num_top, steps)

    def _fn(self, weight_leaves, cache, batch: Batch, shape: StepShape):
        return step_fn(self.program, jax.tree.unflatten(self._weight_tree, weight_leaves), cache, batch, shape)

    def __call__(self, cache, batch: Batch, shape: StepShape) -> tuple[list[np.ndarray], object]:
        """(host outputs [steps, B, ...], the new cache)."""
        B, T = batch.tokens.shape
        key = (B, T, shape.kv_len, shape.num_top, shape.steps)
        if key not in self.compiled_shapes:
            self.compiled_shapes.add(key)
            log.info("compiling step for batch %d x %d tokens, attention over %d positions%s%s", *key[:3],
                     f", top {shape.num_top} logprobs" if shape.num_top else "",
                     f", {shape.steps} tokens per call" if shape.steps > 1 else "")
        out, cache = self.jitted(self.weight_leaves, cache, batch, shape)
        out = [np.asarray(o) for o in out]
        return (out if shape.steps > 1 else [o[None] for o in out]), cache
