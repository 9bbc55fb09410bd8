"""Configs, the abstract 405B tree, scan-over-layers structure, and refusals of bad input."""

import json
import math
import shutil
import time

import jax
import numpy as np
import pytest

import model
from model import LlamaConfig, abstract_model, logical_axes
from model.formats.safetensors_io import CheckpointError


@pytest.mark.parametrize("name,count", [("llama3.1-8b", 8_030_261_248), ("llama3.1-70b", 70_553_706_496),
                                        ("llama3.1-405b", 405_853_388_800)])
def test_preset_parameter_counts(name, count):
    assert LlamaConfig.preset(name).num_params() == count


def _hf_405b_config(kv_heads):
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16384,
            "intermediate_size": 53248, "num_hidden_layers": 126, "num_attention_heads": 128,
            "num_key_value_heads": kv_heads, "vocab_size": 128256, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
            "max_position_embeddings": 131072, "tie_word_embeddings": False, "bos_token_id": 128000,
            "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
            "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"}}


@pytest.mark.parametrize("kv_heads,count", [(8, 405_853_388_800), (16, 410_081_247_232)])
def test_from_hf_405b_variants(tmp_path, kv_heads, count):
    (tmp_path / "config.json").write_text(json.dumps(_hf_405b_config(kv_heads)))
    cfg = LlamaConfig.from_hf(tmp_path)
    assert cfg.num_kv_heads == kv_heads and cfg.num_params() == count
    assert cfg.eos_token_ids == (128001, 128008, 128009) and cfg.rope_scaling.factor == 8.0
    if kv_heads == 8:
        assert cfg.replace(param_dtype="bfloat16") == LlamaConfig.preset("llama3.1-405b").replace(
            eos_token_ids=(128001, 128008, 128009))


