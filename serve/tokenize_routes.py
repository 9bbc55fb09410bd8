"""vLLM's tokenizer endpoints, with its bodies and answers:

    POST /tokenize     {"model"?, "prompt", "add_special_tokens"?: true}           -> {"count", "max_model_len",
                       {"model"?, "messages", "add_generation_prompt"?: true,        "tokens", "token_strs": null}
                        "add_special_tokens"?: false}
    POST /detokenize   {"model"?, "tokens"}                                         -> {"prompt"}

A prompt is tokenized as /v1/completions does it (BOS first unless add_special_tokens is false), messages as
/v1/chat/completions does (the chat template; add_special_tokens adds a BOS before it, as vLLM)."""

from __future__ import annotations

from fastapi import FastAPI, Request

from serve.handlers import API, chat_messages
from serve.schemas import APIError, DetokenizeRequest, TokenizeRequest


async def tokenize(api: API, body: TokenizeRequest) -> dict:
    if body.model is not None:
        api.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "Give either 'prompt' or 'messages'.", param="prompt", code="invalid_value")
    tok = api.tokenizer
    if body.prompt is not None:
        bos = body.add_special_tokens is not False
        ids = await api.tokenize(lambda: tok.encode(body.prompt, bos=bos), "prompt")
    else:
        messages = chat_messages(body)
        ids = await api.tokenize(lambda: tok.encode_chat(messages, add_generation_prompt=body.add_generation_prompt),
                                 "messages")
        if body.add_special_tokens:
            ids = [tok.bos_id, *ids]
    return {"count": len(ids), "max_model_len": api.max_len, "tokens": ids, "token_strs": None}


def detokenize(api: API, body: DetokenizeRequest) -> dict:
    if body.model is not None:
        api.check_model(body.model)
    bad = [t for t in body.tokens if not 0 <= t < api.vocab]
    if bad:
        raise APIError(400, f"Token id {bad[0]} is out of range [0, {api.vocab}).", param="tokens",
                       code="invalid_value")
    return {"prompt": api.tokenizer.decode(body.tokens)}


def register(app: FastAPI, api: API, gate, body_timeout: float) -> None:
    """The two routes, behind the API key like the others (`gate`: serve/server.Gate)."""

    @app.post("/tokenize")
    async def tokenize_route(request: Request):
        return await tokenize(api, await gate.read(request, TokenizeRequest, body_timeout))

    @app.post("/detokenize")
    async def detokenize_route(request: Request):
        return detokenize(api, await gate.read(request, DetokenizeRequest, body_timeout))
