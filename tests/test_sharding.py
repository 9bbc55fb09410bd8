"""Meshes and the logical -> mesh rules on 8 CPU devices: sharded forward passes give the one-device
logits, every parameter lands where the rules say, and bad meshes are refused with the dimension
and axis named."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import model
from model.network import attention
from sharding import mesh as mesh_lib
from sharding import rules

CKPT = dict(vocab=512, dim=64, mlp=128, layers=2, heads=8, kv_heads=8, head_dim=8)  # every dim splits 8 ways
MESHES = ["fsdp=8", "fsdp=2,tensor=4", "tensor=8", "data=2,fsdp=4", "fsdp=2,sequence=2,tensor=2"]

# Independent statement of the table, per logical name of a parameter: the mesh axes it is split over
# (in order) when they are > 1 and not taken by an earlier dimension.
EXPECTED_PARAM_AXES = {"layers": (), "vocab": ("tensor",), "embed": ("fsdp", "sequence"), "heads": ("tensor",),
                       "kv_heads": ("tensor",), "head_dim": (), "mlp": ("tensor",), "lora_rank": ("fsdp", "sequence")}


@pytest.fixture(scope="module")
def ckpt(hf_checkpoint):
    path, _ = hf_checkpoint(**CKPT)
    return path


@pytest.fixture(scope="module")
def transformers_logits(hf_checkpoint, tokens):
    from tests import hf_reference

    return hf_reference.logits(hf_checkpoint(**CKPT)[1], tokens)


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, CKPT["vocab"], (8, 32)).astype(np.int32)


@pytest.fixture(scope="module")
def reference_logits(ckpt, tokens):
    m = model.load(ckpt, dtype="float32", mesh=mesh_lib.single_device_mesh())
    return np.asarray(m(tokens))


@pytest.mark.parametrize("spec", MESHES)
def test_sharded_forward_matches_single_device(ckpt, tokens, reference_logits, transformers_logits, spec):
    """The sharded forward gives transformers' logits (the independent oracle, 1e-4 of the largest as in
    test_parity) and, tighter, the one-device model's (1e-5: only the order of reductions differs)."""
    mesh = mesh_lib.make_mesh(spec)
    m = model.load(ckpt, dtype="float32", mesh=mesh)
    out = m(tokens)
    assert len(out.sharding.device_set) == 8
    out = np.asarray(out)
    rel = np.abs(out - transformers_logits).max() / np.abs(transformers_logits).max()
    assert rel <= 1e-4, f"{spec}: max relative difference from transformers {rel:.2e}"
    rel = np.abs(out - reference_logits).max() / np.abs(reference_logits).max()
    assert rel <= 1e-5, f"{spec}: max relative difference {rel:.2e}"
    _check_every_parameter(m.state, mesh)


def _check_every_parameter(state, mesh):
    checked = 0
    for path, v in nnx.to_flat_state(state):
        names = v.get_metadata().get("out_sharding")
        arr = v.get_value()
        used, want = set(), []
        for name, dim in zip(names, arr.shape):
            axes = [a for a in EXPECTED_PARAM_AXES[name] if mesh.shape[a] > 1 and a not in used]
            used.update(axes)
            want.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
        assert arr.sharding.spec == P(*want), f"{'/'.join(map(str, path))}: {arr.sharding.spec} != {P(*want)}"
        # and the bytes really are split: each device holds the shard shape
        shard = arr.addressable_shards[0].data.shape
        assert shard == arr.sharding.shard_shape(arr.shape), path
        checked += 1
    assert checked >= 10


def test_lora_and_quantized_trees_follow_the_rules():
    from model.network.lora import LoraConfig

    cfg = model.LlamaConfig.preset("toy", lora=LoraConfig(rank=8), quant="int8", vocab_size=256)
    mesh = mesh_lib.make_mesh("fsdp=4,tensor=2")  # toy: 2 KV heads
    m = model.init(cfg, mesh=mesh)
    a = m.state["layers"]["mlp"]["up"]["lora_a"][...]  # [layers, embed, lora_rank]
    b = m.state["layers"]["mlp"]["up"]["lora_b"][...]  # [layers, lora_rank, mlp]
    s = m.state["layers"]["mlp"]["up"]["scale"][...]  # int8 per-channel scale [layers, mlp]
    assert a.sharding.spec == P(None, "fsdp", None)
    assert b.sharding.spec == P(None, "fsdp", "tensor")
    assert s.sharding.spec == P(None, "tensor")
    # a rank the fsdp axis does not divide stays replicated rather than failing
    spec = rules.logical_to_spec(("layers", "lora_rank", "mlp"), mesh_lib.make_mesh("fsdp=8"), (2, 4, 384))
    assert spec == P(None, None, None)


def test_indivisible_dimension_names_dimension_and_axis():
    mesh = mesh_lib.make_mesh("fsdp=2,tensor=4")
    with pytest.raises(ValueError, match=r"'kv_heads'.*size 2.*tensor"):
        rules.logical_to_spec(("layers", "embed", "kv_heads", "head_dim"), mesh, (2, 128, 2, 32), what="k/kernel")
    cfg = model.LlamaConfig.preset("toy")  # 2 KV heads
    with pytest.raises(ValueError, match=r"kv_heads.*tensor"):
        model.init(cfg, mesh=mesh)


