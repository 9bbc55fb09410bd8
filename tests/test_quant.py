"""Weight-only quantization (model/quant.py): numerics, compiled memory, loading, shardings, bad input."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import model
from model import LlamaConfig, abstract_model, state_shardings
from model.network import model as model_weights
from model.network import quant
from model.network.quant import QuantConfig
from sharding import aot_compile
from sharding.mesh import make_mesh

# Quality thresholds for the random-weight toy model (fp32, tests/hf_reference.py weights), measured
# there at KL 6e-5 / top-1 99% (int8) and KL 0.014 / top-1 63% (int4, group 32).
INT8_MAX_KL, INT8_MIN_TOP1 = 1e-3, 0.97
INT4_MAX_KL, INT4_MIN_TOP1 = 0.05, 0.5


def _reference_matmul(x, q, s, qc, ins, outs):
    w = np.asarray(quant.dequantize(q, s, qc, ins, outs))
    I, O = math.prod(ins), math.prod(outs)
    return (x.reshape(*x.shape[:-len(ins)], I) @ w.reshape(I, O)).reshape(*x.shape[:-len(ins)], *outs)


def test_quantize_is_round_to_nearest_with_storage_dtype_scales():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 64, 4, 8)).astype(np.float32)  # [layers, D, N, H]
    w[1, :, 0, 0] = 0.0  # an all-zero output channel
    for qc, scale_shape in ((QuantConfig(bits=8), (3, 4, 8)), (QuantConfig(bits=4, group_size=16), (3, 4, 4, 8))):
        q, s = quant.quantize(w, qc, (64,), (4, 8))
        assert q.dtype == qc.dtype and q.shape == w.shape
        assert s.dtype == jnp.bfloat16 and s.shape == scale_shape
        qmax = quant.QMAX[qc.bits]
        assert int(jnp.max(jnp.abs(q.astype(jnp.int32)))) == qmax
        err = np.abs(np.asarray(quant.dequantize(q, s, qc, (64,), (4, 8))) - w)
        gs = qc.group_size or 64
        step = np.repeat(np.asarray(s, np.float32).reshape(3, 64 // gs, 1, 4, 8), gs, axis=2).reshape(w.shape)
        assert np.all(err <= step / 2 * (1 + 1e-6))  # nearest level of the bf16 scale actually stored
    assert np.all(np.asarray(quant.dequantize(q, s, qc, (64,), (4, 8)))[1, :, 0, 0] == 0)


@pytest.mark.parametrize("bits,group", [(8, 0), (4, 32), (8, 64)])
@pytest.mark.parametrize("ins,outs", [((256,), (4, 32)), ((4, 64), (128,))], ids=["q", "o"])
@pytest.mark.parametrize("tokens", [2, 48], ids=["decode", "prefill"])
@pytest.mark.parametrize("chunked", [False, True])
def test_matmul_equals_dequantized_einsum(bits, group, ins, outs, tokens, chunked, monkeypatch):
    """Every mode (channel / grouped / dequant) and both loops (CPU's static switch, the dynamic slices
    used on other backends) compute x @ dequantize(q, s)."""
    qc = QuantConfig(bits=bits, group_size=group, chunk_bytes=2048 if chunked else 1 << 30)
    rng = np.random.default_rng(1)
    w = rng.normal(size=(*ins, *outs)).astype(np.float32)
    x = rng.normal(size=(2, tokens // 2, *ins)).astype(np.float32)
    q, s = quant.quantize(w, qc, ins, outs)
    ref = _reference_matmul(x, q, s, qc, ins, outs)
    for platform in ("cpu", "gpu") if chunked else ("cpu",):
        monkeypatch.setattr(quant, "_platform", lambda p=platform: p)
        mode, steps = quant.plan(qc, tokens, math.prod(ins), math.prod(outs), jnp.float32, platform)
        assert (steps > 1) == (chunked and not (mode == "channel" and platform == "gpu"))  # GPU fuses converts
        assert mode == ("channel" if not group else "grouped" if tokens == 2 and platform != "cpu" else "dequant")
        y = jax.jit(lambda x, q, s: quant.matmul(x, q, s, qc, ins, outs, jnp.float32))(x, q, s)
        assert y.shape == ref.shape and y.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(y), ref, rtol=0, atol=2e-5 * np.abs(ref).max())


def test_loop_keeps_each_device_whole_units():
    """The row loop views the input dim as [A, steps, unit] with A split like the input dim: A must be a
    multiple of the devices holding it, or the partitioner regroups rows across devices (an all-gather of
    the weight in every call). 405B down projection, int4, decode on a v6e-8 (mlp split 8 ways): the
    fewest steps within chunk_bytes was 8, A = 52, which 8 devices do not divide."""
    qc = QuantConfig(bits=4, group_size=128)
    I, O = 53248, 16384
    assert quant.plan(qc, 16, I, O, jnp.bfloat16, "tpu") == ("grouped", 8)
    for shards in (2, 4, 8, 16):
        mode, steps = quant.plan(qc, 16, I, O, jnp.bfloat16, "tpu", in_shards=shards)
        assert (I // 128 // steps) % shards == 0, (shards, steps)
    assert quant.plan(qc, 16, I, O, jnp.bfloat16, "tpu", in_shards=8) == ("grouped", 13)
    assert quant.plan(qc, 16, I, O, jnp.bfloat16, "tpu", in_shards=3) == ("grouped", 8)  # 416 units: no whole split


@pytest.mark.parametrize("platform", ["cpu", "gpu"])
def test_input_gradient_through_the_chunked_matmul(platform, monkeypatch):
    """QLoRA differentiates through the frozen quantized base: d/dx of the looped matmul is that of
    x @ dequantize(q, s)."""
    monkeypatch.setattr(quant, "_platform", lambda: platform)
    qc = QuantConfig(bits=4, group_size=32, chunk_bytes=2048)
    rng = np.random.default_rng(2)
    q, s = quant.quantize(rng.normal(size=(4, 64, 128)).astype(np.float32), qc, (4, 64), (128,))
    x = jnp.asarray(rng.normal(size=(3, 40, 4, 64)).astype(np.float32))
    w = quant.dequantize(q, s, qc, (4, 64), (128,))
    g = jax.grad(lambda x: jnp.sum(jnp.sin(quant.matmul(x, q, s, qc, (4, 64), (128,), jnp.float32))))(x)
    want = jax.grad(lambda x: jnp.sum(jnp.sin(jnp.einsum("btnh,nhd->btd", x, w))))(x)
    np.testing.assert_allclose(np.asarray(g), np.asarray(want), rtol=0, atol=1e-4 * float(jnp.abs(want).max()))


def test_qlora_adapters_train_on_an_int4_base():
    """A dense layer with an int4 base and LoRA adapters: only the adapters are parameters to train,
    and their gradients flow through the quantized matmul."""
    from model.network.dense import make_dense
    from model.network.lora import LoraConfig

    cfg = LlamaConfig.preset("toy", quant="int4-g32", lora=LoraConfig(rank=4))
    dense = make_dense("o", "BTNH,NHD->BTD", (4, 32), (128,), ("heads", "head_dim", "embed"), cfg=cfg,
                  rngs=nnx.Rngs(0))
    graphdef, adapters, base = nnx.split(dense, nnx.LoRAParam, ...)
    assert base["kernel"].dtype == jnp.int4 and set(adapters) == {"lora_a", "lora_b"}
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 4, 32)).astype(np.float32))

    def loss(adapters):
        return jnp.sum(jnp.tanh(nnx.merge(graphdef, adapters, base)(x)))

    q = base["kernel"][...]
    w = quant.dequantize(q, base["scale"][...], dense.quant, (4, 32), (128,))
    y0 = jnp.einsum("btnh,nhd->btd", x, w)  # B = 0: the adapter adds nothing yet
    np.testing.assert_allclose(np.asarray(dense(x)), np.asarray(y0), rtol=0, atol=1e-4)

    # B != 0 (as after a step): the output and both gradients equal those of x·W + (x·A)·B·alpha/r with the
    # dequantized base written out here
    adapters["lora_b"].set_value(jnp.asarray(np.random.default_rng(1).normal(0, 0.1, adapters["lora_b"].shape),
                                             jnp.float32))
    scale = cfg.lora.alpha / cfg.lora.rank

    def reference(a, b):
        y = jnp.einsum("btnh,nhd->btd", x, w) + jnp.einsum("btr,rd->btd", jnp.einsum("btnh,nhr->btr", x, a), b) * scale
        return jnp.sum(jnp.tanh(y))

    grads = jax.jit(jax.grad(loss))(adapters)
    want_a, want_b = jax.grad(reference, argnums=(0, 1))(adapters["lora_a"][...], adapters["lora_b"][...])
    for got, want in ((grads["lora_a"][...], want_a), (grads["lora_b"][...], want_b)):
        assert float(jnp.abs(want).max()) > 0
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-4 * float(jnp.abs(want).max()))
    np.testing.assert_allclose(float(loss(adapters)), float(reference(adapters["lora_a"][...], adapters["lora_b"][...])),
                               rtol=1e-5)


# The toy preset's state: path -> (shape, dtype, variable type). Checkpoints, the HF/PEFT name tables and
# train's LoRAParam filter depend on these paths: quantization and adapters add leaves beside `kernel`,
# never a level above it.
_PLAIN_TOY = {
    "embed/embedding": ((512, 128), "float32", "Param"),
    "layers/attn/q/kernel": ((2, 128, 4, 32), "float32", "Param"),
    "layers/attn/k/kernel": ((2, 128, 2, 32), "float32", "Param"),
    "layers/attn/v/kernel": ((2, 128, 2, 32), "float32", "Param"),
    "layers/attn/o/kernel": ((2, 4, 32, 128), "float32", "Param"),
    "layers/attn_norm/scale": ((2, 128), "float32", "Param"),
    "layers/mlp/gate/kernel": ((2, 128, 384), "float32", "Param"),
    "layers/mlp/up/kernel": ((2, 128, 384), "float32", "Param"),
    "layers/mlp/down/kernel": ((2, 384, 128), "float32", "Param"),
    "layers/mlp_norm/scale": ((2, 128), "float32", "Param"),
    "lm_head/kernel": ((128, 512), "float32", "Param"),
    "norm/scale": ((128,), "float32", "Param"),
}
_INT8_TOY = {
    "layers/attn/q/kernel": ((2, 128, 4, 32), "int8", "Param"),
    "layers/attn/q/scale": ((2, 4, 32), "bfloat16", "Param"),
    "layers/attn/k/kernel": ((2, 128, 2, 32), "int8", "Param"),
    "layers/attn/k/scale": ((2, 2, 32), "bfloat16", "Param"),
    "layers/attn/v/kernel": ((2, 128, 2, 32), "int8", "Param"),
    "layers/attn/v/scale": ((2, 2, 32), "bfloat16", "Param"),
    "layers/attn/o/kernel": ((2, 4, 32, 128), "int8", "Param"),
    "layers/attn/o/scale": ((2, 128), "bfloat16", "Param"),
    "layers/mlp/gate/kernel": ((2, 128, 384), "int8", "Param"),
    "layers/mlp/gate/scale": ((2, 384), "bfloat16", "Param"),
    "layers/mlp/up/kernel": ((2, 128, 384), "int8", "Param"),
    "layers/mlp/up/scale": ((2, 384), "bfloat16", "Param"),
    "layers/mlp/down/kernel": ((2, 384, 128), "int8", "Param"),
    "layers/mlp/down/scale": ((2, 128), "bfloat16", "Param"),
}
_INT4_G32_TOY = {
    "layers/attn/q/kernel": ((2, 128, 4, 32), "int4", "Param"),
    "layers/attn/q/scale": ((2, 4, 4, 32), "bfloat16", "Param"),
    "layers/attn/k/kernel": ((2, 128, 2, 32), "int4", "Param"),
    "layers/attn/k/scale": ((2, 4, 2, 32), "bfloat16", "Param"),
    "layers/attn/v/kernel": ((2, 128, 2, 32), "int4", "Param"),
    "layers/attn/v/scale": ((2, 4, 2, 32), "bfloat16", "Param"),
    "layers/attn/o/kernel": ((2, 4, 32, 128), "int4", "Param"),
    "layers/attn/o/scale": ((2, 4, 128), "bfloat16", "Param"),
    "layers/mlp/gate/kernel": ((2, 128, 384), "int4", "Param"),
    "layers/mlp/gate/scale": ((2, 4, 384), "bfloat16", "Param"),
    "layers/mlp/up/kernel": ((2, 128, 384), "int4", "Param"),
    "layers/mlp/up/scale": ((2, 4, 384), "bfloat16", "Param"),
    "layers/mlp/down/kernel": ((2, 384, 128), "int4", "Param"),
    "layers/mlp/down/scale": ((2, 12, 128), "bfloat16", "Param"),
}
_LORA_R4_TOY = {
    "layers/attn/q/lora_a": ((2, 128, 4), "float32", "LoRAParam"),
    "layers/attn/q/lora_b": ((2, 4, 4, 32), "float32", "LoRAParam"),
    "layers/attn/k/lora_a": ((2, 128, 4), "float32", "LoRAParam"),
    "layers/attn/k/lora_b": ((2, 4, 2, 32), "float32", "LoRAParam"),
    "layers/attn/v/lora_a": ((2, 128, 4), "float32", "LoRAParam"),
    "layers/attn/v/lora_b": ((2, 4, 2, 32), "float32", "LoRAParam"),
    "layers/attn/o/lora_a": ((2, 4, 32, 4), "float32", "LoRAParam"),
    "layers/attn/o/lora_b": ((2, 4, 128), "float32", "LoRAParam"),
    "layers/mlp/gate/lora_a": ((2, 128, 4), "float32", "LoRAParam"),
    "layers/mlp/gate/lora_b": ((2, 4, 384), "float32", "LoRAParam"),
    "layers/mlp/up/lora_a": ((2, 128, 4), "float32", "LoRAParam"),
    "layers/mlp/up/lora_b": ((2, 4, 384), "float32", "LoRAParam"),
    "layers/mlp/down/lora_a": ((2, 384, 4), "float32", "LoRAParam"),
    "layers/mlp/down/lora_b": ((2, 4, 128), "float32", "LoRAParam"),
}


@pytest.mark.parametrize("variant,expected", [
    ("plain", _PLAIN_TOY),
    ("int8", {**_PLAIN_TOY, **_INT8_TOY}),
    ("int4-g32", {**_PLAIN_TOY, **_INT4_G32_TOY}),
    ("lora-int4-g32", {**_PLAIN_TOY, **_INT4_G32_TOY, **_LORA_R4_TOY}),
])
def test_state_paths_are_the_same_with_quantization_and_adapters(variant, expected):
    from model.network.lora import LoraConfig

    kw = {"plain": {}, "int8": dict(quant="int8"), "int4-g32": dict(quant="int4-g32"),
          "lora-int4-g32": dict(quant="int4-g32", lora=LoraConfig(rank=4))}[variant]
    _, state = abstract_model(LlamaConfig.preset("toy", **kw))
    got = {"/".join(map(str, path)): (tuple(v.shape), str(v.dtype), type(v).__name__)
           for path, v in nnx.to_flat_state(state)}
    assert got == expected


def _compiled_dense(qc, I, O, tokens, mesh=None):
    """Compiles one quantized dense layer [1, tokens, I] x [I, O] (bf16 compute); returns memory_analysis()."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from sharding.rules import use_mesh

    kw = {} if mesh is None else dict(sharding=NamedSharding(mesh, P()))
    x = jax.ShapeDtypeStruct((1, tokens, I), jnp.bfloat16, **kw)
    q = jax.ShapeDtypeStruct((I, O), qc.dtype, **kw)
    s = jax.ShapeDtypeStruct(quant.scale_shape(qc, (I,), (O,)), jnp.dtype(qc.scale_dtype), **kw)

    def f(x, q, s):
        with use_mesh(mesh):
            return quant.matmul(x, q, s, qc, (I,), (O,), jnp.bfloat16)

    lowered = jax.jit(f).lower(x, q, s)
    return (lowered.compile() if mesh is None else aot_compile.compile(lowered, mesh.devices)).memory_analysis()


