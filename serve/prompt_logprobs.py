"""The log-probabilities of a prompt's own tokens (`echo` with `logprobs` on /v1/completions, what
lm-evaluation-harness scores multiple-choice tasks with), computed during the request's prefill chunks.

A step that holds a chunk of such a prompt is compiled with `StepShape.prompt_logprobs`: it computes
logits at every token and gathers, on device, the log-prob of the next prompt token at each position
(`next_tokens`) and the top-k there; only those [T] and [T, k] arrays come to the host. A request that
wants them takes no prefix-cached blocks (serve/scheduler.py), so every position is computed. When the
prompt's last chunk has run, the request gets one event holding them all (the first token's log-prob is
None), before its first token's.
"""

from __future__ import annotations

import numpy as np

from serve.events import Event, TokenLogprob


def _wants(r, count: int) -> bool:
    """Whether request r's chunk of `count` tokens computes positions whose prompt log-probs it still needs."""
    return r.prompt_lps is not None and r.computed < len(r.prompt) and count > 0


def next_tokens(reqs, counts: list[int], T: int) -> np.ndarray | None:
    """[T] int32: at each token of a request that wants its prompt's log-probs, the prompt token after it
    (0 elsewhere); None when no request of the step wants them (the default step)."""
    if not any(_wants(r, c) for r, c in zip(reqs, counts)):
        return None
    out = np.zeros(T, np.int32)
    t = 0
    for r, c in zip(reqs, counts):
        if _wants(r, c):
            for j in range(c):
                p = r.computed + j
                if p + 1 < len(r.prompt):
                    out[t + j] = r.prompt[p + 1]
        t += c
    return out


def collect(plan, out: list[np.ndarray], tokenizer, emit) -> None:
    """Stores the step's prompt log-probs (`out`: [1, T], [1, T, k], [1, T, k]) in the requests that want
    them, before `computed` moves on; a request whose prompt is then complete gets its event via
    `emit(req, event)`: a TokenLogprob per prompt token, the first one's log-prob None."""
    lp, top_ids, top_lp = (o[0] for o in out)
    t = 0
    for r, c in zip(plan.reqs, plan.counts):
        if _wants(r, c) and not r.done:
            for j in range(c):
                p = r.computed + j
                if p + 1 < len(r.prompt):
                    r.prompt_lps[p + 1] = (float(lp[t + j]), top_ids[t + j], top_lp[t + j])
            if r.computed + c >= len(r.prompt):
                emit(r, Event(r.id, prompt_logprobs=_entries(r, tokenizer)))
                r.prompt_lps = None
        t += c


def _entries(r, tokenizer) -> list[TokenLogprob]:
    k = r.params.prompt_logprobs

    def text(i):
        b = tokenizer.token_bytes(int(i))
        return b.decode("utf-8", errors="replace"), list(b)

    s, raw = text(r.prompt[0])
    entries = [TokenLogprob(int(r.prompt[0]), s, None, raw, [])]  # nothing predicts the first token
    for tok, (value, ids, lps) in zip(r.prompt[1:], r.prompt_lps[1:]):
        s, raw = text(tok)
        entries.append(TokenLogprob(int(tok), s, value, raw, [(int(i), text(i)[0], float(v))
                                                               for i, v in zip(ids[:k], lps[:k])]))
    return entries
