"""Against transformers (PyTorch CPU, fp32) as the oracle: the HTTP server (`python -m serve` on a
transformers-written checkpoint, driven by the official `openai` client) generates transformers' greedy
tokens with transformers' log-probabilities, one request alone and several at once; and a `python -m train`
run's exported PEFT adapter, loaded by `peft`, gives the logits of the model the run trained.

Tolerances: fp32 on both sides; log-probabilities agree to 2e-3 absolute (observed ~1e-5); logits to 1e-4
of their largest magnitude. The weights are hf_reference's peaked ones, so greedy tokens have no near-ties."""

import concurrent.futures
import copy
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from flax import nnx

import model
from model.formats.tokenizer import ByteTokenizer
from model.network.lora import LoraConfig
from tests import hf_reference
from tests.serve_process import serve_process

openai = pytest.importorskip("openai")
peft = pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parent.parent
KEY = "parity-key"
LOGPROB_ATOL = 2e-3
N = 12  # generated tokens per request
TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def reference(hf_checkpoint):
    return hf_checkpoint()  # vocab 512 = the byte tokenizer's; llama3 RoPE scaling


@pytest.fixture(scope="module")
def server(reference, tmp_path_factory):
    path, _ = reference
    log = tmp_path_factory.mktemp("serve_parity") / "server.log"
    args = [f"model.checkpoint={path}", "model.dtype=float32", "model.tokenizer=bytes", "model.name=ref",
            "engine.max_slots=4", "engine.max_len=128", "engine.prefill_chunk=16", "engine.prefill_tokens=32"]
    with serve_process(args, log, dict(os.environ, SERVE_API_KEY=KEY), start_timeout=240) as (url, _):
        yield openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=240)


def expected(ref, prompt_ids, n=N):
    """transformers' greedy continuation of `prompt_ids` and the log-probability of each chosen token."""
    toks = np.asarray([prompt_ids], np.int64)
    out = hf_reference.greedy(ref, toks, n)[0]
    full = np.concatenate([toks[0], out])[None]
    logp = torch.log_softmax(torch.tensor(hf_reference.logits(ref, full)[0]), -1).numpy()
    T = len(prompt_ids)
    return out, np.array([logp[T - 1 + i, t] for i, t in enumerate(out)])


def text_of(ids) -> str:
    """The server's text: special tokens skipped (skip_special_tokens defaults to true, as vLLM)."""
    special = set(TOK.special.values())
    return b"".join(TOK.token_bytes(int(i)) for i in ids if int(i) not in special).decode(errors="replace")


def check_completion(client, ref, prompt_ids):
    r = client.completions.create(model="ref", prompt=[int(t) for t in prompt_ids], max_tokens=N, temperature=0,
                                  logprobs=1, extra_body={"ignore_eos": True})
    ids, logp = expected(ref, prompt_ids)
    ch = r.choices[0]
    assert ch.text == text_of(ids), (ch.text, text_of(ids), ids)
    got = np.array(ch.logprobs.token_logprobs)
    np.testing.assert_allclose(got, logp, rtol=0, atol=LOGPROB_ATOL)
    assert r.usage.prompt_tokens == len(prompt_ids) and r.usage.completion_tokens == N


def prompts(seed, lengths):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=n).tolist() for n in lengths]


def test_greedy_completion_equals_transformers_batch_1(server, reference):
    """A prompt longer than one prefill chunk (16): prefill in three steps, then decoding."""
    _, ref = reference
    for p in prompts(0, (37, 5)):
        check_completion(server, ref, p)


def test_greedy_completions_equal_transformers_concurrently(server, reference):
    """Six requests at once on four slots (two wait for a slot), prompts of different lengths batched in
    one step: each is what transformers generates for it alone."""
    _, ref = reference
    ps = prompts(1, (3, 9, 17, 30, 6, 22))
    with concurrent.futures.ThreadPoolExecutor(len(ps)) as pool:
        list(pool.map(lambda p: check_completion(server, ref, p), ps))


def test_greedy_chat_equals_transformers(server, reference):
    """Chat: the conversation rendered by the checkpoint's (here the built-in Llama 3.1) template, then
    transformers' greedy tokens; the logprobs' bytes name each token exactly."""
    _, ref = reference
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there!"}]
    c = server.chat.completions.create(model="ref", messages=msgs, max_tokens=N, temperature=0, logprobs=True,
                                       extra_body={"ignore_eos": True})
    ids, logp = expected(ref, TOK.encode_chat(msgs))
    content = c.choices[0].logprobs.content
    assert [bytes(x.bytes) for x in content] == [TOK.token_bytes(int(i)) for i in ids]
    np.testing.assert_allclose([x.logprob for x in content], logp, rtol=0, atol=LOGPROB_ATOL)
    assert c.choices[0].message.content == text_of(ids)


def test_trained_peft_export_gives_our_logits_in_peft(reference, tmp_path):
    """`python -m train` (its entry point, in this process) fine-tunes LoRA adapters on the checkpoint; the
    run's exported adapter/ loaded by `peft` onto the transformers model reproduces the logits of our model
    with the run's last checkpointed adapters, and differs from the base (the adapters did train)."""
    from train.__main__ import main as train_main
    from train.checkpoints import restore_latest

    path, ref = reference
    over = [f"model.checkpoint={path}", "model.dtype=float32", "data.tokenizer=bytes", "lora.rank=4",
            "lora.alpha=12", "steps=4", "data.seq_len=64", "data.batch_size=8", "data.eval=toy", "eval_every=4",
            "eval_batches=1", "log_every=1", "checkpoint.every=4", "optimizer.warmup_steps=1",
            "optimizer.learning_rate=0.01", f"output_dir={tmp_path}"]
    assert train_main(over) == 0
    m = model.load(path, dtype="float32", lora=LoraConfig(rank=4, alpha=12.0))
    trained = restore_latest(tmp_path / "checkpoints")["params"]
    for p, v in nnx.to_flat_state(m.state.filter(nnx.LoRAParam)):
        leaf = trained
        for k in p:
            leaf = leaf[k]
        v.set_value(np.asarray(leaf))
    toks = np.random.default_rng(5).integers(0, 512, size=(2, 11), dtype=np.int32)
    ours = np.asarray(m(toks))
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(ref), tmp_path / "adapter").eval()
    theirs, base = hf_reference.logits(pm, toks), hf_reference.logits(ref, toks)
    assert np.abs(theirs - base).max() > 1e-3 * np.abs(base).max()  # the trained adapter changes the output
    assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()
