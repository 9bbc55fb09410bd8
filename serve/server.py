"""OpenAI-compatible HTTP API over the engine, on FastAPI/Starlette + uvicorn.

    POST /v1/completions        prompt (text, list of texts, token ids) -> text; `stream` for SSE chunks
    POST /v1/chat/completions   messages -> the Llama 3.1 chat format -> assistant text; `stream` too
    GET  /v1/models, /v1/models/{id}, /health
    POST /v1/load_lora_adapter, /v1/unload_lora_adapter   with server.runtime_lora (serve/lora_routes.py)
    GET  /metrics                Prometheus text format (serve/metrics.py; vLLM's metric names)
    POST /tokenize, /detokenize  vLLM's (serve/tokenize_routes.py)

This module assembles the app: the routes, the API key, the body size limit, and errors in OpenAI's shape
(serve/schemas.py). Requests are validated where they enter: malformed JSON, a field of the wrong type, a
prompt longer than the limit, max_tokens over the limit and a body
over the size limit get 400; a missing or wrong API key 401; an unknown model 404; a full queue 429 (with
Retry-After); a POST body that is not declared JSON 415. Every refusal is one log line, never a traceback.

Against browsers and slow clients: the Host header must name this server (loopback names unless configured:
DNS rebinding), no CORS headers are sent (a page on another origin cannot read an answer), a connection
must send its request head within `header_timeout` and its body within `body_timeout`, and a request runs
at most `request_timeout` (then its connection is closed). Binding to a non-loopback address needs an API
key or `server.allow_unauthenticated=true`.
The endpoints are in serve/handlers.py, the streaming in serve/streaming.py.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import os

import uvicorn
from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from serve.config import ServerConfig
from serve.engine import Engine
from serve.handlers import API
from serve.streaming import Admission
from serve import lora_routes, tokenize_routes
from serve.schemas import (APIError, ChatRequest, CompletionRequest, error_response, type_name, validation_error,
                           warn_ignored)

log = logging.getLogger("serve.server")

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(f"number {text[:20]}… is out of range")
    return v


class Gate:
    """What every request passes before an endpoint sees it: the API key and the body size limit."""

    def __init__(self, api_key: str | None, max_body_bytes: int):
        self.api_key, self.max_body_bytes = api_key, max_body_bytes

    def authorize(self, request: Request):
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "Incorrect API key provided. Send it as 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")

    async def read_json(self, request: Request, timeout: float) -> dict:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise APIError(415, f"Unsupported Content-Type {kind or '(none)'!r}: send the body as application/json.",
                           code="unsupported_media_type")
        limit = self.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise APIError(400, f"Request body of {declared[:20]} bytes exceeds the limit of {limit} bytes.",
                           code="request_too_large")
        try:
            body = await asyncio.wait_for(self._body(request, limit), timeout)
        except TimeoutError:
            raise APIError(408, f"The request body was not received within {timeout:g} s.", code="timeout") from None
        return parse_json(body)

    @staticmethod
    async def _body(request: Request, limit: int) -> bytes:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise APIError(400, f"Request body exceeds the limit of {limit} bytes.", code="request_too_large")
        return bytes(body)

    async def read(self, request: Request, schema, timeout: float):
        """The authorized body of a request, validated against `schema`."""
        self.authorize(request)
        data = await self.read_json(request, timeout)
        try:
            body = schema.model_validate(data)
        except ValidationError as e:
            raise validation_error(e) from None
        except RecursionError:
            raise APIError(400, "The JSON body is nested too deeply.", code="invalid_json") from None
        warn_ignored(body)
        return body


def parse_json(body: bytes) -> dict:
    """A request body as a JSON object: strict JSON (no NaN / Infinity, no number out of float range, no
    integer over Python's 4300 digits, no nesting deeper than the parser's recursion limit, no lone UTF-16
    surrogate in a string), else a 400."""
    try:
        data = json.loads(body, parse_constant=_reject_constant, parse_float=_finite)
        json.dumps(data, ensure_ascii=False).encode("utf-8")  # a lone surrogate ("\ud800") cannot be encoded
    except RecursionError:
        raise APIError(400, "The JSON body is nested too deeply.", code="invalid_json") from None
    except UnicodeEncodeError:
        raise APIError(400, "The JSON body holds a string that is not valid Unicode (a lone surrogate).",
                       code="invalid_json") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, too many digits, NaN / Infinity
        raise APIError(400, f"We could not parse the JSON body of your request ({str(e)[:200]}). The OpenAI API "
                            f"expects a JSON payload.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"The request body must be a JSON object, got {type_name(data)}.", code="invalid_json")
    return data


def host_names(cfg: ServerConfig) -> frozenset[str]:
    """The Host header names this server answers to (lower case, without port): the loopback names, the
    configured ones, and the bound address if it is not a wildcard."""
    names = {"127.0.0.1", "localhost", "[::1]"} | {h.lower() for h in cfg.allowed_hosts}
    if cfg.host not in LOOPBACK and cfg.host not in ("0.0.0.0", "::", ""):
        names.add(f"[{cfg.host}]" if ":" in cfg.host else cfg.host.lower())
    return frozenset(names)


def host_ok(header: str | None, names: frozenset[str]) -> bool:
    if "*" in names:
        return True
    if not header:
        return False
    h = header.strip().lower()
    if h.startswith("["):
        name, _, rest = h.partition("]")
        name, port = name + "]", rest[1:] if rest.startswith(":") else rest
    else:
        name, _, port = h.partition(":")
    return name in names and (port == "" or port.isdigit())


class Guard:
    """ASGI middleware in front of the app: the Host header check, and the deadline of a request (past it,
    the request's task is cancelled and its connection closed); counts the open generation requests."""

    def __init__(self, app, cfg: ServerConfig, admission: Admission):
        self.app, self.names, self.cfg, self.admission = app, host_names(cfg), cfg, admission

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
        if not host_ok(host, self.names):
            log.info("400 %s %s: Host %r refused", scope["method"], scope["path"], host[:100])
            return await error_response(400, f"Host {host[:100]!r} is not served here.",
                                        code="invalid_host")(scope, receive, send)
        started = False

        async def send_(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        generating = scope["method"] == "POST"
        self.admission.open += generating
        try:
            async with asyncio.timeout(self.cfg.request_timeout + 5):
                await self.app(scope, receive, send_)
        except TimeoutError:
            log.info("%s %s: past the request deadline (%g s), closing", scope["method"], scope["path"],
                     self.cfg.request_timeout)
            if not started:
                await error_response(504, "The request took longer than this server's deadline.",
                                     type="server_error", code="timeout")(scope, receive, send)
        finally:
            self.admission.open -= generating


def _error_handlers(app: FastAPI):
    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        log.info("%d %s %s: %s", exc.status, request.method, request.url.path, exc.message[:300])
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


def create_app(engine: Engine, tokenizer, model_name: str, cfg: ServerConfig = ServerConfig(), aliases=()):
    """The ASGI app: FastAPI's routes behind the Guard (Host check, deadline). `aliases`: every name of the
    base model clients may send (model.served_names; default: `model_name`)."""
    app = FastAPI(title="llama-jax", docs_url=None, redoc_url=None, openapi_url=None)
    gate = Gate(cfg.api_key or os.environ.get("SERVE_API_KEY") or None, cfg.max_body_bytes)
    admission = Admission(cfg.max_queue, cfg.stream_buffer, cfg.request_timeout, cfg.retry_after)
    api = API(engine, tokenizer, model_name, cfg, admission)
    _error_handlers(app)

    @app.get("/health")
    async def health():
        return api.health()

    @app.get("/v1/models")
    async def models(request: Request):
        gate.authorize(request)
        return api.models()

    @app.get("/v1/models/{model_id:path}")
    async def model_info(model_id: str, request: Request):
        gate.authorize(request)
        return api.model(model_id)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await api.completions(request, await gate.read(request, CompletionRequest, cfg.body_timeout))

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await api.chat(request, await gate.read(request, ChatRequest, cfg.body_timeout))

    @app.get("/metrics")
    async def metrics():  # like /health, without the API key (as vLLM's)
        return Response(api.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    tokenize_routes.register(app, api, gate, cfg.body_timeout)
    lora_routes.register(app, api, gate, cfg.body_timeout, cfg.runtime_lora, aliases)

    return Guard(app, cfg, admission)


def check_exposure(cfg: ServerConfig) -> None:
    """Refuses (ValueError) to serve a non-loopback address without an API key unless told to."""
    if cfg.host in LOOPBACK:
        return
    if not (cfg.api_key or os.environ.get("SERVE_API_KEY")) and not cfg.allow_unauthenticated:
        raise ValueError(f"server.host={cfg.host} is not a loopback address and no API key is set "
                         f"(server.api_key or $SERVE_API_KEY): anyone who can reach the port could use the model. "
                         f"Set a key, or server.allow_unauthenticated=true to serve without one.")
    log.warning("listening on %s (not loopback)%s; Host names accepted: %s", cfg.host,
                "" if cfg.api_key or os.environ.get("SERVE_API_KEY") else " WITHOUT an API key",
                ", ".join(sorted(host_names(cfg))))


def protocol(header_timeout: float):
    """uvicorn's h11 protocol with a deadline for each request head: a connection that has not sent a whole
    request head `header_timeout` seconds after it opened (or after its previous answer) is closed."""

    class HeaderTimeoutProtocol(H11Protocol):
        _head_timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def _arm(self):
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(header_timeout, self._head_timeout)

        def _disarm(self):
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self):
            self._head_timer = None
            if self.cycle is None or self.cycle.response_complete:
                if not self.transport.is_closing():
                    self.transport.close()

        def data_received(self, data: bytes):
            if self.cycle is None or self.cycle.response_complete:
                self._arm()
            super().data_received(data)
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm()

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

    return HeaderTimeoutProtocol


def run_server(engine: Engine, tokenizer, model_name: str, cfg: ServerConfig, aliases=()) -> None:
    """Serves until interrupted (SIGINT/SIGTERM: uvicorn stops accepting, then the engine stops)."""
    check_exposure(cfg)
    app = create_app(engine, tokenizer, model_name, cfg, aliases)
    engine.start()
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, access_log=False,
                            timeout_graceful_shutdown=5, http=protocol(cfg.header_timeout),
                            timeout_keep_alive=cfg.keep_alive_timeout, limit_concurrency=cfg.max_connections,
                            h11_max_incomplete_event_size=cfg.max_header_bytes)
    server = uvicorn.Server(config)
    try:
        server.run()
    finally:
        engine.stop()
