"""Inputs that come from files (safetensors headers, HF index file names, Orbax metadata keys) are
validated by the one reader before they are used; errors name the file and the entry."""

import json
import shutil
import struct

import numpy as np
import pytest

import model
from model.formats import checkpoint
from model.formats.safetensors_io import CheckpointError, SafetensorsFile
from model.network.config import LlamaConfig


@pytest.fixture
def hf_dir(hf_checkpoint, tmp_path):
    """An HF directory with the toy checkpoint's config.json and no weights yet."""
    src, _ = hf_checkpoint(heads=4, kv_heads=2, head_dim=16)
    dst = tmp_path / "ckpt"
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    return dst, src


def _raw_safetensors(path, header: dict, data: bytes = b"", header_len=None):
    raw = json.dumps(header).encode() if isinstance(header, dict) else header
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)


def _t(dtype="F32", shape=(4,), offsets=(0, 16)):
    return {"dtype": dtype, "shape": shape if isinstance(shape, int) else list(shape), "data_offsets": list(offsets)}


MALFORMED = {
    # case: (header, data bytes, words the error must hold)
    "overflowing_shape": ({"w": _t(shape=[2**32, 2**32], offsets=[0, 0])}, b"", ["'w'", "0 bytes", str(2**66)]),
    "negative_dim": ({"w": _t(shape=[-4, -1], offsets=[0, 16])}, bytes(16), ["'w'", "non-negative integers"]),
    "string_dim": ({"w": _t(shape=["4"], offsets=[0, 16])}, bytes(16), ["'w'", "non-negative integers"]),
    "float_dim": ({"w": _t(shape=[4.0], offsets=[0, 16])}, bytes(16), ["'w'", "non-negative integers"]),
    "bool_dim": ({"w": _t(shape=[True], offsets=[0, 4])}, bytes(4), ["'w'", "non-negative integers"]),
    "shape_not_list": ({"w": _t(shape=4, offsets=[0, 16])}, bytes(16), ["'w'", "non-negative integers"]),
    "unknown_dtype": ({"w": _t(dtype="F128")}, bytes(16), ["'w'", "unsupported dtype 'F128'"]),
    "missing_dtype": ({"w": {"shape": [4], "data_offsets": [0, 16]}}, bytes(16), ["'w'", "malformed header entry"]),
    "entry_not_object": ({"w": [1, 2]}, b"", ["'w'", "malformed header entry"]),
    "negative_offset": ({"w": _t(shape=[0], offsets=[-8, -8])}, b"", ["'w'", "data_offsets"]),
    "string_offset": ({"w": _t(offsets=["0", "16"])}, bytes(16), ["'w'", "data_offsets"]),
    "reversed_offsets": ({"w": _t(shape=[0], offsets=[16, 0])}, bytes(16), ["'w'", "data_offsets"]),
    "wrong_byte_count": ({"w": _t(shape=[5])}, bytes(16), ["'w'", "16 bytes", "20 expected"]),
    "beyond_file": ({"w": _t(shape=[8], offsets=[0, 32])}, bytes(16), ["'w'", "truncated file"]),
    "overlap": ({"a": _t(offsets=[0, 16]), "b": _t(offsets=[8, 24])}, bytes(24), ["'a'", "'b'", "overlap"]),
    "duplicated_name": (b'{"w": ' + json.dumps(_t()).encode() + b', "w": ' + json.dumps(_t()).encode() + b"}",
                        bytes(16), ["'w'", "twice"]),
    "not_utf8": (b'{"w\xff": 1}', b"", ["corrupt safetensors header"]),
    "deep_nesting": (b"[" * 100_000 + b"]" * 100_000, b"", ["corrupt safetensors header"]),
    "metadata_not_object": ({"__metadata__": [1]}, b"", ["__metadata__"]),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_load_refuses_malformed_header_naming_file_and_tensor(hf_dir, case):
    d, _ = hf_dir
    header, data, words = MALFORMED[case]
    _raw_safetensors(d / "model.safetensors", header, data)
    with pytest.raises(CheckpointError) as e:
        model.load(d)
    msg = str(e.value)
    assert str(d / "model.safetensors") in msg, msg
    for w in words:
        assert w in msg, (w, msg)


@pytest.mark.parametrize("n", [0, 1, 1 << 40, 1 << 63])
def test_insane_header_length_refused(tmp_path, n):
    f = tmp_path / "x.safetensors"
    _raw_safetensors(f, {}, bytes(64), header_len=n)
    with pytest.raises(CheckpointError, match=r"x.safetensors: corrupt safetensors header \(declares"):
        SafetensorsFile(f)


def test_valid_header_still_reads(tmp_path):
    f = tmp_path / "ok.safetensors"
    _raw_safetensors(f, {"a": _t(offsets=[0, 16]), "b": _t(dtype="I8", shape=[0, 3], offsets=[16, 16]),
                         "__metadata__": {"format": "pt"}}, np.arange(4, dtype=np.float32).tobytes())
    sf = SafetensorsFile(f)
    np.testing.assert_array_equal(sf.read("a"), np.arange(4, dtype=np.float32))
    assert sf.shape("b") == (0, 3)


@pytest.mark.parametrize("fname", ["/etc/passwd", "../outside.safetensors", "sub/../../outside.safetensors",
                                   "..", "", "./", "a\\..\\b"])
def test_index_file_names_must_stay_inside_the_directory(hf_dir, tmp_path, fname):
    d, src = hf_dir
    shutil.copy(src / "model.safetensors", tmp_path / "outside.safetensors")  # a readable file out there
    names = SafetensorsFile(src / "model.safetensors").tensors
    weight_map = {n: "model.safetensors" for n in names}
    shutil.copy(src / "model.safetensors", d / "model.safetensors")
    bad = sorted(names)[0]
    weight_map[bad] = fname
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError) as e:
        model.load(d)
    msg = str(e.value)
    assert "model.safetensors.index.json" in msg and repr(bad) in msg and repr(fname) in msg, msg
    assert "inside" in msg, msg


