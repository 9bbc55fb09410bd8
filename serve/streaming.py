"""From the engine's events to an HTTP answer, the same for every generation endpoint: `submit` hands a
request's jobs (one per choice) to the engine and yields their events; `sse_stream` writes them as OpenAI's
server-sent events (`data: {chunk}` lines, then `data: [DONE]`) through the endpoint's response shape
(serve/responses.py); `collect` runs them to the end for an answer in one body.

A client that goes away (streaming or not) has its requests cancelled at once, which frees their KV-cache
slots for the next requests in the queue; so does one that stops reading a stream (its events waiting
beyond `stream_buffer`) or runs past its deadline.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import StreamingResponse

from serve.engine import Engine
from serve.events import Event
from serve.responses import Result, usage
from serve.sampling import SamplingParams
from serve.schemas import APIError

log = logging.getLogger("serve.streaming")

DONE = "data: [DONE]\n\n"
Job = tuple[list[int], SamplingParams]  # (prompt ids, sampling) of one choice


@dataclasses.dataclass
class Admission:
    """What an HTTP request may hold: the queue limit (requests waiting for a slot, and open responses, whose
    clients may be slow to read them: `open` is kept by serve/server.Guard), the events one request may have
    waiting for its client, and its deadline."""

    max_queue: int
    stream_buffer: int
    request_timeout: float
    retry_after: int = 1
    open: int = 0  # generation requests whose response is not finished

    def check(self, engine: Engine, jobs: int):
        if engine.pending + jobs > self.max_queue or self.open > self.max_queue + engine.cfg.max_slots:
            raise APIError(429, "The server is overloaded (request queue full); retry later.", type="server_error",
                           code="overloaded", headers={"Retry-After": str(self.retry_after)})


def submit(engine: Engine, request: Request, jobs: list[Job], admission: Admission,
           tracker: Callable[[], Callable[[Event], None]] | None = None,
           adapter: str | None = None) -> AsyncIterator[tuple[int, Event]]:
    """Submits the jobs now; returns an async iterator of (choice index, Event) until every job
    finished. What is left is cancelled when the client disconnects, the consumer stops early, more than
    `admission.stream_buffer` events wait for the consumer (a client that stops reading a stream) or the
    request's deadline passes; the last two end each job left with an error event. `tracker()` gives each
    job a callback that sees its events on the engine thread, as they are made (serve/metrics.py). `adapter`:
    the LoRA adapter the jobs run with (None: the base model)."""
    admission.check(engine, len(jobs))
    loop = asyncio.get_running_loop()
    q: collections.deque = collections.deque()
    ready = asyncio.Event()
    gone = object()
    ids = [uuid.uuid4().hex for _ in jobs]
    left = set(range(len(jobs)))
    state = {"over": False}

    def cancel_left():
        for i in left:
            engine.cancel(ids[i])

    def end(reason: str | None):
        """Cancels what is left and drops what was queued; with a reason, each job left ends with an error."""
        if state["over"]:
            return
        state["over"] = True
        cancel_left()
        q.clear()
        if reason:
            log.info("%s: cancelling %d request(s)", reason, len(left))
            q.extend((i, Event(ids[i], finish_reason="error", error=reason)) for i in sorted(left))
        q.append(gone)
        ready.set()

    def put(item):
        if state["over"]:
            return
        if len(q) >= admission.stream_buffer:
            end(f"the client is not reading its answer ({admission.stream_buffer} events unread)")
            return
        q.append(item)
        ready.set()

    for i, (prompt, params) in enumerate(jobs):
        def emit(ev: Event, i=i, seen=tracker() if tracker else None):
            if seen is not None:
                seen(ev)
            loop.call_soon_threadsafe(put, (i, ev))
        try:
            engine.submit(prompt, params, emit, request_id=ids[i], adapter=adapter)
        except ValueError as e:  # the engine's own checks (the handlers' should have caught it first)
            for j in range(i):
                engine.cancel(ids[j])
            raise APIError(400, str(e), code="invalid_value") from None
    timer = loop.call_later(admission.request_timeout, end,
                            f"the request's deadline ({admission.request_timeout:g} s) passed")

    async def watch():  # frees the slots at once, even while the response is not being iterated
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                if left and not state["over"]:
                    log.info("client disconnected: cancelling %d request(s)", len(left))
                end(None)
                return

    async def events():
        watcher = asyncio.create_task(watch())
        try:
            while left:
                if not q:
                    ready.clear()
                    await ready.wait()
                    continue
                item = q.popleft()
                if item is gone:
                    return
                i, ev = item
                if ev.finished:
                    left.discard(i)
                yield i, ev
        finally:
            watcher.cancel()
            timer.cancel()
            cancel_left()
            q.clear()

    return events()


async def without_output(events: AsyncIterator[tuple[int, Event]]) -> AsyncIterator[tuple[int, Event]]:
    """The events with the generated tokens taken out (echo with max_tokens 0: one token is generated, as
    vLLM does, and is not part of the answer); each job finishes with "length"."""
    try:
        async for i, ev in events:
            if ev.prompt_logprobs is None and ev.finish_reason not in ("error", "cancelled"):
                ev = dataclasses.replace(ev, text="", token_ids=[], logprobs=None, completion_tokens=0,
                                         finish_reason="length" if ev.finished else None)
            yield i, ev
    finally:
        await events.aclose()  # its own clean-up (cancel what is left) now, not when collected


async def collect(events: AsyncIterator[tuple[int, Event]], n: int) -> Result | None:
    """Runs n jobs' events to the end, or None when the client went away."""
    texts, lps, finish, completion_tokens = [""] * n, [[] for _ in range(n)], [None] * n, 0
    prompt_lps = [None] * n
    async for i, ev in events:
        if ev.finish_reason == "error":
            raise APIError(500, ev.error or "generation failed", type="server_error")
        if ev.prompt_logprobs is not None:
            prompt_lps[i] = ev.prompt_logprobs
        texts[i] += ev.text
        lps[i] += ev.logprobs or []
        if ev.finished:
            finish[i] = ev.finish_reason
            completion_tokens += ev.completion_tokens
    if any(f is None or f == "cancelled" for f in finish):
        return None
    return Result(texts, lps, finish, completion_tokens, prompt_lps)


def sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def error_chunk(ev: Event) -> str:
    return sse({"error": {"message": ev.error or "generation failed", "type": "server_error", "param": None,
                          "code": None}})


async def sse_stream(events: AsyncIterator[tuple[int, Event]], shape, prompt_tokens: int,
                     include_usage: bool) -> AsyncIterator[str]:
    """The one streaming path: the shape's opening chunks, a chunk per event (an error event becomes an
    error chunk, a cancelled one nothing), the usage chunk if asked for, then [DONE]."""
    completion_tokens = 0
    for chunk in shape.opening():
        yield sse(chunk)
    async for i, ev in events:
        if ev.finish_reason == "error":
            yield error_chunk(ev)
            continue
        if ev.finish_reason == "cancelled":
            continue
        for chunk in shape.chunks(i, ev):
            yield sse(chunk)
        if ev.finished:
            completion_tokens += ev.completion_tokens
    if include_usage:
        yield sse(shape.envelope([], usage=usage(prompt_tokens, completion_tokens)))
    yield DONE


def event_stream(chunks: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(chunks, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
