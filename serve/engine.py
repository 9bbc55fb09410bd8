"""The serving engine: continuous batching over a paged, sharded KV cache with prefix caching.

    engine = Engine(model, tokenizer, EngineConfig(max_slots=8, max_len=2048))
    engine.start()                                   # a background thread runs the loop
    rid = engine.submit(prompt_ids, SamplingParams(max_tokens=64, temperature=0), emit=on_event)
    engine.cancel(rid)                               # e.g. the client went away: its blocks free now

Each loop iteration (`step`) takes new requests and cancellations, then runs one device step over a token
budget: the next token of every decoding request plus chunks of prompts being prefilled (a new request
joins as soon as there is room and free blocks for its prompt; a prompt's last chunk samples its first
token). Finished requests (stop token, stop string, max_tokens, max_len) give back their blocks at once.

Which requests and tokens go into a step, block tables and preemption are the scheduler's
(serve/scheduler.py, serve/blocks.py); the step itself, one jitted function compiled once per bucket, is
serve/step.py; the pool and attention over it are model/network/kv_cache.py and paged_attention.py;
the weights' layout (scanned or per-layer, packed for the CPU kernels) is serve/layout.py.

Events (serve/events.py) go to each request's `emit` callback from the engine thread: text deltas, token
ids, optional log-probabilities, and at the end the finish reason and token counts.
"""

from __future__ import annotations

import collections
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable

import jax
import numpy as np

from model.network import kv_cache, paged_attention
from model.network.model import Model
from serve import adapters as adapters_lib
from serve import layout, prompt_logprobs
from serve.config import EngineConfig
from serve.events import Event, TextStream, TokenLogprob
from serve.sampling import SamplingParams, SamplingRows
from serve.scheduler import Plan, Request, Scheduler
from serve.step import DeviceStep, Program
from sharding.rules import SERVE_RULES

log = logging.getLogger("serve.engine")


