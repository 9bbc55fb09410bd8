"""Which requests run in the engine's next steps, and their host inputs.

The KV cache has `max_slots` slots of `max_len` positions (model/network/kv_cache.py). Submitted requests
go through a thread-safe inbox to a waiting queue; a waiting request takes a slot as soon as one is free
and leaves it when it finishes or is cancelled. A prefill step takes the next chunk (<= prefill_chunk
tokens) of up to several prompts, packed into one [B, T] batch within a token budget (prefill_tokens), so a
long prompt takes several steps and never stalls the decoding slots for long. A decode step takes every
request that is decoding: `decode_steps` tokens per call while no prompt waits, else one.

Step shapes come from buckets: B a power of two up to max_slots, T = 1 for decode or a power of two up to
prefill_chunk, and the attended cache length a power of two from min_kv_bucket up to max_len.
"""

from __future__ import annotations

import collections
import dataclasses
import queue
import threading
import time
from collections.abc import Callable

import numpy as np

from serve import sampling
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


@dataclasses.dataclass
class Plan:
    """One step: its requests (the batch's first rows; the rest is padding), inputs and static shape."""

    reqs: list[Request]
    batch: Batch
    shape: StepShape
    ends: list[int] = dataclasses.field(default_factory=list)  # prefill: each request's prompt tokens in the cache after


def make_plan(reqs: list[Request], tokens, positions, segments, last, counters: list[int], kv_len: int,
              steps: int = 1) -> Plan:
    """A step over rows `reqs` with these [B, T] / [B] host arrays (B, the batch bucket, >= len(reqs))."""
    pad = tokens.shape[0] - len(reqs)
    params = [r.params for r in reqs] + [None] * pad
    rows = np.array([r.slot for r in reqs] + [reqs[0].slot] * pad, np.int32)
    seeds = [r.seed for r in reqs] + [0] * pad
    rows_sampling = SamplingRows.host(params, seeds, list(counters) + [0] * pad)
    want = max((r.params.logprobs or 0) for r in reqs)
    num_top = 0 if want == 0 else sampling.MAX_TOP_LOGPROBS
    return Plan(reqs, Batch(tokens, positions, segments, rows, last, rows_sampling), StepShape(kv_len, num_top, steps))


class Scheduler:
    """The requests of an engine, from submission to their slot's release. `put`, `cancel`, `active` and
    `pending` are thread-safe; the rest runs on the engine's thread."""

    def __init__(self, cfg: EngineConfig, stats: collections.Counter):
        self.cfg, self.stats = cfg, stats
        self.slots: list[Request | None] = [None] * cfg.max_slots
        self.waiting: collections.deque[Request] = collections.deque()
        self.requests: dict[str, Request] = {}  # taken in, not finished
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._inflight = 0  # submitted, not yet taken in

    def put(self, req: Request):
        with self._lock:
            self._inflight += 1
        self._inbox.put(("submit", req))

    def cancel(self, request_id: str):
        self._inbox.put(("cancel", request_id))

    @property
    def active(self) -> int:
        return sum(r is not None for r in self.slots)

    @property
    def pending(self) -> int:
        """Requests submitted and not yet in a slot."""
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

    def admit(self):
        for i, r in enumerate(self.slots):
            if r is None and self.waiting:
                req = self.waiting.popleft()
                req.slot = i
                self.slots[i] = req

    def release(self, req: Request):
        """A finished request leaves its slot (or the queue)."""
        if req.slot >= 0:
            self.slots[req.slot] = None
            req.slot = -1
        else:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
        self.requests.pop(req.id, None)

    def prefilling(self) -> list[Request]:
        """Requests in a slot with prompt tokens not yet in the cache, oldest first."""
        return sorted((r for r in self.slots if r is not None and r.prefilled < len(r.prompt)),
                      key=lambda r: r.submitted)

    def decoding(self) -> list[Request]:
        return [r for r in self.slots if r is not None and r.prefilled == len(r.prompt) and r.generated]

    def plan_prefill(self, candidates: list[Request]) -> Plan:
        """The next prompt chunks of the first candidates that fit the token budget."""
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
        plan = make_plan(chosen, tokens, positions, segments, last, [0] * len(chosen), kv_len)
        plan.ends = ends
        return plan

    def plan_decode(self, reqs: list[Request], decode_steps: int) -> Plan:
        """One call: `decode_steps` tokens per request when nothing is waiting to be prefilled (tokens after
        a request's end are dropped), else one, so that a new prompt starts at the next call."""
        cfg = self.cfg
        B = bucket(len(reqs), 1, cfg.max_slots)
        busy = self.pending or any(r is not None and r.prefilled < len(r.prompt) for r in self.slots)
        steps = 1 if busy else decode_steps
        tokens = np.zeros((B, 1), np.int32)
        positions = np.zeros((B, 1), np.int32)
        segments = np.zeros((B, 1), np.int32)
        for b, r in enumerate(reqs):
            tokens[b, 0] = r.generated[-1]
            positions[b, 0] = r.length
            segments[b, 0] = 1
        kv_len = bucket(int(positions.max()) + steps, cfg.min_kv_bucket, cfg.max_len)
        return make_plan(reqs, tokens, positions, segments, np.zeros((B,), np.int32),
                         [len(r.generated) for r in reqs], kv_len, steps)

    def warmup_plans(self, decode_steps: int) -> list[Plan]:
        """A plan per step shape serving will need: decode at every batch and attention-length bucket, and
        a full prefill chunk at every attention length (segment 0 everywhere: nothing is written)."""
        cfg = self.cfg
        kvs = buckets(cfg.min_kv_bucket, cfg.max_len)
        steps = sorted({1, decode_steps})
        shapes = [(B, 1, kv, n) for B in buckets(1, cfg.max_slots) for kv in kvs for n in steps]
        shapes += [(1, bucket(cfg.prefill_chunk, 16, cfg.prefill_chunk), kv, 1) for kv in kvs]
        plans = []
        for B, T, kv, n in shapes:
            z = np.zeros((B, T), np.int32)
            dummy = Request("warmup", [0], SamplingParams(), lambda ev: None, 0, None, slot=0)
            plans.append(make_plan([dummy] * B, z, z, z, np.zeros((B,), np.int32), [0] * B, kv, n))
        return plans
