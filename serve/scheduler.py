"""Which requests run in the engine's next step, with which tokens, and their host inputs.

The KV cache is a pool of blocks (model/network/kv_cache.py; who holds which and the prefix cache:
serve/blocks.py). Submitted requests go through a thread-safe inbox to a waiting queue. Each step has a
token budget (`prefill_tokens`): first the next token of every running request that is decoding, then
chunks (<= prefill_chunk tokens each) of the prompts being prefilled, then new requests from the queue, in
order, while there is budget, room (`max_slots` running) and free blocks for the whole prompt (cached
prefix blocks are taken, not recomputed). The step's tokens are then padded to their bucket, so the
prompt chunks grow to fill it: padding costs as much as a token. So decoding never stalls behind a long
prompt (a step's cost is bounded by the bucket of decoders + prefill_chunk), and a prompt never waits
for decoding to end. A decoding request that needs a block when none is free preempts the
newest running request: its blocks go back to the pool and it waits at the head of the queue; when it
runs again its tokens so far (prompt and generated) are recomputed, and it goes on exactly where it was.
When nothing waits and every running request is decoding, one call runs several tokens each (`call_steps`).

A request's tokens are its prompt followed by what it generated; `computed` of them have their keys and
values in the pool. The step that computes a request's last known token samples its next one.

Step shapes come from buckets: T (tokens) 2^k or 3 * 2^(k-1) from 16 up to prefill_tokens (decode-only
steps: T = S), S (sequences) a power of two up to max_slots, P (pages per sequence) a power of two from
min_kv_bucket / block_size up to the pages of max_len.
"""

from __future__ import annotations

import collections
import dataclasses
import queue
import threading
import time
from collections.abc import Callable

import numpy as np

from model.network.paged_attention import PagedMeta
from serve import prompt_logprobs, sampling
from serve.adapters import Adapter
from serve.blocks import BlockManager
from serve.config import EngineConfig
from serve.events import Event, TextStream
from serve.sampling import SamplingParams, SamplingRows
from serve.step import Batch, StepShape


@dataclasses.dataclass(eq=False)
class Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    seed: int
    text: TextStream | None
    submitted: float = dataclasses.field(default_factory=time.perf_counter)
    generated: list[int] = dataclasses.field(default_factory=list)
    first_token_at: float | None = None
    done: bool = False
    running: bool = False
    computed: int = 0  # tokens (prompt, then generated) whose keys/values are in the pool
    blocks: list[int] = dataclasses.field(default_factory=list)  # its block table
    keys: list[bytes] = dataclasses.field(default_factory=list)  # prefix-cache keys of its first full blocks
    adapter: Adapter | None = None  # its LoRA adapter (serve/adapters.py); None: the base model
    prompt_lps: list | None = None  # echo: its prompt's log-probs so far, until sent (serve/prompt_logprobs.py)

    def __post_init__(self):
        if self.params.prompt_logprobs is not None:
            self.prompt_lps = [None] * len(self.prompt)

    @property
    def adapter_row(self) -> int:
        return 0 if self.adapter is None else self.adapter.row

    @property
    def adapter_id(self) -> int | None:
        """The adapter's prefix-cache identity: unique per load, so a slot reloaded with another adapter never
        matches the blocks of the one before."""
        return None if self.adapter is None else self.adapter.uid

    @property
    def total(self) -> int:
        return len(self.prompt) + len(self.generated)

    def tokens(self, start: int, end: int) -> list[int]:
        p = len(self.prompt)
        return self.prompt[start:end] + self.generated[max(start - p, 0):max(end - p, 0)]

    @property
    def decoding(self) -> bool:
        return bool(self.generated) and self.computed == self.total - 1


def bucket(n: int, lo: int, hi: int) -> int:
    """The smallest power of two >= max(n, lo), capped at hi."""
    b = 1 << max(int(max(n, lo)) - 1, 0).bit_length()
    return min(b, hi)


