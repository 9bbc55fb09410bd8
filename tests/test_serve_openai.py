"""The OpenAI surface real clients use (vLLM's conventions), through `python -m serve` on a transformers-written
checkpoint, with the official `openai` client (httpx where it cannot send the body), transformers (PyTorch
CPU, fp32) as the oracle:

- `echo` with prompt log-probs on /v1/completions (the legacy shape lm-evaluation-harness reads), `max_tokens`
  0 with echo, streamed and not, and with the prompt's blocks in the prefix cache;
- unknown fields ignored with one warning per name, known fields of the wrong type still 400;
- up to `server.max_stop` stop strings, `include_stop_str_in_output`, chat `max_tokens` defaulting to the rest
  of the context, usage counting the prompt once whatever `n`;
- `skip_special_tokens`, `min_tokens` (stop ids and stop strings held off), `repetition_penalty` (transformers'
  RepetitionPenaltyLogitsProcessor), `presence_penalty` / `frequency_penalty` (OpenAI's formula in numpy),
  penalized and plain requests decoding in the same steps, several tokens per decode call;
- /tokenize and /detokenize.

Log-probs agree to PROMPT_ATOL (fp32 on both sides; observed ~2e-6)."""

import concurrent.futures
import os

import httpx
import numpy as np
import pytest
import torch

from model.formats.tokenizer import ByteTokenizer
from tests import hf_reference
from tests.serve_process import serve_process

openai = pytest.importorskip("openai")
transformers = pytest.importorskip("transformers")

KEY = "openai-surface-key"
MAX_LEN = 128
PROMPT_ATOL = 1e-4
TOK = ByteTokenizer()
SPECIAL = set(TOK.special.values())


@pytest.fixture(scope="module")
def reference(hf_checkpoint):
    return hf_checkpoint()  # vocab 512 = the byte tokenizer's


@pytest.fixture(scope="module")
def server(reference, tmp_path_factory):
    path, _ = reference
    log = tmp_path_factory.mktemp("serve_openai") / "server.log"
    args = [f"model.checkpoint={path}", "model.dtype=float32", "model.tokenizer=bytes", "model.name=ref",
            "engine.max_slots=4", f"engine.max_len={MAX_LEN}", "engine.prefill_chunk=16", "engine.prefill_tokens=32",
            "engine.decode_steps=3"]  # several tokens per decode call: the penalties' histories grow on device
    with serve_process(args, log, dict(os.environ, SERVE_API_KEY=KEY), start_timeout=240) as (url, _):
        yield url, log


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=240)


def post(server, path, body):
    return httpx.post(server[0] + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=240)


def text_of(ids, skip_special=True) -> str:
    return b"".join(TOK.token_bytes(int(i)) for i in ids if not (skip_special and i in SPECIAL)).decode(
        errors="replace")


def prompt(seed, n):
    return [int(t) for t in np.random.default_rng(seed).integers(0, 256, n)]


def log_softmax(ref, ids):
    return torch.log_softmax(torch.tensor(hf_reference.logits(ref, np.array([ids]))[0]), -1).numpy()


def oracle_greedy(ref, ids, n, process=None, stop=lambda k, tok: False):
    """transformers' greedy continuation, each step's last logits through `process(logits, prompt, output, k)`;
    ends after the token for which stop(k, tok) holds."""
    out = []
    for k in range(n):
        lg = hf_reference.logits(ref, np.array([ids + out]))[0, -1]
        if process is not None:
            lg = process(lg.copy(), ids, out, k)
        out.append(int(np.argmax(lg)))
        if stop(k, out[-1]):
            break
    return out


# ---------------------------------------------------------------------------------------------------------
# echo

def check_echo(choice, ref, ids, n_out, top):
    lp = choice.logprobs
    logp = log_softmax(ref, ids)
    assert choice.text.startswith(text_of(ids))
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(ids) + n_out
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first token
    want = [logp[i - 1, ids[i]] for i in range(1, len(ids))]
    np.testing.assert_allclose(lp.token_logprobs[1:len(ids)], want, rtol=0, atol=PROMPT_ATOL)
    for i in range(1, len(ids)):
        assert 1 <= len(lp.top_logprobs[i]) <= top  # keyed by text: bytes >= 128 all read '\ufffd'
        assert max(lp.top_logprobs[i].values()) == pytest.approx(logp[i - 1].max(), abs=PROMPT_ATOL)
    assert lp.tokens[:len(ids)] == [TOK.token_bytes(t).decode(errors="replace") for t in ids]
    offsets = np.cumsum([0] + [len(t) for t in lp.tokens[:-1]])
    assert lp.text_offset == offsets.tolist()


