"""lm-evaluation-harness end to end: `lm_eval --model local-completions` (its own CLI, in a subprocess) scores a
small multiple-choice task defined here (a task YAML in a tmp dir, local JSON data) against `python -m serve`
on a transformers-written checkpoint with Llama 3's real tokenizer (`tokenizer_backend=huggingface` on the
checkpoint's tokenizer.json). It asks for `echo: true, logprobs: 1, max_tokens: 1` and reads the prompt
tokens' log-probs; each choice's loglikelihood (from `--log_samples`) equals transformers' log_softmax sum
over the same continuation tokens within LL_ATOL (fp32 on both sides; observed 1.9e-6), and its is_greedy
flag agrees. lm-eval 0.4.13 (pinned in pyproject.toml's test extra)."""

import glob
import importlib.resources
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests import hf_reference
from tests.serve_process import serve_process

pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")

LL_ATOL = 1e-4
FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "llama31_tokenizer_config.json")
DOCS = [
    {"question": "The capital of France is", "choices": ["Paris", "London", "Rome"], "answer": 0},
    {"question": "Two plus two equals", "choices": ["four", "five", "twenty-two", "a fish"], "answer": 0},
    {"question": "The colour of the clear daytime sky is", "choices": ["blue", "green"], "answer": 0},
]
TASK = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random Llama with Llama 3's 128,256-token vocabulary, and that tokenizer as transformers' converter
    writes it (tokenizer.json) with Meta's tokenizer_config.json."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from model.formats.tokenizer import Tokenizer

    path = tmp_path_factory.mktemp("lm_eval_ckpt")
    model_file = importlib.resources.files("llama_models") / "llama3" / "tokenizer.model"
    special = Tokenizer(model_file).special
    TikTokenConverter(vocab_file=str(model_file), extra_special_tokens=sorted(special, key=special.get)).converted() \
        .save(str(path / "tokenizer.json"))
    shutil.copy(FIXTURE, path / "tokenizer_config.json")
    ref = hf_reference.save_random_llama(path, vocab=128256)
    return path, ref


def oracle(ref, tok, context: str, continuation: str) -> tuple[float, bool]:
    """transformers' loglikelihood of `continuation` after `context`, tokenized as lm-eval does for a causal
    model (the whole text, split after the context's tokens; no BOS)."""
    ctx = tok(context, add_special_tokens=False).input_ids
    whole = tok(context + continuation, add_special_tokens=False).input_ids
    cont = whole[len(ctx):]
    logp = torch.log_softmax(torch.tensor(hf_reference.logits(ref, np.array([whole]))[0]), -1).numpy()
    rows = logp[len(ctx) - 1:len(whole) - 1]
    return float(sum(rows[j, t] for j, t in enumerate(cont))), all(rows[j].argmax() == t for j, t in enumerate(cont))


def test_lm_eval_loglikelihoods_equal_transformers(checkpoint, tmp_path):
    path, ref = checkpoint
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc.yaml").write_text(TASK.format(data=data))
    args = [f"model.checkpoint={path}", "model.dtype=float32", "model.name=ref", "engine.max_slots=4",
            "engine.max_len=256", "engine.prefill_chunk=32", "engine.prefill_tokens=64"]
    env = {k: v for k, v in os.environ.items() if k != "SERVE_API_KEY"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    with serve_process(args, tmp_path / "server.log", env, start_timeout=300) as (url, _):
        model_args = (f"model=ref,base_url={url}/v1/completions,tokenizer_backend=huggingface,tokenizer={path},"
                      f"num_concurrent=2,max_retries=1")
        cmd = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", model_args,
               "--tasks", "tiny_mc", "--include_path", str(tasks), "--log_samples", "--output_path",
               str(tmp_path / "out"), "--batch_size", "1"]
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-5000:])
    (samples,) = glob.glob(str(tmp_path / "out" / "**" / "samples_tiny_mc_*.jsonl"), recursive=True)
    rows = [json.loads(line) for line in open(samples)]
    assert len(rows) == len(DOCS)
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(str(path))
    diffs = []
    for row in rows:
        assert len(row["resps"]) == len(row["doc"]["choices"])
        for k, resp in enumerate(row["resps"]):
            args = row["arguments"][f"gen_args_{k}"]  # (context, continuation) as lm-eval scored them
            assert args["arg_1"] == " " + row["doc"]["choices"][k]
            ll, greedy = float(resp[0][0]), resp[0][1] in (True, "True")  # the samples file writes strings
            want, want_greedy = oracle(ref, tok, args["arg_0"], args["arg_1"])
            diffs.append(abs(ll - want))
            assert greedy == want_greedy, (args, ll, want)
    assert len(diffs) == sum(len(d["choices"]) for d in DOCS)
    assert max(diffs) <= LL_ATOL, f"largest |ours - transformers'| {max(diffs):.2e} over {len(diffs)} choices"
