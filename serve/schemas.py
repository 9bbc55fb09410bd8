"""What the HTTP API accepts: OpenAI's request bodies as pydantic models (strict types; an unknown field
is an error, as in OpenAI's API), and OpenAI's error shape `{"error": {"message", "type", "param", "code"}}`
with the messages a failed validation gets."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

Int = Annotated[int, Field(strict=True)]
Num = Annotated[float, Field(strict=True)]
Str = Annotated[str, Field(strict=True)]
Bool = Annotated[bool, Field(strict=True)]


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
# Request bodies (OpenAI's fields; unknown fields are errors, as in OpenAI's API)

class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


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
    ignore_eos: Bool | None = None  # vLLM's; handy for benchmarks

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
