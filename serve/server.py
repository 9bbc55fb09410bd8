"""OpenAI-compatible HTTP API over the engine, on FastAPI/Starlette + uvicorn.

    POST /v1/completions        prompt (text, list of texts, token ids) -> text; `stream` for SSE chunks
    POST /v1/chat/completions   messages -> the Llama 3.1 chat format -> assistant text; `stream` too
    GET  /v1/models, /v1/models/{id}, /health

This module assembles the app: the routes, the API key, the body size limit, and errors in OpenAI's shape
(serve/schemas.py). Requests are validated where they enter: malformed JSON, a field of the wrong type, an
argument OpenAI's API does not have, a prompt longer than the limit, max_tokens over the limit and a body
over the size limit get 400; a missing or wrong API key 401; an unknown model 404; a full queue 429.
The endpoints are in serve/handlers.py, the streaming in serve/streaming.py.
"""

from __future__ import annotations

import hmac
import json
import logging
import os

import uvicorn
from fastapi import FastAPI, Request
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.config import ServerConfig
from serve.engine import Engine
from serve.handlers import API
from serve.schemas import APIError, ChatRequest, CompletionRequest, error_response, type_name, validation_error

log = logging.getLogger("serve.server")


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

    async def read_json(self, request: Request) -> dict:
        limit = self.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise APIError(400, f"Request body of {declared} bytes exceeds the limit of {limit} bytes.",
                           code="request_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise APIError(400, f"Request body exceeds the limit of {limit} bytes.", code="request_too_large")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"We could not parse the JSON body of your request ({e}). The OpenAI API expects "
                                f"a JSON payload.", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, f"The request body must be a JSON object, got {type_name(data)}.",
                           code="invalid_json")
        return data

    async def read(self, request: Request, schema):
        """The authorized body of a request, validated against `schema`."""
        self.authorize(request)
        try:
            return schema.model_validate(await self.read_json(request))
        except ValidationError as e:
            raise validation_error(e) from None


def _error_handlers(app: FastAPI):
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


def create_app(engine: Engine, tokenizer, model_name: str, cfg: ServerConfig = ServerConfig()) -> FastAPI:
    app = FastAPI(title="llama-jax", docs_url=None, redoc_url=None, openapi_url=None)
    gate = Gate(cfg.api_key or os.environ.get("SERVE_API_KEY") or None, cfg.max_body_bytes)
    api = API(engine, tokenizer, model_name, cfg)
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
        return await api.completions(request, await gate.read(request, CompletionRequest))

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await api.chat(request, await gate.read(request, ChatRequest))

    return app


def run_server(engine: Engine, tokenizer, model_name: str, cfg: ServerConfig) -> None:
    """Serves until interrupted (SIGINT/SIGTERM: uvicorn stops accepting, then the engine stops)."""
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