@pytest.mark.parametrize("qc", [QuantConfig(bits=8, chunk_bytes=4 << 20), QuantConfig(bits=4, chunk_bytes=4 << 20)],
                         ids=["int8", "int4"])
def test_cpu_temporaries_stay_far_below_the_dequantized_weight(qc):
    """XLA:CPU materialises int->float converts, so the matmul loops over row chunks: temporaries are
    bounded by chunk_bytes, not by the weight (a dequantize-then-dot would need the whole bf16 weight)."""
    temps = {}
    for n in (2048, 8192):
        mem = _compiled_dense(qc, n, n, tokens=8)
        temps[n] = mem.temp_size_in_bytes
    assert temps[8192] < 8192 * 8192 * 2 / 16, temps  # the dequantized bf16 weight: 128 MiB
    assert temps[8192] < 1.5 * temps[2048] + (1 << 20), temps  # 16x the weight, about the same temporaries


def _tpu_devices(name="v6e-4"):
    pytest.importorskip("libtpu")  # only a missing libtpu skips: any other failure here is an error
    from sharding import topology  # compile-only libtpu set-up, beside other processes that hold it

    return list(topology.parse(name).devices())


def test_tpu_aot_dense_layer_has_no_temporaries_and_int4_is_packed():
    from jax.sharding import Mesh

    mesh = Mesh(np.array(_tpu_devices()[:1]).reshape(1), ("fsdp",))
    I = O = 8192
    args = {}
    for qc in (QuantConfig(bits=8), QuantConfig(bits=4)):
        mem = _compiled_dense(qc, I, O, tokens=8, mesh=mesh)
        assert mem.temp_size_in_bytes < I * O * 2 / 64, (qc.name, mem.temp_size_in_bytes)  # observed: 0
        scale_bytes = math.prod(quant.scale_shape(qc, (I,), (O,))) * 2
        args[qc.bits] = mem.argument_size_in_bytes - scale_bytes - 8 * I * 2
    assert args[8] == I * O
    assert args[4] == I * O // 2  # two int4 per byte


