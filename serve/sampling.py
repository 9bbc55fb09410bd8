"""Per-request sampling on device: greedy, temperature, top-k, top-p, seed; log-probabilities; repetition,
presence and frequency penalties and min_tokens.

Every row of a batch carries its own parameters, so requests with different settings decode in the
same step. A row with temperature 0 is greedy (argmax). Sampling is reproducible per request: the
key of a row is `fold_in(key(seed), n)` with n the number of tokens the request has generated so
far, so the same seed gives the same text whatever else shares the batch.

Log-probabilities are those of the model's distribution (log-softmax of the float32 logits, before
penalties, temperature / top-k / top-p), as OpenAI's API and vLLM (its default `raw_logprobs`) report them.

Penalties (`Penalties`, present only when a row of the step asks for one, so the default step is compiled
without them): `repetition_penalty` as transformers' RepetitionPenaltyLogitsProcessor and vLLM, over the
prompt and the output tokens (a seen token's logit divided by it when positive, multiplied when not);
`presence_penalty` and `frequency_penalty` as OpenAI's, over the output tokens (logit - freq * count -
presence * [count > 0]); `min_tokens`: the stop token ids are masked until that many tokens were generated.
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
    prompt_logprobs: int | None = None  # None: none; k: each prompt token's log-prob and the top k (echo)
    min_tokens: int = 0  # stop ids and stop strings take effect only from this many generated tokens on
    repetition_penalty: float = 1.0  # 1 = none
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    skip_special_tokens: bool = True  # special tokens (<|eot_id|>, reserved ones) are not in the text
    include_stop_str_in_output: bool = False

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and not 0 <= v <= MAX_TOP_LOGPROBS:
                raise ValueError(f"{name} must be in [0, {MAX_TOP_LOGPROBS}], got {v}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise ValueError(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")

    @property
    def penalized(self) -> bool:
        """Whether this request's logits are changed before sampling (the step then carries `Penalties`)."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.min_tokens > 0)


def sample(logits_BV, temperature_B, top_k_B, top_p_B, seed_B, counter_B, num_top: int = 0, penalties=None,
           stats=None):
    """-> (tokens [B] int32, logprob of each token [B], top ids [B, num_top], top logprobs [B, num_top]).
    With `penalties` (a `Penalties`), the tokens are drawn from the penalized logits; the log-probs are the
    model's. `stats` computes `logit_stats` (default: this module's, in XLA ops). `logits_BV` may be in the
    model's compute dtype: nothing below makes a float32 [B, V] copy unless it is used (a drawn row, top
    log-probs, penalties)."""
    x = logits_BV.astype(jnp.float32)  # the model's: what the log-probs report
    penalized = None if penalties is None else penalties.apply(x, counter_B)
    first, top, log_sum = (stats or logit_stats)(logits_BV)
    greedy = first if penalized is None else first_argmax(penalized)
    sampled_rows = temperature_B > 0

    def draw():  # converts inside the branch: a greedy step never writes the float32 copy
        logits = logits_BV.astype(jnp.float32) if penalized is None else penalized
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
    # log_softmax(x)_i = (x_i - max) - log(sum(exp(x - max))), for the few i wanted: no [B, V] array of them
    chosen = (jnp.take_along_axis(logits_BV, tokens[:, None], axis=-1)[:, 0].astype(jnp.float32) - top) - log_sum
    top_ids, top_x = top_logprobs(x, num_top)
    top_lp = (top_x - top[:, None]) - log_sum[:, None]
    return tokens, chosen, top_ids, top_lp


def logit_stats(x_BV):
    """Logits [B, V] -> (first index of the largest value [B] int32: the greedy token; the largest
    value [B]; log Σ exp(x − max) [B]): a token's log-prob is x − max − the last. On one CPU device the
    engine passes model.network.backends.cpu_kernels.logit_stats instead, the same in one call (XLA:CPU
    writes and reads back several [B, V] arrays here: ~3 ms of a 64-row decode token at a 32k vocabulary)."""
    x = x_BV.astype(jnp.float32)
    top = jnp.max(x, axis=-1)
    return first_argmax(x), top, jnp.log(jnp.sum(jnp.exp(x - top[:, None]), axis=-1))


