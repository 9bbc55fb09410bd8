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
    prompt_logprobs: list[list[TokenLogprob] | None] | None = None  # echo, per choice


@dataclasses.dataclass
class CompletionShape:
    """/v1/completions: `text_completion` objects; `logprobs` is the request's (None: no log-probs).
    `echo` (the prompt's text per choice; None: no echo): each choice's text starts with its prompt and, with
    log-probs, they start with the prompt tokens' (the first one's log-prob and top alternatives null), as
    OpenAI's legacy API and vLLM answer; streamed, the first chunk of a choice carries them."""

    id: str
    created: int
    model: str
    logprobs: int | None
    choices: int
    echo: list[str] | None = None
    offsets: list[int] = dataclasses.field(init=False)  # streamed text so far, per choice (text_offset)
    echoed: list[bool] = dataclasses.field(init=False)

    def __post_init__(self):
        self.offsets = [0] * self.choices
        self.echoed = [self.echo is None] * self.choices

    def envelope(self, choices: list, **extra) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def opening(self) -> list[dict]:
        return []

    def chunks(self, i: int, ev) -> list[dict]:
        text, lps = ev.text, ev.logprobs
        if not self.echoed[i]:  # the prompt first (its log-probs come in an event of their own, before any token)
            self.echoed[i] = True
            text = self.echo[i] + text
            if ev.prompt_logprobs is not None:
                lps = ev.prompt_logprobs + (lps or [])
        if not (text or ev.finished or lps):
            return []
        choice = {"index": i, "text": text, "logprobs": self._logprobs(lps, self.offsets[i]),
                  "finish_reason": ev.finish_reason}
        self.offsets[i] += len(text)
        return [self.envelope([choice])]

    def body(self, r: Result, prompt_tokens: int) -> dict:
        choices = []
        for i in range(self.choices):
            text, lps = r.texts[i], r.logprobs[i]
            if self.echo is not None:
                text = self.echo[i] + text
                lps = (r.prompt_logprobs[i] or []) + lps if r.prompt_logprobs else lps
            lp = self._logprobs(lps, 0) if self.logprobs is not None else None
            choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": r.finish_reasons[i]})
        return self.envelope(choices, usage=usage(prompt_tokens, r.completion_tokens))

    def _logprobs(self, lps: list[TokenLogprob] | None, offset: int) -> dict | None:
        if lps is None:
            return None
        toks, values, tops, offs = [], [], [], []
        for lp in lps:
            toks.append(lp.token)
            values.append(lp.logprob)
            tops.append(_top_dict(lp.top) if self.logprobs and lp.logprob is not None else None)
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


def _top_dict(top: list[tuple[int, str, float]]) -> dict[str, float]:
    """The legacy shape's {text: log-prob}: tokens of the same text (bytes >= 128 all read "\ufffd") keep the
    best one's (a reader's max(top.values()) is then the top log-prob, as lm-evaluation-harness assumes)."""
    out: dict[str, float] = {}
    for _, t, v in top:  # best first
        out.setdefault(t, v)
    return out


def _content_logprobs(lps: list[TokenLogprob]) -> list[dict]:
    return [{"token": lp.token, "logprob": lp.logprob, "bytes": lp.bytes,
             "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for _, t, v in lp.top]}
            for lp in lps]
