"""What the HTTP API accepts: OpenAI's request bodies as pydantic models (strict types: a known field of the
wrong type is a 400; an unknown field is accepted and ignored with one warning per field name, as vLLM does,
since clients send extras through `extra_body`), vLLM's extra sampling fields, its /tokenize and /detokenize
bodies, and OpenAI's error shape `{"error": {"message", "type", "param", "code"}}` with the messages a failed
validation gets."""

from __future__ import annotations

import logging

from typing import Annotated, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

Int = Annotated[int, Field(strict=True)]
Num = Annotated[float, Field(strict=True)]
Str = Annotated[str, Field(strict=True)]
Bool = Annotated[bool, Field(strict=True)]

log = logging.getLogger("serve.schemas")


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code, self.headers)


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}}, status_code=status,
                        headers=headers)


# ---------------------------------------------------------------------------------------------
# Request bodies (OpenAI's fields and vLLM's; unknown fields are ignored, see `warn_ignored`)

class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


_warned: set[str] = set()


def ignored_fields(body: BaseModel, prefix: str = "") -> list[str]:
    """The unknown fields of a validated body, nested ones as `messages.x` (one name for every message)."""
    out = [prefix + k for k in (body.model_extra or {})]
    for name in type(body).model_fields:
        v = getattr(body, name)
        for x in v if isinstance(v, list) else [v]:
            if isinstance(x, BaseModel):
                out += ignored_fields(x, f"{prefix}{name}.")
    return sorted(set(out))


def warn_ignored(body: BaseModel) -> None:
    """Logs each unknown field name once per process (as vLLM: a warning, not an error)."""
    for name in ignored_fields(body):
        if name not in _warned:
            _warned.add(name)
            log.warning("The following field was present in a request and is ignored: %r (logged once)", name)


class StreamOptions(_Body):
    include_usage: Bool | None = None


class GenerationRequest(_Body):
    """The fields completions and chat completions share."""

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
    # vLLM's extra sampling fields (serve/sampling.py implements them)
    ignore_eos: Bool | None = None  # handy for benchmarks
    repetition_penalty: Num | None = None
    min_tokens: Int | None = None
    stop_token_ids: list[Int] | None = None
    skip_special_tokens: Bool | None = None  # default true
    include_stop_str_in_output: Bool | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(GenerationRequest):
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


class ChatRequest(GenerationRequest):
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


class TokenizeRequest(_Body):
    """vLLM's POST /tokenize: a `prompt` (text) or chat `messages`."""

    model: Str | None = None
    prompt: Str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: Bool | None = None  # default: true for a prompt (BOS), false for messages (the template's)
    add_generation_prompt: Bool = True


class DetokenizeRequest(_Body):
    """vLLM's POST /detokenize."""

    model: Str | None = None
    tokens: list[Int]


def type_name(v) -> str:
    """How an error message names a JSON value's type."""
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
    return APIError(400, f"Invalid type for '{param}': {err['msg']} (got {type_name(err.get('input'))}).",
                    param=param, code="invalid_type")
