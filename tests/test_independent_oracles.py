"""Oracles that share no code with what they check: int4 conversion against a quantizer and dequantizer
written here in numpy and against transformers' logits with those weights, and the CPU kernels' build
failing loudly where a compiler is present."""

import copy

import ml_dtypes
import numpy as np
import pytest
import torch

import model
from convert.hf_to_orbax import convert
from model.formats.safetensors_io import HFCheckpoint
from tests import hf_reference

GROUP = 32
CKPT = dict(dim=128, mlp=256, heads=8, kv_heads=2)  # every contraction dimension a multiple of the group
# our kernel path -> transformers' weight name (per layer); ours reshaped [I, O] is that weight transposed
PROJ = {("attn", "q"): "self_attn.q_proj", ("attn", "k"): "self_attn.k_proj", ("attn", "v"): "self_attn.v_proj",
        ("attn", "o"): "self_attn.o_proj", ("mlp", "gate"): "mlp.gate_proj", ("mlp", "up"): "mlp.up_proj",
        ("mlp", "down"): "mlp.down_proj"}


def numpy_quantize(w_io: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int4 round-to-nearest over groups of `group` consecutive input rows, one bf16 scale per
    (group, output column): w [I, O] -> (q [I, O] int, scale [I/group, O] float32)."""
    I, O = w_io.shape
    g = w_io.astype(np.float32).reshape(I // group, group, O)
    s = (np.abs(g).max(axis=1) / np.float32(7)).astype(ml_dtypes.bfloat16).astype(np.float32)
    s = np.where(s > 0, s, np.float32(1))
    q = np.clip(np.round(g / s[:, None, :]), -7, 7)
    return q.reshape(I, O).astype(np.int32), s


def numpy_dequantize(q_io: np.ndarray, s: np.ndarray, group: int) -> np.ndarray:
    I, O = q_io.shape
    return (q_io.astype(np.float32).reshape(I // group, group, O) * s[:, None, :]).reshape(I, O)


@pytest.fixture(scope="module")
def int4(hf_checkpoint, tmp_path_factory):
    path, ref = hf_checkpoint(**CKPT)
    out = tmp_path_factory.mktemp("oracle") / "int4"
    convert(path, out, dtype="float32", quant=f"int4-g{GROUP}", progress=False)
    return path, ref, out


def test_int4_conversion_is_bit_equal_to_quantized_load_and_to_a_numpy_quantizer(int4):
    """The converter's stored int4 kernels and scales == `model.load(hf, quant=...)` bit for bit, and == the
    numpy quantizer above applied to transformers' weights (ties of round-to-nearest aside, at most one
    level); the numpy dequantization is within half a step of every weight."""
    from flax import nnx

    path, _, out = int4
    conv, direct = model.load(out, dtype="float32"), model.load(path, dtype="float32", quant=f"int4-g{GROUP}")
    flat_c, flat_d = dict(nnx.to_flat_state(conv.state)), dict(nnx.to_flat_state(direct.state))
    assert flat_c.keys() == flat_d.keys()
    for p in flat_c:
        a, b = np.asarray(flat_c[p][...]), np.asarray(flat_d[p][...])
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), p
    hf = HFCheckpoint(path)
    for (block, name), hf_name in PROJ.items():
        q = np.asarray(conv.state["layers"][block][name]["kernel"][...]).astype(np.int32)
        s = np.asarray(conv.state["layers"][block][name]["scale"][...]).astype(np.float32)
        for layer in range(q.shape[0]):
            w = hf.read(f"model.layers.{layer}.{hf_name}.weight").astype(np.float32).T  # [I, O]
            I, O = w.shape
            q_np, s_np = numpy_quantize(w, GROUP)
            ql, sl = q[layer].reshape(I, O), s[layer].reshape(I // GROUP, O)
            np.testing.assert_array_equal(sl, s_np, err_msg=f"{hf_name} layer {layer}: scales")
            assert np.abs(ql - q_np).max() <= 1 and np.mean(ql != q_np) < 1e-3, (hf_name, layer)
            step = np.repeat(s_np, GROUP, axis=0)
            assert np.all(np.abs(numpy_dequantize(ql, sl, GROUP) - w) <= step / 2 * (1 + 1e-6)), (hf_name, layer)


def test_int4_logits_equal_transformers_with_numpy_dequantized_weights(int4):
    """Our int4 forward (its quantized matmuls) == transformers running the same weights dequantized in
    numpy, to 1e-4 of the largest logit."""
    path, ref, out = int4
    conv = model.load(out, dtype="float32")
    deq = copy.deepcopy(ref)
    params = dict(deq.named_parameters())
    with torch.no_grad():
        for (block, name), hf_name in PROJ.items():
            q = np.asarray(conv.state["layers"][block][name]["kernel"][...]).astype(np.int32)
            s = np.asarray(conv.state["layers"][block][name]["scale"][...]).astype(np.float32)
            for layer in range(q.shape[0]):
                target = params[f"model.layers.{layer}.{hf_name}.weight"]
                O, I = target.shape
                w = numpy_dequantize(q[layer].reshape(I, O), s[layer].reshape(I // GROUP, O), GROUP)
                target.copy_(torch.from_numpy(np.ascontiguousarray(w.T)))
    toks = np.random.default_rng(4).integers(0, 512, size=(2, 13), dtype=np.int32)
    ours, theirs = np.asarray(conv(toks)), hf_reference.logits(deq, toks)
    base = hf_reference.logits(ref, toks)
    assert np.abs(theirs - base).max() > 1e-3 * np.abs(base).max()  # quantization does change the model
    assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()


def test_cpu_kernel_build_failure_is_an_error_not_a_fallback(tmp_path, monkeypatch):
    """With a C++ compiler present, a kernel source that does not compile raises (naming the compiler's
    complaint) instead of quietly serving with XLA's ops; only a missing compiler means False."""
    from model.network.backends import cpu_kernels as ck

    if ck.shutil.which("g++") is None and ck.shutil.which("c++") is None and ck.shutil.which("clang++") is None:
        pytest.skip("no C++ compiler")
    broken = tmp_path / "broken.cc"
    broken.write_text("this is not C++;\n")
    monkeypatch.setenv("LLAMA_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(ck, "SOURCES", [broken])
    monkeypatch.setattr(ck, "_STATE", {})
    with pytest.raises(RuntimeError, match=r"building the CPU kernels failed .*broken\.cc"):
        ck.available()
    monkeypatch.setattr(ck, "_STATE", {})
    monkeypatch.setenv("CXX", "")
    monkeypatch.setenv("PATH", str(tmp_path))  # no compiler at all
    assert ck.available() is False