def test_index_duplicated_name_refused(hf_dir):
    d, src = hf_dir
    shutil.copy(src / "model.safetensors", d / "model.safetensors")
    (d / "model.safetensors.index.json").write_text(
        '{"weight_map": {"model.norm.weight": "model.safetensors", "model.norm.weight": "model.safetensors"}}')
    with pytest.raises(CheckpointError, match=r"index.json: tensor 'model.norm.weight' is listed twice"):
        model.load(d)


TOY = LlamaConfig.preset("toy")


def _orbax_with_keys(path, keys):
    """A finished checkpoint directory whose _METADATA lists an array under tree path `keys`."""
    path.mkdir()
    checkpoint.write_metadata(path, {tuple(keys): ((4,), (4,))}, TOY)
    (path / checkpoint.COMMIT_FILE).write_text("done")
    return path


@pytest.mark.parametrize("keys", [["/tmp", "x"], ["embed", "../../x"], [".."], ["embed", ""], ["a/b"]])
def test_orbax_metadata_keys_must_stay_inside_the_directory(tmp_path, keys):
    d = _orbax_with_keys(tmp_path / "ckpt", keys)
    with pytest.raises(checkpoint.CheckpointFormatError) as e:
        checkpoint.read_params(d)
    msg = str(e.value)
    assert str(d / "_METADATA") in msg and "inside the checkpoint directory" in msg, msg
    with pytest.raises(checkpoint.CheckpointFormatError, match="inside the checkpoint directory"):
        model.load(d)


def test_orbax_absolute_key_is_not_read(tmp_path):
    """The attack: an absolute key pointing at an array outside the checkpoint."""
    outside = tmp_path / "elsewhere"
    arr = checkpoint.open_array(outside, "x", shape=(4,), dtype=np.float32, chunks=(4,))
    arr.write(np.arange(4, dtype=np.float32)).result()
    d = _orbax_with_keys(tmp_path / "ckpt", [str(outside / "x")])
    with pytest.raises(checkpoint.CheckpointFormatError, match="inside the checkpoint directory"):
        checkpoint.read_params(d)


# ---------------------------------------------------------------------------------------------
# The CPU kernel cache: a planted library is never loaded

@pytest.fixture
def kernel_cache(tmp_path, monkeypatch):
    from model.network.backends import cpu_kernels
    monkeypatch.setenv("LLAMA_JAX_CACHE", str(tmp_path / "cache"))
    built = []

    def fake_compile(cmd):  # the real compile is tested in tests/test_serve_engine.py
        out = cmd[cmd.index("-o") + 1]
        with open(out, "wb") as f:
            f.write(b"freshly built")
        built.append(out)

    monkeypatch.setattr(cpu_kernels, "_compile", fake_compile)
    return cpu_kernels, tmp_path / "cache", built


def test_kernel_cache_dir_is_private_and_reused(kernel_cache):
    ck, cache, built = kernel_cache
    out = ck.build()
    assert out.parent == cache and (cache.stat().st_mode & 0o777) == 0o700
    assert out.read_bytes() == b"freshly built" and not out.stat().st_mode & 0o022
    assert ck.build() == out and len(built) == 1  # a trusted library is reused


def test_world_writable_planted_library_is_rebuilt(kernel_cache):
    ck, cache, built = kernel_cache
    out = ck.library_path(*ck._toolchain())
    cache.mkdir(mode=0o700)
    out.write_bytes(b"planted")
    out.chmod(0o666)
    assert ck.build() == out and len(built) == 1
    assert out.read_bytes() == b"freshly built" and not out.stat().st_mode & 0o022


def test_library_of_another_user_is_rebuilt(kernel_cache, monkeypatch):
    import os
    ck, cache, built = kernel_cache
    out = ck.library_path(*ck._toolchain())
    cache.mkdir(mode=0o700)
    out.write_bytes(b"planted")
    out.chmod(0o500)
    real = os.lstat

    def lstat(p, *a, **kw):  # the planted file looks owned by another uid
        st = real(p, *a, **kw)
        if str(p) == str(out) and out.read_bytes() == b"planted":
            return os.stat_result((st.st_mode, st.st_ino, st.st_dev, st.st_nlink, st.st_uid + 1, *tuple(st)[5:]))
        return st

    monkeypatch.setattr(ck.os, "lstat", lstat)
    assert ck.build() == out and len(built) == 1 and out.read_bytes() == b"freshly built"


def test_kernel_cache_key_covers_cpu_compiler_and_versions(kernel_cache, monkeypatch):
    import jax
    ck, _, _ = kernel_cache
    tc = ck._toolchain()
    base = ck.library_path(*tc)
    monkeypatch.setattr(ck, "_cpu_features", lambda: "fpu sse2 avx2")
    a = ck.library_path(*tc)
    monkeypatch.setattr(ck, "_cpu_features", lambda: "fpu sse2 avx2 avx512f avx512_bf16")
    b = ck.library_path(*tc)
    monkeypatch.setattr(ck, "_compiler_version", lambda cxx: "g++ 99.0")
    c = ck.library_path(*tc)
    monkeypatch.setattr(jax, "__version__", "0.0.1")
    d = ck.library_path(*tc)
    assert len({base, a, b, c, d}) == 5
