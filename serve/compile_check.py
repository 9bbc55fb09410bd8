"""`python -m serve --config NAME --compile-only`: compile the engine's real prefill and decode steps for
the config's topology and mesh, print per-chip memory, and say whether it fits.

`topology` names the hardware: a TPU slice (v6e-8, v6e-16, …) is compiled ahead of time with libtpu
on this machine (no TPU needed; sharding/topology.py gives its devices); a GPU node (h100x8, …) is
compiled when its GPUs are attached, else planned from exact shard sizes (weights via
model.network.model.weight_bytes, the KV cache via model/network/kv_cache.py) with no compiler numbers; unset: this
machine's own devices. Nothing is allocated: weights and cache are abstract shapes with their
shardings. Exit status: 0 fits, 1 does not fit, 2 bad config.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

import jax

from model.job import resolve
from model.network import kv_cache
from model.network import model as model_weights
from model.network import quant as quant_lib
from model.network.config import LlamaConfig
from model.network.model import abstract_model, state_shardings
from serve.scheduler import bucket
from serve.step import Batch, Program, StepShape, step_fn
from sharding import topology as topo_lib
from sharding.mesh import AXES, axis_sizes, make_mesh
from sharding.rules import SERVE_RULES, abstract_arrays, shard_shape

log = logging.getLogger("serve")
GiB = 1 << 30


def model_config(cfg) -> LlamaConfig:
    """The LlamaConfig `python -m serve` would build for `cfg` (without reading any weights)."""
    return resolve.model_config(cfg.model, remat="none", scan_layers=cfg.model.scan_layers, lora=None)


def lower_step(mcfg: LlamaConfig, mesh, *, batch: int, tokens: int, slots: int, max_len: int, kv_len: int,
               kv_dtype: str, rules=None, num_top: int = 0) -> jax.stages.Lowered:
    """Lowers the engine's step (serve/step.py `step_fn`) from abstract shapes: `batch` rows of
    `tokens` new tokens attending over `kv_len` positions of a [slots, max_len] cache."""
    rules = SERVE_RULES if rules is None else rules
    graphdef, abstract = abstract_model(mcfg)
    params = (abstract_arrays(abstract, state_shardings(abstract, mesh, rules)), None)  # the scan layout
    abs_cache = kv_cache.abstract(mcfg, slots, max_len, kv_cache.resolve_dtype(kv_dtype, mcfg))
    cache_shardings = kv_cache.shardings(abs_cache, mesh, rules)
    program, shape = Program(graphdef, mesh, rules), StepShape(kv_len, num_top)

    def fn(weights, cache, batch):
        return step_fn(program, weights, cache, batch, shape)

    return jax.jit(fn, donate_argnums=1, out_shardings=(None, cache_shardings)).lower(
        params, abstract_arrays(abs_cache, cache_shardings), Batch.abstract(batch, tokens))


def _memory(compiled) -> dict:
    ma = compiled.memory_analysis()
    arg, out, alias, temp = (ma.argument_size_in_bytes, ma.output_size_in_bytes, ma.alias_size_in_bytes,
                             ma.temp_size_in_bytes)
    peak = getattr(ma, "peak_memory_in_bytes", 0) or 0
    return {"argument_bytes": int(arg), "output_bytes": int(out), "alias_bytes": int(alias), "temp_bytes": int(temp),
            "per_chip_bytes": int(max(peak, arg + out - alias + temp))}


def analytic(mcfg: LlamaConfig, mesh_sizes: dict, slots: int, max_len: int, kv_dtype: str, rules=None) -> dict:
    """Exact per-chip bytes of the weights and the KV cache (largest shard), no compiler."""
    rules = SERVE_RULES if rules is None else rules
    amesh = jax.sharding.AbstractMesh(tuple(mesh_sizes[a] for a in AXES), AXES)
    weights = sum(model_weights.weight_bytes(mcfg, amesh, rules).values())
    kvd = kv_cache.resolve_dtype(kv_dtype, mcfg)
    abs_cache = kv_cache.abstract(mcfg, slots, max_len, kvd)
    cache = 0
    for x, axes in ((abs_cache.k, kv_cache.AXES), (abs_cache.v, kv_cache.AXES), (abs_cache.k_scale, kv_cache.SCALE_AXES),
                    (abs_cache.v_scale, kv_cache.SCALE_AXES)):
        if x is not None:
            shape = shard_shape(axes, x.shape, amesh, rules, what="kv cache")
            cache += quant_lib.array_bytes(shape, x.dtype)
    return {"weights_bytes": int(weights), "kv_cache_bytes": int(cache)}


def compile_only(cfg, out=None) -> int:
    out = out or sys.stdout  # looked up per call: a default would keep the stdout of import time
    e = cfg.engine
    try:
        mcfg = model_config(cfg)
        kvd = kv_cache.resolve_dtype(e.kv_dtype, mcfg)
        devices, capacity, where, compile_here = None, None, None, True
        if cfg.topology:
            topo = topo_lib.parse(cfg.topology)
            capacity, where = topo.hbm_bytes, topo.describe()
            if topo.kind == "tpu":
                devices = topo.devices()
            elif jax.devices()[0].platform == "gpu" and jax.device_count() == topo.chips:
                devices = jax.devices()
            else:
                compile_here = False
            n = topo.chips
        else:
            devices = jax.devices()[:cfg.devices] if cfg.devices else jax.devices()
            n = len(devices)
            stats = devices[0].memory_stats() or {}
            capacity = stats.get("bytes_limit") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            where = f"local: {n} x {devices[0].device_kind}"
        sizes = axis_sizes(cfg.mesh, n)
        plan = analytic(mcfg, sizes, e.max_slots, e.max_len, kvd)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    mesh_desc = {a: sizes[a] for a in AXES if sizes[a] > 1} or {"tensor": 1}
    result = {"model": cfg.model.checkpoint or cfg.model.preset, "params": mcfg.num_params(),
              "quant": mcfg.quant.name if mcfg.quant else mcfg.param_dtype, "topology": cfg.topology or where,
              "mesh": mesh_desc, "slots": e.max_slots, "max_len": e.max_len, "kv_dtype": kvd,
              "capacity_bytes": int(capacity), **plan, "steps": {}}
    print(f"{where}; mesh {mesh_desc}; {mcfg.num_params() / 1e9:.1f}B parameters ({result['quant']}); "
          f"{e.max_slots} slots x {e.max_len} positions, KV cache {kvd}", file=out)
    print(f"  per chip, exact: weights {plan['weights_bytes'] / GiB:.2f} GiB, KV cache "
          f"{plan['kv_cache_bytes'] / GiB:.2f} GiB, HBM {capacity / GiB:.2f} GiB", file=out)
    basis = plan["weights_bytes"] + plan["kv_cache_bytes"]
    if compile_here:
        mesh = make_mesh(sizes, devices)
        prefill_rows = bucket(max(e.prefill_tokens // e.prefill_chunk, 1), 1, e.max_slots)
        steps = {"decode": dict(batch=e.max_slots, tokens=1),
                 "prefill": dict(batch=prefill_rows, tokens=bucket(e.prefill_chunk, 16, e.prefill_chunk))}
        for name, shape in steps.items():
            t0 = time.perf_counter()
            try:
                lowered = lower_step(mcfg, mesh, **shape, slots=e.max_slots, max_len=e.max_len, kv_len=e.max_len,
                                     kv_dtype=kvd)
                compiled = lowered.compile()
            except ValueError as err:
                print(f"error: {err}", file=sys.stderr)
                return 2
            mem = _memory(compiled)
            mem["compile_seconds"] = round(time.perf_counter() - t0, 1)
            cost = compiled.cost_analysis()
            cost = (cost[0] if isinstance(cost, (list, tuple)) and cost else cost) or {}
            mem["flops"] = float(cost.get("flops", 0.0))
            mem["bytes_accessed"] = float(cost.get("bytes accessed", 0.0))
            if "optimal_seconds" in cost:
                mem["optimal_seconds"] = float(cost["optimal_seconds"])
            result["steps"][name] = {**shape, **mem}
            print(f"  {name} step ({shape['batch']} x {shape['tokens']} tokens over {e.max_len} positions): "
                  f"{mem['per_chip_bytes'] / GiB:.2f} GiB per chip (arguments {mem['argument_bytes'] / GiB:.2f}, "
                  f"temporaries {mem['temp_bytes'] / GiB:.2f}, output {mem['output_bytes'] / GiB:.2f}, aliased "
                  f"{mem['alias_bytes'] / GiB:.2f}); compiled in {mem['compile_seconds']} s", file=out)
        basis = max(s["per_chip_bytes"] for s in result["steps"].values())
        result["basis"] = "compiled"
    else:
        result["basis"] = "analytic"
        print(f"  (no compile: {cfg.topology} needs its GPUs attached; exact weight + cache bytes only, "
              f"temporaries not included)", file=out)
    result["per_chip_bytes"] = int(basis)
    result["fits"] = basis <= capacity
    result["headroom"] = round(1 - basis / capacity, 4)
    print(f"{'FITS' if result['fits'] else 'DOES NOT FIT'}: {basis / GiB:.2f} GiB of {capacity / GiB:.2f} GiB per chip "
          f"({result['headroom']:.1%} headroom, {result['basis']})", file=out)
    print("PLAN " + json.dumps(result), file=out)
    return 0 if result["fits"] else 1
