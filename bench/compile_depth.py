"""Compile time of the jitted forward against depth: scan over layers keeps it flat.

    python bench/compile_depth.py
Prints one JSON line per depth; the peer is the unrolled Python loop over layers (scan_layers=False).
"""

import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from model import LlamaConfig, abstract_model  # noqa: E402


def compile_seconds(layers: int, scan: bool) -> float:
    cfg = LlamaConfig.preset("toy", num_layers=layers, scan_layers=scan)
    graphdef, state = abstract_model(cfg)
    f = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
    t0 = time.perf_counter()
    f.lower(state, jax.ShapeDtypeStruct((4, 128), np.int32)).compile()
    return time.perf_counter() - t0


if __name__ == "__main__":
    for layers in (2, 32):
        for scan in (True, False):
            print(json.dumps({"bench": "compile_forward", "layers": layers, "scan_layers": scan,
                              "compile_s": round(compile_seconds(layers, scan), 2)}), flush=True)
