"""The endpoints behind the routes of serve/server.py, given bodies already authorized and validated by type
(serve/schemas.py): the checks of values against this server's model and limits, then the request's jobs
(one per choice) answered through one path (`respond`): streamed or collected."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse

from serve import lora_routes, streaming
from serve.config import ServerConfig
from serve.engine import Engine
from serve.responses import ChatShape, CompletionShape
from serve.sampling import MAX_TOP_LOGPROBS, SamplingParams
from serve.events import special_ids
from serve.metrics import Metrics
from serve.schemas import APIError, ChatRequest, CompletionRequest, GenerationRequest, TokenizeRequest


def _need(cond: bool, message: str, param: str):
    if not cond:
        raise APIError(400, message, param=param, code="invalid_value")


def per_choice(sp: SamplingParams, n: int) -> list[SamplingParams]:
    """n choices of one prompt: with a seed, choice j samples with seed + j (distinct, reproducible)."""
    if sp.seed is None or n == 1:
        return [sp] * n
    return [dataclasses.replace(sp, seed=sp.seed + j) for j in range(n)]


def completion_prompts(body: CompletionRequest) -> list:
    """`prompt` as a list of prompts (texts or token-id lists)."""
    for name, ok in (("best_of", body.best_of in (None, 1)), ("suffix", not body.suffix)):
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
    return prompts


def chat_messages(body: ChatRequest | TokenizeRequest) -> list[dict]:
    """The messages as the tokenizer's chat template takes them ({"role", "content"} with text content)."""
    if getattr(body, "tools", None):
        raise APIError(400, "'tools' are not supported by this server.", param="tools", code="unsupported")
    if not body.messages:
        raise APIError(400, "'messages' must hold at least one message.", param="messages", code="invalid_value")
    messages = []
    for m in body.messages:
        content = m.content if isinstance(m.content, str) else "".join(p.text for p in (m.content or []))
        messages.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return messages


