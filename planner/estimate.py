"""The analytic estimate: per-device bytes by category for a job on a mesh (a Mesh or an AbstractMesh:
no devices needed), from the exact shard shapes of the parameter tree and the activations' sizes.

Categories: weights (the frozen or trained base, exact shard bytes, int4 packed), LoRA params,
gradients, optimizer state (AdamW: two moments in the trained dtype), saved activations (what the
remat policy keeps for the backward pass, per layer), KV cache (serving) and compiler temporaries
(one layer's all-gathered weights with its prefetch, one layer's recomputed activations and their
gradients, one attention chunk's scores, the LM head's gathered weight and float32 logits).
"""

from __future__ import annotations

import dataclasses
import math

import jax
from flax import nnx

from model.network import attention
from model.network.model import abstract_model
from model.network.quant import dtype_bits
from planner.job import Job, PlanError, model_config
from sharding.mesh import AXES
from sharding.rules import logical_to_spec, rules_for, shard_shape

CATEGORIES = ("weights", "lora_params", "gradients", "optimizer_state", "activations", "kv_cache", "temporaries")
LABELS = {"weights": "weights", "lora_params": "LoRA params", "gradients": "gradients",
          "optimizer_state": "optimizer state", "activations": "saved activations", "kv_cache": "KV cache",
          "temporaries": "compiler temporaries"}
GiB = 1 << 30

# The temporaries are the larger of two phases that do not overlap in time: a layer's forward
# recompute and backward (XLA all-gathers weights matrix by matrix, so about the layer's largest
# block, the MLP, is live gathered at once; its live activations; one attention chunk's scores) and
# the loss (the LM head gathered, float32 logits and their gradient). Constants read off TPU buffer
# assignments (XLA_FLAGS=--xla_dump_to=...) of 405B-width steps on v6e; see BENCHMARKS.md.
TRAIN_ACT_D, TRAIN_ACT_F = 4.0, 4.0  # bytes per token per D / per F_local element live in a layer's backward
SERVE_ACT_D, SERVE_ACT_F = 8.0, 4.0  # float32 residual / norm copies, MLP intermediate
LOGIT_COPIES_TRAIN, LOGIT_COPIES_SERVE = 2.0, 1.0  # float32 logits and their gradient


def abstract_mesh(sizes: dict[str, int]) -> jax.sharding.AbstractMesh:
    """A device-less mesh with the AXES names and these sizes (what the estimate needs)."""
    return jax.sharding.AbstractMesh(tuple(sizes[a] for a in AXES), AXES)


def _itemsize(dtype) -> float:
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


@dataclasses.dataclass(frozen=True)
class _Local:
    """The per-device sizes the categories are computed from."""
    cb: float  # bytes per compute-dtype element
    N_l: int  # query heads, KV heads, MLP dim and vocab on this device (split over `tensor`)
    K_l: int
    F_l: int
    V_l: int
    rows_l: int  # activation shard: rows, tokens and model dim on this device
    D_act: int
    tok: int
    scores: int  # one chunk of float32 attention scores
    sharded_w: bool  # FSDP-style: weights all-gathered before use (else weight-stationary)