def test_405b_abstract_tree_shapes_and_axes():
    t0 = time.perf_counter()
    cfg = LlamaConfig.preset("llama3.1-405b")
    _, state = abstract_model(cfg)
    shapes = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(state)}
    axes = {jax.tree_util.keystr(p): a for p, a in
            jax.tree_util.tree_leaves_with_path(logical_axes(state), is_leaf=lambda x: isinstance(x, tuple))}
    L, D, N, K, H, F, V = 126, 16384, 128, 8, 128, 53248, 128256
    expected = {
        "['embed']['embedding']": ((V, D), ("vocab", "embed")),
        "['layers']['attn_norm']['scale']": ((L, D), ("layers", "embed")),
        "['layers']['attn']['q']['kernel']": ((L, D, N, H), ("layers", "embed", "heads", "head_dim")),
        "['layers']['attn']['k']['kernel']": ((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim")),
        "['layers']['attn']['v']['kernel']": ((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim")),
        "['layers']['attn']['o']['kernel']": ((L, N, H, D), ("layers", "heads", "head_dim", "embed")),
        "['layers']['mlp_norm']['scale']": ((L, D), ("layers", "embed")),
        "['layers']['mlp']['gate']['kernel']": ((L, D, F), ("layers", "embed", "mlp")),
        "['layers']['mlp']['up']['kernel']": ((L, D, F), ("layers", "embed", "mlp")),
        "['layers']['mlp']['down']['kernel']": ((L, F, D), ("layers", "mlp", "embed")),
        "['norm']['scale']": ((D,), ("embed",)),
        "['lm_head']['kernel']": ((D, V), ("embed", "vocab")),
    }
    assert {k.replace(".value", ""): v for k, v in shapes.items()} == {k: v[0] for k, v in expected.items()}
    assert {k.replace(".value", ""): v for k, v in axes.items()} == {k: v[1] for k, v in expected.items()}
    assert sum(math.prod(s) for s in shapes.values()) == 405_853_388_800
    assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(state))
    assert time.perf_counter() - t0 < 30


def test_scan_keeps_program_size_independent_of_depth():
    """2 and 32 layers lower to the same program (one scanned block), so compile time stays flat."""
    def hlo_ops(layers):
        cfg = LlamaConfig.preset("toy", num_layers=layers, vocab_size=256)
        graphdef, state = abstract_model(cfg)
        from flax import nnx
        f = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
        text = f.lower(state, jax.ShapeDtypeStruct((2, 16), np.int32)).as_text()
        return sum(1 for line in text.splitlines() if "=" in line)
    assert hlo_ops(2) == hlo_ops(32)


@pytest.fixture
def ckpt_copy(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint(heads=4, kv_heads=2, head_dim=16)
    dst = tmp_path / "ckpt"
    shutil.copytree(path, dst)
    return dst


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k)
        else:
            cfg[k] = v
    (path / "config.json").write_text(json.dumps(cfg))


def test_config_missing_field(ckpt_copy):
    _edit_config(ckpt_copy, hidden_size=None)
    with pytest.raises(ValueError, match=r"config.json: missing field 'hidden_size'"):
        model.load(ckpt_copy)


def test_config_unknown_rope_type(ckpt_copy):
    cfg = json.loads((ckpt_copy / "config.json").read_text())
    _edit_config(ckpt_copy, rope_parameters=dict(cfg["rope_parameters"], rope_type="yarn"))
    with pytest.raises(ValueError, match=r"unknown rope_type 'yarn'"):
        model.load(ckpt_copy)


def _rewrite_tensors(path, edit):
    from model.formats.safetensors_io import SafetensorsFile, SafetensorsWriter
    src = SafetensorsFile(path / "model.safetensors")
    tensors = edit({n: src.read(n) for n in src.tensors})
    w = SafetensorsWriter(path / "model.safetensors", [(n, a.dtype, a.shape) for n, a in tensors.items()])
    for n, a in tensors.items():
        w.write(n, a)
    w.close()


def test_checkpoint_missing_tensor(ckpt_copy):
    _rewrite_tensors(ckpt_copy, lambda t: {k: v for k, v in t.items() if k != "model.layers.1.mlp.up_proj.weight"})
    with pytest.raises(CheckpointError, match=r"missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        model.load(ckpt_copy)


def test_checkpoint_wrong_shape_names_tensor_and_file(ckpt_copy):
    def edit(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:16]
        return t
    _rewrite_tensors(ckpt_copy, edit)
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'model.layers.0.self_attn.k_proj.weight' "
                                              r"has shape \[16, 64\], config.json implies \[32, 64\]"):
        model.load(ckpt_copy)


def test_truncated_file_and_pickles_refused(ckpt_copy, tmp_path):
    data = (ckpt_copy / "model.safetensors").read_bytes()
    (ckpt_copy / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors: truncated file: tensor"):
        model.load(ckpt_copy)
    (ckpt_copy / "model.safetensors").unlink()
    (ckpt_copy / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin: pickle-based formats are never loaded"):
        model.load(ckpt_copy)


def test_token_ids_out_of_range(hf_checkpoint):
    path, _ = hf_checkpoint(heads=4, kv_heads=2, head_dim=16)
    m = model.load(path, dtype="float32")
    with pytest.raises(ValueError, match=r"token id 512 is out of range for vocab_size 512"):
        m(np.array([[1, 512]], np.int32))
    with pytest.raises(ValueError, match=r"token id -1 is out of range"):
        m(np.array([[-1, 5]], np.int32))


def test_random_init_is_sharded_and_runs():
    """Created in its shardings, the random model is the one-device model with the same seed, parameter for
    parameter, and gives its logits; another seed gives other weights."""
    from flax import nnx

    from sharding.mesh import make_mesh, single_device_mesh
    cfg = LlamaConfig.preset("toy", vocab_size=256)
    m = model.init(cfg, mesh=make_mesh("fsdp=4,tensor=2"))
    q = m.state["layers"]["attn"]["q"]["kernel"][...]
    assert len(q.sharding.device_set) == 8 and q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    one = model.init(cfg, mesh=single_device_mesh())
    for (p, a), (_, b) in zip(nnx.to_flat_state(m.state), nnx.to_flat_state(one.state)):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(p))
    other = model.init(cfg, seed=1, mesh=single_device_mesh())
    assert not np.array_equal(np.asarray(other.state["layers"]["attn"]["q"]["kernel"][...]), np.asarray(q))
    tokens = np.random.default_rng(0).integers(0, 256, (2, 5), dtype=np.int32)
    np.testing.assert_allclose(np.asarray(m(tokens)), np.asarray(one(tokens)), rtol=0, atol=1e-5)
