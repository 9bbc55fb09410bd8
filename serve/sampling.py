"""Per-request sampling on device: greedy, temperature, top-k, top-p, seed; log-probabilities.

Every row of a batch carries its own parameters, so requests with different settings decode in the
same step. A row with temperature 0 is greedy (argmax). Sampling is reproducible per request: the
key of a row is `fold_in(key(seed), n)` with n the number of tokens the request has generated so
far, so the same seed gives the same text whatever else shares the batch.

Log-probabilities are those of the model's distribution (log-softmax of the float32 logits, before
temperature / top-k / top-p), as OpenAI's API reports them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

MAX_TOP_LOGPROBS = 20  # OpenAI allows up to 20 alternatives per token


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """One request's settings (validated at the edge: the HTTP layer or the CLI)."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k
    seed: int | None = None  # None: drawn by the engine
    stop: tuple[str, ...] = ()  # stop strings (not included in the output)
    stop_token_ids: tuple[int, ...] = ()  # extra stop ids (the tokenizer's and model's are always on)
    logprobs: int | None = None  # None: none; 0: the chosen token's; k: also the top k alternatives
    ignore_eos: bool = False

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs}")


def sample(logits_BV, temperature_B, top_k_B, top_p_B, seed_B, counter_B, num_top: int = 0):
    """-> (tokens [B] int32, logprob of each token [B], top ids [B, num_top], top logprobs [B, num_top])."""
    logits = logits_BV.astype(jnp.float32)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    greedy = first_argmax(logits)
    sampled_rows = temperature_B > 0

    def draw():
        V = logits.shape[-1]
        z = logits / jnp.maximum(temperature_B, 1e-6)[:, None]
        desc = -jnp.sort(-z, axis=-1)  # [B, V], largest first
        k = jnp.where(top_k_B > 0, jnp.minimum(top_k_B, V), V)
        kth = jnp.take_along_axis(desc, (k - 1)[:, None], axis=-1)  # the k-th largest value
        rank_ok = jnp.arange(V)[None, :] < k[:, None]
        probs = jax.nn.softmax(jnp.where(rank_ok, desc, -jnp.inf), axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above
        keep = rank_ok & (before < top_p_B[:, None])
        n_keep = jnp.maximum(jnp.sum(keep, axis=-1), 1)
        cut = jnp.maximum(jnp.take_along_axis(desc, (n_keep - 1)[:, None], axis=-1), kth)
        z = jnp.where(z >= cut, z, -jnp.inf)
        keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seed_B, counter_B)
        return jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, z).astype(jnp.int32)

    drawn = jax.lax.cond(jnp.any(sampled_rows), draw, lambda: greedy)
    tokens = jnp.where(sampled_rows, drawn, greedy)
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    if num_top:
        top_lp, top_ids = jax.lax.top_k(logprobs, num_top)
    else:
        top_lp = jnp.zeros((logits.shape[0], 0), jnp.float32)
        top_ids = jnp.zeros((logits.shape[0], 0), jnp.int32)
    return tokens, chosen, top_ids.astype(jnp.int32), top_lp


def first_argmax(x_BV):
    """jnp.argmax (the first index of the largest value) in two plain reductions: XLA:CPU's variadic
    argmax reduce takes ~0.2 ms over a 32k vocabulary, this ~0.03 ms."""
    V = x_BV.shape[-1]
    top = jnp.max(x_BV, axis=-1, keepdims=True)
    first = jnp.min(jnp.where(x_BV == top, jnp.arange(V, dtype=jnp.int32), V), axis=-1)
    return jnp.minimum(first, V - 1).astype(jnp.int32)  # NaN rows: the last index rather than out of range


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingRows:
    """The sampling settings of a batch's rows, [B] each: what `sample` takes (host arrays in, device arrays
    inside the step)."""

    temperature: jax.Array  # float32; 0 = greedy
    top_k: jax.Array  # int32; 0 = no top-k
    top_p: jax.Array  # float32
    seed: jax.Array  # uint32
    counter: jax.Array  # int32: tokens the request has generated (the key is fold_in(key(seed), counter))

    @classmethod
    def host(cls, params: list[SamplingParams | None], seeds: list[int], counters: list[int]) -> SamplingRows:
        """Per-row numpy arrays (None rows are padding: greedy)."""
        t = np.array([p.temperature if p else 0.0 for p in params], np.float32)
        k = np.array([p.top_k if p else 0 for p in params], np.int32)
        tp = np.array([p.top_p if p else 1.0 for p in params], np.float32)
        return cls(t, k, tp, np.asarray(seeds, np.uint32), np.asarray(counters, np.int32))

    @classmethod
    def abstract(cls, B: int) -> SamplingRows:
        f32, i32 = jnp.float32, jnp.int32
        return cls(*(jax.ShapeDtypeStruct((B,), d) for d in (f32, i32, f32, jnp.uint32, i32)))

    def sample(self, logits_BV, num_top: int = 0):
        return sample(logits_BV, self.temperature, self.top_k, self.top_p, self.seed, self.counter, num_top)

    def next(self) -> SamplingRows:
        """The rows one token later."""
        return dataclasses.replace(self, counter=self.counter + 1)
