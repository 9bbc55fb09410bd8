"""The Llama 3.1 network in Flax NNX.

Layers are stacked (every block parameter has a leading `layers` axis) and run by one
`jax.lax.scan` over a rematerialised block, so compile time does not depend on depth.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name as name

from model.network import kv_cache, lora
from model.network.attention import attend, choose
from model.network.config import LlamaConfig
from model.network.dense import make_dense, project
from model.network.layers import Embed, RMSNorm, apply_rope, rope_frequencies
from sharding.rules import constrain

# Remat policies by config name. Names given with `checkpoint_name` below: "attn_proj" marks the
# q/k/v projections, "mlp_in" the gate/up products.
REMAT_POLICIES = {
    "none": None,  # keep every activation of every layer
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only each layer's input
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "attn_proj": jax.checkpoint_policies.save_only_these_names("attn_proj"),
}


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, layers: int | None = None):
        D, N, K, H = cfg.dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kw = dict(cfg=cfg, rngs=rngs, layers=layers)
        self.q = make_dense("q", "BTD,DNH->BTNH", (D,), (N, H), ("embed", "heads", "head_dim"), **kw)
        self.k = make_dense("k", "BTD,DKH->BTKH", (D,), (K, H), ("embed", "kv_heads", "head_dim"), **kw)
        self.v = make_dense("v", "BTD,DKH->BTKH", (D,), (K, H), ("embed", "kv_heads", "head_dim"), **kw)
        self.o = make_dense("o", "BTNH,NHD->BTD", (N, H), (D,), ("heads", "head_dim", "embed"), **kw)
        choose(cfg.attention)  # refuses an unknown name now; resolved when traced (the platform compiled for)
        self.impl = cfg.attention

    def __call__(self, x_BTD, positions_BT, segments_BT, inv_freq, packed: bool,
                 cache: kv_cache.LayerCache | None = None):
        """With `cache`, this step's keys/values are written to it first and the queries attend over the
        cached positions; returns (output, updated cache)."""
        impl = choose(self.impl)
        q, k, v = project(x_BTD, self.q, self.k, self.v)
        q = constrain(name(q, "attn_proj"), ("batch", "length", "heads", "head_dim"))
        k = constrain(name(k, "attn_proj"), ("batch", "length", "kv_heads", "head_dim"))
        v = constrain(name(v, "attn_proj"), ("batch", "length", "kv_heads", "head_dim"))
        q, k = apply_rope(q, positions_BT, inv_freq), apply_rope(k, positions_BT, inv_freq)
        if cache is not None:
            out, new_cache = cache.attend(q, k, v, impl)
            return self.o(constrain(out, ("batch", "length", "heads", "head_dim"))), new_cache
        out = attend(q, k, v, q_pos=positions_BT, k_pos=positions_BT, q_seg=segments_BT, k_seg=segments_BT,
                     impl=impl, causal_self=not packed, self_attention=True)
        return self.o(constrain(out, ("batch", "length", "heads", "head_dim")))


@jax.custom_vjp
def swiglu(gate, up):
    """silu(gate) * up, each rounded to the inputs' dtype as PyTorch rounds them (silu computed in float32
    and rounded once; XLA's bfloat16 silu rounds the sigmoid too, and on CPU took 2.7x as long)."""
    f32 = jnp.float32
    return (jax.nn.silu(gate.astype(f32)).astype(gate.dtype).astype(f32) * up.astype(f32)).astype(up.dtype)


def _swiglu_fwd(gate, up):
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(res, d_h):
    """From gate and up alone: autodiff saved silu(gate), its sigmoid and products too (five [B,T,F] arrays
    per layer where two do)."""
    gate, up = res
    g, u, dh = (a.astype(jnp.float32) for a in (gate, up, d_h))
    sig = jax.nn.sigmoid(g)
    d_gate = dh * u * sig * (1 + g * (1 - sig))
    return d_gate.astype(gate.dtype), (dh * g * sig).astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class MLP(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, layers: int | None = None):
        D, F = cfg.dim, cfg.mlp_dim
        kw = dict(cfg=cfg, rngs=rngs, layers=layers)
        self.gate = make_dense("gate", "BTD,DF->BTF", (D,), (F,), ("embed", "mlp"), **kw)
        self.up = make_dense("up", "BTD,DF->BTF", (D,), (F,), ("embed", "mlp"), **kw)
        self.down = make_dense("down", "BTF,FD->BTD", (F,), (D,), ("mlp", "embed"), **kw)

    def __call__(self, x_BTD):
        gate, up = project(x_BTD, self.gate, self.up)
        h = swiglu(name(gate, "mlp_in"), name(up, "mlp_in"))
        return self.down(constrain(h, ("batch", "length", "mlp")))


class Block(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, layers: int | None = None):
        self.attn_norm = RMSNorm(cfg.dim, cfg=cfg, layers=layers)
        self.attn = Attention(cfg, rngs=rngs, layers=layers)
        self.mlp_norm = RMSNorm(cfg.dim, cfg=cfg, layers=layers)
        self.mlp = MLP(cfg, rngs=rngs, layers=layers)

    def __call__(self, x_BTD, positions_BT, segments_BT, inv_freq, packed: bool,
                 cache: kv_cache.LayerCache | None = None):
        if cache is not None:  # serving: returns (output, updated cache)
            a, new_cache = self.attn(self.attn_norm(x_BTD), positions_BT, segments_BT, inv_freq, packed, cache)
            h = x_BTD + a
            return constrain(h + self.mlp(self.mlp_norm(h)), ("batch", "length", "embed")), new_cache
        h = x_BTD + self.attn(self.attn_norm(x_BTD), positions_BT, segments_BT, inv_freq, packed)
        out = h + self.mlp(self.mlp_norm(h))
        return constrain(out, ("batch", "length", "embed"))


