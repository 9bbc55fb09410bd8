"""python -m sharding.plan: what slice a Llama job needs, and whether it fits, in numbers the XLA
compiler confirms.

    python -m sharding.plan --model llama3.1-405b --mode qlora --quant int4 --topology v6e-16 --compile
    python -m sharding.plan --model llama3.1-405b --mode serve --quant int8 --topology h200x8
    python -m sharding.plan --model llama3.1-405b --mode lora --topology v6e --smallest --compile
    python -m sharding.plan --model path/to/config.json --mode full --topology v5p-128 --json

Per device it counts, by category: weights (the frozen or trained base, exact shard bytes, int4
packed), LoRA params, gradients, optimizer state (AdamW: two moments in the trained dtype), saved
activations (what the remat policy keeps for the backward pass, per layer), KV cache (serving) and
compiler temporaries (one layer's all-gathered weights with its prefetch, one layer's recomputed
activations and their gradients, one attention chunk's scores, the LM head's gathered weight and
float32 logits). `--compile` lowers and compiles this project's real step (train/step.py for
lora/qlora/full; for serve a prefill forward with quantized weights and a KV-cache-sized buffer,
until serve/ provides its step) for the TPU topology on this machine (libtpu, no TPU needed) and
prints the compiler's per-chip peak memory (memory_analysis) and FLOPs (cost_analysis) beside the
estimate. GPU topologies get the analytic plan (a compile needs the GPUs themselves: run --compile
on the node, where jax.devices() are those GPUs).

The mesh: `--mesh fsdp=4,sequence=4` or, by default, the simplest that fits with `--headroom`
(pure FSDP first, then tensor parallelism over heads/MLP/vocab, then sequence parallelism, which
is what cuts saved activations at long sequences).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
from pathlib import Path

MODES = ("serve", "lora", "qlora", "full")
QUANTS = ("bf16", "int8", "int4")
CATEGORIES = ("weights", "lora_params", "gradients", "optimizer_state", "activations", "kv_cache", "temporaries")
LABELS = {"weights": "weights", "lora_params": "LoRA params", "gradients": "gradients",
          "optimizer_state": "optimizer state", "activations": "saved activations", "kv_cache": "KV cache",
          "temporaries": "compiler temporaries"}
GiB = 1 << 30


class PlanError(ValueError):
    """Bad input: the message names what is wrong and what would be valid."""


@dataclasses.dataclass(frozen=True)
class Job:
    model: str = "llama3.1-405b"  # preset name or a Hugging Face config.json (or its directory)
    mode: str = "lora"  # serve | lora | qlora | full
    quant: str = "bf16"  # base weights: bf16 | int8 | int4
    batch: int | None = None  # global rows per (micro-)step; default: one per data x fsdp shard
    seq: int = 4096  # training sequence length / serving prompt (prefill) length
    kv_len: int | None = None  # serving: KV-cache length per sequence (default: seq)
    lora_rank: int = 16
    lora_targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
    remat: str = "full"  # none | full | dots | attn_proj
    accum: int = 1  # gradient accumulation: micro-batches of batch // accum rows
    layers: int | None = None  # reduced depth (tests, quick checks)

    def validate(self) -> None:
        if self.mode not in MODES:
            raise PlanError(f"--mode {self.mode!r}: expected one of {', '.join(MODES)}")
        if self.quant not in QUANTS:
            raise PlanError(f"--quant {self.quant!r}: expected one of {', '.join(QUANTS)}")
        if self.mode == "qlora" and self.quant == "bf16":
            raise PlanError("--mode qlora needs a quantized base: --quant int4 or int8 (bf16 base: --mode lora)")
        if self.mode == "lora" and self.quant != "bf16":
            raise PlanError(f"--mode lora trains adapters on a bf16 base; with --quant {self.quant} use --mode qlora")
        if self.mode == "full" and self.quant != "bf16":
            raise PlanError("--mode full trains every weight: it needs --quant bf16")
        from model.network.llama import REMAT_POLICIES

        if self.remat not in REMAT_POLICIES:
            raise PlanError(f"--remat {self.remat!r}: expected one of {', '.join(REMAT_POLICIES)}")
        for name, v in (("--seq", self.seq), ("--lora-rank", self.lora_rank), ("--accum", self.accum)):
            if v < 1:
                raise PlanError(f"{name} must be >= 1, got {v}")
        if self.batch is not None and (self.batch < 1 or self.batch % self.accum):
            raise PlanError(f"--batch {self.batch} must be a positive multiple of --accum {self.accum}")

    @property
    def training(self) -> bool:
        return self.mode != "serve"


def model_config(job: Job):
    """The LlamaConfig the job runs: quantized base, adapters, remat policy, depth."""
    from model.network import lora as lora_lib
    from model.network import quant as quant_lib
    from model.network.config import PRESETS, LlamaConfig

    if job.model in PRESETS:
        cfg = PRESETS[job.model]
    elif Path(job.model).exists():
        try:
            cfg = LlamaConfig.from_hf(job.model)
        except (ValueError, FileNotFoundError) as e:
            raise PlanError(str(e)) from None
    else:
        raise PlanError(f"unknown model {job.model!r}: give a preset ({', '.join(PRESETS)}) or the path of a "
                        f"Hugging Face config.json")
    dtype = "float32" if job.model == "toy" else "bfloat16"
    kw = dict(param_dtype=dtype, compute_dtype=dtype, remat=job.remat, lora=None, quant=None)
    if job.layers:
        kw["num_layers"] = job.layers
    if job.mode in ("lora", "qlora"):
        try:
            kw["lora"] = lora_lib.LoraConfig(rank=job.lora_rank, alpha=2.0 * job.lora_rank,
                                             targets=tuple(job.lora_targets))
        except ValueError as e:
            raise PlanError(str(e)) from None
    if job.quant != "bf16":
        kw["quant"] = quant_lib.parse(job.quant)
    return cfg.replace(**kw)


# ---------------------------------------------------------------------------------------------
# The analytic estimate

def _itemsize(dtype) -> float:
    from model.network.quant import dtype_bits

    return dtype_bits(dtype) / 8


@dataclasses.dataclass
class _Tree:
    """Per-device facts about the parameter tree on one mesh."""
    base: int = 0  # frozen (or, for full fine-tuning, trained) weights on this device
    lora: int = 0  # adapters on this device
    layer_gathered: float = 0.0  # one layer's weights as the matmuls see them (fsdp/sequence gathered)
    mlp_gathered: float = 0.0  # the layer's MLP (gate, up, down): its largest block, gathered at once
    head_gathered: float = 0.0  # the LM head (or tied embedding) as the logits matmul sees it
    embed_shard: int = 0


def _tree_facts(cfg, mesh, rules) -> _Tree:
    from flax import nnx

    from model.network.model import abstract_model
    from sharding.rules import logical_to_spec, shard_shape

    _, abstract = abstract_model(cfg)
    t = _Tree()
    for path, v in nnx.to_flat_state(abstract):
        names = tuple(v.get_metadata().get("out_sharding") or (None,) * v.ndim)
        where = "/".join(map(str, path))
        try:
            local = shard_shape(names, v.shape, mesh, rules, what=where)
        except ValueError as e:
            raise PlanError(str(e)) from None
        nbytes = math.ceil(math.prod(local) * _itemsize(v.dtype))
        if isinstance(v, nnx.LoRAParam):
            t.lora += nbytes
        else:
            t.base += nbytes
        # what a matmul sees after FSDP's all-gather: split over `tensor` only
        spec = logical_to_spec(names, mesh, v.shape, rules)
        tsplit = 1
        for axes in spec:
            axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
            if "tensor" in axes:
                tsplit *= mesh.shape["tensor"]
        gathered = math.prod(v.shape) * _itemsize(v.dtype) / tsplit
        if names and names[0] == "layers":
            t.layer_gathered += gathered / v.shape[0]
            if "mlp" in path and not isinstance(v, nnx.LoRAParam):
                t.mlp_gathered += gathered / v.shape[0]
        elif path[-2:] in (("lm_head", "kernel"), ("lm_head", "scale")) or (
                cfg.tie_embeddings and path[-1] == "embedding"):
            t.head_gathered += gathered
        if path[-1] == "embedding":
            t.embed_shard = nbytes
    return t


def _split(size: int, mesh, axes) -> int:
    """How many ways a dimension of `size` splits over mesh `axes` (1 when they do not divide it)."""
    n = math.prod(mesh.shape[a] for a in axes)
    return n if size % n == 0 else 1


# The temporaries are the larger of two phases that do not overlap in time: a layer's forward
# recompute and backward (XLA all-gathers weights matrix by matrix, so about the layer's largest
# block, the MLP, is live gathered at once; its live activations; one attention chunk's scores) and
# the loss (the LM head gathered, float32 logits and their gradient). Constants read off TPU buffer
# assignments (XLA_FLAGS=--xla_dump_to=...) of 405B-width steps on v6e; see BENCHMARKS.md.
TRAIN_ACT_D, TRAIN_ACT_F = 4.0, 4.0  # bytes per token per D / per F_local element live in a layer's backward
SERVE_ACT_D, SERVE_ACT_F = 8.0, 4.0  # float32 residual / norm copies, MLP intermediate
LOGIT_COPIES_TRAIN, LOGIT_COPIES_SERVE = 2.0, 1.0  # float32 logits and their gradient
DEQUANT_COPIES = 2.0  # int4 training: XLA (TPU seen; GPU assumed) materialises dequantized bf16 gate/up
MESH_HEADROOM = 0.10  # the default mesh is the simplest whose estimate leaves this much HBM free


def estimate(job: Job, mesh, platform: str = "tpu") -> dict[str, int]:
    """Per-device bytes by category for `job` on `mesh` (a Mesh or AbstractMesh with the AXES names)."""
    from model.network import attention
    from sharding.rules import logical_to_spec, rules_for

    cfg = model_config(job)
    rules = rules_for(job.mode)
    tree = _tree_facts(cfg, mesh, rules)
    D, F, V, L = cfg.dim, cfg.mlp_dim, cfg.vocab_size, cfg.num_layers
    H, N, K = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    cb = _itemsize(cfg.compute_dtype)
    N_l, K_l = N // _split(N, mesh, ("tensor",)), K // _split(K, mesh, ("tensor",))
    F_l, V_l = F // _split(F, mesh, ("tensor",)), V // _split(V, mesh, ("tensor",))
    batch = job.batch or mesh.shape["data"] * mesh.shape["fsdp"]
    rows = batch // job.accum if job.training else batch
    T = job.seq
    spec = logical_to_spec(("batch", "length", "embed"), mesh, (rows, T, D), rules, strict=False)
    split = [math.prod(mesh.shape[a] for a in ((ax,) if isinstance(ax, str) else ax or ())) for ax in
             (*spec, None, None, None)[:3]]
    rows_l, T_l, D_act = rows // split[0], T // split[1], D // split[2]  # activation shard
    tok = rows_l * T_l
    chunk = attention.QUERY_CHUNK
    q_l = (chunk // _split(chunk, mesh, ("sequence",))) if (T > chunk and T % chunk == 0) else T_l
    scores = rows_l * K_l * (N // K) * q_l * T * 4  # one chunk of float32 attention scores
    # FSDP: the batch is split over the axes the weights are split over, so weights are all-gathered
    # before use. Weight-stationary (serving rules): activations move instead.
    sharded_w = split[0] * split[1] > 1 and any(
        a in dict(rules)["batch"] + dict(rules)["length"] for a in ("fsdp", "sequence") if mesh.shape[a] > 1)

    out = dict.fromkeys(CATEGORIES, 0)
    out["weights"] = tree.base
    if job.training:
        out["lora_params"] = tree.lora
        trained = tree.lora if job.mode != "full" else tree.base
        out["gradients"] = trained
        out["optimizer_state"] = 2 * trained
        per_tok = {"full": D * cb,
                   "attn_proj": D * cb + (N_l + 2 * K_l) * H * cb,
                   "dots": (3 * D + (N_l + 2 * K_l) * H + 2 * F_l) * cb,
                   "none": (8 * D + 3 * (N_l + 2 * K_l) * H + 4 * F_l) * cb + 8 * D}[cfg.remat]
        out["activations"] = L * tok * per_tok
        layer = tok * (TRAIN_ACT_D * D + TRAIN_ACT_F * F_l) + 2 * scores
        if sharded_w:
            layer += tree.mlp_gathered
        if job.mode == "full":  # a layer's weight gradient before its reduce-scatter
            layer += tree.layer_gathered
        if cfg.quant is not None and cfg.quant.group_size and platform != "cpu":
            layer += DEQUANT_COPIES * D * F_l * cb
        head = (tree.head_gathered if sharded_w else 0) + LOGIT_COPIES_TRAIN * tok * V_l * 4
    else:
        from sharding.rules import shard_shape

        S = job.kv_len or T
        shape = (L, rows, S, K, H)
        local = shard_shape(("layers", "batch", "cache_length", "kv_heads", "head_dim"), shape, mesh, rules,
                            what="KV cache")
        out["kv_cache"] = 2 * math.prod(local) * cb
        layer = tok * (SERVE_ACT_D * D_act + SERVE_ACT_F * F_l) + scores
        if sharded_w:
            layer += tree.mlp_gathered
        head = (tree.head_gathered if sharded_w else 0) + LOGIT_COPIES_SERVE * rows_l * V_l * 4
    # A one-layer scan is inlined by XLA, and then the loss overlaps the layer's buffers.
    out["temporaries"] = max(layer, head) if L > 1 else layer + head
    return {k: int(v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# Meshes

def candidate_meshes(job: Job, chips: int, num_slices: int = 1) -> list[dict[str, int]]:
    """Meshes worth trying, simplest first: pure FSDP, then tensor parallelism (up to the KV heads),
    then sequence parallelism. `data` spans the slices of a multi-slice topology."""
    cfg = model_config(job)
    out = []
    pows = [2 ** i for i in range(0, 12) if 2 ** i <= chips]
    for seq_ax in pows:
        if job.seq % seq_ax or seq_ax > 16:
            continue
        for tensor in pows:
            if cfg.num_kv_heads % tensor or tensor > 8:
                continue
            rest = chips // (seq_ax * tensor * num_slices)
            if rest < 1 or chips % (seq_ax * tensor * num_slices):
                continue
            out.append({"data": num_slices, "fsdp": rest, "sequence": seq_ax, "tensor": tensor})
    if job.training:  # FSDP first; then tensor and sequence parallelism, which cut activations
        out.sort(key=lambda m: (m["sequence"] * m["tensor"], m["sequence"], m["tensor"]))
    else:  # serving: tensor parallelism first (weights stay put), FSDP to shard what is left
        out.sort(key=lambda m: (m["sequence"], -m["tensor"]))
    return out


def _abstract(sizes: dict[str, int]):
    import jax

    from sharding.mesh import AXES

    return jax.sharding.AbstractMesh(tuple(sizes[a] for a in AXES), AXES)


def choose_mesh(job: Job, chips: int, capacity: int, headroom: float, num_slices: int = 1,
                platform: str = "tpu") -> tuple[dict[str, int], dict[str, int]]:
    """(mesh sizes, estimate): the first candidate that fits with `headroom`, else the smallest."""
    best = None
    errors = []
    for sizes in candidate_meshes(job, chips, num_slices):
        mesh = _abstract(sizes)
        batch = job.batch or sizes["data"] * sizes["fsdp"]
        rows = batch // job.accum
        if rows % (sizes["data"] * sizes["fsdp"]):
            errors.append(f"batch {rows} rows is not divisible by data x fsdp = {sizes['data'] * sizes['fsdp']}")
            continue
        try:
            est = estimate(job, mesh, platform)
        except PlanError as e:
            errors.append(str(e))
            continue
        total = sum(est.values())
        if total <= capacity * (1 - headroom):
            return sizes, est
        if best is None or total < sum(best[1].values()):
            best = (sizes, est)
    if best is None:
        raise PlanError(f"no mesh of {chips} devices can hold this job: {errors[0] if errors else 'no candidates'}")
    return best


# ---------------------------------------------------------------------------------------------
# Compilation

def lower_serve(cfg, mesh, batch: int, prefill: int, kv_len: int):
    """The serving step: prefill of `prefill` tokens in each of `batch` cache slots of `kv_len`
    positions, with the (quantized) weights. The engine's own step (serve.compile_check.lower_step)
    when serve/ exists; else a prefill through the model's KV-cache path (model/kv_cache.py), returning
    last-token logits and the donated, updated cache; else (no cache path in the model) a forward
    with the cache as a donated pass-through buffer (sized right, not written)."""
    import inspect

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from model.network.llama import Llama
    from model.network.model import abstract_model, state_shardings
    from sharding.rules import SERVE_RULES, abstract_arrays, named_sharding, use_mesh

    try:  # the serving engine's own step (serve/engine.py), when serve/ is there
        from serve.compile_check import lower_step as serve_lower_step
    except ImportError:
        serve_lower_step = None
    if serve_lower_step is not None:
        return serve_lower_step(cfg, mesh, batch=batch, tokens=prefill, slots=batch, max_len=kv_len,
                                kv_len=kv_len, kv_dtype="auto", rules=SERVE_RULES)

    graphdef, abstract = abstract_model(cfg)
    params = abstract_arrays(abstract, state_shardings(abstract, mesh, SERVE_RULES))
    tok_sh = named_sharding(("batch", "length"), mesh, (batch, prefill), SERVE_RULES, what="prompt tokens")
    tokens = jax.ShapeDtypeStruct((batch, prefill), jnp.int32, sharding=tok_sh)
    try:
        from model.network import kv_cache
    except ImportError:
        kv_cache = None
    if kv_cache is not None and "cache" in inspect.signature(Llama.__call__).parameters:
        abs_cache = kv_cache.abstract(cfg, batch, kv_len, cfg.compute_dtype)
        cache = abstract_arrays(abs_cache, kv_cache.shardings(abs_cache, mesh, SERVE_RULES))

        def prefill_step(state, tokens, cache):
            with use_mesh(mesh, SERVE_RULES):
                m = nnx.merge(graphdef, state)
                B, T = tokens.shape
                pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
                update = kv_cache.CacheUpdate(cache, jnp.arange(B, dtype=jnp.int32), kv_len)
                return m(tokens, pos, jnp.ones_like(tokens), cache=update,
                         logits_at=jnp.full((B,), T - 1, jnp.int32))

        return jax.jit(prefill_step, donate_argnums=2).lower(params, tokens, cache)

    names = ("layers", "batch", "cache_length", "kv_heads", "head_dim")
    shape = (cfg.num_layers, batch, kv_len, cfg.num_kv_heads, cfg.head_dim)
    cache_sh = named_sharding(names, mesh, shape, SERVE_RULES, what="KV cache")
    buf = jax.ShapeDtypeStruct(shape, jnp.dtype(cfg.compute_dtype), sharding=cache_sh)

    def passthrough_step(state, tokens, k_cache, v_cache):
        with use_mesh(mesh, SERVE_RULES):
            m = nnx.merge(graphdef, state)
            B, T = tokens.shape
            pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
            x = m.run_layers(m.embed(tokens), pos, jnp.ones_like(tokens), False)
            x = m.norm(x[:, -1:])
            logits = m.embed.attend(x) if cfg.tie_embeddings else m.lm_head(x)
            return logits.astype(jnp.float32), k_cache, v_cache

    return jax.jit(passthrough_step, donate_argnums=(2, 3)).lower(params, tokens, buf, buf)


def compile_job(job: Job, mesh) -> dict:
    """Lowers and compiles the job's real step on `mesh`; the compiler's per-device numbers."""
    cfg = model_config(job)
    batch = job.batch or mesh.shape["data"] * mesh.shape["fsdp"]
    t0 = time.perf_counter()
    if job.mode == "serve":
        lowered = lower_serve(cfg, mesh, batch, job.seq, job.kv_len or job.seq)
    else:
        from train.step import lower_step

        lowered = lower_step(cfg, mesh=mesh, batch=batch, seq=job.seq, accum=job.accum)
    t1 = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as e:  # the TPU compiler refuses a program that does not fit its HBM
        m = re.search(r"RESOURCE_EXHAUSTED.*?required for [^(]*\(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)",
                      str(e), re.S)
        if not m:
            raise
        need = int(float(m.group(1)) * GiB)
        return {"per_device_bytes": need, "argument_bytes": None, "output_bytes": None, "alias_bytes": None,
                "temp_bytes": None, "generated_code_bytes": None, "peak_bytes": need, "flops": None,
                "bytes_accessed": None, "lower_seconds": round(t1 - t0, 1),
                "compile_seconds": round(time.perf_counter() - t1, 1),
                "error": f"compiler: {m.group(0).split(': ', 1)[-1]}"}
    t2 = time.perf_counter()
    ma = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) and cost else cost) or {}
    arg, out, alias, temp = (ma.argument_size_in_bytes, ma.output_size_in_bytes, ma.alias_size_in_bytes,
                             ma.temp_size_in_bytes)
    peak = getattr(ma, "peak_memory_in_bytes", 0) or 0
    total = max(peak, 0) or (arg + out - alias + temp)
    return {
        "per_device_bytes": int(total),
        "argument_bytes": int(arg), "output_bytes": int(out), "alias_bytes": int(alias), "temp_bytes": int(temp),
        "generated_code_bytes": int(ma.generated_code_size_in_bytes),
        "peak_bytes": int(peak),
        "flops": float(cost.get("flops", 0.0)),
        "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
        "lower_seconds": round(t1 - t0, 1), "compile_seconds": round(t2 - t1, 1),
    }


# ---------------------------------------------------------------------------------------------
# The plan

def plan(job: Job, topology: str, mesh_spec: str | None = None, compile: bool = False,
         headroom: float = 0.0) -> dict:
    """The plan for `job` on `topology` (a name from sharding.topology) as one dict (the --json output)."""
    from sharding import topology as topo_lib
    from sharding.mesh import AXES, axis_sizes, make_mesh

    job.validate()
    try:
        topo = topo_lib.parse(topology)
    except ValueError as e:
        raise PlanError(str(e)) from None
    cfg = model_config(job)
    capacity = topo.hbm_bytes
    if mesh_spec:
        try:
            sizes = axis_sizes(mesh_spec, topo.chips)
        except ValueError as e:
            raise PlanError(str(e)) from None
        if topo.num_slices > 1 and sizes["data"] % topo.num_slices:
            raise PlanError(f"mesh {mesh_spec!r}: {topo.name} has {topo.num_slices} slices; the data axis "
                            f"({sizes['data']}) must be a multiple of {topo.num_slices}")
        batch = job.batch or sizes["data"] * sizes["fsdp"]
        rows = batch // job.accum
        if job.training and rows % (sizes["data"] * sizes["fsdp"]):
            raise PlanError(f"batch: {rows} rows per step is not divisible by mesh axes data x fsdp = "
                            f"{sizes['data'] * sizes['fsdp']}; choose --batch as a multiple of it")
        est = estimate(job, _abstract(sizes), topo.kind)
    else:
        sizes, est = choose_mesh(job, topo.chips, capacity, max(headroom, MESH_HEADROOM), topo.num_slices, topo.kind)
    batch = job.batch or sizes["data"] * sizes["fsdp"]
    total = sum(est.values())
    result = {
        "model": job.model, "params": cfg.num_params(), "layers": cfg.num_layers,
        "mode": job.mode, "quant": job.quant, "topology": topo.name, "chips": topo.chips,
        "device_kind": topo.family.device_kind, "mesh": {a: sizes[a] for a in AXES},
        "batch": batch, "seq": job.seq, "accum": job.accum, "remat": job.remat,
        "kv_len": (job.kv_len or job.seq) if job.mode == "serve" else None,
        "lora": ({"rank": job.lora_rank, "targets": list(job.lora_targets)} if job.mode in ("lora", "qlora")
                 else None),
        "per_device": est, "per_device_bytes": total,
        "compiled_per_device_bytes": None, "compiled": None,
        "capacity_bytes": capacity,
    }
    if compile:
        if topo.kind == "tpu":
            devices = topo.devices()
        else:
            import jax

            devices = jax.devices()
            if devices[0].platform != "gpu" or len(devices) != topo.chips:
                raise PlanError(f"--compile for {topo.name} needs its {topo.chips} GPUs attached (here: "
                                f"{len(devices)} {devices[0].platform} device(s)); without them the plan is "
                                f"analytic only")
        mesh = make_mesh({a: sizes[a] for a in AXES}, devices)
        result["compiled"] = compile_job(job, mesh)
        result["compiled_per_device_bytes"] = result["compiled"]["per_device_bytes"]
    basis = result["compiled_per_device_bytes"] or total
    result["basis"] = "compiled" if result["compiled_per_device_bytes"] else "analytic"
    result["fits"] = basis <= capacity * (1 - headroom)
    result["headroom"] = round(1 - basis / capacity, 4)
    result["short_by_bytes"] = max(0, int(basis - capacity * (1 - headroom)))
    if result["compiled_per_device_bytes"]:
        result["analytic_vs_compiled"] = round(total / result["compiled_per_device_bytes"] - 1, 4)
    if job.training:
        from train.step import model_flops_per_token

        tokens = batch * job.seq
        result["model_flops_per_chip"] = model_flops_per_token(cfg, job.seq, job.mode != "full") * tokens / topo.chips
    return result


def smallest(job: Job, family: str, compile: bool = False, headroom: float = 0.0,
             mesh_spec: str | None = None, log=None) -> dict:
    """The plan on the smallest slice of `family` (e.g. "v6e", "h100", "2xv6e") that fits."""
    from sharding import topology as topo_lib

    slices, _, fam = family.lower().rpartition("x") if family.lower()[0].isdigit() else ("", "", family.lower())
    fam = fam.split("-")[0]
    if fam not in topo_lib.FAMILIES:
        raise PlanError(f"unknown topology family {family!r}; families: {', '.join(topo_lib.FAMILIES)} "
                        f"(valid names: {topo_lib.names_hint()})")
    f = topo_lib.FAMILIES[fam]
    sep = "x" if f.kind == "gpu" else "-"
    prefix = f"{slices}x" if slices else ""
    last = None
    for size in f.sizes:
        name = f"{prefix}{f.name}{sep}{size}"
        try:
            analytic = plan(job, name, mesh_spec, compile=False, headroom=headroom)
        except PlanError:
            continue  # this size cannot hold the mesh (e.g. batch or heads do not divide)
        last = analytic
        if log:
            log(f"{name}: analytic {analytic['per_device_bytes'] / GiB:.2f} GiB of "
                f"{analytic['capacity_bytes'] / GiB:.2f} GiB -> {'fits' if analytic['fits'] else 'does not fit'}")
        if not analytic["fits"]:
            continue
        if not compile or f.kind != "tpu":
            return analytic
        spec = ",".join(f"{k}={v}" for k, v in analytic["mesh"].items())
        compiled = plan(job, name, spec, compile=True, headroom=headroom)
        if log:
            log(f"{name}: compiled {compiled['compiled_per_device_bytes'] / GiB:.2f} GiB -> "
                f"{'fits' if compiled['fits'] else 'does not fit'}")
        if compiled["fits"]:
            return compiled
        last = compiled
    if last is None:
        raise PlanError(f"no {family} slice can hold this job")
    last = dict(last)
    last["note"] = f"no {family} slice up to {last['topology']} fits"
    return last


# ---------------------------------------------------------------------------------------------
# Output

def _gib(b) -> str:
    if b is None:
        return "—"
    return f"{b / GiB:8.2f} GiB" if b >= GiB // 10 or b == 0 else f"{b / (1 << 20):8.2f} MiB"


def format_plan(r: dict) -> str:
    lines = []
    lora = f" · LoRA r={r['lora']['rank']} on {','.join(r['lora']['targets'])}" if r["lora"] else ""
    mesh = " × ".join(f"{a}={n}" for a, n in r["mesh"].items() if n > 1) or "1 device"
    what = f"{r['batch']} × {r['seq']} tokens" + (f" (KV cache {r['kv_len']})" if r["kv_len"] else "")
    if r["accum"] > 1:
        what += f" in {r['accum']} micro-batches"
    lines.append(f"{r['model']} ({r['params']:,} parameters, {r['layers']} layers) · {r['mode']} · {r['quant']}"
                 f"{lora} · remat {r['remat']}")
    lines.append(f"{r['topology']}: {r['chips']} × {r['device_kind']} · mesh {mesh} · batch {what}")
    c = r["compiled"]
    lines.append(f"{'per chip':<24}{'analytic':>12}")
    for k in CATEGORIES:
        v = r["per_device"][k]
        if v or k in ("weights", "temporaries"):
            lines.append(f"  {LABELS[k]:<22}{_gib(v):>12}")
    lines.append(f"  {'total':<22}{_gib(r['per_device_bytes']):>12}")
    if c and c.get("error"):
        lines.append(f"  {'compiled (XLA)':<22}{_gib(c['per_device_bytes']):>12}   {c['error']}")
        lines.append(f"  {'analytic vs compiled':<22}{r['analytic_vs_compiled'] * 100:+11.1f}%")
    elif c:
        lines.append(f"  {'compiled (XLA peak)':<22}{_gib(c['per_device_bytes']):>12}   memory_analysis: arguments "
                     f"{c['argument_bytes'] / GiB:.2f} GiB, temp {c['temp_bytes'] / GiB:.2f} GiB, "
                     f"outputs {c['output_bytes'] / GiB:.2f} GiB ({c['alias_bytes'] / GiB:.2f} aliased)")
        lines.append(f"  {'analytic vs compiled':<22}{r['analytic_vs_compiled'] * 100:+11.1f}%")
    lines.append(f"  {'capacity':<22}{_gib(r['capacity_bytes']):>12}")
    basis = r["basis"]
    if r["fits"]:
        free = r["capacity_bytes"] - (r["compiled_per_device_bytes"] or r["per_device_bytes"])
        lines.append(f"FITS ({basis}): {r['headroom'] * 100:.1f}% headroom, {free / GiB:.2f} GiB free per chip")
    else:
        need = r["compiled_per_device_bytes"] or r["per_device_bytes"]
        if need <= r["capacity_bytes"]:  # fits the chip, but not with the headroom asked for
            lines.append(f"DOES NOT FIT ({basis}) with the headroom asked for: uses {need / r['capacity_bytes']:.0%} "
                         f"of capacity; needs {r['short_by_bytes'] / GiB:.2f} GiB less per chip")
        else:
            lines.append(f"DOES NOT FIT ({basis}): needs {r['short_by_bytes'] / GiB:.2f} GiB more per chip "
                         f"({need / r['capacity_bytes'] * 100:.0f}% of capacity)")
    if c and not c.get("error"):
        extra = ""
        if r.get("model_flops_per_chip"):
            extra = f"; model FLOPs {r['model_flops_per_chip']:.3g} per chip per step"
        lines.append(f"compiler: {c['flops']:.3g} FLOPs per chip per step (cost_analysis, which counts a loop "
                     f"body once: the {r['layers']}-layer scan's work appears as one layer's){extra}; "
                     f"lowered in {c['lower_seconds']} s, compiled in {c['compile_seconds']} s")
    elif r["topology"].startswith(("h100", "h200", "a100")):
        lines.append("(GPU: analytic only; run with --compile on the GPU node to confirm)")
    if r.get("note"):
        lines.append(r["note"])
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sharding.plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama3.1-405b", help="preset name or Hugging Face config.json")
    p.add_argument("--mode", default="lora", help="serve | lora | qlora | full")
    p.add_argument("--quant", default=None, help="bf16 | int8 | int4 (default: int4 for qlora, else bf16)")
    p.add_argument("--topology", default="v6e-16",
                   help="v6e-8 … v6e-256, 2xv6e-256, v5p-128, v5e-16, h100x8, h200x8, …; with --smallest a family")
    p.add_argument("--mesh", default=None, help="axis sizes, e.g. fsdp=4,sequence=4 (default: the simplest that fits)")
    p.add_argument("--batch", type=int, default=None, help="global rows per step (default: one per data x fsdp)")
    p.add_argument("--seq", type=int, default=4096, help="sequence length (serve: prompt length)")
    p.add_argument("--kv-len", type=int, default=None, help="serve: KV-cache positions per sequence (default: --seq)")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-targets", default="q,k,v,o,gate,up,down")
    p.add_argument("--remat", default="full", help="none | full | dots | attn_proj")
    p.add_argument("--accum", type=int, default=1, help="gradient accumulation micro-batches")
    p.add_argument("--layers", type=int, default=None, help="reduced depth (quick checks)")
    p.add_argument("--headroom", type=float, default=0.0, help="fraction of HBM to keep free for FITS (e.g. 0.1)")
    p.add_argument("--compile", action="store_true", help="compile the real step for the TPU topology (AOT)")
    p.add_argument("--smallest", action="store_true", help="the smallest slice of --topology's family that fits")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the default backend stays local; TPU devices come from libtpu
    quant = args.quant or ("int4" if args.mode == "qlora" else "bf16")
    job = Job(model=args.model, mode=args.mode, quant=quant, batch=args.batch, seq=args.seq, kv_len=args.kv_len,
              lora_rank=args.lora_rank, lora_targets=tuple(t for t in args.lora_targets.split(",") if t),
              remat=args.remat, accum=args.accum, layers=args.layers)
    log = None if args.json else (lambda m: print(m, file=sys.stderr, flush=True))
    try:
        if args.smallest:
            r = smallest(job, args.topology, args.compile, args.headroom, args.mesh, log)
        else:
            r = plan(job, args.topology, args.mesh, args.compile, args.headroom)
    except PlanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(r) if args.json else format_plan(r))
    return 0 if r["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())
