"""The engine's device step: one jitted function for every step (prompt chunks and decode tokens together),

    (weights, pool, Batch) -> ((tokens, log-probs, top ids, top log-probs), pool)

with the KV pool (model/network/kv_cache.py `KVPool`) donated (updated in place). `Batch` holds one
ragged step: T tokens of S sequences flattened into one row, each sequence's query tokens the last of its
keys, which sit in the pool's blocks (model/network/paged_attention.py `PagedMeta`); each sequence
samples one token at its last query token. `StepShape` holds the static inputs (top log-probs, tokens per
call) and `Program` what is fixed for an engine (the network, its mesh and rules, which kernels run).
T, S and the pages per sequence come from buckets (serve/scheduler.py), so `DeviceStep` compiles once
per bucket, never per request; `compiled_shapes` lists the buckets seen.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.network import kv_cache, lora
from model.network.backends import cpu_kernels
from model.network.paged_attention import PagedMeta
from serve import layout
from serve import sampling
from serve.sampling import SamplingRows
from sharding.rules import use_mesh

log = logging.getLogger("serve.step")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Batch:
    """One step: T tokens (a bucket; padding at the end) of S sequences (a bucket; padding rows last)."""

    tokens: jax.Array  # [T] int32
    positions: jax.Array  # [T] int32: each token's position in its sequence
    meta: PagedMeta  # where the tokens write, what each sequence attends to
    last: jax.Array  # [S] int32: each sequence's last token in this step (its logits are sampled)
    sampling: SamplingRows  # [S]
    adapters: jax.Array  # [T] int32: each token's LoRA slot row (0: the base; model/network/lora.py token_slots)
    next_tokens: jax.Array | None = None  # [T] int32, with prompt log-probs: the token each position predicts

    @classmethod
    def abstract(cls, T: int, S: int, P: int) -> Batch:
        t, s = jax.ShapeDtypeStruct((T,), jnp.int32), jax.ShapeDtypeStruct((S,), jnp.int32)
        return cls(t, t, PagedMeta.abstract(T, S, P), s, SamplingRows.abstract(S), t)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(T, S, P)."""
        return self.tokens.shape[0], self.last.shape[0], self.meta.page_indices.shape[1]

    def next(self, tokens_S, block_size: int) -> Batch:
        """A decode step (one token per sequence, T == S) one token later: the sampled tokens are the new
        inputs, written one position further (to the scratch block past a sequence's pages)."""
        m = self.meta
        live = m.kv_lens > 0
        positions = self.positions + 1
        page = positions // block_size
        P = m.page_indices.shape[1]
        blk = jnp.take_along_axis(m.page_indices, jnp.minimum(page, P - 1)[:, None], axis=1)[:, 0]
        slots = jnp.where(live & (page < P), blk * block_size + positions % block_size, 0)
        # a request that reached max_len inside the call runs on (its tokens are dropped) within its P pages
        kv_lens = jnp.minimum(m.kv_lens + live, P * block_size)
        meta = dataclasses.replace(m, slot_mapping=slots.astype(jnp.int32), kv_lens=kv_lens)
        return dataclasses.replace(self, tokens=tokens_S, positions=positions, meta=meta,
                                   sampling=self.sampling.next(tokens_S))


@dataclasses.dataclass(frozen=True)
class StepShape:
    """The static inputs: one compiled program per value (with the batch's T, S and P)."""

    num_top: int = 0  # top log-probs computed per token
    steps: int = 1  # tokens per sequence per call (decode only): each sampled token is fed back as the next input
    prompt_logprobs: bool = False  # also the log-prob of `next_tokens` and the top ones at every token (echo)


@dataclasses.dataclass(frozen=True)
class Program:
    """What is fixed for an engine."""

    graphdef: nnx.GraphDef
    mesh: jax.sharding.Mesh
    rules: object
    cpu_kernels: bool = False  # products by the CPU kernels (serve/layout.py)
    attention: str = "xla"  # the paged attention implementation (model/network/paged_attention.py)