def _local(job: Job, cfg, mesh, rules) -> _Local:
    D, F, V = cfg.dim, cfg.mlp_dim, cfg.vocab_size
    N, K = cfg.num_heads, cfg.num_kv_heads
    N_l, K_l = N // _split(N, mesh, ("tensor",)), K // _split(K, mesh, ("tensor",))
    batch = job.batch or mesh.shape["data"] * mesh.shape["fsdp"]
    rows = batch // job.accum if job.training else batch
    T = job.seq
    spec = logical_to_spec(("batch", "length", "embed"), mesh, (rows, T, D), rules, strict=False)
    split = [math.prod(mesh.shape[a] for a in ((ax,) if isinstance(ax, str) else ax or ())) for ax in
             (*spec, None, None, None)[:3]]
    rows_l, T_l, D_act = rows // split[0], T // split[1], D // split[2]
    chunk = attention.QUERY_CHUNK
    q_l = (chunk // _split(chunk, mesh, ("sequence",))) if (T > chunk and T % chunk == 0) else T_l
    # FSDP: the batch is split over the axes the weights are split over, so weights are all-gathered
    # before use. Weight-stationary (serving rules): activations move instead.
    sharded_w = split[0] * split[1] > 1 and any(
        a in dict(rules)["batch"] + dict(rules)["length"] for a in ("fsdp", "sequence") if mesh.shape[a] > 1)
    return _Local(cb=_itemsize(cfg.compute_dtype), N_l=N_l, K_l=K_l, F_l=F // _split(F, mesh, ("tensor",)),
                  V_l=V // _split(V, mesh, ("tensor",)), rows_l=rows_l, D_act=D_act, tok=rows_l * T_l,
                  scores=rows_l * K_l * (N // K) * q_l * T * 4, sharded_w=sharded_w)


def _training(job: Job, cfg, tree: _Tree, lo: _Local, out: dict) -> tuple[float, float]:
    """Fills the training categories; (one layer's temporaries, the loss's)."""
    D, H, L, cb = cfg.dim, cfg.head_dim, cfg.num_layers, lo.cb
    out["lora_params"] = tree.lora
    trained = tree.lora if job.mode != "full" else tree.base
    out["gradients"] = trained
    out["optimizer_state"] = 2 * trained
    qkv = (lo.N_l + 2 * lo.K_l) * H
    per_tok = {"full": D * cb,
               "attn_proj": D * cb + qkv * cb,
               "dots": (3 * D + qkv + 2 * lo.F_l) * cb,
               "none": (8 * D + 3 * qkv + 4 * lo.F_l) * cb + 8 * D}[cfg.remat]
    out["activations"] = L * lo.tok * per_tok
    layer = lo.tok * (TRAIN_ACT_D * D + TRAIN_ACT_F * lo.F_l) + 2 * lo.scores
    if lo.sharded_w:
        layer += tree.mlp_gathered
    if job.mode == "full":  # a layer's weight gradient before its reduce-scatter
        layer += tree.layer_gathered
    head = (tree.head_gathered if lo.sharded_w else 0) + LOGIT_COPIES_TRAIN * lo.tok * lo.V_l * 4
    return layer, head


def _serving(job: Job, cfg, tree: _Tree, lo: _Local, mesh, rules, out: dict) -> tuple[float, float]:
    """Fills the KV cache; (one layer's temporaries, the LM head's)."""
    rows = job.batch or mesh.shape["data"] * mesh.shape["fsdp"]
    shape = (cfg.num_layers, rows, job.kv_len or job.seq, cfg.num_kv_heads, cfg.head_dim)
    local = shard_shape(("layers", "batch", "cache_length", "kv_heads", "head_dim"), shape, mesh, rules,
                        what="KV cache")
    out["kv_cache"] = 2 * math.prod(local) * lo.cb
    layer = lo.tok * (SERVE_ACT_D * lo.D_act + SERVE_ACT_F * lo.F_l) + lo.scores
    if lo.sharded_w:
        layer += tree.mlp_gathered
    head = (tree.head_gathered if lo.sharded_w else 0) + LOGIT_COPIES_SERVE * lo.rows_l * lo.V_l * 4
    return layer, head


def estimate(job: Job, mesh) -> dict[str, int]:
    """Per-device bytes by category for `job` on `mesh` (a Mesh or AbstractMesh with the AXES names)."""
    cfg = model_config(job)
    rules = rules_for(job.mode)
    tree = _tree_facts(cfg, mesh, rules)
    lo = _local(job, cfg, mesh, rules)
    out = dict.fromkeys(CATEGORIES, 0)
    out["weights"] = tree.base
    if job.training:
        layer, head = _training(job, cfg, tree, lo, out)
    else:
        layer, head = _serving(job, cfg, tree, lo, mesh, rules, out)
    # A one-layer scan is inlined by XLA, and then the loss overlaps the layer's buffers.
    out["temporaries"] = max(layer, head) if cfg.num_layers > 1 else layer + head
    return {k: int(v) for k, v in out.items()}
