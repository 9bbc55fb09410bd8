"""The serving engine (serve/engine.py) against transformers: greedy tokens equal for one request and for
requests of different lengths decoded together; continuous batching, chunked prefill, compile buckets,
stops, sampling, log-probs, int8 KV cache, quantized weights and LoRA adapters (PEFT as the oracle)."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

import model
from model.formats.tokenizer import ByteTokenizer
from serve.config import EngineConfig, ModelSpec
from serve.engine import Engine
from serve.events import TextStream
from serve.sampling import SamplingParams, sample
from serve.scheduler import bucket, buckets, call_steps, token_bucket
from sharding.mesh import make_mesh
from tests import hf_reference

CFG = EngineConfig(max_slots=4, max_len=128, prefill_chunk=16, prefill_tokens=32, min_kv_bucket=128)
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(0, 256, n)] for n in lengths]


@pytest.fixture(scope="module")
def hf(hf_checkpoint):
    return hf_checkpoint()  # (directory, transformers model): fp32, random, peaked logits


@pytest.fixture(scope="module")
def tp_mesh():
    return make_mesh({"tensor": 2}, jax.devices()[:2])  # KV heads (2) split over 2 devices


@pytest.fixture(scope="module")
def engine(hf, tp_mesh):
    m = model.load(hf[0], dtype="float32", mesh=tp_mesh)
    return Engine(m, ByteTokenizer(), CFG)


def hf_greedy(torch_model, prompt, n):
    return [int(t) for t in hf_reference.greedy(torch_model, np.array([prompt]), n)[0]]


def test_greedy_matches_transformers_batch1(engine, hf):
    assert engine.layout == "scan" and not engine.cpu_kernels  # 2 devices: the sharded, scanned path
    (p,) = prompts([11])
    (r,) = engine.generate([p], GREEDY)
    assert r["token_ids"] == hf_greedy(hf[1], p, 24)
    assert r["finish_reason"] == "length" and r["completion_tokens"] == 24


def test_several_tokens_per_decode_call_sharded(hf, tp_mesh):
    """decode_steps=3 on the sharded, scanned path: the same tokens as transformers (requests ending inside
    a call drop its extra tokens; max_tokens 10 is not a multiple of 3)."""
    m = model.load(hf[0], dtype="float32", mesh=tp_mesh)
    e = Engine(m, ByteTokenizer(), EngineConfig(**{**CFG.__dict__, "decode_steps": 3}))
    ps = prompts([5, 12], seed=12)
    res = e.generate(ps, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    for p, r in zip(ps, res):
        assert r["token_ids"] == hf_greedy(hf[1], p, 10) and r["completion_tokens"] == 10
    assert any(shape[-1] == 3 for shape in e.compiled_shapes)


def test_greedy_matches_transformers_decoded_together(engine, hf):
    ps = prompts([3, 17, 40, 70], seed=1)  # 40 and 70 take 3 and 5 prefill chunks of 16
    results = engine.generate(ps, GREEDY)
    for p, r in zip(ps, results):
        assert r["token_ids"] == hf_greedy(hf[1], p, 24), f"prompt of {len(p)} tokens"
    assert engine.stats["step_rows"] > engine.stats["steps"]  # rows really were batched


def test_continuous_batching_joins_and_leaves(engine, hf):
    """6 requests on 4 slots: the 5th and 6th join as soon as short ones leave, while the long one goes on."""
    ps = prompts([5, 9, 6, 12, 7, 8], seed=2)
    lengths = [40, 4, 4, 4, 6, 6]
    order = []

    def emit_for(i):
        return lambda ev: order.append((i, ev.finished))

    for i, (p, n) in enumerate(zip(ps, lengths)):
        engine.submit(p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), emit_for(i))
    outputs = {i: [] for i in range(6)}
    while sum(f for _, f in order) < 6:
        engine.step()
    long_done = order.index((0, True))
    for late in (4, 5):
        assert order.index((late, True)) < long_done, "a waiting request should not wait for the long one"
    # and the tokens are those of each request decoded alone
    res = engine.generate(ps, [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in lengths])
    for i, (p, n) in enumerate(zip(ps, lengths)):
        outputs[i] = res[i]["token_ids"]
        assert outputs[i] == hf_greedy(hf[1], p, n)


def test_chunked_prefill_keeps_decoding(engine):
    """A 100-token prompt is prefilled in chunks while a decoding request gets a token at every step."""
    (short, long_) = prompts([4, 100], seed=3)
    events = []
    engine.submit(short, SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True),
                  lambda ev: events.append(("short", ev)))
    while not events:
        engine.step()
    engine.submit(long_, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True),
                  lambda ev: events.append(("long", ev)))
    start, steps = len(events), 0
    while not any(k == "long" for k, _ in events[start:]):
        engine.step()
        steps += 1
    during = sum(1 for k, _ in events[start:] if k == "short")
    assert during == steps, f"{during} decode tokens in the long prefill's {steps} steps"
    assert steps > 1  # the prompt took several steps (chunks)
    while not any(k == "short" and ev.finished for k, ev in events) or \
            not any(k == "long" and ev.finished for k, ev in events):
        engine.step()


def test_compiles_once_per_bucket(engine):
    engine.generate(prompts([2, 30, 50], seed=4), GREEDY)
    seen = set(engine.compiled_shapes)
    assert engine.device_step.jitted._cache_size() == len(seen)  # one executable per bucket, none per request
    cfg = engine.cfg  # resolved for the platform
    pages = set(buckets(cfg.min_kv_bucket // cfg.block_size, cfg.max_len // cfg.block_size))
    for T, S, P, _, steps in seen:
        assert S in buckets(1, CFG.max_slots) and P in pages and steps in (1, call_steps(engine.decode_steps, S))
        assert T == S or T == token_bucket(T, 16, CFG.prefill_tokens)  # decode only, or with prompt chunks
    engine.generate(prompts([4, 31, 49], seed=5), GREEDY)  # new requests, same buckets
    assert engine.compiled_shapes == seen and engine.device_step.jitted._cache_size() == len(seen)


def test_buckets():
    assert [bucket(n, 16, 512) for n in (1, 16, 17, 300, 512, 900)] == [16, 16, 32, 512, 512, 512]
    assert buckets(128, 1000) == [128, 256, 512, 1000]
    # a step's tokens: powers of two and the three quarters between them, multiples of 8
    assert [token_bucket(n, 16, 512) for n in (1, 16, 17, 24, 25, 33, 48, 49, 65, 97, 300, 900)] == \
        [16, 16, 24, 24, 32, 48, 48, 64, 96, 128, 384, 512]
    assert token_bucket(70, 16, 100) == 96 and token_bucket(99, 16, 100) == 100
    # tokens per decode call: all of decode_steps up to 4 rows, half beyond
    assert [call_steps(4, n) for n in (1, 4, 5, 64)] == [4, 4, 2, 2] and call_steps(1, 64) == call_steps(3, 9) == 1


def test_stops_and_max_tokens(engine):
    (p,) = prompts([6], seed=6)
    # special tokens' names in the text, as before skip_special_tokens (tests/test_serve_openai.py tests it)
    (full,) = engine.generate([p], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True,
                                                  skip_special_tokens=False))
    toks = full["token_ids"]
    # a stop token id ends the completion at its first occurrence (the id is counted, not printed)
    stop_id = toks[5]
    (r,) = engine.generate([p], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True,
                                               stop_token_ids=(stop_id,), skip_special_tokens=False))
    first = toks.index(stop_id)
    assert r["token_ids"] == toks[:first + 1] and r["finish_reason"] == "stop"
    assert r["text"] == ByteTokenizer().decode(toks[:first])
    # a stop string: the text up to it, never the string itself
    text = full["text"]
    stop = text[8:11]
    (r,) = engine.generate([p], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, stop=(stop,),
                                               skip_special_tokens=False))
    assert r["finish_reason"] == "stop" and r["text"] == text[:text.find(stop)]
    # the model's and tokenizer's stop ids end generation unless ignore_eos
    engine.stop_ids, saved = engine.stop_ids | {toks[2]}, engine.stop_ids
    try:
        (r,) = engine.generate([p], SamplingParams(max_tokens=30, temperature=0.0))
        assert r["token_ids"] == toks[:toks.index(toks[2]) + 1] and r["finish_reason"] == "stop"
    finally:
        engine.stop_ids = saved
    (r,) = engine.generate([p], SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True))
    assert r["token_ids"] == toks[:7] and r["finish_reason"] == "length"


def test_text_stream_holds_back_stop_prefixes():
    ts = TextStream(ByteTokenizer(), ("END",))
    out = [ts.push(t) for t in b"abcEN"]
    assert "".join(o for o, _ in out) == "abc" and not any(s for _, s in out)  # "EN" might start "END"
    assert ts.push(ord("D")) == ("", True)
    ts = TextStream(ByteTokenizer(), ())
    assert [ts.push(t)[0] for t in "é".encode()] == ["", "é"]  # whole UTF-8 characters only


def test_seeded_sampling_is_reproducible(engine):
    ps = prompts([7, 13, 21], seed=7)
    sp = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    (alone,) = engine.generate([ps[0]], sp)
    together = engine.generate(ps, [sp, SamplingParams(max_tokens=16, temperature=0.5, seed=5, ignore_eos=True),
                                    GREEDY])
    assert together[0]["token_ids"] == alone["token_ids"]  # same seed, whatever shares the batch
    (other,) = engine.generate([ps[0]], SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=99,
                                                       ignore_eos=True))
    assert other["token_ids"] != alone["token_ids"]
    (k1,) = engine.generate([ps[1]], SamplingParams(max_tokens=16, temperature=1.0, top_k=1, seed=3, ignore_eos=True))
    (g,) = engine.generate([ps[1]], SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    assert k1["token_ids"] == g["token_ids"]  # top-k 1 is greedy


def test_sample_distribution():
    """top-k and top-p keep exactly the right tokens, drawn in proportion to their probabilities."""
    n = 4000
    probs = np.array([0.4, 0.3, 0.2, 0.1, 0.0], np.float32) + 1e-9
    logits = np.log(np.tile(probs, (n, 1)))
    ones, zeros = np.ones(n, np.float32), np.zeros(n, np.int32)
    seeds, counters = np.full(n, 7, np.uint32), np.arange(n, dtype=np.int32)
    f = jax.jit(sample, static_argnums=6)
    tok, lp, _, _ = f(logits, ones, np.full(n, 3, np.int32), ones, seeds, counters, 0)
    freq = np.bincount(np.asarray(tok), minlength=5) / n
    np.testing.assert_allclose(freq[:3], probs[:3] / probs[:3].sum(), atol=0.03)
    assert freq[3:].sum() == 0
    np.testing.assert_allclose(np.asarray(lp), np.log(probs[np.asarray(tok)]), rtol=1e-4)
    tok, *_ = f(logits, ones, zeros, np.full(n, 0.5, np.float32), seeds, counters, 0)
    freq = np.bincount(np.asarray(tok), minlength=5) / n
    np.testing.assert_allclose(freq[:2], [4 / 7, 3 / 7], atol=0.03)  # 0.4 + 0.3 reach top_p 0.5
    assert freq[2:].sum() == 0
    tok, *_ = f(logits, np.zeros(n, np.float32), zeros, ones, seeds, counters, 0)
    assert (np.asarray(tok) == 0).all()  # temperature 0: argmax


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("B,V", [(64, 32768), (3, 1000), (2, 7)])
def test_cpu_logit_stats_kernel_equals_the_xla_path(B, V, dtype):
    """model/network/backends/cpu_logits.cc against serve/sampling.py's XLA `logit_stats`: the greedy token
    and the max exactly; log Σ exp(x − max) within 1e-6 of float64's (float32 sums, the exponential's 2e-7).
    Rows with the max tied at several places (in different vector lanes, and in the tail past the last 16),
    all -inf, a NaN, +inf; 64 x 32k rows run threaded; V = 1000 has a tail of 8, V = 7 is all tail. bfloat16
    logits (the serving step's, read as they are) make many more ties."""
    from model.network.backends import cpu_kernels
    from serve.sampling import logit_stats

    if not cpu_kernels.available():
        pytest.skip("no C++ compiler: sampling uses XLA's ops instead")
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((B, V)) * 3).astype(np.float32)
    x[0, [V - 1, V // 3, 2]] = 20.0  # tied: the first (2) wins
    x[1, [V - 1, 1]] = 21.0
    if V > 16:
        x[0, [5, 21, V - 1]] = 20.0  # tied in lanes 5 and 5 of the next vector, and the tail: 2 still wins
        x[1, [V - 3, V - 1]] = 22.0  # tied within the tail: V - 3
    if B > 2:
        x[2] = -np.inf
        x[B - 1, V // 2] = np.nan
    if B > 3:
        x[3, V - 2] = np.inf
    x = np.asarray(jax.numpy.asarray(x, dtype))
    got = [np.asarray(a) for a in jax.jit(cpu_kernels.logit_stats)(x)]
    want = [np.asarray(a) for a in jax.jit(logit_stats)(x)]
    if B > 2:  # jnp.max's NaN propagation (XLA:CPU's reduction drops the NaN in 32k rows: not compared)
        assert got[0][B - 1] == V - 1 and np.isnan(got[1][B - 1]) and np.isnan(got[2][B - 1])
        got, want = [g[:B - 1] for g in got], [w[:B - 1] for w in want]
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])  # -inf, +inf rows as XLA gives them
    assert got[0][0] == 2 and got[0][1] == (V - 3 if V > 16 else 1)
    x64 = x[:len(got[2])].astype(np.float32).astype(np.float64)
    with np.errstate(invalid="ignore"):
        exact = np.log(np.exp(x64 - x64.max(-1, keepdims=True)).sum(-1))
    np.testing.assert_allclose(got[2], exact, rtol=0, atol=1e-6)  # measured <= 4.1e-7 (XLA <= 2.6e-7)


def test_logprobs_match_the_model(engine):
    (p,) = prompts([9], seed=8)
    (r,) = engine.generate([p], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=3))
    full = np.asarray(engine.model(np.array([p + r["token_ids"]])))[0]
    ref = jax.nn.log_softmax(full, axis=-1)
    for i, lp in enumerate(r["logprobs"]):
        row = np.asarray(ref[len(p) - 1 + i])
        assert lp.token_id == r["token_ids"][i]
        assert lp.logprob == pytest.approx(float(row[lp.token_id]), abs=1e-4)
        assert [t for t, _, _ in lp.top] == list(np.argsort(-row)[:3])
        assert lp.top[0][0] == lp.token_id  # greedy: the best alternative is the token itself


