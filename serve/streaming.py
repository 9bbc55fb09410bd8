"""From the engine's events to an HTTP answer, the same for every generation endpoint: `submit` hands a
request's jobs (one per choice) to the engine and yields their events; `sse_stream` writes them as OpenAI's
server-sent events (`data: {chunk}` lines, then `data: [DONE]`) through the endpoint's response shape
(serve/responses.py); `collect` runs them to the end for an answer in one body.

A client that goes away (streaming or not) has its requests cancelled at once, which frees their KV-cache
slots for the next requests in the queue.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator

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


def submit(engine: Engine, request: Request, jobs: list[Job], max_queue: int) -> AsyncIterator[tuple[int, Event]]:
    """Submits the jobs now; returns an async iterator of (choice index, Event) until every job
    finished. What is left is cancelled when the client disconnects or the consumer stops early."""
    if engine.pending + len(jobs) > max_queue:
        raise APIError(429, "The server is overloaded (request queue full); retry later.", type="server_error",
                       code="overloaded")
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue()
    gone = object()
    ids = [uuid.uuid4().hex for _ in jobs]
    left = set(range(len(jobs)))

    def cancel_left():
        for i in left:
            engine.cancel(ids[i])

    for i, (prompt, params) in enumerate(jobs):
        def emit(ev: Event, i=i):
            loop.call_soon_threadsafe(q.put_nowait, (i, ev))
        engine.submit(prompt, params, emit, request_id=ids[i])

    async def watch():  # frees the slots at once, even while the response is not being iterated
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                if left:
                    log.info("client disconnected: cancelling %d request(s)", len(left))
                cancel_left()
                q.put_nowait(gone)
                return

    async def events():
        watcher = asyncio.create_task(watch())
        try:
            while left:
                item = await q.get()
                if item is gone:
                    return
                i, ev = item
                if ev.finished:
                    left.discard(i)
                yield i, ev
        finally:
            watcher.cancel()
            cancel_left()

    return events()


async def collect(events: AsyncIterator[tuple[int, Event]], n: int) -> Result | None:
    """Runs n jobs' events to the end, or None when the client went away."""
    texts, lps, finish, completion_tokens = [""] * n, [[] for _ in range(n)], [None] * n, 0
    async for i, ev in events:
        if ev.finish_reason == "error":
            raise APIError(500, ev.error or "generation failed", type="server_error")
        texts[i] += ev.text
        lps[i] += ev.logprobs or []
        if ev.finished:
            finish[i] = ev.finish_reason
            completion_tokens += ev.completion_tokens
    if any(f is None or f == "cancelled" for f in finish):
        return None
    return Result(texts, lps, finish, completion_tokens)


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
