"""How the engine holds the weights it runs: a pair (state, layers).

- "scan" (accelerators): (the model's state, None); the step scans over the stacked layer weights, so
  compile time does not depend on depth.
- "unrolled" (`layout` auto on one CPU device): (the state without the blocks, the block weights one
  layer at a time) and the step unrolls the loop over layers: XLA:CPU copies each layer's slice out of a
  stacked weight and converts 16-bit and integer weights to float32 before a dot, which made decoding
  several times slower than the weight read itself (bench/serve.py, BENCHMARKS.md). Where the CPU
  kernels run (model/network/backends/cpu_kernels.py), the Dense kernels they cover are packed for
  them, and they run every product (decode and prefill) and the attention over the cache.
"""

from __future__ import annotations

import jax
from flax import nnx

from model.network import dense
from model.network.backends import cpu_kernels
from model.network.model import Model
from serve.config import EngineConfig


def choose(model: Model, cfg: EngineConfig) -> tuple[str, bool]:
    """(the layout, whether the CPU kernels run) for `model` on its mesh."""
    devices = model.mesh.devices
    one_cpu = devices.size == 1 and devices.flat[0].platform == "cpu"
    name = cfg.layout if cfg.layout != "auto" else ("unrolled" if one_cpu else "scan")
    return name, cfg.cpu_kernels and name == "unrolled" and cpu_kernels.enabled(model.mesh)


def arrange(model: Model, name: str, packed: bool):
    """The model's weights in layout `name`, packed for the CPU kernels if `packed`."""
    if name != "unrolled":
        return model.state, None
    weights = unstack(model.state)
    return pack_for_cpu(model.graphdef, *weights) if packed else weights


def unstack(state: nnx.State) -> tuple[nnx.State, tuple[nnx.State, ...]]:
    """(everything but the block weights, the block weights one layer at a time): the "unrolled" layout.
    The layer arrays are copies; `Engine.release_model_weights` frees the stacked originals."""
    rest = nnx.State({k: v for k, v in state.items() if k != "layers"})
    layers = state["layers"]
    n = jax.tree.leaves(layers)[0].shape[0]
    return rest, tuple(jax.tree.map(lambda a, i=i: a[i], layers) for i in range(n))


def pack_for_cpu(graphdef, rest: nnx.State, layers: tuple[nnx.State, ...]):
    """The unrolled weights with the Dense kernels the CPU kernels cover packed for them."""
    block_graphdef = nnx.split(nnx.merge(graphdef, nnx.State({**rest, "layers": layers[0]})).layers)[0]
    layers = tuple(dense.pack_cpu(block_graphdef, layer) for layer in layers)
    packed = dense.pack_cpu(graphdef, nnx.State({**rest, "layers": layers[0]}))  # the head; blocks are packed
    return nnx.State({k: v for k, v in packed.items() if k != "layers"}), layers


def module_state(weights) -> nnx.State:
    """A state the model's graphdef merges with: unrolled, the first layer stands in for the blocks (the
    module needs a `layers` entry to be built; the step runs the per-layer weights, `block_layers`)."""
    state, layers = weights
    return state if layers is None else nnx.State({**state, "layers": layers[0]})


def block_layers(weights) -> tuple[nnx.State, ...] | None:
    """The per-layer block weights (unrolled), or None (scan: they are stacked in the state)."""
    return weights[1]