@pytest.fixture(scope="module")
def one_device():
    return make_mesh({}, jax.devices()[:1])


def test_int8_kv_cache(hf, one_device):
    m = model.load(hf[0], dtype="float32", mesh=one_device)
    e8 = Engine(m, ByteTokenizer(), EngineConfig(**{**CFG.__dict__, "kv_dtype": "int8", "max_slots": 2}))
    assert e8.cache.kv.dtype == np.int8 and e8.cache.nbytes <= (16 + 4) / (16 * 4) * Engine(m, ByteTokenizer(), CFG).cache.nbytes
    ps = prompts([5, 14], seed=9)
    res = e8.generate(ps, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=0))
    for p, r in zip(ps, res):
        ref = hf_greedy(hf[1], p, 16)
        agree = sum(a == b for a, b in zip(r["token_ids"], ref))
        assert agree >= 14, (r["token_ids"], ref)


@pytest.mark.parametrize("dtype,quant,wide", [("float32", "int8", False), ("float32", "int8", True),
                                             ("float32", "int4-g32", False), ("float32", "int4", True),
                                             ("bfloat16", None, False)])
def test_quantized_weights(hf, hf_checkpoint, one_device, dtype, quant, wide, monkeypatch):
    """The engine over int8/int4/bf16 weights gives the tokens of the same model run without a cache (XLA's
    dot). On one CPU device the engine runs unrolled layers with model/cpu_gemv.cc (`wide`: dims that the
    integer kernels take; otherwise those layers stay with XLA), a 16-bit cache as bits, and samples with
    cpu_logits.cc's row statistics."""
    from model.network.backends import cpu_kernels
    from model.network.dense import Dense

    traced = []
    kernel = cpu_kernels.logit_stats
    monkeypatch.setattr(cpu_kernels, "logit_stats", lambda x: traced.append(x.shape) or kernel(x))
    path = hf_checkpoint(dim=128, mlp=256, heads=4, kv_heads=2, head_dim=32)[0] if wide else hf[0]
    m = model.load(path, dtype=dtype, quant=quant, mesh=one_device)
    e = Engine(m, ByteTokenizer(), EngineConfig(**{**CFG.__dict__, "max_slots": 2}))
    assert e.layout == "unrolled" and e.cpu_kernels == cpu_kernels.available()
    if e.cpu_kernels:
        block_gd = nnx.split(nnx.merge(m.graphdef, nnx.State({**e.weights[0], "layers": e.weights[1][0]})).layers)[0]
        layer = nnx.merge(block_gd, e.weights[1][0])
        packed = [cpu_kernels.is_packed(d) for _, d in nnx.iter_graph(layer) if isinstance(d, Dense)]
        assert all(packed) if (wide or quant is None) else not any(packed), packed
    ps = prompts([14, 14], seed=10)
    e.generate(ps[:1], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    assert bool(traced) == e.cpu_kernels  # the step's sampling took the kernel
    if wide and e.cpu_kernels:  # int8 activations in the integer kernels: the same distribution, not bits
        res = e.generate(ps, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=0))
        for p, r in zip(ps, res):  # XLA's float-activation logits along the engine's own greedy path
            ref = np.asarray(jax.nn.log_softmax(m(np.array([p + r["token_ids"][:-1]]))[0, len(p) - 1:], axis=-1))
            want = ref[np.arange(12), r["token_ids"]]
            assert np.abs(np.array([t.logprob for t in r["logprobs"]]) - want).max() < 0.1  # measured <= 0.051
            assert (want >= ref.max(-1) - 0.1).all()  # each greedy token is (near) the reference argmax
        return
    res = e.generate(ps, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    ref = m.greedy(np.array(ps), 12)  # full recompute, no cache: one compile for both rows
    if dtype == "float32":
        assert [r["token_ids"] for r in res] == [[int(t) for t in row] for row in ref]
    else:  # bf16 rounding differs between the two paths; a rare near-tie may flip a token
        assert e.cache.kv.dtype == np.uint16 and e.cache.dtype == "bfloat16"
        agree = sum(a == int(b) for r, row in zip(res, ref) for a, b in zip(r["token_ids"], row))
        assert agree >= 20, (res, ref)


@pytest.fixture(scope="module")
def peft_adapter(hf, tmp_path_factory):
    import peft
    import torch

    base = hf[1]
    pm = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], lora_dropout=0.0))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    out = tmp_path_factory.mktemp("peft")
    pm.save_pretrained(out)
    ps = prompts([8, 13], seed=11)
    ref = [hf_greedy(pm, p, 12) for p in ps]
    pm.unload()  # leave the shared base model as it was
    return out, ps, ref


