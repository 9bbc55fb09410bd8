"""Numerical parity with transformers' LlamaForCausalLM (fp32, PyTorch CPU)."""

import numpy as np
import pytest

import model
from tests import hf_reference

CASES = {
    # GQA ratio 1, llama3 RoPE, odd length
    "gqa1": dict(heads=4, kv_heads=4, head_dim=16, T=7),
    # GQA ratio 2, heads*head_dim != dim, no RoPE scaling, sharded checkpoint files
    "gqa2_nohd": dict(heads=4, kv_heads=2, head_dim=32, rope=None, rope_theta=10000.0, shards=True, T=13),
    # GQA ratio 4, small head dim, a RoPE scaling whose medium band covers short wavelengths
    "gqa4_medium": dict(heads=8, kv_heads=2, head_dim=8, rope_theta=10000.0, T=9,
                        rope=dict(hf_reference.LLAMA3_ROPE, original_max_position_embeddings=64, factor=4.0)),
    # GQA ratio 8 (multi-query), tied embeddings, three layers
    "gqa8_tied": dict(heads=8, kv_heads=1, head_dim=16, tied=True, layers=3, T=11),
}


@pytest.mark.parametrize("case", CASES)
def test_logits_and_greedy_match_transformers(case, hf_checkpoint):
    kw = dict(CASES[case])
    T = kw.pop("T")
    path, ref = hf_checkpoint(**kw)
    m = model.load(path, dtype="float32")
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, m.config.vocab_size, size=(2, T), dtype=np.int32)

    ours, theirs = np.asarray(m(tokens)), hf_reference.logits(ref, tokens)
    assert ours.dtype == np.float32 and ours.shape == theirs.shape == (2, T, m.config.vocab_size)
    assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()

    np.testing.assert_array_equal(m.greedy(tokens, 16), hf_reference.greedy(ref, tokens, 16))


def test_positions_far_into_the_context(hf_checkpoint):
    """Explicit positions deep into the 128K window, where llama3 RoPE scaling dominates."""
    path, ref = hf_checkpoint(heads=4, kv_heads=2, head_dim=16)
    m = model.load(path, dtype="float32")
    tokens = np.random.default_rng(2).integers(0, 512, size=(1, 10), dtype=np.int32)
    positions = (np.arange(10, dtype=np.int32) + 100_000)[None]
    ours, theirs = np.asarray(m(tokens, positions)), hf_reference.logits(ref, tokens, positions)
    assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()


def test_packed_segments_do_not_attend_across_documents(hf_checkpoint):
    """Two documents packed in one row give each document's own logits."""
    path, _ = hf_checkpoint(heads=4, kv_heads=2, head_dim=16)
    m = model.load(path, dtype="float32")
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 512, size=(1, 5), dtype=np.int32), rng.integers(0, 512, size=(1, 6), dtype=np.int32)
    packed = np.concatenate([a, b], axis=1)
    positions = np.concatenate([np.arange(5), np.arange(6)])[None].astype(np.int32)
    segments = np.array([[1] * 5 + [2] * 6], np.int32)
    out = np.asarray(m(packed, positions, segments))
    np.testing.assert_allclose(out[:, :5], np.asarray(m(a)), rtol=0, atol=1e-5)
    np.testing.assert_allclose(out[:, 5:], np.asarray(m(b)), rtol=0, atol=1e-5)