def test_echo_prompt_logprobs_equal_transformers(client, reference):
    """A 37-token prompt (three prefill chunks): every prompt token's log-prob and the top 2 there, then the
    generated ones; max_tokens 0 gives the prompt alone (finish "length", no completion tokens)."""
    _, ref = reference
    ids = prompt(0, 37)
    r = client.completions.create(model="ref", prompt=ids, max_tokens=0, echo=True, logprobs=2, temperature=0)
    ch = r.choices[0]
    check_echo(ch, ref, ids, 0, 2)
    assert ch.text == text_of(ids) and ch.finish_reason == "length"
    assert r.usage.prompt_tokens == 37 and r.usage.completion_tokens == 0
    r = client.completions.create(model="ref", prompt=ids, max_tokens=3, echo=True, logprobs=1, temperature=0,
                                  extra_body={"ignore_eos": True})
    out = oracle_greedy(ref, ids, 3)
    check_echo(r.choices[0], ref, ids, 3, 1)
    assert r.choices[0].text == text_of(ids) + text_of(out)
    assert r.usage.completion_tokens == 3


def test_echo_with_cached_prefix_and_streamed(client, reference):
    """The prompt's blocks are in the prefix cache (a plain request ran it first): an echo request still gets
    every prompt position's log-prob (it takes no cached blocks); streamed, the first chunk carries the prompt
    and its log-probs, and the chunks add up to the whole answer."""
    _, ref = reference
    ids = prompt(1, 50)
    client.completions.create(model="ref", prompt=ids, max_tokens=1, temperature=0)
    whole = client.completions.create(model="ref", prompt=ids, max_tokens=2, echo=True, logprobs=1, temperature=0,
                                      extra_body={"ignore_eos": True})
    check_echo(whole.choices[0], ref, ids, 2, 1)
    chunks = list(client.completions.create(model="ref", prompt=ids, max_tokens=2, echo=True, logprobs=1,
                                            temperature=0, stream=True, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].text.startswith(text_of(ids))
    assert len(chunks[0].choices[0].logprobs.tokens) >= len(ids)
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    streamed = [x for c in chunks for x in c.choices[0].logprobs.token_logprobs]
    assert streamed[0] is None
    np.testing.assert_allclose(streamed[1:], whole.choices[0].logprobs.token_logprobs[1:], rtol=0, atol=1e-6)


def test_echo_of_text_prompt_and_max_tokens_zero_needs_echo(client):
    r = client.completions.create(model="ref", prompt="Hello there", max_tokens=0, echo=True)
    assert r.choices[0].text == "Hello there" and r.choices[0].logprobs is None
    r = client.completions.create(model="ref", prompt=["ab", "cde"], n=2, max_tokens=0, echo=True, logprobs=0)
    assert [(c.index, c.text) for c in r.choices] == [(0, "ab"), (1, "ab"), (2, "cde"), (3, "cde")]
    assert [len(c.logprobs.tokens) for c in r.choices] == [3, 3, 4, 4]  # BOS and the bytes
    assert r.usage.prompt_tokens == 7 and r.usage.completion_tokens == 0
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="ref", prompt="Hello", max_tokens=0)
    assert e.value.body["param"] == "max_tokens"


# ---------------------------------------------------------------------------------------------------------
# unknown fields, stop strings, defaults, usage

