"""`python -m serve --config NAME --compile-only`: compile the engine's step (serve/step.py: prompt chunks
and decode tokens in one ragged step over the paged KV pool) for the config's topology and mesh, print
per-chip memory including the block pool, and say whether it fits.

`topology` names the hardware: a TPU slice (v6e-8, v6e-16, …) is compiled ahead of time with libtpu
on this machine (no TPU needed; sharding/topology.py gives its devices); a GPU node (h100x8, …) is
compiled when its GPUs are attached, else planned from exact shard sizes (weights via
model.network.model.weight_bytes, the pool via model/network/kv_cache.py) with no compiler numbers; unset:
this machine's own devices. Nothing is allocated: weights and pool are abstract shapes with their
shardings. Two step shapes are compiled: "decode" (every sequence one token) and "prefill" (the step's
whole token budget, engine.prefill_tokens: prompt chunks beside decode tokens), both with max_slots
sequences of up to max_len keys. On TPU the attention over the pool is JAX's ragged paged attention kernel
(model/network/backends/tpu_paged.py) where it applies, else the XLA reference.

The pool: engine.kv_tokens tokens (0: max_slots x max_len) in blocks of engine.block_size (0: chosen for
the topology's platform, EngineConfig.resolved: 256 tokens for the v6e configs), one more block for
scratch. Its KV heads split over `tensor`, so every chip holds every block (its heads' share of it); the
report gives the pool's blocks, tokens and bytes per chip and how many blocks the chip would have room
for beside the compiled step (`room_blocks`: the largest engine.kv_tokens that fits, in blocks).
Exit status: 0 fits, 1 does not fit, 2 bad config.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time

import jax

from model.job import resolve
from model.network import kv_cache, paged_attention
from model.network import model as model_weights
from model.network import quant as quant_lib
from model.network.backends import tpu_paged
from model.network.config import LlamaConfig
from model.network.model import abstract_model, state_shardings
from serve.scheduler import bucket
from serve.weights import adapter_slots
from serve.step import Batch, Program, StepShape, step_fn
from sharding import aot_compile
from sharding import topology as topo_lib
from sharding.mesh import AXES, axis_sizes, make_mesh
from sharding.rules import SERVE_RULES, abstract_arrays, shard_shape

log = logging.getLogger("serve")
GiB, MiB = 1 << 30, 1 << 20


def model_config(cfg) -> LlamaConfig:
    """The LlamaConfig `python -m serve` would build for `cfg` (without reading any weights; adapter slots
    included when model.lora_modules or server.runtime_lora ask for them)."""
    return resolve.model_config(cfg.model, remat="none", scan_layers=cfg.model.scan_layers,
                                lora=adapter_slots(cfg))


def pool_blocks(kv_tokens: int, block_size: int) -> int:
    """Blocks of a pool holding `kv_tokens` tokens, the scratch block included (EngineConfig.num_blocks)."""
    return -(-kv_tokens // block_size) + 1


def attention_impl(mesh, kv_dtype: str, mcfg: LlamaConfig) -> str:
    """The paged attention the step runs on `mesh`: the Pallas kernel on TPU where it applies, else what
    model/network/paged_attention.py chooses."""
    if mesh.devices.flat[0].platform == "tpu" and tpu_paged.applies(kv_dtype, mcfg.head_dim):
        return "pallas"
    return paged_attention.choose(mesh)


def lower_step(mcfg: LlamaConfig, mesh, *, tokens: int, seqs: int, max_len: int, kv_tokens: int, kv_dtype: str,
               block_size: int = 16, rules=None, attention: str | None = None) -> jax.stages.Lowered:
    """Lowers the engine's step (serve/step.py `step_fn`) from abstract shapes: `tokens` flattened tokens
    of `seqs` sequences of up to `max_len` keys each, over a pool of `kv_tokens` tokens in blocks of
    `block_size`, with the scan layout of the weights."""
    rules = SERVE_RULES if rules is None else rules
    kvd = kv_cache.resolve_dtype(kv_dtype, mcfg)
    graphdef, abstract = abstract_model(mcfg)
    params = (abstract_arrays(abstract, state_shardings(abstract, mesh, rules)), None)  # the scan layout
    pool = kv_cache.abstract(mcfg, pool_blocks(kv_tokens, block_size), block_size, kvd, mesh.devices.flat[0].platform)
    pool_shardings = kv_cache.shardings(pool, mesh, rules)
    impl = attention or attention_impl(mesh, kvd, mcfg)
    program, shape = Program(graphdef, mesh, rules, attention=impl), StepShape()

    def fn(weights, pool, batch):
        return step_fn(program, weights, pool, batch, shape)

    batch = Batch.abstract(tokens, seqs, -(-max_len // block_size))
    return jax.jit(fn, donate_argnums=1, out_shardings=(None, pool_shardings)).lower(
        params, abstract_arrays(pool, pool_shardings), batch)


def _memory(compiled) -> dict:
    ma = compiled.memory_analysis()
    arg, out, alias, temp = (ma.argument_size_in_bytes, ma.output_size_in_bytes, ma.alias_size_in_bytes,
                             ma.temp_size_in_bytes)
    peak = getattr(ma, "peak_memory_in_bytes", 0) or 0
    return {"argument_bytes": int(arg), "output_bytes": int(out), "alias_bytes": int(alias), "temp_bytes": int(temp),
            "per_chip_bytes": int(max(peak, arg + out - alias + temp))}


def analytic(mcfg: LlamaConfig, mesh_sizes: dict, num_blocks: int, block_size: int, kv_dtype: str,
             rules=None) -> dict:
    """Exact per-chip bytes of the weights and the block pool (largest shard), no compiler."""
    rules = SERVE_RULES if rules is None else rules
    amesh = jax.sharding.AbstractMesh(tuple(mesh_sizes[a] for a in AXES), AXES)
    weights = sum(model_weights.weight_bytes(mcfg, amesh, rules).values())
    pool = kv_cache.abstract(mcfg, num_blocks, block_size, kv_cache.resolve_dtype(kv_dtype, mcfg))
    nbytes = 0
    for x, axes in ((pool.kv, kv_cache.AXES), (pool.scale, kv_cache.SCALE_AXES)):
        if x is not None:
            nbytes += quant_lib.array_bytes(shard_shape(axes, x.shape, amesh, rules, what="kv pool"), x.dtype)
    return {"weights_bytes": int(weights), "kv_pool_bytes": int(nbytes), "block_bytes": int(nbytes // num_blocks)}


def _where(cfg):
    """(devices or None, capacity per chip, description, chips, whether to compile here)."""
    if cfg.topology:
        topo = topo_lib.parse(cfg.topology)
        if topo.kind == "tpu":
            return topo.devices(), topo.hbm_bytes, topo.describe(), topo.chips, True
        if jax.devices()[0].platform == "gpu" and jax.device_count() == topo.chips:
            return jax.devices(), topo.hbm_bytes, topo.describe(), topo.chips, True
        return None, topo.hbm_bytes, topo.describe(), topo.chips, False
    devices = jax.devices()[:cfg.devices] if cfg.devices else jax.devices()
    stats = devices[0].memory_stats() or {}
    capacity = stats.get("bytes_limit") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return devices, capacity, f"local: {len(devices)} x {devices[0].device_kind}", len(devices), True


def _compile_steps(cfg, mcfg, mesh, kvd: str, result: dict, out) -> int | None:
    """Compiles the decode and prefill shapes into result["steps"]; 2 on a bad config, else None."""
    e = cfg.engine
    kv_tokens = e.kv_tokens or e.max_slots * e.max_len
    steps = {"decode": dict(tokens=e.max_slots, seqs=e.max_slots),
             "prefill": dict(tokens=bucket(e.prefill_tokens, 16, e.prefill_tokens), seqs=e.max_slots)}
    for name, shape in steps.items():
        t0 = time.perf_counter()
        try:
            lowered = lower_step(mcfg, mesh, **shape, max_len=e.max_len, kv_tokens=kv_tokens, kv_dtype=kvd,
                                 block_size=e.block_size, attention=result["attention"])
            compiled = aot_compile.compile(lowered, mesh.devices)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        mem = _memory(compiled)
        mem["compile_seconds"] = getattr(compiled, "compile_seconds", round(time.perf_counter() - t0, 1))
        cost = aot_compile.cost(compiled)
        mem["flops"] = float(cost.get("flops", 0.0))
        mem["bytes_accessed"] = float(cost.get("bytes accessed", 0.0))
        if "optimal_seconds" in cost:
            mem["optimal_seconds"] = float(cost["optimal_seconds"])
        result["steps"][name] = {**shape, **mem}
        print(f"  {name} step ({shape['tokens']} tokens of {shape['seqs']} sequences, up to {e.max_len} keys "
              f"each): {mem['per_chip_bytes'] / GiB:.2f} GiB per chip (arguments {mem['argument_bytes'] / GiB:.2f}, "
              f"temporaries {mem['temp_bytes'] / GiB:.2f}, output {mem['output_bytes'] / GiB:.2f}, aliased "
              f"{mem['alias_bytes'] / GiB:.2f}); compiled in {mem['compile_seconds']} s", file=out)
    return None


def compile_only(cfg, out=None) -> int:
    out = out or sys.stdout  # looked up per call: a default would keep the stdout of import time
    try:
        mcfg = model_config(cfg)
        devices, capacity, where, n, compile_here = _where(cfg)
        platform = topo_lib.parse(cfg.topology).kind if cfg.topology else devices[0].platform
        cfg = dataclasses.replace(cfg, engine=cfg.engine.resolved(platform))
        e = cfg.engine
        kvd = kv_cache.resolve_dtype(e.kv_dtype, mcfg)
        sizes = axis_sizes(cfg.mesh, n)
        num_blocks = e.num_blocks
        plan = analytic(mcfg, sizes, num_blocks, e.block_size, kvd)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    mesh_desc = {a: sizes[a] for a in AXES if sizes[a] > 1} or {"tensor": 1}
    pool = {"blocks": num_blocks, "block_size": e.block_size, "tokens": (num_blocks - 1) * e.block_size}
    result = {"model": cfg.model.checkpoint or cfg.model.preset, "params": mcfg.num_params(),
              "quant": mcfg.quant.name if mcfg.quant else mcfg.param_dtype, "topology": cfg.topology or where,
              "mesh": mesh_desc, "slots": e.max_slots, "max_len": e.max_len, "kv_dtype": kvd, "pool": pool,
              "capacity_bytes": int(capacity), **plan, "steps": {}}
    print(f"{where}; mesh {mesh_desc}; {mcfg.num_params() / 1e9:.1f}B parameters ({result['quant']}); "
          f"{e.max_slots} sequences per step, up to {e.max_len} tokens each; KV pool {kvd}", file=out)
    print(f"  per chip, exact: weights {plan['weights_bytes'] / GiB:.2f} GiB; KV pool {num_blocks} blocks x "
          f"{e.block_size} tokens ({pool['tokens']} tokens + a scratch block; every block on every chip, "
          f"{plan['block_bytes'] / MiB:.2f} MiB of it each) = {plan['kv_pool_bytes'] / GiB:.2f} GiB; "
          f"HBM {capacity / GiB:.2f} GiB", file=out)
    basis = plan["weights_bytes"] + plan["kv_pool_bytes"]
    if compile_here:
        mesh = make_mesh(sizes, devices)
        result["attention"] = attention_impl(mesh, kvd, mcfg)
        print(f"  paged attention: {result['attention']}", file=out)
        if _compile_steps(cfg, mcfg, mesh, kvd, result, out) is not None:
            return 2
        basis = max(s["per_chip_bytes"] for s in result["steps"].values())
        result["basis"] = "compiled"
    else:
        result["basis"] = "analytic"
        print(f"  (no compile: {cfg.topology} needs its GPUs attached; exact weight + pool bytes only, "
              f"temporaries not included)", file=out)
    room = max((capacity - (basis - plan["kv_pool_bytes"])) // max(plan["block_bytes"], 1), 0)
    pool["room_blocks"], pool["room_tokens"] = int(room), int(max(room - 1, 0) * e.block_size)
    print(f"  room per chip beside the step: {room} blocks = engine.kv_tokens up to {pool['room_tokens']} "
          f"({pool['room_tokens'] // e.max_len} requests of {e.max_len} tokens)", file=out)
    result["per_chip_bytes"] = int(basis)
    result["fits"] = basis <= capacity
    result["headroom"] = round(1 - basis / capacity, 4)
    print(f"{'FITS' if result['fits'] else 'DOES NOT FIT'}: {basis / GiB:.2f} GiB of {capacity / GiB:.2f} GiB per chip "
          f"({result['headroom']:.1%} headroom, {result['basis']})", file=out)
    print("PLAN " + json.dumps(result), file=out)
    return 0 if result["fits"] else 1