def step_fn(program: Program, weights, cache, batch: Batch, shape: StepShape):
    """The engine's one step: writes the new tokens' keys/values to the pool, samples one token per sequence
    at `batch.last`; returns ((tokens, their log-probs, top ids, top log-probs), pool). `weights` is in a
    layout of serve/layout.py. `shape.steps` > 1 (decode only): that many tokens per sequence, each sampled
    token fed back as the next input; the outputs get a leading [steps] axis."""
    layers = layout.block_layers(weights)
    with use_mesh(program.mesh, program.rules), lora.token_slots(batch.adapters[None]):
        module = nnx.merge(program.graphdef, layout.module_state(weights))

        def one(cache, batch: Batch):
            update = kv_cache.CacheUpdate(cache, batch.meta, program.attention, layers,
                                          kv_cache.as_bits(program.mesh.devices.flat[0].platform))
            at = jnp.arange(batch.tokens.shape[0]) if shape.prompt_logprobs else batch.last
            logits, cache = module(batch.tokens[None], batch.positions[None], cache=update, logits_at=at)
            out = batch.sampling.sample(logits[batch.last, 0] if shape.prompt_logprobs else logits[:, 0], shape.num_top,
                                        cpu_kernels.logit_stats if program.cpu_kernels else None)
            if shape.prompt_logprobs:  # gathered per token on device: [T] and [T, k] go to the host, not [T, V]
                out += sampling.token_logprobs(logits[:, 0], batch.next_tokens, sampling.MAX_TOP_LOGPROBS)
            return out, cache

        if shape.steps == 1:
            return one(cache, batch)

        outs = []
        for _ in range(shape.steps):  # unrolled: in a while loop XLA:CPU copied the cache at every layer's write
            out, cache = one(cache, batch)
            outs.append(out)
            batch = batch.next(out[0], cache.block_size)
    return tuple(jnp.stack(o) for o in zip(*outs)), cache


class DeviceStep:
    """`step_fn` jitted for one engine's weights and pool, and the shapes it compiled."""

    def __init__(self, program: Program, weights, cache_shardings):
        self.program = program
        # The step takes the weights as a flat list: flattening nnx Variables at every call costs ~1 ms.
        self.weight_leaves, self._weight_tree = jax.tree.flatten(weights)
        self.jitted = jax.jit(self._fn, static_argnames="shape", donate_argnames="cache",
                              out_shardings=(None, cache_shardings))
        self.compiled_shapes: set[tuple] = set()  # (T, S, P, num_top, steps[, opt-in path labels])

    def set_weights(self, weights):
        """New values of the same weights (an adapter loaded into a slot): same shapes, no recompile."""
        leaves, tree = jax.tree.flatten(weights)
        assert tree == self._weight_tree
        self.weight_leaves = leaves

    def _fn(self, weight_leaves, cache, batch: Batch, shape: StepShape):
        return step_fn(self.program, jax.tree.unflatten(self._weight_tree, weight_leaves), cache, batch, shape)

    def __call__(self, cache, batch: Batch, shape: StepShape) -> tuple[list[np.ndarray], object]:
        """(host outputs [steps, S, ...], the new pool)."""
        key = (*batch.shape, shape.num_top, shape.steps)
        pen = batch.sampling.penalties  # the opt-in paths add a label (the default key is as it was)
        key += ((f"penalties L={pen.history.shape[1]} K={pen.stop_ids.shape[1]}",) if pen is not None else ()) + \
            (("prompt_logprobs",) if shape.prompt_logprobs else ())
        if key not in self.compiled_shapes:
            self.compiled_shapes.add(key)
            log.info("compiling step for %d tokens of %d sequences, %d pages each%s%s%s", *key[:3],
                     f", top {shape.num_top} logprobs" if shape.num_top else "",
                     f", {shape.steps} tokens per call" if shape.steps > 1 else "", "".join(f", {x}" for x in key[5:]))
        out, cache = self.jitted(self.weight_leaves, cache, batch, shape)
        out = [np.asarray(o) for o in out]
        return (out if shape.steps > 1 else [o[None] for o in out]), cache