def test_unknown_fields_ignored_with_one_warning_per_name(server, client):
    for _ in range(2):
        r = client.completions.create(model="ref", prompt="hi", max_tokens=2,
                                      extra_body={"frobnicate": {"a": 1}, "min_p": 0.1})
        assert r.choices[0].finish_reason in ("stop", "length")
    r = post(server, "/v1/chat/completions", {"model": "ref", "max_tokens": 2,
                                              "messages": [{"role": "user", "content": "x", "colour": "red"}]})
    assert r.status_code == 200, r.text
    text = server[1].read_text()
    for name in ("frobnicate", "min_p", "messages.colour"):
        assert text.count(f"is ignored: '{name}'") == 1, (name, text[-2000:])
    for field, value in (("repetition_penalty", "high"), ("min_tokens", 1.5), ("skip_special_tokens", "no")):
        r = post(server, "/v1/completions", {"model": "ref", "prompt": "hi", "max_tokens": 2, field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


def test_many_stop_strings_and_include_stop_str(client, reference):
    _, ref = reference
    for seed in range(200, 300):  # a prompt whose text has a clean two-character window past its start
        ids = prompt(seed, 9)
        text = text_of(oracle_greedy(ref, ids, 16))
        at = next((i for i in range(2, len(text) - 1)
                   if "\ufffd" not in text[i:i + 2] and text.find(text[i:i + 2]) == i), None)
        if at is not None:
            break
    stop = [f"never{i}" for i in range(63)] + [text[at:at + 2]]
    common = dict(model="ref", prompt=ids, max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
    r = client.completions.create(stop=stop, **common)
    assert r.choices[0].text == text[:at] and r.choices[0].finish_reason == "stop"
    r = client.completions.create(stop=stop, **{**common, "extra_body": {"ignore_eos": True,
                                                                          "include_stop_str_in_output": True}})
    assert r.choices[0].text == text[:at + 2]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(stop=stop + ["one too many"], **common)
    assert e.value.body["param"] == "stop" and "64" in e.value.body["message"]


def test_chat_defaults_to_the_rest_of_the_context_and_counts_the_prompt_once(client):
    msgs = [{"role": "user", "content": "Tell me everything."}]
    n_prompt = len(TOK.encode_chat(msgs))
    r = client.chat.completions.create(model="ref", messages=msgs, n=2, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert [c.finish_reason for c in r.choices] == ["length", "length"]
    assert r.usage.prompt_tokens == n_prompt
    assert r.usage.completion_tokens == 2 * (MAX_LEN - n_prompt)
    r = client.completions.create(model="ref", prompt=["ab", "cde"], n=2, max_tokens=1)
    assert r.usage.prompt_tokens == 3 + 4  # each prompt once (BOS + bytes), not once per choice


# ---------------------------------------------------------------------------------------------------------
# sampling: special tokens, min_tokens, penalties

def test_skip_special_tokens(client, reference):
    _, ref = reference
    ids = prompt(0, 11)
    out = oracle_greedy(ref, ids, 10)
    assert any(t in SPECIAL for t in out) and any(t not in SPECIAL for t in out)
    common = dict(model="ref", prompt=ids, max_tokens=10, temperature=0)
    r = client.completions.create(**common, extra_body={"ignore_eos": True})
    assert r.choices[0].text == text_of(out)
    r = client.completions.create(**common, extra_body={"ignore_eos": True, "skip_special_tokens": False})
    assert r.choices[0].text == text_of(out, skip_special=False) and "<|reserved_special_token_" in r.choices[0].text


def first_printable(ref):
    """A prompt whose greedy continuation starts with a printable ASCII byte."""
    for seed in range(100, 200):
        ids = prompt(seed, 6)
        if 33 <= oracle_greedy(ref, ids, 1)[0] < 127:
            return ids
    pytest.fail("no prompt starts with a printable byte")


def test_min_tokens_holds_off_stop_ids_and_stop_strings(client, reference):
    _, ref = reference
    ids = first_printable(ref)
    t0 = oracle_greedy(ref, ids, 1)[0]
    common = dict(model="ref", prompt=ids, max_tokens=12, temperature=0)
    r = client.completions.create(**common, extra_body={"ignore_eos": True, "stop_token_ids": [t0]})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 1 and r.choices[0].text == ""

    def mask(lg, p, out, k):
        if k < 4:
            lg[t0] = -np.inf
        return lg

    want = oracle_greedy(ref, ids, 12, mask, stop=lambda k, tok: k >= 4 and tok == t0)
    r = client.completions.create(**common, extra_body={"ignore_eos": True, "stop_token_ids": [t0], "min_tokens": 4})
    assert r.usage.completion_tokens == len(want)
    assert r.choices[0].finish_reason == ("stop" if want[-1] == t0 else "length")
    assert r.choices[0].text == text_of(want[:-1] if want[-1] == t0 else want)
    # a stop string that the first token's text ends: not looked for before min_tokens
    c = chr(t0)
    r = client.completions.create(**common, stop=[c], extra_body={"ignore_eos": True})
    assert r.choices[0].text == "" and r.choices[0].finish_reason == "stop"
    plain = text_of(oracle_greedy(ref, ids, 12))
    r = client.completions.create(**common, stop=[c], extra_body={"ignore_eos": True, "min_tokens": 3})
    assert r.choices[0].text.startswith(text_of(oracle_greedy(ref, ids, 3))) and len(r.choices[0].text) >= 3
    assert plain.startswith(r.choices[0].text)


def repetition(penalty, prompt_too=True):
    proc = transformers.RepetitionPenaltyLogitsProcessor(penalty)

    def process(lg, p, out, k):  # over the prompt and the output, as transformers and vLLM
        seen = (p if prompt_too else []) + out
        return proc(torch.tensor([seen]), torch.tensor(lg)[None])[0].numpy() if seen else lg
    return process


def openai_penalties(presence, frequency):
    def process(lg, p, out, k):  # OpenAI's formula, over the output tokens only
        counts = np.bincount(np.asarray(out, np.int64), minlength=lg.shape[0]).astype(np.float32)
        return lg - frequency * counts - presence * (counts > 0)
    return process


@pytest.mark.parametrize("case", ["repetition", "presence_frequency", "negative_frequency"])
def test_penalties_equal_the_oracles_beside_a_plain_request(client, reference, case):
    """A penalized and a plain greedy request at once (one batch, several tokens per decode call): each equals
    its oracle; the penalty changes the output (the test would see a penalty left out)."""
    _, ref = reference
    ids = prompt(3, 11)
    if case == "repetition":  # a prompt where penalizing the prompt's tokens too changes the output
        ids = next((x for x in (prompt(s, 11) for s in range(300, 340))
                    if oracle_greedy(ref, x, 14, repetition(1.5)) != oracle_greedy(ref, x, 14, repetition(1.5, False))),
                   None)
        assert ids is not None
    extra, process = {
        "repetition": ({"repetition_penalty": 1.5}, repetition(1.5)),
        "presence_frequency": ({"presence_penalty": 0.7, "frequency_penalty": 1.1}, openai_penalties(0.7, 1.1)),
        "negative_frequency": ({"frequency_penalty": -1.5}, openai_penalties(0.0, -1.5)),
    }[case]
    want, plain = oracle_greedy(ref, ids, 14, process), oracle_greedy(ref, ids, 14)
    assert want != plain

    def run(body):
        return client.completions.create(model="ref", prompt=ids, max_tokens=14, temperature=0,
                                         extra_body={"ignore_eos": True, "skip_special_tokens": False, **body})

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        got, got_plain = pool.map(run, [extra, {}])
    assert got.choices[0].text == text_of(want, skip_special=False)
    assert got_plain.choices[0].text == text_of(plain, skip_special=False)


# ---------------------------------------------------------------------------------------------------------
# /tokenize, /detokenize

def test_tokenize_and_detokenize(server):
    r = post(server, "/tokenize", {"model": "ref", "prompt": "hi"})
    assert r.json() == {"count": 3, "max_model_len": MAX_LEN, "tokens": [TOK.bos_id, 104, 105], "token_strs": None}
    r = post(server, "/tokenize", {"model": "ref", "prompt": "hi", "add_special_tokens": False})
    assert r.json()["tokens"] == [104, 105]
    msgs = [{"role": "user", "content": "Hi"}]
    r = post(server, "/tokenize", {"model": "ref", "messages": msgs})
    assert r.json()["tokens"] == TOK.encode_chat(msgs)
    r = post(server, "/detokenize", {"model": "ref", "tokens": [104, 105, TOK.eot_id]})
    assert r.json() == {"prompt": "hi<|eot_id|>"}
    for path, body, param in (("/detokenize", {"tokens": [1 << 20]}, "tokens"),
                              ("/tokenize", {"model": "ref"}, "prompt"),
                              ("/tokenize", {"model": "gpt-9", "prompt": "x"}, "model")):
        r = post(server, path, body)
        assert r.status_code in (400, 404) and r.json()["error"]["param"] == param, r.text


def test_min_tokens_masks_the_engines_eos_ids_unless_ignore_eos():
    """On device: before min_tokens, a row masks the engine's EOS ids (unless ignore_eos) and its own
    stop_token_ids; from min_tokens on, nothing."""
    import jax.numpy as jnp

    from serve.sampling import SamplingParams, SamplingRows

    params = [SamplingParams(max_tokens=8, temperature=0, min_tokens=2),
              SamplingParams(max_tokens=8, temperature=0, min_tokens=2, ignore_eos=True, stop_token_ids=(7,))]
    logits = np.zeros((2, 16), np.float32)
    logits[:, 5], logits[:, 7], logits[:, 3] = 10, 9, 8  # 5: the EOS id, 7: row 1's stop id
    for generated, want in ((0, [7, 5]), (1, [7, 5]), (2, [5, 5])):
        rows = SamplingRows.host(params, [0, 0], [generated] * 2, [([1], [2] * generated)] * 2, frozenset({5}), 1)
        assert np.asarray(rows.sample(jnp.asarray(logits))[0]).tolist() == want, generated
