"""What the HTTP API answers: the body of a finished completion and the server-sent-event chunks of a
streamed one, per endpoint, as plain dicts in OpenAI's field order (the JSON is written in that order).

A shape is made per request; `serve/streaming.py` drives it: `opening()` chunks first, `chunks(i, event)`
for every engine event of choice i, `envelope([], usage=…)` for the usage chunk, and `body(result)` when
the request is answered at once (not streamed).
"""

from __future__ import annotations

import dataclasses

from serve.events import TokenLogprob


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclasses.dataclass
class Result:
    """Every choice of a request run to the end."""

    texts: list[str]
    logprobs: list[list[TokenLogprob]]
    finish_reasons: list[str]
    completion_tokens: int


@dataclasses.dataclass
class CompletionShape:
    """/v1/completions: `text_completion` objects; `logprobs` is the request's (None: no log-probs)."""

    id: str
    created: int
    model: str
    logprobs: int | None
    choices: int
    offsets: list[int] = dataclasses.field(init=False)  # streamed text so far, per choice (text_offset)

    def __post_init__(self):
        self.offsets = [0] * self.choices

    def envelope(self, choices: list, **extra) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def opening(self) -> list[dict]:
        return []

    def chunks(self, i: int, ev) -> list[dict]:
        if not (ev.text or ev.finished or ev.logprobs):
            return []
        choice = {"index": i, "text": ev.text, "logprobs": self._logprobs(ev.logprobs, self.offsets[i]),
                  "finish_reason": ev.finish_reason}
        self.offsets[i] += len(ev.text)
        return [self.envelope([choice])]

    def body(self, r: Result, prompt_tokens: int) -> dict:
        choices = []
        for i in range(self.choices):
            lp = self._logprobs(r.logprobs[i], 0) if self.logprobs is not None else None
            choices.append({"index": i, "text": r.texts[i], "logprobs": lp, "finish_reason": r.finish_reasons[i]})
        return self.envelope(choices, usage=usage(prompt_tokens, r.completion_tokens))

    def _logprobs(self, lps: list[TokenLogprob] | None, offset: int) -> dict | None:
        if lps is None:
            return None
        toks, values, tops, offs = [], [], [], []
        for lp in lps:
            toks.append(lp.token)
            values.append(lp.logprob)
            tops.append({t: v for _, t, v in lp.top} if self.logprobs else None)
            offs.append(offset)
            offset += len(lp.token)
        return {"tokens": toks, "token_logprobs": values, "top_logprobs": tops, "text_offset": offs}


@dataclasses.dataclass
class ChatShape:
    """/v1/chat/completions: `chat.completion` (whole) or `chat.completion.chunk` objects (streamed: a role
    delta per choice first, then content deltas, then a finish chunk per choice)."""

    id: str
    created: int
    model: str
    logprobs: bool
    choices: int

    def envelope(self, choices: list, **extra) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices, **extra}

    def opening(self) -> list[dict]:
        return [self.envelope([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                "finish_reason": None}]) for i in range(self.choices)]

    def chunks(self, i: int, ev) -> list[dict]:
        out = []
        if ev.text or ev.logprobs:
            lp = {"content": _content_logprobs(ev.logprobs)} if ev.logprobs else None
            out.append(self.envelope([{"index": i, "delta": {"content": ev.text}, "logprobs": lp,
                                       "finish_reason": None}]))
        if ev.finished:
            out.append(self.envelope([{"index": i, "delta": {}, "logprobs": None, "finish_reason": ev.finish_reason}]))
        return out

    def body(self, r: Result, prompt_tokens: int) -> dict:
        choices = [{"index": i, "message": {"role": "assistant", "content": r.texts[i], "refusal": None},
                    "logprobs": {"content": _content_logprobs(r.logprobs[i])} if self.logprobs else None,
                    "finish_reason": r.finish_reasons[i]} for i in range(self.choices)]
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices, "usage": usage(prompt_tokens, r.completion_tokens)}


def _content_logprobs(lps: list[TokenLogprob]) -> list[dict]:
    return [{"token": lp.token, "logprob": lp.logprob, "bytes": lp.bytes,
             "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for _, t, v in lp.top]}
            for lp in lps]
