"""LoRA adapters over HTTP, as vLLM serves them (so clients and scripts carry over):

    GET  /v1/models                  the base model (its first name) and each loaded adapter, whose `parent`
                                     is the base: {"id", "object": "model", "owned_by", "parent", "root"}
    a request's `model`              a name of the base (model.served_names) or an adapter; else 404
                                     model_not_found
    POST /v1/load_lora_adapter       {"lora_name", "lora_path"}   only with server.runtime_lora=true (vLLM's
    POST /v1/unload_lora_adapter     {"lora_name"}                VLLM_ALLOW_RUNTIME_LORA_UPDATING); else 404

A refused load or unload (bad path, another base's shapes, rank above engine.max_lora_rank, no free slot,
the name taken or unknown) is a 4xx in OpenAI's error shape and changes nothing. Unloading an adapter that
requests are using: the name goes at once, the requests finish with it (serve/adapters.py).
"""

from __future__ import annotations

import asyncio

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, ValidationError

from serve.adapters import LoraRequestError
from serve.schemas import APIError, Str

OWNER = "llama-jax"


class LoadLoraRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: Str
    lora_path: Str


class UnloadLoraRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: Str
    lora_int_id: int | None = None  # vLLM's; ignored


def base_names(api) -> list[str]:
    return getattr(api, "aliases", None) or [api.model_name]


def resolve(api, name: str) -> str | None:
    """The adapter a request's `model` names (None: the base model); 404 for a name not served here."""
    if name in base_names(api):
        return None
    if name in api.engine.adapters.names:
        return name
    served = ", ".join(repr(x) for x in base_names(api)[:1] + api.engine.adapters.names)
    raise APIError(404, f"The model '{name}' does not exist; this server serves {served}.", param="model",
                   code="model_not_found")


def cards(api) -> list[dict]:
    base = base_names(api)[0]
    out = [{"id": base, "object": "model", "created": api.started, "owned_by": OWNER, "root": base, "parent": None}]
    for a in api.engine.adapters.cards():
        out.append({"id": a["name"], "object": "model", "created": api.started, "owned_by": OWNER,
                    "root": a["path"], "parent": base})
    return out


def card(api, model_id: str) -> dict:
    adapter = resolve(api, model_id)
    all_cards = cards(api)
    return all_cards[0] if adapter is None else next(c for c in all_cards if c["id"] == adapter)


def _refused(e: LoraRequestError, param: str) -> APIError:
    return APIError(e.status, str(e), param=param, code=e.code)


def register(app: FastAPI, api, gate, body_timeout: float, runtime_lora: bool, aliases=()) -> None:
    """The base model's names on `api`, and the run-time adapter routes when `runtime_lora`."""
    api.aliases = list(aliases) or [api.model_name]
    if not runtime_lora:
        return

    async def read(request: Request, schema):
        gate.authorize(request)
        data = await gate.read_json(request, body_timeout)
        try:
            return schema.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            field = ".".join(str(x) for x in err.get("loc", ())) or None
            raise APIError(400, f"{field}: {err.get('msg')}", param=field, code="invalid_value") from None

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        body = await read(request, LoadLoraRequest)
        if body.lora_name in base_names(api):
            raise APIError(400, f"'{body.lora_name}' is the base model's name.", param="lora_name",
                           code="lora_exists")
        try:
            await asyncio.to_thread(api.engine.load_adapter, body.lora_name, body.lora_path)
        except LoraRequestError as e:
            raise _refused(e, "lora_path" if e.code in ("invalid_lora_path", "invalid_lora_adapter") else "lora_name")
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        body = await read(request, UnloadLoraRequest)
        try:
            api.engine.unload_adapter(body.lora_name)
        except LoraRequestError as e:
            raise _refused(e, "lora_name")
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