class Engine:
    def __init__(self, model: Model, tokenizer, cfg: EngineConfig = EngineConfig(), rules=None):
        cfg = cfg.resolved(model.mesh.devices.flat[0].platform)
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.rules = SERVE_RULES if rules is None else rules
        mcfg = model.config
        if cfg.max_len > mcfg.max_seq_len:
            raise ValueError(f"engine.max_len={cfg.max_len} exceeds the model's max_seq_len {mcfg.max_seq_len}")
        if tokenizer.vocab_size > mcfg.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens, the model only {mcfg.vocab_size}")
        self.kv_dtype = kv_cache.resolve_dtype(cfg.kv_dtype, mcfg)
        self.cache = self._new_cache()
        self.stop_ids = frozenset(tokenizer.stop_ids) | frozenset(mcfg.eos_token_ids)
        self.layout, self.cpu_kernels = layout.choose(model, cfg)
        self.attention = paged_attention.choose(model.mesh, self.kv_dtype, mcfg.head_dim, self.cpu_kernels)
        self.weights = layout.arrange(model, self.layout, self.cpu_kernels)
        self.decode_steps = cfg.decode_steps or (4 if self.cpu_kernels else 1)
        program = Program(model.graphdef, model.mesh, self.rules, self.cpu_kernels, self.attention)
        self.device_step = DeviceStep(program, self.weights, kv_cache.shardings(self.cache, model.mesh, self.rules))
        slots = mcfg.lora if isinstance(mcfg.lora, adapters_lib.LoraSlots) else None
        self.adapters = adapters_lib.AdapterSlots(mcfg, slots)  # names for /v1/models: self.adapters.names
        self._commands: queue.SimpleQueue = queue.SimpleQueue()  # run on the engine thread between steps
        self.stats = collections.Counter()
        self.scheduler = Scheduler(cfg, self.stats)
        self.scheduler.stop_ids = self.stop_ids  # min_tokens masks them
        self._ids = itertools.count()
        self._rng = np.random.default_rng(cfg.seed)
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------
    # public interface (thread-safe)

    def submit(self, prompt: list[int], params: SamplingParams, emit: Callable[[Event], None],
               request_id: str | None = None, adapter: str | None = None) -> str:
        """Queues a request for the base model or the loaded LoRA `adapter` (a name; an unknown one raises
        LoraRequestError, a ValueError); `emit` receives its events (from the engine thread)."""
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("the prompt is empty (at least one token is needed)")
        if len(prompt) + params.max_tokens > self.cfg.max_len:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                             f"context length {self.cfg.max_len}")
        pool = (self.cfg.num_blocks - 1) * self.cfg.block_size
        if len(prompt) + params.max_tokens > pool:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the KV pool "
                             f"({pool} tokens, engine.kv_tokens)")
        vocab = self.model.config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is out of range for vocab_size {vocab}")
        if params.top_k > vocab:
            raise ValueError(f"top_k {params.top_k} exceeds the vocabulary size {vocab}")
        if params.seed is not None and not -2**63 <= params.seed < 2**64:
            raise ValueError(f"seed {params.seed} is not a 64-bit integer")
        rid = request_id or f"req-{next(self._ids)}"
        seed = (params.seed if params.seed is not None else int(self._rng.integers(0, 2**31))) & 0xFFFFFFFF
        try:  # this request's row of the step inputs: a value that does not fit fails here, alone
            SamplingRows.host([params], [seed], [0])
        except (OverflowError, ValueError, TypeError) as e:
            raise ValueError(f"sampling parameters out of range: {e}") from None
        held = None if adapter is None else self.adapters.acquire(adapter)
        self.scheduler.put(Request(rid, prompt, params, emit, seed, TextStream.of(self.tokenizer, params),
                                   adapter=held))
        self._wake.set()
        return rid

    def load_adapter(self, name: str, path: str) -> adapters_lib.Adapter:
        """Loads a LoRA adapter (PEFT directory, this project's checkpoint or a training run) into a free slot
        under `name`; LoraRequestError (nothing changed) if it cannot be served here. Read on the calling
        thread; written to the device on the engine thread, between steps."""
        host = self.adapters.read(name, path, adapters_lib.slot_shapes(self.weights))

        def install():
            a = self.adapters.claim(name, str(path), host.rank)
            try:
                adapters_lib.write_slot(self.weights, a.row, host)
            except Exception:
                self.adapters.unclaim(a)
                raise
            self.device_step.set_weights(self.weights)
            log.info("LoRA adapter %s (rank %d) from %s in slot %d", name, host.rank, path, a.row)
            return a

        return self._on_engine_thread(install)

    def unload_adapter(self, name: str) -> None:
        """`name` is no longer served (new requests for it are refused); requests already using it finish with
        it, then its slot is free."""
        self.adapters.unload(name)
        log.info("LoRA adapter %s unloaded", name)

    def _on_engine_thread(self, fn):
        if self._thread is None or threading.current_thread() is self._thread:
            return fn()
        done, box = threading.Event(), {}

        def run():
            try:
                box["value"] = fn()
            except BaseException as e:
                box["error"] = e
            done.set()

        self._commands.put(run)
        self._wake.set()
        done.wait()
        if "error" in box:
            raise box["error"]
        return box["value"]

    def cancel(self, request_id: str) -> None:
        self.scheduler.cancel(request_id)
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
        while not self._commands.empty():  # an adapter load that arrived as the engine stopped
            self._commands.get_nowait()()

    def release_model_weights(self) -> None:
        """With the unrolled layout the engine holds its own per-layer copies of the block weights; this
        frees the model's stacked ones (the Model object can then no longer run by itself)."""
        if self.layout != "unrolled":
            return
        for leaf in jax.tree.leaves(self.model.state["layers"]):
            leaf.delete()

    @property
    def active(self) -> int:
        return self.scheduler.active

    @property
    def pending(self) -> int:
        """Requests submitted and not running."""
        return self.scheduler.pending

    @property
    def compiled_shapes(self) -> set[tuple[int, int, int, int, int]]:
        """The step shapes compiled so far: (tokens, sequences, pages per sequence, top log-probs, tokens per call)."""
        return self.device_step.compiled_shapes

    def pool_stats(self) -> dict:
        """Blocks of the KV pool used / free / cached and the prefix cache's hit rate (of full blocks looked up)."""
        return {"block_size": self.cfg.block_size, **self.scheduler.blocks.stats()}

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
                if ev.prompt_logprobs is not None:
                    r["prompt_logprobs"] = ev.prompt_logprobs
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
        """Compiles the decode step for every sequence and page bucket, and a full step of prompt tokens at
        every page bucket, so that no request waits for a compile."""
        t0 = time.perf_counter()
        plans = self.scheduler.warmup_plans(self.decode_steps)
        for plan in plans:
            self._run_step(plan)
        log.info("compiled %d step shapes in %.1f s", len(plans), time.perf_counter() - t0)

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
        """One iteration: intake, one device step. False when there was nothing to do."""
        while not self._commands.empty():
            self._commands.get_nowait()()
        for req in self.scheduler.intake():
            if not req.done:
                self._finish(req, "cancelled")
        reqs, counts, steps = self.scheduler.schedule(self.decode_steps)
        if not reqs:
            return False
        self._step_requests(reqs, counts, steps)
        return True

    def _new_cache(self):
        return kv_cache.create(self.model.config, self.cfg.num_blocks, self.cfg.block_size, self.kv_dtype,
                               self.model.mesh, self.rules)

    def _finish(self, req: Request, reason: str, text: str = "", tokens=(), logprobs=None, error=None, ttft=None):
        first = not req.done
        req.done = True
        self.scheduler.release(req)
        if first and req.adapter is not None:
            self.adapters.release(req.adapter)
        self.stats[f"finish_{reason}"] += 1
        self._emit(req, Event(req.id, text, list(tokens), logprobs, reason, len(req.prompt), len(req.generated),
                              error, ttft))

    def _emit(self, req: Request, ev: Event):
        try:
            req.emit(ev)
        except Exception:  # a consumer's failure must not stop the engine
            log.exception("emit failed for %s", req.id)

    def _fail_all(self, message: str):
        for r in list(self.scheduler.requests.values()):
            self._finish(r, "error", error=message)
        self.cache = self._new_cache()  # a failed donated call may have eaten it
        self.scheduler.reset_blocks()

    # ------------------------------------------------------------------------------------------
    # device steps

    def _run_step(self, plan: Plan) -> list[np.ndarray]:
        """One call of the device step; outputs [steps, B, ...] (tokens, log-probs, top ids, top log-probs)."""
        out, self.cache = self.device_step(self.cache, plan.batch, plan.shape)
        return out

    def _plan(self, reqs: list[Request], counts: list[int], steps: int) -> Plan | None:
        """The step's inputs, or, when building them fails, those of the requests whose own inputs can be built
        (the others end with an error, alone); None when none is left."""
        try:
            return self.scheduler.plan(reqs, counts, steps)
        except Exception:
            log.exception("building a step's inputs failed; retrying request by request")
        good = []
        for r, c in zip(reqs, counts):
            try:
                self.scheduler.plan([r], [c], steps)
                good.append((r, c))
            except Exception as e:
                self._finish(r, "error", error=f"invalid request inputs: {type(e).__name__}: {e}")
        if len(good) == len(reqs):  # each builds alone, not together: one at a time
            good = good[:1]
        return self._plan([r for r, _ in good], [c for _, c in good], steps) if good else None

    def _step_requests(self, reqs: list[Request], counts: list[int], steps: int):
        """One device step over `reqs`. When it fails, each request is retried alone (if the donated pool
        survived), so only the requests whose own step fails end with an error; a lost pool ends them all."""
        plan = self._plan(reqs, counts, steps)
        if plan is None:
            return
        try:
            out = self._run_step(plan)
        except Exception as e:
            log.exception("engine step failed (%d request(s))", len(plan.reqs))
            lost = any(x.is_deleted() for x in jax.tree.leaves(self.cache) if hasattr(x, "is_deleted"))
            if not lost and len(plan.reqs) > 1:
                for r, c in zip(plan.reqs, plan.counts):
                    if r.running and not r.done:
                        self._step_requests([r], [c], 1)
                return
            message = f"engine error: {type(e).__name__}: {e}"
            for r in plan.reqs:
                if not r.done:
                    self._finish(r, "error", error=message)
            if lost:
                self._fail_all(message)
            return
        self.stats["steps"] += 1
        if plan.shape.prompt_logprobs:  # echo: the prompt tokens' log-probs, before `computed` moves on
            prompt_logprobs.collect(plan, out[4:], self.tokenizer, self._emit)
            out = out[:4]
        self.stats["step_rows"] += len(plan.reqs)
        for i, r in enumerate(plan.reqs):
            self.stats["decode_tokens" if r.decoding else "prefill_tokens"] += plan.counts[i]
        samples = [plan.samples(i) for i in range(len(plan.reqs))]
        for j in range(plan.shape.steps):
            for i, r in enumerate(plan.reqs):
                if r.done or not r.running:
                    continue
                self.scheduler.computed(r, plan.counts[i] if j == 0 else 1)
                if samples[i]:
                    self._accept(r, *(o[j, i] for o in out))

    def _accept(self, r: Request, tok, lp, top_ids, top_lp):
        """A sampled token for request r (a failure ends r alone, with an error)."""
        try:
            self._accept_token(r, tok, lp, top_ids, top_lp)
        except Exception as e:
            log.exception("handling a token of %s failed", r.id)
            if not r.done:
                self._finish(r, "error", error=f"engine error: {type(e).__name__}: {e}")

    def _accept_token(self, r: Request, tok, lp, top_ids, top_lp):
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
            text, stop_hit = r.text.push(tok, check_stop=len(r.generated) >= r.params.min_tokens)
            if stop_hit:
                finish = "stop"
        if finish is None and len(r.generated) >= r.params.max_tokens:
            finish = "length"
        if finish is None and r.total >= self.cfg.max_len:
            finish = "length"  # the request's context is full
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
