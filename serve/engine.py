"""The serving engine: continuous batching over a preallocated, sharded KV cache.

    engine = Engine(model, tokenizer, EngineConfig(max_slots=8, max_len=2048))
    engine.start()                                   # a background thread runs the loop
    rid = engine.submit(prompt_ids, SamplingParams(max_tokens=64, temperature=0), emit=on_event)
    engine.cancel(rid)                               # e.g. the client went away: the slot frees now

The cache has `max_slots` slots of `max_len` positions (model/kv_cache.py). Each loop iteration:
  1. takes new requests and cancellations; a waiting request joins as soon as a slot is free;
  2. runs one prefill step: the next chunk (<= prefill_chunk tokens) of up to several prompts, packed
     into one [B, T] call within a token budget (prefill_tokens), so a long prompt takes several
     iterations and never stalls the decoding slots for long; a prompt's last chunk samples its first
     token;
  3. runs one decode step: new tokens for every request that is decoding (`decode_steps` of them per
     call while no prompt waits, which spreads the host's per-call cost over several tokens; else one).
Finished requests (stop token, stop string, max_tokens, cache full) leave their slot at once.

Prefill and decode are the same jitted function `(weights, cache, tokens [B, T], ...) -> (next
tokens, log-probs, cache)`, with the cache donated (updated in place). Its shapes come from buckets:
B a power of two up to max_slots, T = 1 for decode or a power of two up to prefill_chunk, and the
attended cache length a power of two from min_kv_bucket up to max_len. So it compiles once per
bucket, never per request; `compiled_shapes` lists the buckets seen.

Weights: on accelerators the step scans over the stacked layer weights (compile time independent of
depth). On one CPU device (`layout` auto) the engine keeps per-layer copies and unrolls the loop, and
packs the Dense kernels for model/cpu_gemv.cc, which then runs every product (decode and prefill):
XLA:CPU copies each layer's slice out of a stacked weight and converts 16-bit and integer weights to
float32 before a dot, which made decoding several times slower than the weight read itself
(bench/serve.py, BENCHMARKS.md).

Events (`Event`) go to each request's `emit` callback from the engine thread: text deltas (complete
UTF-8 only; text that may be the start of a stop string is held back until it is known not to be),
token ids, optional log-probabilities, and at the end the finish reason and token counts.
"""

from __future__ import annotations

import codecs
import collections
import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.network import cpu_kernels, kv_cache
from model.network.model import Model
from serve import sampling
from serve.config import EngineConfig
from serve.sampling import SamplingParams
from sharding.rules import use_mesh

log = logging.getLogger("serve.engine")


@dataclasses.dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    bytes: list[int]
    top: list[tuple[int, str, float]]  # (id, text, logprob) alternatives, best first


