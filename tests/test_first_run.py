"""The first run connects: `python -m train` (the embedded default) writes an adapter that `python -m serve generate`
serves on the same random base, so the served model scores the run's eval loss and continues the toy sequences;
a preset's random weights do not depend on LoRA or quantization settings; the headline TPU config run on this
machine ends in one line naming the devices it needs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from model import LlamaConfig, init
from model.formats.tokenizer import ByteTokenizer
from model.network.lora import LoraConfig
from model.network.model import quantize_state
from serve.__main__ import main as serve_main
from serve.config import ModelSpec
from serve.engine import Engine, EngineConfig
from serve.sampling import SamplingParams
from serve.weights import build
from sharding.mesh import make_mesh
from train import data as data_lib
from train import toy_data
from train.__main__ import main as train_main

ROOT = Path(__file__).resolve().parent.parent
EVAL = ROOT / "train" / "data" / "toy_eval.jsonl"


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """`python -m train` with nothing but its output directory changed (the README's first command)."""
    out = tmp_path_factory.mktemp("first_run")
    assert train_main([f"output_dir={out}"]) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, metrics[-1]


@pytest.fixture(scope="module")
def served(toy_run):
    """The model `python -m serve` builds (serve_toy: the toy preset, seed 0, one device) with the run's adapter."""
    spec = ModelSpec(preset="toy", adapter=str(toy_run[0] / "adapter"))
    return build(spec, make_mesh("tensor=1", jax.devices()[:1]))


def test_served_model_scores_the_runs_eval_loss(toy_run, served):
    """The eval loss of the adapter on the base that serve builds is the run's own (it was 6.6, against the
    run's 1.7, while adapters drew from the base weights' random stream: they fitted a base that existed only in
    training)."""
    model, tok, _ = served
    docs, _ = data_lib.read_documents(EVAL, tok, 128, "truncate", 1.0)
    eb = data_lib.Batches(docs, seq_len=128, batch_size=16, seed=0, shuffle=False)
    total = count = 0.0
    for _ in range(4):  # the run's Evaluator: eval_batches=4 of the unshuffled eval documents
        b = next(eb)
        logits = np.asarray(model(b["inputs"], b["positions"], b["segments"]), np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        nll = -np.take_along_axis(logp, b["targets"][..., None], -1)[..., 0]
        total, count = total + float((nll * b["weights"]).sum()), count + float(b["weights"].sum())
    assert toy_run[1]["eval_loss"] < 2.5
    np.testing.assert_allclose(total / count, toy_run[1]["eval_loss"], rtol=1e-4)


def test_serve_generate_continues_the_sequences(toy_run, served, capsys):
    """`python -m serve generate` answers the README's prompt correctly (before: reserved-token noise), the
    serving engine answers the eval prompts correctly, and its greedy continuations are the argmax of the very
    distribution the eval loss scored (the full-recompute `Model.greedy` of the served model)."""
    assert serve_main(["generate", "--prompt", "Continue: c d e f", "--max-tokens", "8",
                       f"model.adapter={toy_run[0] / 'adapter'}"]) == 0
    text = capsys.readouterr().out.rstrip("\n")
    assert text.startswith(" g h i j"), text
    model, tok, _ = served
    recs = [r for r in map(json.loads, EVAL.read_text().splitlines()) if "prompt" in r][:16]
    prompts = [tok.encode(r["prompt"], bos=True) for r in recs]
    engine = Engine(model, tok, EngineConfig(max_slots=8, max_len=128, prefill_chunk=64, prefill_tokens=128,
                                             min_kv_bucket=64))
    out = engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0))
    same = 0
    for ids, o in zip(prompts, out):
        want = [int(t) for t in model.greedy(np.asarray([ids]), 12)[0]]
        got = list(o["token_ids"])
        stopped = len(got) == 12 or want[len(got)] in engine.stop_ids or (got and got[-1] in engine.stop_ids)
        same += got == want[:len(got)] and stopped
    assert same >= 15, same  # one near-tie may flip between the KV-cache and the full-recompute arithmetic
    answers = [(toy_data.continuation(r["prompt"].removeprefix("Continue: ")), o["text"]) for r, o in zip(recs, out)]
    # Every answer continues the run; 150 steps on a toy leave the end-of-turn token close after the third
    # letter, so some answers stop there, and how many depends on the CPU's arithmetic (AVX-512 vs AMX).
    assert all(text.startswith(want[:6]) for want, text in answers), answers
    assert sum(text.startswith(want) for want, text in answers) >= 10, answers


def _flat(m) -> dict:
    return {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(m.state)}


def test_preset_weights_do_not_depend_on_lora_or_quant():
    cfg = LlamaConfig.preset("toy")
    plain = _flat(init(cfg, seed=3))
    for variant in (cfg.replace(lora=LoraConfig(rank=4)), cfg.replace(lora=LoraConfig(rank=8, targets=("v", "down")))):
        with_lora = _flat(init(variant, seed=3))
        assert {k: v for k, v in with_lora.items() if k[-1] not in ("lora_a", "lora_b")}.keys() == plain.keys()
        for k, v in plain.items():
            np.testing.assert_array_equal(with_lora[k], v, err_msg="/".join(map(str, k)))
    qcfg = cfg.replace(quant="int8", lora=LoraConfig(rank=4))
    _, expected = quantize_state(init(cfg, seed=3).state, cfg, "int8")
    got = _flat(init(qcfg, seed=3))
    for k, v in nnx.to_flat_state(expected):
        np.testing.assert_array_equal(got[k], np.asarray(v.get_value()), err_msg="/".join(map(str, k)))
    assert ByteTokenizer.VOCAB_SIZE == cfg.vocab_size


def test_headline_config_without_its_devices_is_one_line():
    r = subprocess.run([sys.executable, "-m", "train", "--config", "lora_v6e"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env=os.environ)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(errors) == 1 and "needs 64 devices" in errors[0] and "--compile-only" in errors[0], r.stderr
