"""The adapters' low-rank product `(x A) B · scale` with its gradient written out.

Autodiff of the two einsums gives the right numbers, but XLA:CPU then lays the adapter-gradient dots
out by transposing the large operand: `dB = hᵀ · dy` became a copy of dy ([tokens, out] -> [out,
tokens], fused into the elementwise backward that produces it, 17% of the bench step's time), and
likewise for `dA`. Here the tokens are flattened to one leading dim and the small operands (h, dh:
[tokens, R]) are the ones transposed, so every large array keeps its layout: the MLP with LoRA,
forward and backward, went from 8.3 s to 5.3 s on the bench shape (BENCHMARKS.md). The same program
runs on every backend.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp


def product(x: jax.Array, a: jax.Array, b: jax.Array, n_in: int, scale: float) -> jax.Array:
    """x [*tokens, *in], a [*in, R], b [R, *out] (all in x's dtype) -> [*tokens, *out]; `n_in` input dims."""
    return _product(n_in, float(scale), x, a, b)


def _flat(x, a, b, n_in):
    tokens, in_shape, out_shape = x.shape[:x.ndim - n_in], a.shape[:-1], b.shape[1:]
    M, I, O, R = math.prod(tokens), math.prod(in_shape), math.prod(out_shape), a.shape[-1]
    return x.reshape(M, I), a.reshape(I, R), b.reshape(R, O), (*tokens, *out_shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _product(n_in, scale, x, a, b):
    return _fwd(n_in, scale, x, a, b)[0]


def _fwd(n_in, scale, x, a, b):
    x2, a2, b2, out_shape = _flat(x, a, b, n_in)
    h = x2 @ a2
    y = (h @ b2) * jnp.asarray(scale, x.dtype)
    return y.reshape(out_shape), (x, a, b, h)


def _bwd(n_in, scale, res, dy):
    x, a, b, h = res
    x2, a2, b2, _ = _flat(x, a, b, n_in)
    dy = dy.reshape(x2.shape[0], b2.shape[1]) * jnp.asarray(scale, dy.dtype)
    db = h.T @ dy  # [R, tokens] · [tokens, out]
    dh = dy @ b2.T
    da = (dh.T @ x2).T  # [R, tokens] · [tokens, in], then the small [R, in] transposed
    dx = dh @ a2.T
    return dx.reshape(x.shape), da.reshape(a.shape), db.reshape(b.shape)


_product.defvjp(_fwd, _bwd)
