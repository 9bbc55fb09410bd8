"""The paged engine: attention over the block pool (model/network/paged_attention.py) against the dense
attention it replaces, and the engine's greedy tokens against transformers' `generate` for one request, 16
requests of mixed lengths in one pool, prefix caching on and off, and a pool so small that requests are
preempted and recomputed; /health's pool numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
from model.formats.tokenizer import ByteTokenizer
from model.network import kv_cache, paged_attention
from model.network.attention import attend
from model.network.paged_attention import PagedMeta
from serve.config import EngineConfig, ServerConfig
from serve.engine import Engine
from serve.handlers import API
from serve.sampling import SamplingParams
from sharding.mesh import make_mesh
from tests import hf_reference

GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)


def prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(0, 256, n)] for n in lengths]


def hf_greedy(torch_model, prompt, n):
    return [int(t) for t in hf_reference.greedy(torch_model, np.array([prompt]), n)[0]]


@pytest.fixture(scope="module")
def hf(hf_checkpoint):
    return hf_checkpoint()


@pytest.fixture(scope="module")
def one_cpu(hf):
    return model.load(hf[0], dtype="float32", mesh=make_mesh({}, jax.devices()[:1]))


@pytest.fixture(scope="module")
def sharded(hf):
    return model.load(hf[0], dtype="float32", mesh=make_mesh({"tensor": 2}, jax.devices()[:2]))


# ------------------------------------------------------------------------------------------------
# the XLA reference against the dense attention


def ragged_case(rng, q_lens, kv_lens, K, G, H, bs, dtype, num_blocks=40, P=8):
    """A pool of random blocks (stale values everywhere), sequences in shuffled blocks; returns the pool layer,
    meta, q and, per sequence, its dense (k, v) and the tokens of its queries."""
    kv = rng.standard_normal((num_blocks, bs, 2 * K, H)).astype(np.float32)
    free = list(rng.permutation(np.arange(1, num_blocks)))
    S = len(q_lens)
    pages = np.zeros((S, P), np.int32)
    dense = []
    for i, n in enumerate(kv_lens):
        blocks = [free.pop() for _ in range(-(-n // bs))]
        pages[i, :len(blocks)] = blocks
        keys = np.concatenate([kv[b] for b in blocks])[:n]  # [n, 2K, H]
        dense.append((keys[:, 0::2], keys[:, 1::2]))
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    T = int(2 ** np.ceil(np.log2(cu[-1] + 1)))  # padding tokens at the end
    q = rng.standard_normal((T, K * G, H)).astype(np.float32)
    meta = PagedMeta(np.zeros(T, np.int32), np.asarray(kv_lens, np.int32), pages, cu, np.array([S], np.int32))
    return jnp.asarray(kv, dtype), meta, jnp.asarray(q, dtype), dense


@pytest.mark.parametrize("dtype,H,chunked", [("float32", 64, False), ("float32", 128, True), ("bfloat16", 64, True),
                                             ("bfloat16", 128, False)])
def test_paged_reference_matches_dense_attention(dtype, H, chunked, monkeypatch):
    """Decode tokens (q_len 1) and prompt chunks (the last q_len of kv_len keys, in the middle of a prompt and
    from its start) in one flattened step, GQA (8 query heads on 2 KV heads), blocks of 16 scattered in a pool
    of stale values; `chunked` makes the reference split queries into chunks of 4 (chunks of one sequence
    and chunks that straddle sequences). Against `attention.attend` over each sequence's dense keys.
    Tolerance: float32 1e-5; bfloat16 2e-2 (outputs round to 8 bits; summation over a different key count)."""
    if chunked:
        monkeypatch.setattr(paged_attention, "GATHER_ELEMENTS", 4 * 8 * 16 * 4 * H)
    rng = np.random.default_rng(H)
    q_lens, kv_lens = [1, 1, 9, 1, 6, 20], [5, 40, 30, 17, 6, 50]
    K, G = 2, 4
    kv, meta, q, dense = ragged_case(rng, q_lens, kv_lens, K, G, H, 16, dtype)
    got = np.asarray(jax.jit(paged_attention.attend)(q, kv, None, meta).astype(jnp.float32))
    tol = 1e-5 if dtype == "float32" else 2e-2
    for i, ((k, v), n, m) in enumerate(zip(dense, kv_lens, q_lens)):
        qi = q[meta.cu_q_lens[i]:meta.cu_q_lens[i + 1]][None]
        pos = np.arange(n - m, n)[None]
        want = attend(qi, jnp.asarray(k, dtype)[None], jnp.asarray(v, dtype)[None], q_pos=pos,
                      k_pos=np.arange(n)[None], q_seg=np.ones_like(pos), k_seg=np.ones((1, n), np.int32))
        np.testing.assert_allclose(got[meta.cu_q_lens[i]:meta.cu_q_lens[i + 1]],
                                   np.asarray(want[0].astype(jnp.float32)), rtol=tol, atol=tol, err_msg=f"sequence {i}")


def test_pool_write_and_int8():
    """Keys/values land at slot_mapping with key head k at 2k and value head k at 2k+1; an int8 pool holds
    them with a per-token, per-head scale (dequantized within half a step of 127 levels)."""
    cfg = model.LlamaConfig(vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64)
    mesh = make_mesh({}, jax.devices()[:1])
    rng = np.random.default_rng(0)
    k, v = (jnp.asarray(rng.standard_normal((3, 2, 8)), jnp.float32) for _ in range(2))
    slots = jnp.asarray([5 * 4 + 1, 2 * 4 + 3, 0], jnp.int32)  # blocks 5 and 2; a padding token to scratch
    for dtype in ("float32", "int8"):
        pool = kv_cache.create(cfg, 8, 4, dtype, mesh)
        pool = kv_cache.write(pool, 1, k, v, slots)
        got = np.asarray(pool.kv[1, 5, 1], np.float32)
        if dtype == "int8":
            scale = np.asarray(pool.scale[1, 5, 1])
            got = got * scale[:, None]
            np.testing.assert_allclose(got[0::2], k[0], atol=float(np.abs(k[0]).max()) / 127)
        else:
            np.testing.assert_array_equal(got[0::2], k[0])
            np.testing.assert_array_equal(got[1::2], v[0])
            np.testing.assert_array_equal(np.asarray(pool.kv[1, 2, 3])[1::2], v[1])
        assert not np.asarray(pool.kv[0]).any()  # other layers untouched


# ------------------------------------------------------------------------------------------------
# the engine against transformers


def test_batch1_one_cpu_device(one_cpu, hf):
    e = Engine(one_cpu, ByteTokenizer(), EngineConfig(max_slots=2, max_len=128, prefill_chunk=16,
                                                      prefill_tokens=32))
    assert e.layout == "unrolled"
    (p,) = prompts([37], seed=1)  # 3 chunks of 16, blocks of 16 filled across chunk boundaries
    (r,) = e.generate([p], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))
    assert r["token_ids"] == hf_greedy(hf[1], p, 30)


def test_sixteen_mixed_requests_together(sharded, hf):
    """16 requests of 1 to 90 tokens in one pool, submitted together: all run at once, prompt chunks and
    decode tokens share steps; each gets the tokens it gets alone from transformers."""
    e = Engine(sharded, ByteTokenizer(), EngineConfig(max_slots=16, max_len=128, prefill_chunk=32,
                                                      prefill_tokens=64, block_size=8))
    ps = prompts([1, 90, 3, 17, 40, 5, 64, 8, 33, 2, 70, 12, 25, 9, 50, 16], seed=2)
    res = e.generate(ps, GREEDY)
    for p, r in zip(ps, res):
        assert r["token_ids"] == hf_greedy(hf[1], p, 20), f"prompt of {len(p)} tokens"
    assert e.stats["step_rows"] > 8 * e.stats["steps"] // 2  # most steps ran many sequences
    assert e.stats["preemptions"] == 0


def test_prefix_caching_on_and_off(one_cpu, hf):
    """Requests sharing a 50-token prefix: with prefix caching the later ones take its 3 full blocks from the
    cache; text, tokens and log-probs are those without it (and transformers' tokens); /health shows the pool."""
    shared = prompts([50], seed=3)[0]
    tails = prompts([4, 9, 1], seed=4)
    ps = [shared + t for t in tails]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=3)
    out = {}
    for caching in (True, False):
        e = Engine(one_cpu, ByteTokenizer(), EngineConfig(max_slots=4, max_len=128, prefill_chunk=32,
                                                          prefill_tokens=64, prefix_caching=caching))
        first = e.generate(ps[:1], params)  # the prefix is in the pool (and cached) before the others come
        out[caching] = first + e.generate(ps[1:], params)
        cached = e.stats["prefix_cached_tokens"]
        assert cached == (2 * 48 if caching else 0), cached
        pool = API(e, ByteTokenizer(), "toy", ServerConfig()).health()["kv_pool"]  # what /health shows
        assert (pool["prefix_cache_hit_rate"] > 0) == caching and pool["blocks_cached"] == (5 if caching else 0)
        assert pool["blocks_used"] == 0 and pool["blocks_free"] == pool["blocks_total"] == 4 * 128 // 16
    for on, off, p in zip(out[True], out[False], ps):
        assert on["token_ids"] == off["token_ids"] == hf_greedy(hf[1], p, 12)
        assert on["text"] == off["text"]
        lp_on = [(t.token_id, t.logprob, [x[0] for x in t.top]) for t in on["logprobs"]]
        lp_off = [(t.token_id, t.logprob, [x[0] for x in t.top]) for t in off["logprobs"]]
        assert [x[0] for x in lp_on] == [x[0] for x in lp_off] and [x[2] for x in lp_on] == [x[2] for x in lp_off]
        np.testing.assert_allclose([x[1] for x in lp_on], [x[1] for x in lp_off], rtol=0, atol=1e-5)


