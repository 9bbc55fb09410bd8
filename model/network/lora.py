"""LoRA adapters on dense layers: `y = W x + (x A) B · scale`, with scale = alpha / r (or alpha / sqrt(r), rsLoRA).

Adapters live on the dense layer they adapt (`LoRADense`, model/network/dense.py), as `lora_a` [*in, R]
and `lora_b` [R, *out] (`nnx.LoRAParam`, stacked with a leading `layers` axis like the kernel), so the
base weight keeps its path and the adapters can be split off by type: only they are differentiated and
only they get optimizer state. `B` starts at zero, so a fresh adapter leaves the base model's output
unchanged.

Serving many adapters at once (`LoraSlots`): every targeted layer holds `slots` adapters side by side,
`lora_a` [slots, *in, R] and `lora_b` [slots, R, *out] (after `layers`; ranks zero-padded to the
largest, each adapter's scale folded into its B), and each token of a step names its adapter (`token_slots`: 0 = none,
s = slot s-1). `slot_delta` gives every token its own adapter's delta in one batched product (the
gather of Punica / S-LoRA's BGMV for a few tokens, a one-hot segment product for many): requests for
different adapters and for the base run in the same step, with nothing merged.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import zlib

import jax
import jax.numpy as jnp
from flax import nnx

from model.network import lora_product
from model.network.quant import TARGETS

PEFT_NAMES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
              "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = TARGETS
    rslora: bool = False
    dropout: float = 0.0
    dtype: str = "float32"  # adapter master weights; the matmul runs in the model's compute dtype

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        bad = [t for t in self.targets if t not in TARGETS]
        if bad:
            raise ValueError(f"lora.targets: unknown target {bad[0]!r}; valid: {', '.join(TARGETS)}")
        if self.rank < 1:
            raise ValueError(f"lora.rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


@dataclasses.dataclass(frozen=True)
class LoraSlots(LoraConfig):
    """Serving: `slots` adapters of rank <= `rank` in every target layer, chosen per token (`token_slots`).
    Both A and B start at zero (an empty slot adds nothing); alpha is unused (scales are folded into B)."""

    slots: int = 1

    def __post_init__(self):
        super().__post_init__()
        if self.slots < 1:
            raise ValueError(f"lora slots must be >= 1, got {self.slots}")


def adapters(lora: LoraConfig, in_shape, out_shape, in_axes, out_axes, layers: int | None,
             rngs: nnx.Rngs, name: str) -> tuple[nnx.LoRAParam, nnx.LoRAParam]:
    """(`lora_a` [*in, R], Kaiming-uniform as PEFT; `lora_b` [R, *out], zeros) with their logical axes.

    `lora_a` is drawn from the seed's key folded with the target's name, not from the parameter stream:
    drawing from the stream would shift every base weight created after it, so a preset's random base
    would depend on whether (and where) LoRA is configured, and an adapter would fit a base that exists
    only in the training run."""
    R, dtype = lora.rank, jnp.dtype(lora.dtype)
    lead, lead_axes = ((layers,), ("layers",)) if layers else ((), ())
    if isinstance(lora, LoraSlots):  # the slot axis is replicated: adapters shard like the layer they adapt
        lead, lead_axes = (*lead, lora.slots), (*lead_axes, None)
        return (nnx.LoRAParam(jnp.zeros((*lead, *in_shape, R), dtype), out_sharding=(*lead_axes, *in_axes, "lora_rank")),
                nnx.LoRAParam(jnp.zeros((*lead, R, *out_shape), dtype),
                              out_sharding=(*lead_axes, "lora_rank", *out_axes)))
    bound = 1.0 / math.sqrt(math.prod(in_shape))
    key = jax.random.fold_in(rngs.params.key.get_value(), zlib.crc32(f"lora_a/{name}".encode()))
    a = jax.random.uniform(key, (*lead, *in_shape, R), dtype, -bound, bound)
    return (nnx.LoRAParam(a, out_sharding=(*lead_axes, *in_axes, "lora_rank")),
            nnx.LoRAParam(jnp.zeros((*lead, R, *out_shape), dtype), out_sharding=(*lead_axes, "lora_rank", *out_axes)))


_DROPOUT_KEY: contextvars.ContextVar[jax.Array | None] = contextvars.ContextVar("lora_dropout_key", default=None)
_TOKEN_SLOTS: contextvars.ContextVar[jax.Array | None] = contextvars.ContextVar("lora_token_slots", default=None)


@contextlib.contextmanager
def _setting(var: contextvars.ContextVar, value):
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


def dropout_key(key: jax.Array | None):
    """Within this context (a training step's trace, per layer), adapters apply their dropout."""
    return _setting(_DROPOUT_KEY, key)


def current_dropout_key() -> jax.Array | None:
    return _DROPOUT_KEY.get()


def token_slots(rows: jax.Array | None):
    """Within this context (a serving step's trace), `LoraSlots` layers apply adapter rows[b, t] - 1 to
    token [b, t] (`rows` shaped like the tokens; 0: no adapter). Outside it they add nothing."""
    return _setting(_TOKEN_SLOTS, rows)


def current_token_slots() -> jax.Array | None:
    return _TOKEN_SLOTS.get()


def slot_delta(x: jax.Array, a: jax.Array, b: jax.Array, eq: str, rows: jax.Array) -> jax.Array:
    """Each token's own adapter's contribution `(x A[s]) B[s]` (scale folded into B): x [*tokens, *in],
    a [slots, *in, R], b [slots, R, *out], rows [*tokens] (0: none, s: slot s-1); `eq` the layer's einsum.
    At most `slots` tokens (decoding) gather their A and B; more (prompt chunks) multiply with every slot's A
    and keep their own slot's rank block (one-hot), so no [tokens, in, R] gather is materialised."""
    ins, out = eq.split("->")
    x_sub, w_sub = ins.split(",")
    n_in = a.ndim - 2
    in_sub, out_w = w_sub[:n_in], w_sub[n_in:]
    tok = "".join(c for c in x_sub if c not in in_sub)
    a, b = a.astype(x.dtype), b.astype(x.dtype)
    slots = a.shape[0]
    if rows.size <= slots:
        idx = jnp.maximum(rows - 1, 0)
        h = jnp.einsum(f"{x_sub},{tok}{in_sub}R->{tok}R", x, a[idx])
        h = h * (rows > 0)[..., None].astype(h.dtype)
        return jnp.einsum(f"{tok}R,{tok}R{out_w}->{out}", h, b[idx])
    onehot = (rows[..., None] - 1 == jnp.arange(slots, dtype=rows.dtype)).astype(x.dtype)  # [*tokens, slots]
    h = jnp.einsum(f"{x_sub},s{in_sub}R->{tok}sR", x, a) * onehot[..., None]
    return jnp.einsum(f"{tok}sR,sR{out_w}->{out}", h, b)


def delta(x: jax.Array, a: jax.Array, b: jax.Array, eq: str, lora: LoraConfig, name: str) -> jax.Array:
    """The adapter's contribution `(x A) B · scale` for input `x`: a [*in, R], b [R, *out]; `eq` is the
    adapted layer's einsum string, `name` its target name (each target draws its own dropout mask)."""
    ins, out = eq.split("->")
    x_sub, w_sub = ins.split(",")
    n_in = a.ndim - 1
    a_sub, b_sub = w_sub[:n_in] + "R", "R" + w_sub[n_in:]
    r_sub = "".join(c for c in x_sub if c not in w_sub[:n_in]) + "R"
    key = current_dropout_key()
    if lora.dropout and key is not None:
        key = jax.random.fold_in(key, zlib.crc32(name.encode()))
        keep = jax.random.bernoulli(key, 1.0 - lora.dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - lora.dropout), 0).astype(x.dtype)
    if x_sub.endswith(w_sub[:n_in]) and out == x_sub[:-n_in] + w_sub[n_in:]:  # `…in, in out -> …out`
        return lora_product.product(x, a.astype(x.dtype), b.astype(x.dtype), n_in, lora.scale)
    h = jnp.einsum(f"{x_sub},{a_sub}->{r_sub}", x, a.astype(x.dtype))
    return jnp.einsum(f"{r_sub},{b_sub}->{out}", h, b.astype(x.dtype)) * jnp.asarray(lora.scale, x.dtype)