def top_logprobs(logprobs_BV, num_top: int):
    """(ids [B, num_top] int32, log-probs [B, num_top]) of the most likely tokens, best first."""
    if not num_top:
        B = logprobs_BV.shape[0]
        return jnp.zeros((B, 0), jnp.int32), jnp.zeros((B, 0), jnp.float32)
    top_lp, top_ids = jax.lax.top_k(logprobs_BV, num_top)
    return top_ids.astype(jnp.int32), top_lp


def token_logprobs(logits_TV, next_T, num_top: int):
    """Prompt log-probs: (log-prob of next_T at each position [T], top ids [T, num_top], their log-probs)."""
    logprobs = jax.nn.log_softmax(logits_TV.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(logprobs, next_T[:, None], axis=-1)[:, 0]
    return (chosen, *top_logprobs(logprobs, num_top))


def first_argmax(x_BV):
    """jnp.argmax (the first index of the largest value) in two plain reductions: XLA:CPU's variadic
    argmax reduce takes ~0.2 ms over a 32k vocabulary, this ~0.03 ms."""
    V = x_BV.shape[-1]
    top = jnp.max(x_BV, axis=-1, keepdims=True)
    first = jnp.min(jnp.where(x_BV == top, jnp.arange(V, dtype=jnp.int32), V), axis=-1)
    return jnp.minimum(first, V - 1).astype(jnp.int32)  # NaN rows: the last index rather than out of range


NO_TOKEN = 2**30  # pads token lists: out of range of any vocabulary, so scatters drop it


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Penalties:
    """What the penalties and min_tokens of a batch's rows need, [B, ...] each: every row's tokens so far
    (prompt then output, NO_TOKEN-padded to a bucket L with room for the tokens of one call), gathered per
    token into [B, V] counts on device (a few KB from the host, not a [B, V] array)."""

    history: jax.Array  # [B, L] int32
    length: jax.Array  # [B] int32: tokens in history
    prompt_len: jax.Array  # [B] int32: history[:prompt_len] is the prompt
    repetition: jax.Array  # [B] float32
    presence: jax.Array  # [B] float32
    frequency: jax.Array  # [B] float32
    min_tokens: jax.Array  # [B] int32
    stop_ids: jax.Array  # [B, K] int32: masked while fewer than min_tokens were generated (NO_TOKEN-padded)

    @classmethod
    def host(cls, params: list[SamplingParams | None], histories: list[tuple[list[int], list[int]]],
             stop_ids: frozenset[int], room: int) -> Penalties:
        """`histories` (prompt, generated) per row (padding rows past them); `room`: tokens one call appends."""
        B = len(params)
        lens = [len(p) + len(g) for p, g in histories] + [0] * (B - len(histories))
        L = 1 << max(max(lens) + room - 1, 15).bit_length()  # a power of two >= 16
        history = np.full((B, L), NO_TOKEN, np.int32)
        for i, (p, g) in enumerate(histories):
            history[i, :len(p)] = p
            history[i, len(p):lens[i]] = g
        bans = [sorted(set(p.stop_token_ids) | (set() if p.ignore_eos else set(stop_ids))) if p else [] for p in params]
        K = max(1, max(len(b) for b in bans))
        ban = np.full((B, K), NO_TOKEN, np.int32)
        for i, b in enumerate(bans):
            ban[i, :len(b)] = b

        def f(name, default, dtype):
            return np.array([getattr(p, name) if p else default for p in params], dtype)

        prompt_len = np.array([len(p) for p, _ in histories] + [0] * (B - len(histories)), np.int32)
        return cls(history, np.asarray(lens, np.int32), prompt_len, f("repetition_penalty", 1.0, np.float32),
                   f("presence_penalty", 0.0, np.float32), f("frequency_penalty", 0.0, np.float32),
                   f("min_tokens", 0, np.int32), ban)

    def apply(self, logits_BV, generated_B):
        """The penalized logits; `generated_B`: tokens each row has generated before this one."""
        B, V = logits_BV.shape
        rows = jnp.arange(B)[:, None]
        pos = jnp.arange(self.history.shape[1])[None, :]
        valid = pos < self.length[:, None]
        ids = jnp.where(valid, self.history, NO_TOKEN)
        is_output = (valid & (pos >= self.prompt_len[:, None])).astype(jnp.float32)
        counts = jnp.zeros((B, V), jnp.float32).at[rows, ids].add(is_output, mode="drop")
        seen = jnp.zeros((B, V), jnp.bool_).at[rows, ids].set(True, mode="drop")
        rep = self.repetition[:, None]
        x = jnp.where(seen, jnp.where(logits_BV > 0, logits_BV / rep, logits_BV * rep), logits_BV)
        x = x - self.frequency[:, None] * counts - self.presence[:, None] * (counts > 0)
        banned = jnp.zeros((B, V), jnp.bool_).at[rows, self.stop_ids].set(True, mode="drop")
        return jnp.where(banned & (generated_B < self.min_tokens)[:, None], -jnp.inf, x)

    def next(self, tokens_B) -> Penalties:
        """One token later: the sampled tokens appended."""
        B = tokens_B.shape[0]
        history = self.history.at[jnp.arange(B), self.length].set(tokens_B, mode="drop")
        return dataclasses.replace(self, history=history, length=self.length + 1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingRows:
    """The sampling settings of a batch's rows, [B] each: what `sample` takes (host arrays in, device arrays
    inside the step). `penalties` is None unless a row has one (then the step is compiled with them)."""

    temperature: jax.Array  # float32; 0 = greedy
    top_k: jax.Array  # int32; 0 = no top-k
    top_p: jax.Array  # float32
    seed: jax.Array  # uint32
    counter: jax.Array  # int32: tokens the request has generated (the key is fold_in(key(seed), counter))
    penalties: Penalties | None = None

    @classmethod
    def host(cls, params: list[SamplingParams | None], seeds: list[int], counters: list[int],
             histories: list[tuple[list[int], list[int]]] | None = None, stop_ids: frozenset[int] = frozenset(),
             room: int = 1) -> SamplingRows:
        """Per-row numpy arrays (None rows are padding: greedy). `histories` (prompt, generated) of the rows,
        `stop_ids` (the ones min_tokens masks besides a request's own) and `room` (tokens per call) are
        needed when a row is penalized."""
        t = np.array([p.temperature if p else 0.0 for p in params], np.float32)
        k = np.array([p.top_k if p else 0 for p in params], np.int32)
        tp = np.array([p.top_p if p else 1.0 for p in params], np.float32)
        penalties = None
        if any(p is not None and p.penalized for p in params):
            penalties = Penalties.host(params, histories or [([], [])] * len(params), stop_ids, room)
        return cls(t, k, tp, np.asarray(seeds, np.uint32), np.asarray(counters, np.int32), penalties)

    @classmethod
    def abstract(cls, B: int) -> SamplingRows:
        f32, i32 = jnp.float32, jnp.int32
        return cls(*(jax.ShapeDtypeStruct((B,), d) for d in (f32, i32, f32, jnp.uint32, i32)))

    def sample(self, logits_BV, num_top: int = 0, stats=None):
        return sample(logits_BV, self.temperature, self.top_k, self.top_p, self.seed, self.counter, num_top,
                      self.penalties, stats)

    def next(self, tokens_B=None) -> SamplingRows:
        """The rows one token later (`tokens_B`, the sampled ones, extend the penalties' histories)."""
        penalties = self.penalties if self.penalties is None else self.penalties.next(tokens_B)
        return dataclasses.replace(self, counter=self.counter + 1, penalties=penalties)
