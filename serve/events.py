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
    logprob: float
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

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class TextStream:
    """Incremental detokenization with stop strings: UTF-8 characters are only emitted whole, and a
    tail that could be the beginning of a stop string is held back."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tok = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending = ""

    def push(self, token_id: int) -> tuple[str, bool]:
        """(text to emit now, whether a stop string ended the text)."""
        self.pending += self.dec.decode(self.tok.token_bytes(token_id))
        if self.stop:
            hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
            if hits:
                out, self.pending = self.pending[:min(hits)], ""
                return out, True
        cut = max(len(self.pending) - self.hold, 0)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending + self.dec.decode(b"", final=True), ""
        return out