@pytest.mark.parametrize("mode", ["merge", "dynamic"])
def test_lora_adapter_matches_peft(hf, peft_adapter, one_device, mode):
    from serve.weights import build

    path, ps, ref = peft_adapter
    m, tok, name = build(ModelSpec(checkpoint=str(hf[0]), dtype="float32", adapter=str(path), adapter_mode=mode,
                                   tokenizer="bytes"), one_device)
    assert (m.config.lora is not None) == (mode == "dynamic")
    e = Engine(m, tok, EngineConfig(**{**CFG.__dict__, "max_slots": 2}))
    res = e.generate(ps, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    assert [r["token_ids"] for r in res] == ref
    assert ref[0] != hf_greedy(hf[1], ps[0], 12)  # the adapter changes the output


def test_lora_adapter_from_project_checkpoint(hf, one_device, tmp_path):
    """An adapter saved in this project's format (model.checkpoint.save of the LoRA parameters) merged at
    load gives the tokens of the model that applies the same adapters on the fly."""
    from flax import nnx

    from model.formats import checkpoint as ckpt
    from model.network.lora import LoraConfig
    from model.job.adapters import set_adapters
    from serve.weights import build

    lc = LoraConfig(rank=4, alpha=8.0)
    m = model.load(hf[0], dtype="float32", mesh=one_device, lora=lc)
    rng = np.random.default_rng(3)
    flat = {tuple(str(k) for k in path): rng.normal(0, 0.05, v.shape).astype(np.float32)
            for path, v in nnx.to_flat_state(m.state.filter(nnx.LoRAParam))}
    set_adapters(m, flat)
    ckpt.save(m.state.filter(nnx.LoRAParam), m.config, tmp_path / "adapter")
    served, tok, _ = build(ModelSpec(checkpoint=str(hf[0]), dtype="float32", adapter=str(tmp_path / "adapter"),
                                     adapter_mode="merge", tokenizer="bytes"), one_device)
    assert served.config.lora is None  # merged into the kernels
    e = Engine(served, tok, EngineConfig(**{**CFG.__dict__, "max_slots": 2}))
    ps = prompts([9, 9], seed=13)
    res = e.generate(ps, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    assert [r["token_ids"] for r in res] == [[int(t) for t in row] for row in m.greedy(np.array(ps), 10)]


def test_cancel_frees_the_slot(engine):
    ps = prompts([5, 6, 7, 8, 9], seed=12)
    events = {i: [] for i in range(5)}
    ids = [engine.submit(p, SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True),
                         lambda ev, i=i: events[i].append(ev)) for i, p in enumerate(ps)]
    for _ in range(3):
        engine.step()
    assert engine.active == 4 and not events[4]  # the fifth waits for a slot
    engine.cancel(ids[1])
    engine.step()
    assert events[1][-1].finish_reason == "cancelled"
    assert events[4], "the waiting request should start as soon as the slot is free"
    for i in (0, 2, 3, 4):
        engine.cancel(ids[i])
    engine.step()
    assert engine.active == 0 and engine.pending == 0
    assert not engine.scheduler.requests  # nothing left behind


def _run_until_done(engine, events, limit=500):
    for _ in range(limit):
        if all(ev and ev[-1].finished for ev in events.values()):
            return
        engine.step()
    pytest.fail("requests did not finish")


def test_out_of_range_params_fail_alone(engine):
    """A request whose inputs cannot be built (top_k past int32, which the engine's submit refuses, forced in
    afterwards) ends with an error alone; the others keep decoding, with the tokens they get alone."""
    ps = prompts([6, 9, 7], seed=21)
    alone = [r["token_ids"] for r in engine.generate(ps[:2], GREEDY)]
    with pytest.raises(ValueError, match="top_k"):
        engine.submit(ps[0], SamplingParams(max_tokens=4, top_k=2**32), lambda ev: None)
    with pytest.raises(ValueError, match="seed"):
        engine.submit(ps[0], SamplingParams(max_tokens=4, seed=2**70), lambda ev: None)
    events = {i: [] for i in range(3)}
    bad = SamplingParams(max_tokens=24, temperature=0.5, top_k=3, ignore_eos=True)  # not ended by a sampled stop
    for i, p in enumerate(ps):
        engine.submit(p, GREEDY if i < 2 else bad, lambda ev, i=i: events[i].append(ev))
    engine.step()  # all three prefill; then the bad one's inputs stop fitting int32
    object.__setattr__(bad, "top_k", 2**32)
    _run_until_done(engine, events)
    assert events[2][-1].finish_reason == "error"
    for i in (0, 1):
        assert events[i][-1].finish_reason == "length"
        assert [t for ev in events[i] for t in ev.token_ids] == alone[i]
    assert engine.active == 0


def test_failed_device_step_fails_only_its_rows(engine, monkeypatch):
    """A device step that raises ends its own requests with an error; a request decoding meanwhile goes on."""
    ps = prompts([5, 8], seed=22)
    (alone,) = [r["token_ids"] for r in engine.generate(ps[:1], GREEDY)]
    events = {0: [], 1: []}
    engine.submit(ps[0], GREEDY, lambda ev: events[0].append(ev))
    for _ in range(3):
        engine.step()
    assert events[0] and not events[0][-1].finished  # decoding
    real = engine.device_step

    def failing(cache, batch, shape):
        T, S, _ = batch.shape
        if T > S:  # a step with a prompt chunk: the second request's (alone or with the first's next token)
            raise RuntimeError("device step failed")
        return real(cache, batch, shape)

    monkeypatch.setattr(engine, "device_step", failing)
    engine.submit(ps[1], GREEDY, lambda ev: events[1].append(ev))
    _run_until_done(engine, events)
    assert events[1][-1].finish_reason == "error" and "device step failed" in events[1][-1].error
    assert events[0][-1].finish_reason == "length"
    assert [t for ev in events[0] for t in ev.token_ids] == alone


def test_compile_only_local(capsys):
    from serve.compile_check import compile_only
    from serve.config import load_config

    cfg = load_config(None, ["engine.max_slots=2", "engine.max_len=256"])
    assert compile_only(cfg) == 0
    out = capsys.readouterr().out
    assert "decode step" in out and "prefill step" in out and "FITS" in out


def test_auto_block_size_and_prompt_chunk_follow_the_platform(one_device):
    """engine.block_size and engine.prefill_chunk default to 0, chosen per platform (EngineConfig.resolved):
    16 and 32 on CPU (measured: BENCHMARKS.md), 16 and 256 on GPU, and on TPU max_len in 16 blocks of 16-256
    tokens (16 beyond 8,192), the rule vLLM-TPU uses for JAX's ragged paged attention kernel."""
    auto = EngineConfig(max_len=4096)
    assert (auto.block_size, auto.prefill_chunk) == (0, 0)
    got = {p: (c.block_size, c.prefill_chunk) for p in ("cpu", "gpu", "tpu") for c in [auto.resolved(p)]}
    assert got == {"cpu": (16, 32), "gpu": (16, 256), "tpu": (256, 256)}
    lens = (100, 300, 2048, 8192, 8193, 131072)
    assert [EngineConfig(max_len=n).resolved("tpu").block_size for n in lens] == [16, 32, 128, 256, 16, 16]
    fixed = EngineConfig(max_len=4096, block_size=32, prefill_chunk=64).resolved("tpu")
    assert (fixed.block_size, fixed.prefill_chunk) == (32, 64)
    assert EngineConfig(max_slots=8, prefill_tokens=128).resolved("gpu").prefill_chunk == 128
    with pytest.raises(ValueError, match="auto"):
        auto.num_blocks
    with pytest.raises(ValueError, match="engine.block_size"):
        EngineConfig(block_size=-16)
    m = model.init(model.LlamaConfig.preset("toy"), mesh=one_device)
    e = Engine(m, ByteTokenizer(), EngineConfig(max_slots=2, max_len=256))
    assert (e.cfg.block_size, e.cfg.prefill_chunk) == (16, 32) and e.cache.kv.shape[2] == 16
    fixed = Engine(m, ByteTokenizer(), EngineConfig(max_slots=2, max_len=256, block_size=32, prefill_chunk=128))
    ps = prompts([70, 9], seed=3)  # 70 tokens: three chunks of 32 with the auto config, one of 128 without
    assert [r["token_ids"] for r in e.generate(ps, GREEDY)] == [r["token_ids"] for r in fixed.generate(ps, GREEDY)]


def test_compile_only_resolves_the_block_size_for_the_topology(capsys):
    """A v6e config compiled ahead of time gets TPU blocks (max_len 4096: 16 blocks of 256 tokens), however
    small its model; the H100 configs keep 16 (test_plan.py)."""
    from serve.compile_check import compile_only
    from serve.config import load_config

    cfg = load_config("serve_405b_int4_v6e", ["model.preset=toy", "engine.max_slots=2", "engine.max_len=4096",
                                                "mesh=fsdp=4,tensor=2"])
    try:
        code = compile_only(cfg)
    except ImportError as e:
        pytest.skip(f"libtpu is not installed: {e}")
    r = json.loads(capsys.readouterr().out.split("PLAN ", 1)[1])
    assert code == 0 and r["pool"]["block_size"] == 256 and r["pool"]["blocks"] == 2 * 4096 // 256 + 1


@pytest.mark.parametrize("fmt,Ns", [("float32", (200, 64)), ("bfloat16", (200, 64)), ("bfloat16", (208, 48)),
                                    ("int8", (200, 64)), ("int8", (208, 48)), ("int4", (200, 64))])
def test_cpu_gemv_kernels(fmt, Ns):
    """model/cpu_gemv.cc against numpy: float kernels on the same weights; integer kernels against the
    arithmetic they implement (activations quantized per block of 128 inputs, exact integer sums),
    several products in one call, row counts across the 4-row tiles and the L2 chunking of x. bfloat16 and int8
    with outputs in multiples of 16 and 16 rows or more take the AMX tiles where the CPU has them (208: an odd
    number of 16-output blocks; 17 and 300 rows: a part-filled block of rows)."""
    from model.network import quant
    from model.network.backends import cpu_kernels

    if not cpu_kernels.available():
        pytest.skip("no C++ compiler: the engine uses XLA's dot instead")
    rng = np.random.default_rng(0)
    K = 512
    ws = [rng.standard_normal((K, N)).astype(np.float32) * 0.1 for N in Ns]
    if fmt in ("float32", "bfloat16"):
        packed = [(jax.numpy.asarray(w.T, fmt), None) for w in ws]
        dense_ws = [np.asarray(wt.astype(np.float32)).T for wt, _ in packed]
        group = 0
    else:
        qc = quant.QuantConfig(bits=8 if fmt == "int8" else 4, group_size=0 if fmt == "int8" else 256)
        packed, dense_ws = [], []
        for w, N in zip(ws, Ns):
            q, s = quant.quantize(jax.numpy.asarray(w), qc, (K,), (N,))
            packed.append((q.reshape(K, N).T, s.reshape(N) if fmt == "int8" else s.reshape(K // 256, N).T))
            dense_ws.append(np.asarray(quant.dequantize(q, s, qc, (K,), (N,)), np.float32))
        group = qc.group_size
    f = jax.jit(lambda x, p: cpu_kernels.gemv(x, p, group))
    for M in (1, 5, 17, 300):
        x = rng.standard_normal((M, K)).astype(np.float32)
        if fmt == "bfloat16":
            x = np.asarray(jax.numpy.asarray(x, "bfloat16").astype(np.float32))
        xin = x
        if fmt in ("int8", "int4"):  # the quantized activations the kernels compute with
            xb = x.reshape(M, K // 128, 128)
            s = np.abs(xb).max(-1, keepdims=True) / np.float32(127)
            xin = (np.rint(np.clip(xb * (np.float32(1) / s), -127, 127)) * s).reshape(M, K)
            # and what that costs against float activations: well under a percent of the output scale
            y = np.asarray(f(x, packed)[0])
            assert np.abs(y - x @ dense_ws[0]).max() < 0.02 * np.abs(x @ dense_ws[0]).max()
        for y, w in zip(f(x, packed), dense_ws):
            ref = xin @ w
            np.testing.assert_allclose(np.asarray(y), ref, rtol=0, atol=2e-5 * np.abs(ref).max() + 1e-6)
