"""OpenAI-compatible HTTP API over the engine, on FastAPI/Starlette + uvicorn.

    POST /v1/completions        prompt (text, list of texts, token ids) -> text; `stream` for SSE chunks
    POST /v1/chat/completions   messages -> the Llama 3.1 chat format -> assistant text; `stream` too
    GET  /v1/models, /v1/models/{id}, /health

Requests are validated where they enter (design.md: errors at the edge) and answered in OpenAI's error
shape, `{"error": {"message", "type", "param", "code"}}`: malformed JSON, a field of the wrong type, an
argument OpenAI's API does not have, a prompt longer than the limit, max_tokens over the limit and a
body over the size limit get 400; a missing or wrong API key 401; an unknown model 404; a full queue
429. Streaming follows OpenAI's server-sent events (`data: {chunk}` lines, then `data: [DONE]`).
A client that goes away (streaming or not) has its requests cancelled at once, which frees their
KV-cache slots for the next requests in the queue.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import os
import time
import uuid
from typing import Annotated, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.config import ServerConfig
from serve.engine import Engine, Event
from serve.sampling import MAX_TOP_LOGPROBS, SamplingParams

log = logging.getLogger("serve.server")

Int = Annotated[int, Field(strict=True)]
Num = Annotated[float, Field(strict=True)]
Str = Annotated[str, Field(strict=True)]
Bool = Annotated[bool, Field(strict=True)]


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code)


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}}, status_code=status)


# ---------------------------------------------------------------------------------------------
# Request bodies (OpenAI's fields; unknown fields are errors, as in OpenAI's API)

class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: Bool | None = None


class _Sampling(_Body):
    model: Str
    max_tokens: Int | None = None
    temperature: Num | None = None
    top_p: Num | None = None
    top_k: Int | None = None  # not OpenAI's, but vLLM's and common in clients' extra_body
    n: Int | None = None
    stream: Bool | None = False
    stream_options: StreamOptions | None = None
    stop: Str | list[Str] | None = None
    seed: Int | None = None
    presence_penalty: Num | None = None
    frequency_penalty: Num | None = None
    logit_bias: dict[str, Num] | None = None
    user: Str | None = None
    ignore_eos: Bool | None = None  # vLLM's; handy for benchmarks


class CompletionRequest(_Sampling):
    prompt: Str | list[Str] | list[Int] | list[list[Int]]
    logprobs: Int | None = None
    echo: Bool | None = False
    best_of: Int | None = None
    suffix: Str | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: Str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Str | list[TextPart] | None = None
    name: Str | None = None
    tool_call_id: Str | None = None
    tool_calls: list[dict] | None = None
    refusal: Str | None = None


class ResponseFormat(_Body):
    type: Literal["text"]


class ChatRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: Int | None = None
    logprobs: Bool | None = False
    top_logprobs: Int | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict] | None = None
    tool_choice: Str | dict | None = None
    parallel_tool_calls: Bool | None = None
    store: Bool | None = None
    metadata: dict[str, Str] | None = None
    service_tier: Str | None = None


def _type_name(v) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object", type(None): "null"}.get(type(v), type(v).__name__)


def validation_error(e: ValidationError) -> APIError:
    err = e.errors()[0]
    loc = [str(x) for x in err["loc"] if not str(x).startswith(("function-", "union[", "list[", "str", "int",
                                                                    "float", "bool", "literal["))]
    # pydantic puts union members in the path (e.g. prompt.str / prompt.list[int]); keep the field path
    param = ".".join(x for x in loc if not x.startswith(("lax-", "strict-")))
    kind = err["type"]
    if kind == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param,
                        code="unrecognized_argument")
    if kind == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    return APIError(400, f"Invalid type for '{param}': {err['msg']} (got {_type_name(err.get('input'))}).",
                    param=param, code="invalid_type")


# ---------------------------------------------------------------------------------------------
# The app

def create_app(engine: Engine, tokenizer, model_name: str, cfg: ServerConfig = ServerConfig()) -> FastAPI:
    app = FastAPI(title="llama-jax", docs_url=None, redoc_url=None, openapi_url=None)
    api_key = cfg.api_key or os.environ.get("SERVE_API_KEY") or None
    max_len = engine.cfg.max_len
    max_prompt = min(cfg.max_prompt_tokens or max_len - 1, max_len - 1)
    max_new = min(cfg.max_tokens or max_len - 1, max_len - 1)
    started = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        kind = {404: "Not found", 405: "Method not allowed"}.get(exc.status_code, str(exc.detail))
        return error_response(exc.status_code, f"{kind}: {request.method} {request.url.path}",
                              code="not_found" if exc.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        log.exception("unhandled error")
        return error_response(500, f"internal error: {type(exc).__name__}", type="server_error")

    def authorize(request: Request):
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key provided. Send it as 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")

    async def read_json(request: Request) -> dict:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > cfg.max_body_bytes:
            raise APIError(400, f"Request body of {declared} bytes exceeds the limit of {cfg.max_body_bytes} bytes.",
                           code="request_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > cfg.max_body_bytes:
                raise APIError(400, f"Request body exceeds the limit of {cfg.max_body_bytes} bytes.",
                               code="request_too_large")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"We could not parse the JSON body of your request ({e}). The OpenAI API expects "
                                f"a JSON payload.", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, f"The request body must be a JSON object, got {_type_name(data)}.",
                           code="invalid_json")
        return data

    def check_model(name: str):
        if name != model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{model_name}'.",
                           param="model", code="model_not_found")

    def sampling_params(body: _Sampling, max_tokens: int | None, prompt_len: int, logprobs: int | None,
                        param: str) -> SamplingParams:
        def need(cond, message, p):
            if not cond:
                raise APIError(400, message, param=p, code="invalid_value")

        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(body, name)
            need(v is None or -2 <= v <= 2, f"'{name}' must be in [-2, 2], got {v}.", name)
            need(not v, f"'{name}' is not supported by this server (only 0).", name)
        need(not body.logit_bias, "'logit_bias' is not supported by this server.", "logit_bias")
        t = 1.0 if body.temperature is None else float(body.temperature)
        need(0 <= t <= 2, f"'temperature' must be in [0, 2], got {t}.", "temperature")
        top_p = 1.0 if body.top_p is None else float(body.top_p)
        need(0 <= top_p <= 1, f"'top_p' must be in [0, 1], got {top_p}.", "top_p")
        top_k = body.top_k or 0
        need(top_k >= 0 or top_k == -1, f"'top_k' must be >= 0, got {top_k}.", "top_k")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        need(len(stop) <= 4, f"'stop' takes up to 4 sequences, got {len(stop)}.", "stop")
        if max_tokens is None:
            max_tokens = min(cfg.default_max_tokens, max_len - prompt_len)
        need(max_tokens >= 1, f"'{param}' must be at least 1, got {max_tokens}.", param)
        need(max_tokens <= max_new, f"'{param}' is {max_tokens}, above this server's limit of {max_new}.", param)
        if prompt_len + max_tokens > max_len:
            raise APIError(400, f"This model's maximum context length is {max_len} tokens. However, you requested "
                                f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the "
                                f"completion). Please reduce the prompt or {param}.", param=param,
                           code="context_length_exceeded")
        return SamplingParams(max_tokens=max_tokens, temperature=t, top_p=max(top_p, 1e-6), top_k=max(top_k, 0),
                              seed=body.seed, stop=tuple(stop), logprobs=logprobs, ignore_eos=bool(body.ignore_eos))

    def check_prompt(ids: list[int], param: str):
        if not ids:
            raise APIError(400, "The prompt is empty.", param=param, code="invalid_value")
        if len(ids) > max_prompt:
            raise APIError(400, f"The prompt is {len(ids)} tokens, above this server's limit of {max_prompt}.",
                           param=param, code="context_length_exceeded")
        vocab = engine.model.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"Token id {bad[0]} is out of range [0, {vocab}).", param=param, code="invalid_value")

    def per_choice(sp: SamplingParams, n: int) -> list[SamplingParams]:
        """n choices of one prompt: with a seed, choice j samples with seed + j (distinct, reproducible)."""
        if sp.seed is None or n == 1:
            return [sp] * n
        return [dataclasses.replace(sp, seed=sp.seed + j) for j in range(n)]

    def choices_count(n: int | None, prompts: int) -> int:
        n = 1 if n is None else n
        if n < 1:
            raise APIError(400, f"'n' must be at least 1, got {n}.", param="n", code="invalid_value")
        if n * prompts > cfg.max_n:
            raise APIError(400, f"{n * prompts} choices requested (n × prompts); this server's limit is {cfg.max_n}.",
                           param="n", code="invalid_value")
        return n

    def run(request: Request, jobs: list[tuple[list[int], SamplingParams]]):
        """Submits the jobs now; returns an async iterator of (choice index, Event) until every job
        finished. What is left is cancelled when the client disconnects or the consumer stops early."""
        if engine.pending + len(jobs) > cfg.max_queue:
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

    async def read_request(request: Request, schema):
        """The authorized, validated body of a generation request, for this server's model."""
        authorize(request)
        try:
            body = schema.model_validate(await read_json(request))
        except ValidationError as e:
            raise validation_error(e) from None
        check_model(body.model)
        return body

    async def collect(request: Request, jobs) -> tuple[list[str], list[list], list[str], int] | None:
        """Runs the jobs to the end: (texts, log-probs, finish reasons, completion tokens), or None when
        the client went away."""
        texts, lps, finish, completion_tokens = [""] * len(jobs), [[] for _ in jobs], [None] * len(jobs), 0
        async for i, ev in run(request, jobs):
            if ev.finish_reason == "error":
                raise APIError(500, ev.error or "generation failed", type="server_error")
            texts[i] += ev.text
            lps[i] += ev.logprobs or []
            if ev.finished:
                finish[i] = ev.finish_reason
                completion_tokens += ev.completion_tokens
        if any(f is None or f == "cancelled" for f in finish):
            return None
        return texts, lps, finish, completion_tokens

    def event_stream(chunks) -> StreamingResponse:
        return StreamingResponse(chunks, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"

    def error_chunk(ev: Event) -> str:
        return sse({"error": {"message": ev.error or "generation failed", "type": "server_error", "param": None,
                              "code": None}})

    # ------------------------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "active": engine.active, "waiting": engine.pending,
                "compiled_steps": len(engine.compiled_shapes)}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": started,
                                            "owned_by": "llama-jax"}]}

    @app.get("/v1/models/{model_id:path}")
    async def model_info(model_id: str, request: Request):
        authorize(request)
        check_model(model_id)
        return {"id": model_name, "object": "model", "created": started, "owned_by": "llama-jax"}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_request(request, CompletionRequest)
        for name, ok in (("echo", not body.echo), ("best_of", body.best_of in (None, 1)), ("suffix", not body.suffix)):
            if not ok:
                raise APIError(400, f"'{name}' is not supported by this server.", param=name, code="unsupported")
        p = body.prompt
        if isinstance(p, str):
            prompts = [p]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [list(p)]
        else:
            prompts = list(p)
        if not prompts:
            raise APIError(400, "'prompt' is empty.", param="prompt", code="invalid_value")
        ids = [tokenizer.encode(x, bos=True) if isinstance(x, str) else list(x) for x in prompts]
        if body.logprobs is not None and not 0 <= body.logprobs <= MAX_TOP_LOGPROBS:
            raise APIError(400, f"'logprobs' must be in [0, {MAX_TOP_LOGPROBS}], got {body.logprobs}.",
                           param="logprobs", code="invalid_value")
        for x in ids:
            check_prompt(x, "prompt")
        n = choices_count(body.n, len(ids))
        max_tokens = body.max_tokens if body.max_tokens is not None else 16  # OpenAI's default for completions
        jobs = []
        for x in ids:
            sp = sampling_params(body, max_tokens, len(x), body.logprobs, "max_tokens")
            jobs += [(x, s) for s in per_choice(sp, n)]
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        prompt_tokens = sum(len(x) for x in ids)

        def logprobs_obj(ev: Event, offset: int):
            if ev.logprobs is None:
                return None
            toks, lps, tops, offs = [], [], [], []
            for lp in ev.logprobs:
                toks.append(lp.token)
                lps.append(lp.logprob)
                tops.append({t: v for _, t, v in lp.top} if body.logprobs else None)
                offs.append(offset)
                offset += len(lp.token)
            return {"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = run(request, jobs)

            async def chunks():
                completion_tokens = 0
                offsets = [0] * len(jobs)
                async for i, ev in events:
                    if ev.finish_reason == "error":
                        yield error_chunk(ev)
                        continue
                    if ev.finish_reason == "cancelled":
                        continue
                    if ev.text or ev.finished or ev.logprobs:
                        choice = {"index": i, "text": ev.text, "logprobs": logprobs_obj(ev, offsets[i]),
                                  "finish_reason": ev.finish_reason}
                        offsets[i] += len(ev.text)
                        yield sse({"id": rid, "object": "text_completion", "created": created, "model": model_name,
                                   "choices": [choice]})
                    if ev.finished:
                        completion_tokens += ev.completion_tokens
                if include_usage:
                    yield sse({"id": rid, "object": "text_completion", "created": created, "model": model_name,
                               "choices": [], "usage": usage(prompt_tokens, completion_tokens)})
                yield "data: [DONE]\n\n"

            return event_stream(chunks())

        done = await collect(request, jobs)
        if done is None:
            return JSONResponse({}, status_code=499)  # the client is gone; nobody reads this
        texts, lps, finish, completion_tokens = done
        choices = []
        for i in range(len(jobs)):
            lp = logprobs_obj(Event("", logprobs=lps[i]), 0) if body.logprobs is not None else None
            choices.append({"index": i, "text": texts[i], "logprobs": lp, "finish_reason": finish[i]})
        return {"id": rid, "object": "text_completion", "created": created, "model": model_name, "choices": choices,
                "usage": usage(prompt_tokens, completion_tokens)}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await read_request(request, ChatRequest)
        if body.tools:
            raise APIError(400, "'tools' are not supported by this server.", param="tools", code="unsupported")
        if not body.messages:
            raise APIError(400, "'messages' must hold at least one message.", param="messages", code="invalid_value")
        messages = []
        for m in body.messages:
            content = m.content if isinstance(m.content, str) else "".join(p.text for p in (m.content or []))
            messages.append({"role": "system" if m.role == "developer" else m.role, "content": content})
        ids = tokenizer.encode_chat(messages)
        check_prompt(ids, "messages")
        top = None
        if body.logprobs:
            top = body.top_logprobs or 0
            if not 0 <= top <= MAX_TOP_LOGPROBS:
                raise APIError(400, f"'top_logprobs' must be in [0, {MAX_TOP_LOGPROBS}], got {top}.",
                               param="top_logprobs", code="invalid_value")
        elif body.top_logprobs:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true.", param="top_logprobs", code="invalid_value")
        n = choices_count(body.n, 1)
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        sp = sampling_params(body, limit, len(ids), top, param)
        jobs = [(ids, s) for s in per_choice(sp, n)]
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def content_logprobs(lps):
            return [{"token": lp.token, "logprob": lp.logprob, "bytes": lp.bytes,
                     "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for _, t, v in lp.top]}
                    for lp in lps]

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = run(request, jobs)

            def chunk(choices, **extra):
                return sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                            "system_fingerprint": None, "choices": choices, **extra})

            async def chunks():
                completion_tokens = 0
                for i in range(n):
                    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}])
                async for i, ev in events:
                    if ev.finish_reason == "error":
                        yield error_chunk(ev)
                        continue
                    if ev.finish_reason == "cancelled":
                        continue
                    if ev.text or ev.logprobs:
                        lp = {"content": content_logprobs(ev.logprobs)} if ev.logprobs else None
                        yield chunk([{"index": i, "delta": {"content": ev.text}, "logprobs": lp, "finish_reason": None}])
                    if ev.finished:
                        completion_tokens += ev.completion_tokens
                        yield chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": ev.finish_reason}])
                if include_usage:
                    yield chunk([], usage=usage(len(ids) * n, completion_tokens))
                yield "data: [DONE]\n\n"

            return event_stream(chunks())

        done = await collect(request, jobs)
        if done is None:
            return JSONResponse({}, status_code=499)
        texts, lps, finish, completion_tokens = done
        choices = [{"index": i, "message": {"role": "assistant", "content": texts[i], "refusal": None},
                    "logprobs": {"content": content_logprobs(lps[i])} if body.logprobs else None,
                    "finish_reason": finish[i]} for i in range(n)]
        return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                "system_fingerprint": None, "choices": choices, "usage": usage(len(ids) * n, completion_tokens)}

    return app


def run_server(engine: Engine, tokenizer, model_name: str, cfg: ServerConfig) -> None:
    """Serves until interrupted (SIGINT/SIGTERM: uvicorn stops accepting, then the engine stops)."""
    import uvicorn

    app = create_app(engine, tokenizer, model_name, cfg)
    if cfg.host not in ("127.0.0.1", "localhost", "::1"):
        key = cfg.api_key or os.environ.get("SERVE_API_KEY")
        log.warning("listening on %s (not loopback)%s", cfg.host,
                    "" if key else " WITHOUT an API key: anyone who can reach this port can use the model")
    engine.start()
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, access_log=False,
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    try:
        server.run()
    finally:
        engine.stop()
