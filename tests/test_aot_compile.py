"""sharding/aot_compile.py: compiles for a TPU slice this machine lacks are kept by a key of the program,
the chips and the compiler, and given back with the analyses the compiler gave."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sharding import aot_compile, topology
from sharding.mesh import make_mesh


def _lowered(name: str, width: int = 512):
    pytest.importorskip("libtpu")
    mesh = make_mesh("fsdp=4", topology.parse(name).devices())
    s = NamedSharding(mesh, P("fsdp", None))
    x = jax.ShapeDtypeStruct((64, width), jnp.bfloat16, sharding=s)
    w = jax.ShapeDtypeStruct((width, width), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
    return jax.jit(lambda x, w: jnp.tanh(x @ w) @ w).lower(x, w), mesh.devices


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_JAX_CACHE", str(tmp_path))
    monkeypatch.delenv("LLAMA_JAX_AOT_CACHE", raising=False)
    calls = []
    real = jax.stages.Lowered.compile
    monkeypatch.setattr(jax.stages.Lowered, "compile", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    return tmp_path / "aot", calls


def test_second_compile_comes_from_the_cache_with_the_compilers_numbers(cache):
    where, calls = cache
    lowered, devices = _lowered("v6e-4")
    real = lowered.compile()
    calls.clear()
    first = aot_compile.compile(lowered, devices)
    again = aot_compile.compile(_lowered("v6e-4")[0], devices)
    assert len(calls) == 1 and len(list(where.iterdir())) == 1  # compiled once
    assert again == first
    ma = real.memory_analysis()
    for f in aot_compile.MEMORY_FIELDS:
        assert getattr(again.memory_analysis(), f) == int(getattr(ma, f)), f
    assert again.memory_analysis().argument_size_in_bytes == (16 * 512 + 512 * 512) * 2  # x's shard + w
    assert again.cost_analysis()["flops"] == real.cost_analysis()["flops"] > 0
    assert again.as_text() == real.as_text() and "fusion" in again.as_text()


def test_other_chips_or_program_are_other_entries(cache):
    where, calls = cache
    for name, width in (("v6e-4", 512), ("v5e-4", 512), ("v6e-4", 256)):
        aot_compile.compile(*_lowered(name, width))
    assert len(calls) == 3 and len(list(where.iterdir())) == 3


def test_a_broken_entry_is_compiled_again(cache):
    where, calls = cache
    lowered, devices = _lowered("v6e-4")
    first = aot_compile.compile(lowered, devices)
    (entry,) = where.iterdir()
    entry.write_bytes(b"not gzip")
    assert aot_compile.compile(lowered, devices) == first and len(calls) == 2
    assert aot_compile.compile(lowered, devices) == first and len(calls) == 2  # rewritten whole


def test_attached_devices_and_the_switch_compile_for_real(cache, monkeypatch):
    where, calls = cache
    x = jnp.ones((8, 8))
    cpu = aot_compile.compile(jax.jit(lambda a: a * 2).lower(x), np.array(jax.devices()[:1]))
    assert isinstance(cpu, jax.stages.Compiled)
    monkeypatch.setenv("LLAMA_JAX_AOT_CACHE", "0")
    assert isinstance(aot_compile.compile(*_lowered("v6e-4")), jax.stages.Compiled)
    assert not where.exists()


def test_an_unwritable_cache_still_compiles(cache):
    where, calls = cache
    where.write_text("a file where the cache directory should be")
    rec = aot_compile.compile(*_lowered("v6e-4"))
    assert rec.memory_analysis().argument_size_in_bytes > 0 and len(calls) == 1