def test_mesh_spec_errors():
    with pytest.raises(ValueError, match="unknown axis 'model'"):
        mesh_lib.make_mesh("model=2")
    with pytest.raises(ValueError, match="only one axis may be -1"):
        mesh_lib.make_mesh("fsdp=-1,tensor=-1")
    with pytest.raises(ValueError, match="8 devices are not divisible by 3"):
        mesh_lib.make_mesh("fsdp=-1,tensor=3")
    with pytest.raises(ValueError, match="needs 16 devices, there are 8"):
        mesh_lib.make_mesh("fsdp=4,tensor=4")
    m = mesh_lib.make_mesh("fsdp=-1,tensor=4")
    assert dict(m.shape) == {"data": 1, "fsdp": 2, "sequence": 1, "tensor": 4}
    assert mesh_lib.describe(m) == "fsdp=2 × tensor=4"


def test_tpu_topology_meshes():
    pytest.importorskip("libtpu")
    from sharding import topology

    devs = topology.parse("v6e-16").devices()
    m = mesh_lib.make_mesh("fsdp=4,tensor=4", devs)
    assert m.devices.shape == (1, 4, 1, 4) and m.devices.flat[0].platform == "tpu"
    # tensor groups are physical neighbours: the 4 chips of a tensor group span at most a 2x2 / 1x4 patch
    for row in m.devices.reshape(4, 4):
        xs, ys = zip(*[d.coords[:2] for d in row])
        assert (max(xs) - min(xs) + 1) * (max(ys) - min(ys) + 1) == 4
    two = topology.parse("2xv6e-16").devices()
    m2 = mesh_lib.make_mesh("data=2,fsdp=4,tensor=4", "2xv6e-16")  # by name
    for i in range(2):  # the data axis spans the slices (DCN), everything else stays within a slice
        assert {d.slice_index for d in m2.devices[i].flat} == {i}
    with pytest.raises(ValueError, match="data' axis to be a multiple of 2"):
        mesh_lib.make_mesh("fsdp=8,tensor=4", two)


def test_constrain_applies_rules_by_logical_name():
    mesh = mesh_lib.make_mesh("fsdp=2,tensor=4")
    x = jnp.ones((4, 8, 16))
    assert rules.constrain(x, ("batch", "length", "embed")) is x  # no active mesh: no-op

    def f(x):
        with rules.use_mesh(mesh):
            return rules.constrain(x * 2, ("batch", "length", "mlp"))

    y = jax.jit(f)(x)
    assert y.sharding.spec == P("fsdp", None, "tensor")
    # an activation the axes do not divide (batch 1 while decoding) stays replicated instead of failing
    z = jax.jit(f)(jnp.ones((1, 8, 16)))
    assert z.sharding.spec == P(None, None, "tensor")


def test_abstract_mesh_shard_shapes_without_devices():
    am = mesh_lib.abstract_mesh("fsdp=-1,tensor=8", 256)
    shape = rules.shard_shape(("layers", "embed", "mlp"), (126, 16384, 53248), am)
    assert shape == (126, 16384 // 32, 53248 // 8)


def test_create_and_restore_sharded(tmp_path):
    """Created straight into one mesh's shardings (jit out_shardings), restored by Orbax straight into
    another's from the abstract arrays of sharding/rules.py."""
    mesh_a, mesh_b = mesh_lib.make_mesh("fsdp=8"), mesh_lib.make_mesh("fsdp=2,tensor=4")
    names = {"w": ("embed", "mlp"), "b": ("mlp",)}
    abstract = {"w": jax.ShapeDtypeStruct((64, 32), jnp.float32), "b": jax.ShapeDtypeStruct((32,), jnp.float32)}

    def shardings(mesh):
        return {k: rules.named_sharding(names[k], mesh, abstract[k].shape) for k in names}

    made = jax.jit(lambda: {"w": jnp.arange(64 * 32, dtype=jnp.float32).reshape(64, 32), "b": jnp.ones(32)},
                   out_shardings=shardings(mesh_a))()
    assert made["w"].sharding.spec == P("fsdp", None)
    with ocp.StandardCheckpointer() as ck:
        ck.save(tmp_path / "ckpt", made)
    with ocp.StandardCheckpointer() as ck:
        back = ck.restore(tmp_path / "ckpt", rules.abstract_arrays(abstract, shardings(mesh_b)))
    assert back["w"].sharding.spec == P("fsdp", "tensor")
    np.testing.assert_array_equal(np.asarray(back["w"]), np.asarray(made["w"]))


def test_chunked_attention_matches_reference_under_sequence_parallelism(monkeypatch):
    """The query-chunked XLA attention (long sequences) is the reference, row for row, also with the
    sequence axis splitting the queries; gradients agree too."""
    B, T, N, K, H = 2, 64, 4, 2, 8
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (B, T, N, H))
    k, v = jax.random.normal(ks[1], (B, T, K, H)), jax.random.normal(ks[2], (B, T, K, H))
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    seg = jnp.ones((B, T), jnp.int32).at[1, 40:].set(2)  # a packed row: two documents

    def ref(q, k, v):
        return attention.xla_attention(q, k, v, pos, pos, seg, seg)

    monkeypatch.setattr(attention, "QUERY_CHUNK", 16)
    mesh = mesh_lib.make_mesh("fsdp=2,sequence=2,tensor=2")

    @jax.jit
    def chunked(q, k, v):
        with rules.use_mesh(mesh):
            q = rules.constrain(q, ("batch", "length", "heads", "head_dim"))
            return attention.attend(q, k, v, q_pos=pos, k_pos=pos, q_seg=seg, k_seg=seg)

    np.testing.assert_allclose(np.asarray(chunked(q, k, v)), np.asarray(ref(q, k, v)), atol=2e-6)
    g_ref = jax.grad(lambda *a: (ref(*a) ** 2).sum(), argnums=(0, 1, 2))(q, k, v)
    g_chk = jax.grad(lambda *a: (chunked(*a) ** 2).sum(), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_ref, g_chk):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5)
