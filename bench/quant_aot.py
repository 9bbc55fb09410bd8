"""Per-device weight bytes of a quantized model: the analytic count (model.network.model.weight_bytes) against a
TPU ahead-of-time compile of the quantized forward (memory_analysis().argument_size_in_bytes).

    python bench/quant_aot.py [--layers 2] [--topology v6e:2x2] [--mesh tensor=4] [--quant int4]

Needs libtpu (the `jax[tpu]` extra); runs on a CPU-only machine (the compile targets the topology).
Prints one JSON line per quantization. The model is 405B-wide (D 16384, F 53248, 128 heads, vocab
128256) with reduced depth: per-layer bytes do not depend on depth, and the scan over layers makes
the compile independent of it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the default backend stays CPU; TPU devices come from the topology
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from model import LlamaConfig, abstract_model, state_shardings  # noqa: E402
from model.network import model as model_weights
from model.network import quant
from sharding import aot_compile  # noqa: E402
from sharding.mesh import make_mesh  # noqa: E402
from sharding.rules import named_sharding, use_mesh  # noqa: E402


def tpu_devices(topology: str = "v6e:2x2"):
    from jax.experimental import topologies

    chips = [int(x) for x in topology.split(":")[1].split("x")]
    bounds = (min(chips[0], 2), min(chips[1], 2), 1)
    return topologies.get_topology_desc(platform="tpu", topology_name=topology, chip_config_name="default",
                                        chips_per_host_bounds=bounds, num_slices=1).devices


def compare(quant_name: str = "int4", layers: int = 2, topology: str = "v6e:2x2", mesh_spec: str = "tensor=4",
            batch: int = 4, length: int = 16, vocab: int | None = None) -> dict:
    qc = None if quant_name == "bf16" else quant.parse(quant_name)
    cfg = LlamaConfig.preset("llama3.1-405b", num_layers=layers, quant=qc)
    if vocab:
        cfg = cfg.replace(vocab_size=vocab)
    mesh = make_mesh(mesh_spec, devices=tpu_devices(topology))
    graphdef, abstract = abstract_model(cfg)
    shardings = state_shardings(abstract, mesh)
    args = jax.tree.map(lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)), abstract,
                        shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
    tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32,
                                  sharding=named_sharding(("batch", "length"), mesh))

    def forward(state, tokens):
        with use_mesh(mesh):
            return nnx.merge(graphdef, state)(tokens)

    t0 = time.perf_counter()
    compiled = aot_compile.compile(jax.jit(forward).lower(args, tokens), mesh.devices)
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    analytic = sum(model_weights.weight_bytes(cfg, mesh).values())
    token_bytes = tokens.sharding.shard_shape(tokens.shape)[0] * tokens.sharding.shard_shape(tokens.shape)[1] * 4
    compiled_args = mem.argument_size_in_bytes - token_bytes
    return dict(bench="quant_aot", quant=qc.name if qc else "bf16", model="llama3.1-405b-width", layers=layers,
                vocab=cfg.vocab_size,
                topology=topology, mesh=mesh_spec, analytic_bytes_per_device=analytic,
                compiled_argument_bytes_per_device=compiled_args, ratio=compiled_args / analytic,
                temp_bytes_per_device=mem.temp_size_in_bytes,
                compile_seconds=getattr(compiled, "compile_seconds", round(seconds, 1)))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--topology", default="v6e:2x2")
    p.add_argument("--mesh", default="tensor=4")
    p.add_argument("--quant", default="int4,int8,bf16")
    a = p.parse_args()
    for q in a.quant.split(","):
        print(json.dumps(compare(q, a.layers, a.topology, a.mesh)), flush=True)


if __name__ == "__main__":
    main()