@dataclasses.dataclass
class Event:
    request_id: str
    text: str = ""  # new text since the previous event
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # stop | length | cancelled | error
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    ttft: float | None = None  # seconds from submit to the first token (first event only)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class TextStream:
    """Incremental detokenization with stop strings: UTF-8 characters are only emitted whole, and a
    tail that could be the beginning of a stop string is held back."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tok = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending = ""

    def push(self, token_id: int) -> tuple[str, bool]:
        """(text to emit now, whether a stop string ended the text)."""
        self.pending += self.dec.decode(self.tok.token_bytes(token_id))
        if self.stop:
            hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
            if hits:
                out, self.pending = self.pending[:min(hits)], ""
                return out, True
        cut = max(len(self.pending) - self.hold, 0)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending + self.dec.decode(b"", final=True), ""
        return out


@dataclasses.dataclass(eq=False)
class Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    seed: int
    text: TextStream
    submitted: float = dataclasses.field(default_factory=time.perf_counter)
    slot: int = -1
    prefilled: int = 0  # prompt tokens in the cache
    generated: list[int] = dataclasses.field(default_factory=list)
    first_token_at: float | None = None
    done: bool = False

    @property
    def length(self) -> int:
        """Tokens in the cache (the last sampled token is written by the next decode step)."""
        return self.prefilled + max(len(self.generated) - 1, 0)


def bucket(n: int, lo: int, hi: int) -> int:
    """The smallest power of two >= max(n, lo), capped at hi."""
    b = 1 << max(int(max(n, lo)) - 1, 0).bit_length()
    return min(b, hi)


def buckets(lo: int, hi: int) -> list[int]:
    out, b = [], bucket(1, lo, hi)
    while True:
        out.append(b)
        if b >= hi:
            return out
        b = bucket(b + 1, lo, hi)


class Engine:
    def __init__(self, model: Model, tokenizer, cfg: EngineConfig = EngineConfig(), rules=None):
        from sharding.rules import SERVE_RULES

        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.rules = SERVE_RULES if rules is None else rules
        mcfg = model.config
        if cfg.max_len > mcfg.max_seq_len:
            raise ValueError(f"engine.max_len={cfg.max_len} exceeds the model's max_seq_len {mcfg.max_seq_len}")
        if tokenizer.vocab_size > mcfg.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens, the model only {mcfg.vocab_size}")
        self.kv_dtype = kv_cache.resolve_dtype(cfg.kv_dtype, mcfg)
        self.cache = kv_cache.create(mcfg, cfg.max_slots, cfg.max_len, self.kv_dtype, model.mesh, self.rules)
        self.stop_ids = frozenset(tokenizer.stop_ids) | frozenset(mcfg.eos_token_ids)
        self._cache_shardings = kv_cache.shardings(self.cache, model.mesh, self.rules)
        one_cpu = model.mesh.devices.size == 1 and model.mesh.devices.flat[0].platform == "cpu"
        self.layout = cfg.layout if cfg.layout != "auto" else ("unrolled" if one_cpu else "scan")
        self.cpu_kernels = cfg.cpu_kernels and one_cpu and self.layout == "unrolled" and cpu_kernels.available()
        self.weights = unstack(model.state) if self.layout == "unrolled" else (model.state, None)
        if self.cpu_kernels:
            self.weights = pack_for_cpu(model.graphdef, *self.weights)
        self.decode_steps = cfg.decode_steps or (4 if self.cpu_kernels else 1)
        # The step takes the weights as a flat list: flattening nnx Variables at every call costs ~1 ms.
        self._weight_leaves, self._weight_tree = jax.tree.flatten(self.weights)
        self._step = jax.jit(_bind_step(self), static_argnums=(12, 13, 14), donate_argnums=(1,),
                             out_shardings=(None, None, None, None, self._cache_shardings))
        self.compiled_shapes: set[tuple[int, int, int, int]] = set()
        self._slots: list[Request | None] = [None] * cfg.max_slots
        self._waiting: collections.deque[Request] = collections.deque()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self._rng = np.random.default_rng(cfg.seed)
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._inflight = 0  # submitted, not yet taken in by the loop
        self._stop = False
        self._thread: threading.Thread | None = None
        self.stats = collections.Counter()

    # ------------------------------------------------------------------------------------------
    # public interface (thread-safe)

    def submit(self, prompt: list[int], params: SamplingParams, emit: Callable[[Event], None],
               request_id: str | None = None) -> str:
        """Queues a request; `emit` receives its events (from the engine thread)."""
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("the prompt is empty (at least one token is needed)")
        if len(prompt) + params.max_tokens > self.cfg.max_len:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                             f"context length {self.cfg.max_len}")
        bad = [t for t in prompt if not 0 <= t < self.model.config.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is out of range for vocab_size {self.model.config.vocab_size}")
        rid = request_id or f"req-{next(self._ids)}"
        seed = params.seed if params.seed is not None else int(self._rng.integers(0, 2**31))
        req = Request(rid, prompt, params, emit, seed & 0xFFFFFFFF, TextStream(self.tokenizer, params.stop))
        with self._lock:
            self._inflight += 1
        self._inbox.put(("submit", req))
        self._wake.set()
        return rid

    def cancel(self, request_id: str) -> None:
        self._inbox.put(("cancel", request_id))
        self._wake.set()

    def start(self) -> Engine:
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._run, name="serve-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def release_model_weights(self) -> None:
        """With the unrolled layout the engine holds its own per-layer copies of the block weights; this
        frees the model's stacked ones (the Model object can then no longer run by itself)."""
        if self.layout != "unrolled":
            return
        for leaf in jax.tree.leaves(self.model.state["layers"]):
            leaf.delete()

    @property
    def active(self) -> int:
        return sum(r is not None for r in self._slots)

    @property
    def pending(self) -> int:
        """Requests submitted and not yet in a slot."""
        return len(self._waiting) + self._inflight

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[dict]:
        """Runs requests to completion (in this thread when the engine thread is not running) and
        returns, per prompt, {"text", "token_ids", "finish_reason", "logprobs", ...}."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        results = [dict(text="", token_ids=[], logprobs=[], finish_reason=None) for _ in prompts]
        done = threading.Event()
        left = [len(prompts)]

        def collect(i):
            def emit(ev: Event):
                r = results[i]
                r["text"] += ev.text
                r["token_ids"] += ev.token_ids
                if ev.logprobs:
                    r["logprobs"] += ev.logprobs
                if ev.ttft is not None:
                    r["ttft"] = ev.ttft
                if ev.finished:
                    r.update(finish_reason=ev.finish_reason, error=ev.error, prompt_tokens=ev.prompt_tokens,
                             completion_tokens=ev.completion_tokens)
                    left[0] -= 1
                    if left[0] == 0:
                        done.set()
            return emit

        for i, (p, sp) in enumerate(zip(prompts, params)):
            self.submit(p, sp, collect(i))
        if self._thread is None:
            while not done.is_set():
                self.step()
        else:
            done.wait()
        return results

    def warmup(self) -> None:
        """Compiles the decode step for every batch and attention-length bucket, and the prefill step
        for a full chunk at every attention length, so that no request waits for a compile."""
        cfg = self.cfg
        t0 = time.perf_counter()
        kvs = buckets(cfg.min_kv_bucket, cfg.max_len)
        steps = sorted({1, self.decode_steps})
        shapes = [(B, 1, kv, n) for B in buckets(1, cfg.max_slots) for kv in kvs for n in steps]
        shapes += [(1, bucket(cfg.prefill_chunk, 16, cfg.prefill_chunk), kv, 1) for kv in kvs]
        for B, T, kv, n in shapes:
            z = np.zeros((B, T), np.int32)  # segment 0 everywhere: nothing is written to the cache
            dummy = Request("warmup", [0], SamplingParams(), lambda ev: None, 0, None, slot=0)
            self._run_step([dummy] * B, z, z, z, np.zeros((B,), np.int32), [0] * B, kv, n)
        log.info("compiled %d step shapes in %.1f s", len(shapes), time.perf_counter() - t0)

    # ------------------------------------------------------------------------------------------
    # the loop

    def _run(self):
        while not self._stop:
            try:
                busy = self.step()
            except Exception as e:  # keep serving: fail what was running, free the slots
                log.exception("engine step failed")
                self._fail_all(f"engine error: {type(e).__name__}: {e}")
                busy = False
            if not busy:
                self._wake.wait(0.05)
                self._wake.clear()

    def step(self) -> bool:
        """One iteration: intake, one prefill step, one decode step. False when there was nothing to do."""
        self._intake()
        self._admit()
        busy = False
        prefilling = [r for r in self._slots if r is not None and r.prefilled < len(r.prompt)]
        if prefilling:
            self._prefill(sorted(prefilling, key=lambda r: r.submitted))
            busy = True
        decoding = [r for r in self._slots if r is not None and r.prefilled == len(r.prompt) and r.generated]
        if decoding:
            self._decode(decoding)
            busy = True
        return busy

    def _intake(self):
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "submit":
                with self._lock:
                    self._inflight -= 1
                self._requests[item.id] = item
                self._waiting.append(item)
                self.stats["requests"] += 1
            else:
                req = self._requests.get(item)
                if req is not None and not req.done:
                    self._finish(req, "cancelled")

    def _admit(self):
        for i, r in enumerate(self._slots):
            if r is None and self._waiting:
                req = self._waiting.popleft()
                req.slot = i
                self._slots[i] = req

    def _finish(self, req: Request, reason: str, text: str = "", tokens=(), logprobs=None, error=None, ttft=None):
        req.done = True
        if req.slot >= 0:
            self._slots[req.slot] = None
            req.slot = -1
        else:
            try:
                self._waiting.remove(req)
            except ValueError:
                pass
        self._requests.pop(req.id, None)
        self.stats[f"finish_{reason}"] += 1
        self._emit(req, Event(req.id, text, list(tokens), logprobs, reason, len(req.prompt), len(req.generated),
                              error, ttft))

    def _emit(self, req: Request, ev: Event):
        try:
            req.emit(ev)
        except Exception:  # a consumer's failure must not stop the engine
            log.exception("emit failed for %s", req.id)

    def _fail_all(self, message: str):
        for r in list(self._requests.values()):
            self._finish(r, "error", error=message)
        self.cache = kv_cache.create(self.model.config, self.cfg.max_slots, self.cfg.max_len, self.kv_dtype,
                                     self.model.mesh, self.rules)  # a failed donated call may have eaten it

    # ------------------------------------------------------------------------------------------
    # device steps

    def _run_step(self, reqs: list[Request], tokens, positions, segments, last, counters, kv_len, steps: int = 1):
        """One call of the jitted step over rows `reqs` (padded to the batch bucket); outputs [steps, B, ...]."""
        B = tokens.shape[0]
        params = [r.params for r in reqs] + [None] * (B - len(reqs))
        rows = np.array([r.slot for r in reqs] + [reqs[0].slot] * (B - len(reqs)), np.int32)
        seeds = [r.seed for r in reqs] + [0] * (B - len(reqs))
        t, k, p, s, c = sampling.host_arrays(params, seeds, list(counters) + [0] * (B - len(reqs)))
        want = max((r.params.logprobs or 0) for r in reqs)
        num_top = 0 if want == 0 else sampling.MAX_TOP_LOGPROBS
        shape = (B, tokens.shape[1], kv_len, num_top, steps)
        if shape not in self.compiled_shapes:
            self.compiled_shapes.add(shape)
            log.info("compiling step for batch %d x %d tokens, attention over %d positions%s%s", *shape[:3],
                     f", top {num_top} logprobs" if num_top else "", f", {steps} tokens per call" if steps > 1 else "")
        out = self._step(self._weight_leaves, self.cache, tokens, positions, segments, rows, last, t, k, p, s, c,
                         kv_len, num_top, steps)
        *out, self.cache = out
        out = [np.asarray(o) for o in out]
        return out if steps > 1 else [o[None] for o in out]

    def _prefill(self, candidates: list[Request]):
        cfg = self.cfg
        chosen, T = [], 0
        for r in candidates:
            n = min(len(r.prompt) - r.prefilled, cfg.prefill_chunk)
            t = bucket(max(T, n), 16, cfg.prefill_chunk)
            if chosen and (bucket(len(chosen) + 1, 1, cfg.max_slots) * t > cfg.prefill_tokens):
                break
            chosen.append(r)
            T = t
        B = bucket(len(chosen), 1, cfg.max_slots)
        tokens = np.zeros((B, T), np.int32)
        positions = np.zeros((B, T), np.int32)
        segments = np.zeros((B, T), np.int32)
        last = np.zeros((B,), np.int32)
        ends = []
        for b, r in enumerate(chosen):
            n = min(len(r.prompt) - r.prefilled, T)
            tokens[b, :n] = r.prompt[r.prefilled:r.prefilled + n]
            positions[b, :] = r.prefilled + np.arange(T)
            segments[b, :n] = 1
            last[b] = n - 1
            ends.append(r.prefilled + n)
        kv_len = bucket(max(ends), cfg.min_kv_bucket, cfg.max_len)
        out = self._run_step(chosen, tokens, positions, segments, last, [0] * len(chosen), kv_len)
        self.stats["prefill_steps"] += 1
        for b, r in enumerate(chosen):
            self.stats["prefill_tokens"] += ends[b] - r.prefilled
            r.prefilled = ends[b]
            if r.prefilled == len(r.prompt):  # the prompt is in: its last position's sample is token 1
                self._accept(r, *(o[0, b] for o in out))

    def _decode(self, reqs: list[Request]):
        """One call: decode_steps tokens per request when nothing is waiting to be prefilled (tokens after
        a request's end are dropped), else one, so that a new prompt starts at the next call."""
        cfg = self.cfg
        B = bucket(len(reqs), 1, cfg.max_slots)
        busy = self.pending or any(r is not None and r.prefilled < len(r.prompt) for r in self._slots)
        steps = 1 if busy else self.decode_steps
        tokens = np.zeros((B, 1), np.int32)
        positions = np.zeros((B, 1), np.int32)
        segments = np.zeros((B, 1), np.int32)
        for b, r in enumerate(reqs):
            tokens[b, 0] = r.generated[-1]
            positions[b, 0] = r.length
            segments[b, 0] = 1
        kv_len = bucket(int(positions.max()) + steps, cfg.min_kv_bucket, cfg.max_len)
        out = self._run_step(reqs, tokens, positions, segments, np.zeros((B,), np.int32),
                             [len(r.generated) for r in reqs], kv_len, steps)
        self.stats["decode_steps"] += 1
        self.stats["decode_rows"] += len(reqs)
        for j in range(steps):
            for b, r in enumerate(reqs):
                if not r.done:
                    self._accept(r, *(o[j, b] for o in out))

    def _accept(self, r: Request, tok, lp, top_ids, top_lp):
        """A sampled token for request r: text, stop conditions, event."""
        tok = int(tok)
        now = time.perf_counter()
        ttft = None
        if r.first_token_at is None:
            r.first_token_at = now
            ttft = now - r.submitted
        r.generated.append(tok)
        self.stats["tokens"] += 1
        finish, text, stop_hit = None, "", False
        if (tok in self.stop_ids and not r.params.ignore_eos) or tok in r.params.stop_token_ids:
            finish = "stop"
        else:
            text, stop_hit = r.text.push(tok)
            if stop_hit:
                finish = "stop"
        if finish is None and len(r.generated) >= r.params.max_tokens:
            finish = "length"
        if finish is None and r.length + 1 >= self.cfg.max_len:
            finish = "length"  # the slot is full
        if finish is not None and not stop_hit:
            text += r.text.flush()
        logprobs = None
        if r.params.logprobs is not None:
            logprobs = [self._logprob(tok, lp, top_ids, top_lp, r.params.logprobs)]
        ev = Event(r.id, text, [tok], logprobs, ttft=ttft)
        if finish is None:
            self._emit(r, ev)
        else:
            self._finish(r, finish, text, [tok], logprobs, ttft=ttft)

    def _token_text(self, i: int) -> tuple[str, list[int]]:
        b = self.tokenizer.token_bytes(int(i))
        return b.decode("utf-8", errors="replace"), list(b)

    def _logprob(self, tok, lp, top_ids, top_lp, n) -> TokenLogprob:
        text, raw = self._token_text(tok)
        top = [(int(i), self._token_text(i)[0], float(v)) for i, v in zip(top_ids[:n], top_lp[:n])]
        return TokenLogprob(tok, text, float(lp), raw, top)


def unstack(state: nnx.State) -> tuple[nnx.State, tuple[nnx.State, ...]]:
    """(everything but the block weights, the block weights one layer at a time): the "unrolled" layout.
    The layer arrays are copies; `Engine.release_model_weights` frees the stacked originals."""
    rest = nnx.State({k: v for k, v in state.items() if k != "layers"})
    layers = state["layers"]
    n = jax.tree.leaves(layers)[0].shape[0]
    return rest, tuple(jax.tree.map(lambda a, i=i: a[i], layers) for i in range(n))


def pack_for_cpu(graphdef, rest: nnx.State, layers: tuple[nnx.State, ...]):
    """The unrolled weights with the Dense kernels model/cpu_gemv.cc covers packed for it."""
    block_graphdef = nnx.split(nnx.merge(graphdef, nnx.State({**rest, "layers": layers[0]})).layers)[0]
    layers = tuple(cpu_kernels.pack(block_graphdef, layer) for layer in layers)
    packed = cpu_kernels.pack(graphdef, nnx.State({**rest, "layers": layers[0]}))  # the head; blocks are packed
    return nnx.State({k: v for k, v in packed.items() if k != "layers"}), layers


def step_fn(graphdef, mesh, rules, weights, cache, tokens, positions, segments, rows, last, temperature, top_k, top_p,
            seeds, counters, kv_len, num_top, use_cpu_kernels: bool = False, steps: int = 1):
    """The engine's one step (prefill chunk or decode): writes the new tokens' keys/values to `cache`, samples
    one token per row at `last`; returns (tokens, their log-probs, top ids, top log-probs, cache).
    `weights` is (state, None) or, unrolled, (state without the blocks, per-layer block states).
    `steps` > 1 (decode only): that many tokens per row, each sampled token fed back as the next input;
    the outputs get a leading [steps] axis."""
    state, layers = weights
    if layers is not None:  # the module needs a `layers` entry to be built; the loop uses `layers`
        state = nnx.State({**state, "layers": layers[0]})
    with use_mesh(mesh, rules):
        module = nnx.merge(graphdef, state)

        def one(cache, tokens, positions, counters):
            update = kv_cache.CacheUpdate(cache, rows, kv_len, layers, cpu_kernels=use_cpu_kernels)
            logits, cache = module(tokens, positions, segments, cache=update, logits_at=last)
            return sampling.sample(logits[:, 0], temperature, top_k, top_p, seeds, counters, num_top), cache

        if steps == 1:
            (tok, lp, top_ids, top_lp), cache = one(cache, tokens, positions, counters)
            return tok, lp, top_ids, top_lp, cache

        outs = []
        for _ in range(steps):  # unrolled: in a while loop XLA:CPU copied the cache at every layer's write
            out, cache = one(cache, tokens, positions, counters)
            outs.append(out)
            tokens, positions, counters = out[0][:, None], positions + 1, counters + 1
    return (*(jnp.stack(o) for o in zip(*outs)), cache)


def _bind_step(engine: Engine):
    def fn(weight_leaves, cache, tokens, positions, segments, rows, last, temperature, top_k, top_p, seeds, counters,
           kv_len, num_top, steps):
        weights = jax.tree.unflatten(engine._weight_tree, weight_leaves)
        return step_fn(engine.model.graphdef, engine.model.mesh, engine.rules, weights, cache, tokens, positions,
                       segments, rows, last, temperature, top_k, top_p, seeds, counters, kv_len, num_top,
                       engine.cpu_kernels, steps)
    return fn