def test_tpu_aot_405b_width_int4_argument_bytes_match_weight_bytes():
    """The per-device argument bytes of an int4 forward of a 405B-wide model (1 layer, smaller vocab to
    save compile time), compiled for v6e:2x2 with tensor=4, equal quant.weight_bytes within 5%
    (bench/quant_aot.py runs the same with the full vocab: ratio 1.00000)."""
    import sys
    from pathlib import Path

    _tpu_devices()
    sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
    import quant_aot

    r = quant_aot.compare("int4", layers=1, vocab=4096)
    assert abs(r["ratio"] - 1) < 0.05, r
    assert r["temp_bytes_per_device"] < 0.05 * r["analytic_bytes_per_device"], r


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A random HF checkpoint (dims divisible by the int4 group size 32), its float32 model and logits."""
    from tests import hf_reference

    path = tmp_path_factory.mktemp("hf_quant")
    hf_reference.save_random_llama(path, mlp=192, heads=4, kv_heads=2, head_dim=16)
    m = model.load(path, dtype="float32")
    tokens = np.random.default_rng(1).integers(0, m.config.vocab_size, (4, 32), dtype=np.int32)
    return path, m, tokens, np.asarray(m(tokens))


def _kl_top1(ref, out):
    lp, lq = jax.nn.log_softmax(ref, -1), jax.nn.log_softmax(out, -1)
    kl = float(jnp.mean(jnp.sum(jnp.exp(lp) * (lp - lq), -1)))
    return kl, float(np.mean(ref.argmax(-1) == out.argmax(-1)))


@pytest.mark.parametrize("q,max_kl,min_top1", [("int8", INT8_MAX_KL, INT8_MIN_TOP1),
                                               ("int4-g32", INT4_MAX_KL, INT4_MIN_TOP1)])
def test_quantized_forward_stays_close_and_greedy_works(toy, q, max_kl, min_top1):
    path, m, tokens, ref = toy
    mq = model.load(path, dtype="float32", quant=q)
    kernel = mq.state["layers"]["attn"]["q"]["kernel"]
    assert kernel.dtype == (jnp.int8 if q == "int8" else jnp.int4)
    assert "scale" in mq.state["layers"]["mlp"]["down"] and "scale" not in mq.state["lm_head"]
    kl, top1 = _kl_top1(ref, np.asarray(mq(tokens)))
    assert kl < max_kl and top1 >= min_top1, (kl, top1)
    # Greedy generation: every generated token is the quantized model's own argmax; with int8, the
    # prompts on which the float model is most decisive (largest top-1 margin) also start the same.
    top2 = np.sort(ref[:, 7], axis=-1)[:, -2:]
    prompts = tokens[np.argsort(top2[:, 0] - top2[:, 1])[:2], :8]
    out = mq.greedy(prompts, 8)
    assert out.shape == (2, 8) and out.min() >= 0 and out.max() < mq.config.vocab_size
    if q == "int8":
        np.testing.assert_array_equal(out[:, 0], m.greedy(prompts, 1)[:, 0])
    seq = np.concatenate([prompts, out], axis=1)
    np.testing.assert_array_equal(np.asarray(mq(seq)).argmax(-1)[:, 7:-1], out)


def test_load_quantizes_per_tensor_like_quantize_state_and_shards_scales_with_weights(toy):
    """Streaming load into a 2x2 (fsdp, tensor) mesh == quantizing the float model in memory; the
    scales land on the same devices as the rows/columns they scale."""
    path, m, tokens, _ = toy
    mesh = make_mesh("fsdp=2,tensor=2", devices=jax.devices()[:4])
    mq = model.load(path, dtype="float32", quant="int4-g32", mesh=mesh)
    _, expect = model_weights.quantize_state(m.state, m.config, "int4-g32")
    for (p, a), (_, b) in zip(nnx.to_flat_state(mq.state), nnx.to_flat_state(expect)):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a[...]), np.asarray(b[...])), p
    shardings = dict(nnx.to_flat_state(state_shardings(mq.state, mesh)))
    for p, v in nnx.to_flat_state(mq.state):
        want = shardings[p].get_value() if isinstance(shardings[p], nnx.Variable) else shardings[p]
        assert v[...].sharding.is_equivalent_to(want, v.ndim), (p, v[...].sharding, want)
    q = mq.state["layers"]["attn"]["q"]
    assert q["kernel"][...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert q["scale"][...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    single = model.load(path, dtype="float32", quant="int4-g32")
    np.testing.assert_allclose(np.asarray(mq(tokens)), np.asarray(single(tokens)), rtol=0, atol=1e-4)


def test_lm_head_quantized_when_configured(toy):
    path, m, tokens, ref = toy
    qc = QuantConfig(bits=8, targets=(*quant.TARGETS, "lm_head"))
    mq = model.load(path, dtype="float32", quant=qc)
    head = mq.state["lm_head"]
    assert head["kernel"].dtype == jnp.int8 and head["scale"].shape == (m.config.vocab_size,)
    assert mq.state["embed"]["embedding"].dtype == jnp.float32
    _, expect = model_weights.quantize_state(m.state, m.config, qc)
    assert np.array_equal(np.asarray(head["kernel"][...]), np.asarray(expect["lm_head"]["kernel"][...]))
    kl, top1 = _kl_top1(ref, np.asarray(mq(tokens)))
    assert kl < INT8_MAX_KL and top1 >= INT8_MIN_TOP1, (kl, top1)


def test_405b_scales_shard_like_the_kernel_dims_they_index():
    cfg = LlamaConfig.preset("llama3.1-405b", quant=QuantConfig(bits=4))
    mesh = make_mesh("fsdp=2,tensor=4")
    _, abstract = abstract_model(cfg)
    sh = state_shardings(abstract, mesh)
    for block, name in [("attn", n) for n in "qkvo"] + [("mlp", n) for n in ("gate", "up", "down")]:
        k, s = sh["layers"][block][name]["kernel"], sh["layers"][block][name]["scale"]
        kspec, sspec = tuple(k.spec) + (None,) * 4, tuple(s.spec) + (None,) * 4
        n_in = 2 if name == "o" else 1
        n_out = abstract["layers"][block][name]["kernel"].ndim - 1 - n_in
        assert sspec[1] == kspec[1], (name, kspec, sspec)  # the group dim goes with the first input dim
        assert sspec[2:2 + n_out] == kspec[1 + n_in:1 + n_in + n_out], (name, kspec, sspec)


def test_weight_bytes_are_exact_and_include_scales():
    cfg = LlamaConfig.preset("llama3.1-405b")
    D, N, H, L, F = cfg.dim, cfg.num_heads, cfg.head_dim, cfg.num_layers, cfg.mlp_dim
    b16 = model_weights.weight_bytes(cfg)
    b8 = model_weights.weight_bytes(cfg.replace(quant="int8"))
    b4 = model_weights.weight_bytes(cfg.replace(quant="int4"))
    assert sum(b16.values()) == 2 * cfg.num_params()
    assert b4["layers/attn/q/kernel"] == L * D * N * H // 2 and b4["layers/attn/q/scale"] == L * D // 128 * N * H * 2
    assert b8["layers/mlp/down/kernel"] == L * F * D and b8["layers/mlp/down/scale"] == L * D * 2
    assert b4["embed/embedding"] == b16["embed/embedding"] and "lm_head/scale" not in b4
    # int4 ≈ 215.5 GB: 401.6 G projection weights at half a byte plus a bf16 scale per 128 of them;
    # embedding, LM head and norms stay bf16
    quantized = L * (2 * D * N * H + 2 * D * cfg.num_kv_heads * H + 3 * D * F)
    assert sum(b4.values()) == quantized // 2 + quantized // 128 * 2 + 2 * (cfg.num_params() - quantized)
    assert sum(b8.values()) == quantized + L * (N * H + 2 * cfg.num_kv_heads * H + D + 2 * F + D) * 2 + \
        2 * (cfg.num_params() - quantized)
    mesh = make_mesh("fsdp=2,tensor=4")
    per_device = model_weights.weight_bytes(cfg.replace(quant="int4"), mesh)
    assert per_device["layers/attn/q/kernel"] == b4["layers/attn/q/kernel"] // 8
    assert per_device["layers/attn/q/scale"] == b4["layers/attn/q/scale"] // 8


def test_quantized_state_round_trips_through_orbax(toy, tmp_path):
    """model.checkpoint.save of a quantized, sharded state, then model.load of the Orbax directory:
    same int4 kernels and scales, in the shardings of the logical rules, same logits."""
    from model.formats import checkpoint

    path, _, tokens, _ = toy
    mesh = make_mesh("fsdp=2,tensor=2", devices=jax.devices()[:4])
    mq = model.load(path, dtype="float32", quant="int4-g32", mesh=mesh)
    checkpoint.save(mq.state, mq.config, tmp_path / "ckpt")
    back = model.load(tmp_path / "ckpt", dtype="float32", mesh=mesh)
    assert back.config.quant == mq.config.quant
    assert back.state["layers"]["attn"]["q"]["kernel"].dtype == jnp.int4
    for (p, a), (_, b) in zip(nnx.to_flat_state(mq.state), nnx.to_flat_state(back.state)):
        a, b = a[...], b[...]
        assert a.dtype == b.dtype and a.sharding.is_equivalent_to(b.sharding, a.ndim), p
        assert np.array_equal(np.asarray(a), np.asarray(b)), p
    np.testing.assert_array_equal(np.asarray(back(tokens)), np.asarray(mq(tokens)))


def test_bad_input_is_refused_with_layer_and_dimension():
    with pytest.raises(ValueError, match=r"quant.bits=3 is not supported for layers q, k, v.*expected 8 .* or 4"):
        QuantConfig(bits=3)
    cfg = LlamaConfig.preset("toy")  # D=128, N·H=128, F=384
    with pytest.raises(ValueError, match=r"layer 'q': int4 group_size 96 does not divide the contraction "
                                         r"dimension D=128"):
        abstract_model(cfg.replace(quant=QuantConfig(bits=4, group_size=96)))
    with pytest.raises(ValueError, match=r"layer 'down': int4 group_size 256 does not divide the contraction "
                                         r"dimension F=384"):
        abstract_model(cfg.replace(quant=QuantConfig(bits=4, group_size=256, targets=("down",))))
    with pytest.raises(ValueError, match=r"layer 'o': .* dimension N=4·H=32 \(128 rows\)"):
        abstract_model(cfg.replace(quant=QuantConfig(bits=4, group_size=48, targets=("o",))))
    with pytest.raises(ValueError, match=r"quant='int3'"):
        quant.parse("int3")
    with pytest.raises(ValueError, match=r"quant.targets: unknown layer 'embed'"):
        QuantConfig(bits=8, targets=("embed",))
