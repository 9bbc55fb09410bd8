"""Meshes made the way JAX documents them (`jax.make_mesh`, Explicit axis types by default) work in
`model.load` (HF and Orbax checkpoints, with LoRA adapters) and `model.init`: the logits equal those of
the same mesh with Auto axes bit for bit, and the unsharded logits within float32 reduction-order noise."""

import jax
import numpy as np
import pytest
from jax.sharding import AxisType

import model
from model.formats import checkpoint
from model.network.lora import LoraConfig
from sharding.mesh import make_mesh, single_device_mesh

CKPT = dict(vocab=512, dim=64, mlp=128, layers=2, heads=8, kv_heads=4, head_dim=8)
TOKENS = np.random.default_rng(0).integers(0, 512, (8, 16)).astype(np.int32)


@pytest.fixture(scope="module")
def explicit_mesh():
    mesh = jax.make_mesh((1, 4, 2), ("data", "fsdp", "tensor"))
    assert set(mesh.axis_types) == {AxisType.Explicit}  # the default this test is about
    return mesh


def _check(got, auto, unsharded):
    np.testing.assert_array_equal(got, auto)  # same mesh shape, Auto axes: the very same program
    rel = np.abs(got - unsharded).max() / np.abs(unsharded).max()
    assert rel <= 1e-5, f"explicit-mesh logits differ from one device by {rel:.2e}"


def test_load_hf_into_explicit_mesh(hf_checkpoint, explicit_mesh):
    path, _ = hf_checkpoint(**CKPT)
    unsharded = np.asarray(model.load(path, dtype="float32", mesh=single_device_mesh())(TOKENS))
    auto = np.asarray(model.load(path, dtype="float32", mesh=make_mesh("fsdp=4,tensor=2"))(TOKENS))
    m = model.load(path, dtype="float32", mesh=explicit_mesh)
    q = m.state["layers"]["attn"]["q"]["kernel"][...]
    assert len(q.sharding.device_set) == 8 and "fsdp" in str(q.sharding.spec)  # really sharded over the mesh
    _check(np.asarray(m(TOKENS)), auto, unsharded)


def test_load_orbax_with_lora_into_explicit_mesh(hf_checkpoint, explicit_mesh, tmp_path):
    path, _ = hf_checkpoint(**CKPT)
    src = model.load(path, dtype="float32")
    orbax = checkpoint.save(src.state, src.config, tmp_path / "orbax")
    lc = LoraConfig(rank=4, alpha=8)
    unsharded = np.asarray(model.load(orbax, dtype="float32", lora=lc, mesh=single_device_mesh())(TOKENS))
    auto = np.asarray(model.load(orbax, dtype="float32", lora=lc, mesh=make_mesh("fsdp=4,tensor=2"))(TOKENS))
    m = model.load(orbax, dtype="float32", lora=lc, mesh=explicit_mesh)
    _check(np.asarray(m(TOKENS)), auto, unsharded)


def test_init_on_explicit_mesh(explicit_mesh):
    cfg = model.LlamaConfig(vocab_size=512, dim=64, mlp_dim=128, num_layers=2, num_heads=8, num_kv_heads=4,
                            head_dim=8, param_dtype="float32", compute_dtype="float32")
    unsharded = np.asarray(model.init(cfg, seed=3, mesh=single_device_mesh())(TOKENS))
    auto = np.asarray(model.init(cfg, seed=3, mesh=make_mesh("fsdp=4,tensor=2"))(TOKENS))
    m = model.init(cfg, seed=3, mesh=explicit_mesh)
    _check(np.asarray(m(TOKENS)), auto, unsharded)
