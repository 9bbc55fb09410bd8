"""What a request gives back, event by event: `Event`s (text deltas, token ids, optional log-probabilities;
at the end the finish reason and token counts) and the incremental detokenization behind their text
(`TextStream`: complete UTF-8 only; text that may be the start of a stop string is held back until it is
known not to be)."""

from __future__ import annotations

import codecs
import dataclasses


@dataclasses.dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float | None  # None: the first token of an echoed prompt (nothing predicts it)
    bytes: list[int]
    top: list[tuple[int, str, float]]  # (id, text, logprob) alternatives, best first


@dataclasses.dataclass
class Event:
    request_id: str
    text: str = ""  # new text since the previous event
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # stop | length | cancelled | error
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    ttft: float | None = None  # seconds from submit to the first token (first event only)
    prompt_logprobs: list[TokenLogprob] | None = None  # echo: one per prompt token, in an event of its own
    # before the first token's (serve/prompt_logprobs.py)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def special_ids(tokenizer) -> frozenset[int]:
    """The ids of the tokenizer's special tokens (<|eot_id|>, <|reserved_special_token_N|>, …)."""
    return frozenset(getattr(tokenizer, "special", {}).values())


class TextStream:
    """Incremental detokenization with stop strings: UTF-8 characters are only emitted whole, and a
    tail that could be the beginning of a stop string is held back. Tokens in `skip` add no text; with
    `include_stop`, the text ends with the stop string that ended it (else just before it)."""

    def __init__(self, tokenizer, stop: tuple[str, ...], include_stop: bool = False, skip: frozenset[int] = frozenset()):
        self.tok = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.include_stop, self.skip = include_stop, skip
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending = ""

    @classmethod
    def of(cls, tokenizer, params) -> TextStream:
        """The stream of a request's `SamplingParams` (stop strings, include_stop_str_in_output,
        skip_special_tokens)."""
        skip = special_ids(tokenizer) if params.skip_special_tokens else frozenset()
        return cls(tokenizer, params.stop, params.include_stop_str_in_output, skip)

    def push(self, token_id: int, check_stop: bool = True) -> tuple[str, bool]:
        """(text to emit now, whether a stop string ended the text); stop strings are looked for only when
        `check_stop` (min_tokens: not before)."""
        if int(token_id) not in self.skip:
            self.pending += self.dec.decode(self.tok.token_bytes(token_id))
        if self.stop and check_stop:
            hits = [(i, i + len(s)) for i, s in ((self.pending.find(s), s) for s in self.stop) if i >= 0]
            if hits:
                start, end = min(hits)
                out, self.pending = self.pending[:end if self.include_stop else start], ""
                return out, True
        cut = max(len(self.pending) - self.hold, 0)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending + self.dec.decode(b"", final=True), ""
        return out