class Llama(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        if cfg.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={cfg.remat!r}: expected one of {', '.join(REMAT_POLICIES)}")
        self.config = cfg
        self.embed = Embed(cfg, rngs=rngs)
        self.layers = Block(cfg, rngs=rngs, layers=cfg.num_layers)
        self.norm = RMSNorm(cfg.dim, cfg=cfg)
        if not cfg.tie_embeddings:
            self.lm_head = make_dense("lm_head", "BTD,DV->BTV", (cfg.dim,), (cfg.vocab_size,), ("embed", "vocab"),
                                      cfg=cfg, rngs=rngs)

    def __call__(self, tokens_BT, positions_BT=None, segments_BT=None, *,
                 cache: kv_cache.CacheUpdate | None = None, logits_at=None):
        """Float32 logits [B, T, V]. Without positions, rows are single documents from position 0;
        with segment ids, tokens attend only within their segment (packed rows).

        Serving (model/network/kv_cache.py): with `cache` (a CacheUpdate over the paged KV pool), tokens [1, T]
        are one flattened, ragged step (model/network/paged_attention.py); returns (logits in the compute
        dtype, updated pool): sampling reads bfloat16 logits as they are (a float32 copy of a 64-row step's
        [64, 32k] logits cost ~3% of it on CPU). `logits_at` [S] picks the tokens to compute logits for: [S, 1, V]."""
        if cache is not None:
            return self._cached(tokens_BT, positions_BT, segments_BT, cache, logits_at)
        cfg = self.config
        packed = segments_BT is not None or positions_BT is not None
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1], dtype=jnp.int32), tokens_BT.shape)
        if segments_BT is None:
            segments_BT = jnp.ones_like(tokens_BT, dtype=jnp.int32)
        x = constrain(self.embed(tokens_BT), ("batch", "length", "embed"))
        x = self.run_layers(x, positions_BT, segments_BT, packed)
        x = self.norm(x)
        logits = self.embed.attend(x) if cfg.tie_embeddings else self.lm_head(x)
        return constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))

    def _cached(self, tokens_BT, positions_BT, segments_BT, update: kv_cache.CacheUpdate, logits_at):
        cfg = self.config
        if segments_BT is None:
            segments_BT = jnp.ones_like(tokens_BT, dtype=jnp.int32)
        table = self.embed.embedding[...]
        if update.bits and table.dtype.itemsize == 2:  # as bits: XLA:CPU would convert the whole table
            rows = jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(table, jnp.uint16)[tokens_BT], table.dtype)
            x = rows.astype(self.embed.compute_dtype)
        else:
            x = self.embed(tokens_BT)
        x = constrain(x, ("batch", "length", "embed"))
        inv_freq = rope_frequencies(cfg)
        graphdef, state = nnx.split(self.layers)

        def body(carry, xs):
            x, cache = carry
            layer_state, i = xs
            view = update.layer(cache, i, positions_BT, segments_BT)
            x, cache = nnx.merge(graphdef, layer_state)(x, positions_BT, segments_BT, inv_freq, True, view)
            return (x, cache), None

        carry = (x, update.cache)
        if update.layer_params is not None:  # unstacked weights: an unrolled loop, no slicing
            for i, layer_state in enumerate(update.layer_params):
                carry, _ = body(carry, (layer_state, i))
        elif cfg.scan_layers:
            carry, _ = jax.lax.scan(body, carry, (state, jnp.arange(cfg.num_layers)))
        else:
            for i in range(cfg.num_layers):
                carry, _ = body(carry, (jax.tree.map(lambda a, i=i: a[i], state), i))
        x, cache = carry
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)  # [B, 1, D]
        x = self.norm(x)
        logits = self.embed.attend(x) if cfg.tie_embeddings else self.lm_head(x)
        return constrain(logits, ("batch", "length", "vocab")), cache

    def run_layers(self, x, positions, segments, packed):
        cfg = self.config
        inv_freq = rope_frequencies(cfg)
        graphdef, state = nnx.split(self.layers)
        key = lora.current_dropout_key()  # set by a training step when adapters use dropout
        keys = None if key is None else jax.random.split(key, cfg.num_layers)

        def body(x, xs):
            layer_state, layer_key = xs
            with lora.dropout_key(layer_key):
                return nnx.merge(graphdef, layer_state)(x, positions, segments, inv_freq, packed), None

        policy = REMAT_POLICIES[cfg.remat]
        if cfg.remat != "none":
            body = jax.checkpoint(body, policy=policy, prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            x, _ = jax.lax.scan(body, x, (state, keys))
        else:  # debug path: an unrolled Python loop, one layer at a time
            for i in range(cfg.num_layers):
                x, _ = body(x, jax.tree.map(lambda a, i=i: a[i], (state, keys)))
        return x