def token_bucket(n: int, lo: int, hi: int) -> int:
    """A step's token count: the smallest 2^k or 3 * 2^(k-1) >= max(n, lo), capped at hi. Steps between
    powers of two pad at most a third, not a half: 15 decoders plus a 32-token prompt chunk run 48 tokens,
    not 64 (on a CPU, where a 16-row step already costs its arithmetic, that is the decoders' wait)."""
    n = max(int(n), lo)
    b = 1 << (n - 1).bit_length()
    return min(b * 3 // 4 if b % 4 == 0 and b * 3 // 4 >= n else b, hi)


def call_steps(decode_steps: int, rows: int) -> int:
    """Tokens per decode call for `rows` decoding requests: `decode_steps` for up to 4, half as many beyond
    (at least 1). A call's tokens reach the clients together, and a prompt that arrives waits for the call
    in flight: with many rows a call is long (16 rows, 4 tokens: ~45 ms on a 2-core CPU), with few the
    per-call overhead counts most (batch-1 decode: 5% slower at 2 tokens a call than at 4)."""
    return decode_steps if rows <= 4 else max(decode_steps // 2, 1)


def buckets(lo: int, hi: int) -> list[int]:
    out, b = [], bucket(1, lo, hi)
    while True:
        out.append(b)
        if b >= hi:
            return out
        b = bucket(b + 1, lo, hi)


@dataclasses.dataclass
class Plan:
    """One step: its requests (in token order), how many tokens each computes, and its inputs."""

    reqs: list[Request]
    counts: list[int]
    batch: Batch
    shape: StepShape

    def samples(self, i: int) -> bool:
        """Whether request i's tokens end at its last known token (then its sample is its next token)."""
        return self.reqs[i].computed + self.counts[i] == self.reqs[i].total


class Scheduler:
    """The requests of an engine, from submission to release. `put`, `cancel`, `active` and `pending` are
    thread-safe; the rest runs on the engine's thread."""

    def __init__(self, cfg: EngineConfig, stats: collections.Counter):
        self.cfg, self.stats = cfg, stats
        self.blocks = BlockManager(cfg.num_blocks, cfg.block_size, cfg.prefix_caching)
        self.running: list[Request] = []  # in order of admission
        self.waiting: collections.deque[Request] = collections.deque()
        self.requests: dict[str, Request] = {}  # taken in, not finished
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._inflight = 0  # submitted, not yet taken in
        self.stop_ids: frozenset[int] = frozenset()  # the engine's EOS ids: what min_tokens masks besides a request's own
        self.max_pages = -(-cfg.max_len // cfg.block_size)
        self.min_pages = min(-(-cfg.min_kv_bucket // cfg.block_size), self.max_pages)

    def put(self, req: Request):
        with self._lock:
            self._inflight += 1
        self._inbox.put(("submit", req))

    def cancel(self, request_id: str):
        self._inbox.put(("cancel", request_id))

    @property
    def active(self) -> int:
        return len(self.running)

    @property
    def pending(self) -> int:
        """Requests submitted and not running."""
        return len(self.waiting) + self._inflight

    def intake(self) -> list[Request]:
        """Takes in what was submitted and returns the requests cancelled (in order; the engine finishes them)."""
        cancelled = []
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return cancelled
            if kind == "submit":
                with self._lock:
                    self._inflight -= 1
                self.requests[item.id] = item
                self.waiting.append(item)
                self.stats["requests"] += 1
            else:
                req = self.requests.get(item)
                if req is not None and not req.done and req not in cancelled:
                    cancelled.append(req)

    def release(self, req: Request):
        """A finished request gives back its blocks (or leaves the queue)."""
        if req.running:
            self.running.remove(req)
            self._free(req)
        else:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
        self.requests.pop(req.id, None)

    def reset_blocks(self):
        """The pool was lost (a failed step): every request has been released; forget the cache."""
        self.blocks.reset()

    def _free(self, req: Request):
        self.blocks.release(req.blocks)
        req.blocks, req.keys, req.computed, req.running = [], [], 0, False

    def _grow(self, req: Request, tokens: int, preempt: bool = True) -> bool:
        """Blocks for `tokens` of req; while none is free, the newest running request is preempted (unless not
        `preempt`). False when there are none, or req itself was preempted."""
        while len(req.blocks) < self.blocks.blocks_for(tokens):
            if not self.blocks.free:
                if not preempt:
                    return False
                victim = self.running.pop()
                self._free(victim)
                self.waiting.appendleft(victim)
                self.stats["preemptions"] += 1
                if victim is req:
                    return False
                continue
            req.blocks.append(self.blocks.allocate())
        return True

    def _admit(self, req: Request) -> bool:
        """Blocks for all of req's tokens (cached prefix blocks first); False (nothing taken) if they are not free."""
        tokens = req.tokens(0, req.total)
        matched, keys = self.blocks.lookup(tokens, req.adapter_id)
        if req.prompt_lps is not None and matched:  # echo computes every prompt position: no cached blocks (vLLM too)
            self.blocks.unlookup(matched, len(tokens))
            matched, keys = [], []
        need = self.blocks.blocks_for(req.total) - len(matched)
        if need > self.blocks.free:
            self.blocks.unlookup(matched, len(tokens))
            return False
        req.blocks, req.keys = matched, keys
        req.computed = len(matched) * self.cfg.block_size
        req.blocks += [self.blocks.allocate() for _ in range(need)]
        req.running = True
        self.running.append(req)
        self.stats["prefix_cached_tokens"] += req.computed
        return True

    def schedule(self, decode_steps: int) -> tuple[list[Request], list[int], int]:
        """The next step: (requests in token order, tokens each, tokens per call)."""
        cfg = self.cfg
        decoders = [r for r in list(self.running) if r.running and r.decoding and self._grow(r, r.total)]
        decoders = [r for r in decoders if r.running]
        budget = cfg.prefill_tokens - len(decoders)
        chunks, counts = [], []

        def take(r: Request):
            nonlocal budget
            n = min(r.total - r.computed, cfg.prefill_chunk, budget)
            chunks.append(r)
            counts.append(n)
            budget -= n

        for r in list(self.running):
            if budget > 0 and not r.decoding:
                take(r)
        while budget > 0 and self.waiting and len(self.running) < cfg.max_slots and self._admit(self.waiting[0]):
            take(self.waiting.popleft())
        if chunks:  # the step computes its whole bucket of tokens: prompt tokens instead of padding
            room = token_bucket(len(decoders) + sum(counts), 16, cfg.prefill_tokens) - len(decoders) - sum(counts)
            for i, r in enumerate(chunks):
                extra = min(room, r.total - r.computed - counts[i])
                counts[i] += extra
                room -= extra
        steps = 1
        if decoders and not chunks and not self.waiting and (per_call := call_steps(decode_steps, len(decoders))) > 1:
            steps = per_call
            for r in decoders:  # blocks for every token of the call, or one token per call
                cap = min(len(r.prompt) + r.params.max_tokens, cfg.max_len)
                if not self._grow(r, min(r.total + steps - 1, cap), preempt=False):
                    steps = 1
        return decoders + chunks, [1] * len(decoders) + counts, steps

    def computed(self, req: Request, n: int):
        """n more of req's tokens are in the pool: its newly full blocks go to the prefix cache."""
        req.computed += n
        bs = self.cfg.block_size
        if len(req.keys) < req.computed // bs:
            start = len(req.keys) * bs
            self.blocks.register(req.blocks, req.keys, [0] * start + req.tokens(start, req.computed), req.computed,
                                 req.adapter_id)

    def plan(self, reqs: list[Request], counts: list[int], steps: int = 1) -> Plan:
        """The step's host inputs: a ragged batch in buckets."""
        cfg, bs = self.cfg, self.cfg.block_size
        S = bucket(len(reqs), 1, cfg.max_slots)
        T = S if all(c == 1 for c in counts) else token_bucket(sum(counts), 16, cfg.prefill_tokens)
        P = bucket(max(len(r.blocks) for r in reqs), self.min_pages, self.max_pages)
        tokens, positions, slots, rows = (np.zeros(T, np.int32) for _ in range(4))
        kv_lens, last = np.zeros(S, np.int32), np.zeros(S, np.int32)
        pages, cu = np.zeros((S, P), np.int32), np.zeros(S + 1, np.int32)
        t = 0
        for i, (r, c) in enumerate(zip(reqs, counts)):
            pos = np.arange(r.computed, r.computed + c)
            tokens[t:t + c] = r.tokens(r.computed, r.computed + c)
            positions[t:t + c] = pos
            rows[t:t + c] = r.adapter_row
            table = np.asarray(r.blocks, np.int32)
            slots[t:t + c] = table[pos // bs] * bs + pos % bs
            pages[i, :len(table)] = table
            kv_lens[i] = r.computed + c
            t += c
            cu[i + 1:] = t
            last[i] = t - 1
        meta = PagedMeta(slots, kv_lens, pages, cu, np.array([len(reqs)], np.int32))
        pad = S - len(reqs)
        sampling_rows = SamplingRows.host([r.params for r in reqs] + [None] * pad, [r.seed for r in reqs] + [0] * pad,
                                          [len(r.generated) for r in reqs] + [0] * pad,
                                          [(r.prompt, r.generated) for r in reqs], self.stop_ids, steps)
        want = max((r.params.logprobs or 0) for r in reqs)
        next_tokens = prompt_logprobs.next_tokens(reqs, counts, T)  # None unless a prompt's log-probs are wanted
        shape = StepShape(0 if want == 0 else sampling.MAX_TOP_LOGPROBS, steps, next_tokens is not None)
        return Plan(reqs, counts, Batch(tokens, positions, meta, last, sampling_rows, rows, next_tokens), shape)

    def warmup_plans(self, decode_steps: int) -> list[Plan]:
        """A plan per step shape serving will need: decode at every sequence and page bucket, and a full step
        of prompt tokens at every page bucket (everything is written to the scratch block)."""
        cfg = self.cfg
        pages = buckets(self.min_pages, self.max_pages)
        shapes = [(S, S, P, n) for S in buckets(1, cfg.max_slots) for P in pages
                  for n in sorted({1, call_steps(decode_steps, S)})]
        shapes += [(bucket(cfg.prefill_tokens, 16, cfg.prefill_tokens), 1, P, 1) for P in pages]
        plans = []
        for T, S, P, n in shapes:
            z, zs = np.zeros(T, np.int32), np.zeros(S, np.int32)
            meta = PagedMeta(z, zs, np.zeros((S, P), np.int32), np.zeros(S + 1, np.int32), np.zeros(1, np.int32))
            rows = SamplingRows.host([None] * S, [0] * S, [0] * S)
            plans.append(Plan([], [], Batch(z, z, meta, zs, rows, z), StepShape(0, n)))
        return plans