def test_small_pool_preempts_and_recomputes(sharded, hf):
    """A pool of 6 blocks of 16 (96 tokens) for 4 requests that need 40 to 60 tokens each: decoding runs out
    of blocks, the newest request is preempted (its blocks freed) and recomputed later; every request still
    gets transformers' tokens, and all blocks are free at the end."""
    e = Engine(sharded, ByteTokenizer(), EngineConfig(max_slots=4, max_len=128, prefill_chunk=16,
                                                      prefill_tokens=32, kv_tokens=96, prefix_caching=False))
    ps = prompts([20, 30, 12, 25], seed=5)
    params = SamplingParams(max_tokens=28, temperature=0.0, ignore_eos=True)
    res = e.generate(ps, params)
    for p, r in zip(ps, res):
        assert r["token_ids"] == hf_greedy(hf[1], p, 28), f"prompt of {len(p)} tokens"
    assert e.stats["preemptions"] > 0
    assert e.pool_stats()["blocks_used"] == 0 and e.pool_stats()["blocks_free"] == 6
    with pytest.raises(ValueError, match="KV pool"):  # a request the whole pool cannot hold is refused
        e.submit(ps[0], SamplingParams(max_tokens=90), lambda ev: None)


def test_decoding_goes_on_during_a_long_prompt(one_cpu):
    """While a 100-token prompt is prefilled in chunks, every step also gives the decoding request a token;
    the chunks fill the step's bucket (1 decode + 16 prompt tokens pad to 24: 23 prompt tokens a step)."""
    e = Engine(one_cpu, ByteTokenizer(), EngineConfig(max_slots=2, max_len=256, prefill_chunk=16,
                                                      prefill_tokens=32))
    short, long_ = prompts([4, 100], seed=6)
    events = []
    e.submit(short, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True), lambda ev: events.append("s"))
    while not events:
        e.step()
    e.submit(long_, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True), lambda ev: events.append("l"))
    steps = 0
    while "l" not in events:
        n = len(events)
        e.step()
        steps += 1
        assert events[n:].count("s") == 1, "the decoding request got no token in a step"
    # one chunk per step beside the decode token, grown from 16 to fill the step's 24-token bucket
    assert steps == -(-100 // 23)