class API:
    """The endpoints of one served model."""

    def __init__(self, engine: Engine, tokenizer, model_name: str, cfg: ServerConfig,
                 admission: streaming.Admission | None = None):
        self.engine, self.tokenizer, self.model_name, self.cfg = engine, tokenizer, model_name, cfg
        self.admission = admission or streaming.Admission(cfg.max_queue, cfg.stream_buffer, cfg.request_timeout,
                                                          cfg.retry_after)
        self.vocab = engine.model.config.vocab_size
        self.max_len = engine.cfg.max_len
        self.max_prompt = min(cfg.max_prompt_tokens or self.max_len - 1, self.max_len - 1)
        self.max_new = min(cfg.max_tokens or self.max_len - 1, self.max_len - 1)
        self.started = int(time.time())
        self.special = special_ids(tokenizer)
        self.metrics = Metrics(engine, model_name)

    # ------------------------------------------------------------------------------------------
    # the endpoints

    def health(self) -> dict:
        e = self.engine
        return {"status": "ok", "model": self.model_name, "active": e.active, "waiting": e.pending,
                "compiled_steps": len(e.compiled_shapes), "kv_pool": e.pool_stats()}

    def models(self) -> dict:
        return {"object": "list", "data": lora_routes.cards(self)}  # the base and each LoRA adapter

    def model(self, model_id: str) -> dict:
        return lora_routes.card(self, model_id)

    async def completions(self, request: Request, body: CompletionRequest):
        self.check_model(body.model)  # the cheap checks first, tokenization (off the event loop) after
        prompts = completion_prompts(body)
        if body.logprobs is not None and not 0 <= body.logprobs <= MAX_TOP_LOGPROBS:
            raise APIError(400, f"'logprobs' must be in [0, {MAX_TOP_LOGPROBS}], got {body.logprobs}.",
                           param="logprobs", code="invalid_value")
        n = self.choices_count(body.n, len(prompts))
        self.check_limits(body, body.max_tokens, "max_tokens", least=0 if body.echo else 1)
        ids = await self.tokenize(lambda: [self.tokenizer.encode(x, bos=True) if isinstance(x, str) else list(x)
                                           for x in prompts], "prompt")
        for x in ids:
            self.check_prompt(x, "prompt")
        max_tokens = body.max_tokens if body.max_tokens is not None else 16  # OpenAI's (and vLLM's) default
        # echo: the prompt's text first and, with logprobs, its tokens' log-probs; max_tokens 0 generates one
        # token and drops it (as vLLM)
        prompt_lps = body.logprobs if body.echo else None
        jobs, echoes = [], []
        for p, x in zip(prompts, ids):
            sp = self.sampling_params(body, max(max_tokens, 1), len(x), body.logprobs, "max_tokens", prompt_lps)
            jobs += [(x, s) for s in per_choice(sp, n)]
            echoes += [p if isinstance(p, str) else self.text_of(x, sp.skip_special_tokens)] * n
        shape = CompletionShape(f"cmpl-{uuid.uuid4().hex}", int(time.time()), body.model, body.logprobs,
                                len(jobs), echoes if body.echo else None)
        return await self.respond(request, body, jobs, shape, sum(len(x) for x in ids), drop_output=max_tokens == 0)

    async def chat(self, request: Request, body: ChatRequest):
        self.check_model(body.model)  # the cheap checks first, tokenization (off the event loop) after
        messages = chat_messages(body)
        n = self.choices_count(body.n, 1)
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        self.check_limits(body, limit, param)
        top = None
        if body.logprobs:
            top = body.top_logprobs or 0
            _need(0 <= top <= MAX_TOP_LOGPROBS, f"'top_logprobs' must be in [0, {MAX_TOP_LOGPROBS}], got {top}.",
                  "top_logprobs")
        else:
            _need(not body.top_logprobs, "'top_logprobs' needs 'logprobs': true.", "top_logprobs")
        ids = await self.tokenize(lambda: self.tokenizer.encode_chat(messages), "messages")
        self.check_prompt(ids, "messages")
        sp = self.sampling_params(body, limit, len(ids), top, param)
        jobs = [(ids, s) for s in per_choice(sp, n)]
        shape = ChatShape(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), body.model, bool(body.logprobs), n)
        return await self.respond(request, body, jobs, shape, len(ids))  # usage counts the prompt once

    async def respond(self, request: Request, body: GenerationRequest, jobs: list[streaming.Job], shape,
                      prompt_tokens: int, drop_output: bool = False):
        """The one answer path of the generation endpoints: server-sent events, or one body at the end.
        `drop_output`: the generated token is not part of the answer (echo with max_tokens 0)."""
        events = streaming.submit(self.engine, request, jobs, self.admission, self.metrics.tracker(body.model),
                                  adapter=self.check_model(body.model))
        if drop_output:
            events = streaming.without_output(events)
        if body.stream:
            return streaming.event_stream(streaming.sse_stream(events, shape, prompt_tokens, body.include_usage))
        done = await streaming.collect(events, len(jobs))
        if done is None:
            return JSONResponse({}, status_code=499)  # the client is gone; nobody reads this
        return shape.body(done, prompt_tokens)

    # ------------------------------------------------------------------------------------------
    # checks of values (types were checked by the schemas)

    @staticmethod
    async def tokenize(fn, param: str):
        """fn() in a worker thread (a long prompt must not stall the event loop)."""
        try:
            return await asyncio.to_thread(fn)
        except UnicodeError as e:
            raise APIError(400, f"The text cannot be tokenized ({type(e).__name__}).", param=param,
                           code="invalid_value") from None
        except ValueError as e:  # the chat template refused the messages (raise_exception, a bad role, …)
            raise APIError(400, str(e), param=param, code="invalid_value") from None

    def check_limits(self, body: GenerationRequest, max_tokens: int | None, param: str, least: int = 1):
        """The bounds of every sampling value, before any work: the model's vocabulary and context, int64 seeds,
        stop strings' count and length."""
        if max_tokens is not None:
            _need(max_tokens >= least, f"'{param}' must be at least {least}, got {max_tokens}.", param)
            _need(max_tokens <= self.max_new, f"'{param}' is {max_tokens}, above this server's limit of "
                                              f"{self.max_new}.", param)
        if body.top_k is not None:
            _need(-1 <= body.top_k <= self.vocab, f"'top_k' must be in [0, {self.vocab}] (the vocabulary size) "
                                                  f"or -1, got {body.top_k}.", "top_k")
        if body.seed is not None:
            _need(-2**63 <= body.seed < 2**63, f"'seed' must be a 64-bit integer, got {str(body.seed)[:30]}.",
                  "seed")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        _need(len(stop) <= self.cfg.max_stop, f"'stop' takes up to {self.cfg.max_stop} sequences (server.max_stop), "
                                              f"got {len(stop)}.", "stop")
        longest = max((len(x) for x in stop), default=0)
        _need(longest <= self.cfg.max_stop_chars, f"a 'stop' sequence is {longest} characters, above this "
                                                   f"server's limit of {self.cfg.max_stop_chars}.", "stop")
        for name in ("temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            v = getattr(body, name)
            _need(v is None or math.isfinite(v), f"'{name}' must be a finite number, got {v}.", name)
        bad = [t for t in body.stop_token_ids or [] if not 0 <= t < self.vocab]
        _need(not bad, f"'stop_token_ids' holds {bad[:1]}, out of range [0, {self.vocab}).", "stop_token_ids")

    def check_model(self, name: str) -> str | None:
        """The LoRA adapter `name` picks (None: the base model); 404 for a name this server does not serve."""
        return lora_routes.resolve(self, name)

    def check_prompt(self, ids: list[int], param: str):
        if not ids:
            raise APIError(400, "The prompt is empty.", param=param, code="invalid_value")
        if len(ids) > self.max_prompt:
            raise APIError(400, f"The prompt is {len(ids)} tokens, above this server's limit of {self.max_prompt}.",
                           param=param, code="context_length_exceeded")
        vocab = self.engine.model.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"Token id {bad[0]} is out of range [0, {vocab}).", param=param, code="invalid_value")

    def choices_count(self, n: int | None, prompts: int) -> int:
        n = 1 if n is None else n
        if n < 1:
            raise APIError(400, f"'n' must be at least 1, got {n}.", param="n", code="invalid_value")
        if n * prompts > self.cfg.max_n:
            raise APIError(400, f"{n * prompts} choices requested (n × prompts); this server's limit is "
                                f"{self.cfg.max_n}.", param="n", code="invalid_value")
        return n

    def sampling_params(self, body: GenerationRequest, max_tokens: int | None, prompt_len: int,
                        logprobs: int | None, param: str, prompt_logprobs: int | None = None) -> SamplingParams:
        """A choice's SamplingParams; `max_tokens` None (chat): the rest of the context, as vLLM and OpenAI."""
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(body, name)
            _need(v is None or -2 <= v <= 2, f"'{name}' must be in [-2, 2], got {v}.", name)
        rp = 1.0 if body.repetition_penalty is None else float(body.repetition_penalty)
        _need(0 < rp <= 2, f"'repetition_penalty' must be in (0, 2], got {rp}.", "repetition_penalty")
        _need(not body.logit_bias, "'logit_bias' is not supported by this server.", "logit_bias")
        t = 1.0 if body.temperature is None else float(body.temperature)
        _need(0 <= t <= 2, f"'temperature' must be in [0, 2], got {t}.", "temperature")
        top_p = 1.0 if body.top_p is None else float(body.top_p)
        _need(0 <= top_p <= 1, f"'top_p' must be in [0, 1], got {top_p}.", "top_p")
        top_k = body.top_k or 0
        self.check_limits(body, max_tokens, param)
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if max_tokens is None:
            max_tokens = min(self.max_len - prompt_len, self.max_new)
        _need(max_tokens >= 1, f"'{param}' must be at least 1, got {max_tokens}.", param)
        _need(max_tokens <= self.max_new, f"'{param}' is {max_tokens}, above this server's limit of "
                                          f"{self.max_new}.", param)
        if prompt_len + max_tokens > self.max_len:
            raise APIError(400, f"This model's maximum context length is {self.max_len} tokens. However, you "
                                f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} "
                                f"for the completion). Please reduce the prompt or {param}.", param=param,
                           code="context_length_exceeded")
        min_tokens = body.min_tokens or 0
        _need(0 <= min_tokens <= max_tokens, f"'min_tokens' must be in [0, {param}={max_tokens}], got {min_tokens}.",
              "min_tokens")
        return SamplingParams(
            max_tokens=max_tokens, temperature=t, top_p=max(top_p, 1e-6), top_k=max(top_k, 0), seed=body.seed,
            stop=tuple(stop), stop_token_ids=tuple(body.stop_token_ids or ()), logprobs=logprobs,
            ignore_eos=bool(body.ignore_eos), prompt_logprobs=prompt_logprobs, min_tokens=min_tokens,
            repetition_penalty=rp, presence_penalty=float(body.presence_penalty or 0.0),
            frequency_penalty=float(body.frequency_penalty or 0.0),
            skip_special_tokens=body.skip_special_tokens is not False,
            include_stop_str_in_output=bool(body.include_stop_str_in_output))

    def text_of(self, ids: list[int], skip_special: bool) -> str:
        """The text of token ids (an echoed prompt), special tokens left out when `skip_special`."""
        skip = self.special if skip_special else frozenset()
        return b"".join(self.tokenizer.token_bytes(t) for t in ids if t not in skip).decode("utf-8", errors="replace")
