"""Training-speed paths checked against their oracles: the splash-attention kernel (Pallas, interpret mode
on this CPU) against the XLA reference with packed segments and GQA, forward and q/k/v gradients; the
QLoRA int4 backward without a dequantized copy of a whole weight (a 405B-width, 1-layer step compiled
ahead of time for TPU, its buffers read from the compiled program)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.network import attention


def _packed_inputs(B=2, T=256, N=4, K=2, H=64, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, T, K, H)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, T, K, H)), jnp.float32)
    # row 0: three packed documents then padding (segment 0); row 1: one document over the whole row
    seg = np.ones((B, T), np.int32)
    seg[0, :70], seg[0, 70:150], seg[0, 150:230], seg[0, 230:] = 1, 2, 3, 0
    pos = np.zeros((B, T), np.int32)
    for b in range(B):
        for s in np.unique(seg[b]):
            idx = np.flatnonzero(seg[b] == s)
            pos[b, idx] = np.arange(idx.size)
    return q, k, v, jnp.asarray(pos), jnp.asarray(seg)


def test_splash_matches_the_xla_reference_forward_and_gradients():
    """Outputs and dq, dk, dv of splash (interpret mode) within 2e-5 × max|reference| of `xla_attention`,
    packed rows (three documents and padding in one row), GQA (4 query heads on 2 KV heads)."""
    q, k, v, pos, seg = _packed_inputs()
    ct = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)

    def ref(q, k, v):
        return jnp.sum(attention.xla_attention(q, k, v, pos, pos, seg, seg) * ct)

    def spl(q, k, v):
        return jnp.sum(attention.splash_attention(q, k, v, seg, seg, interpret=True) * ct)

    out_ref = attention.xla_attention(q, k, v, pos, pos, seg, seg)
    out = attention.splash_attention(q, k, v, seg, seg, interpret=True)
    np.testing.assert_allclose(out, out_ref, rtol=0, atol=2e-5 * float(jnp.abs(out_ref).max()))
    g_ref = jax.grad(ref, argnums=(0, 1, 2))(q, k, v)
    g = jax.grad(spl, argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", g, g_ref):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * float(jnp.abs(b).max()), err_msg=f"d{name}")


def test_attend_routes_splash_only_for_self_attention_it_can_run():
    q, k, v, pos, seg = _packed_inputs(B=1, T=128)
    kw = dict(q_pos=pos, k_pos=pos, q_seg=seg, k_seg=seg, impl="splash")
    want = attention.xla_attention(q, k, v, pos, pos, seg, seg)
    np.testing.assert_allclose(attention.attend(q, k, v, self_attention=True, **kw), want, atol=1e-4)
    assert attention.choose("auto", "tpu") == "splash" and attention.choose("auto", "cpu") == "xla"
    assert not attention.splash_supported(q[:, :100], k[:, :100])  # not a multiple of 128: the reference


def test_causal_blocks_equal_the_reference_forward_and_gradients():
    """The causal-blocks path (query blocks over the keys up to their end) against one [T, S] block of the
    reference: packed rows with padding, GQA, outputs and dq, dk, dv within 1e-5 × max; and `attend` takes it
    for self-attention (a block that missed its own last keys, or saw later ones, moves the outputs)."""
    q, k, v, pos, seg = _packed_inputs(T=256)
    ct = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)

    def blocks(q, k, v):
        return attention.xla_attention_causal_blocks(q, k, v, pos, pos, seg, seg, attention.CAUSAL_BLOCK)

    def ref(q, k, v):
        return attention.xla_attention(q, k, v, pos, pos, seg, seg)

    want = ref(q, k, v)
    np.testing.assert_allclose(blocks(q, k, v), want, rtol=0,
                               atol=1e-5 * float(jnp.abs(want).max()))
    routed = attention.attend(q, k, v, q_pos=pos, k_pos=pos, q_seg=seg, k_seg=seg, self_attention=True)
    np.testing.assert_array_equal(routed, blocks(q, k, v))
    for name, a, b in zip("qkv", jax.grad(lambda *a: jnp.sum(blocks(*a) * ct), (0, 1, 2))(q, k, v),
                          jax.grad(lambda *a: jnp.sum(ref(*a) * ct), (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(jnp.abs(b).max()), err_msg=f"d{name}")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_swiglu_backward_equals_autodiff(dtype):
    """The MLP's activation with its written-out backward (saves gate and up only) against autodiff of
    silu(gate) * up: float32 within 1e-6 relative, bfloat16 within one rounding of the output."""
    from model.network.llama import swiglu
    rng = np.random.default_rng(0)
    gate, up, ct = (jnp.asarray(rng.normal(size=(4, 64)) * 3, dtype) for _ in range(3))
    got = jax.vjp(swiglu, gate, up)[1](ct)
    want = jax.vjp(lambda g, u: jax.nn.silu(g) * u, gate.astype(jnp.float32), up.astype(jnp.float32))[1](
        ct.astype(jnp.float32))
    import torch  # the forward rounds as PyTorch's bf16 silu and product do: bit-equal (XLA's bf16 silu: 65%)
    tdt = torch.bfloat16 if dtype == jnp.bfloat16 else torch.float32
    g_t, u_t = (torch.tensor(np.asarray(x.astype(jnp.float32))).to(tdt) for x in (gate, up))
    torch_out = (torch.nn.functional.silu(g_t) * u_t).float().numpy()
    if dtype == jnp.bfloat16:
        np.testing.assert_array_equal(np.asarray(swiglu(gate, up), np.float32), torch_out)
    else:  # float32 silu differs between libraries in the last bit
        np.testing.assert_array_equal(swiglu(gate, up), jax.nn.silu(gate) * up)
        np.testing.assert_allclose(np.asarray(swiglu(gate, up)), torch_out, rtol=1e-6, atol=1e-6)
    tol = 1e-6 if dtype == jnp.float32 else 8e-3
    for name, a, b in zip(("gate", "up"), got, want):
        assert a.dtype == dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=tol, atol=tol * float(jnp.abs(b).max()),
                                   err_msg=f"d_{name}")


def test_qlora_backward_has_no_dequantized_whole_weight():
    """The real QLoRA step (int4 base, adapters, remat full) of a 405B-width model at depth 1, compiled
    for v6e-4 (fsdp 4): no bf16/f32 buffer in the compiled program is as large as one device's gate/up
    weight dequantized (autodiff of the row-chunk loop saved every chunk's converted rows: the whole
    weight, `bf16[32,1,128,53248]` per chip in qlora_v6e before this)."""
    pytest.importorskip("libtpu")
    from planner import __main__ as cli
    from planner.compile import lower_job
    from planner.job import Job
    from sharding import aot_compile
    from sharding.mesh import make_mesh

    mesh = make_mesh("fsdp=4", "v6e-4")
    lowered = lower_job(Job(mode="qlora", quant="int4", layers=1, seq=128, batch=4), mesh, cli.PROGRAMS)
    text = aot_compile.compile(lowered, mesh.devices).as_text()
    D, F = 16384, 53248
    local_weight = D // 4 * F  # one chip's gate (or up) rows
    biggest = 0
    for dt, dims in re.findall(r"\b(bf16|f32)\[([\d,]+)\]", text):
        if "53248" in dims.split(","):
            biggest = max(biggest, int(np.prod([int(d) for d in dims.split(",")])))
    assert 0 < biggest < local_weight / 4, (biggest, local_weight)


@pytest.mark.parametrize("shapes", [((2, 8, 32), (32,), (48,)), ((2, 8, 4, 16), (4, 16), (32,))], ids=["q", "o"])
def test_lora_product_gradient_is_autodiffs(shapes):
    """The adapters' product with its hand-written backward (model/network/lora_product.py): value and
    gradients for x, A and B equal autodiff of the two plain einsums (1e-5 relative), for one and for
    two input dims (`o` contracts heads × head_dim)."""
    from model.network import lora_product

    x_shape, in_shape, out_shape = shapes
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
    a = jnp.asarray(rng.normal(size=(*in_shape, 4)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(4, *out_shape)), jnp.float32)
    ct = jnp.asarray(rng.normal(size=(*x_shape[:2], *out_shape)), jnp.float32)
    n = len(in_shape)

    def plain(x, a, b):
        h = jnp.tensordot(x, a, axes=n)
        return jnp.tensordot(h, b, axes=1) * 2.0

    for f in (plain, lambda x, a, b: lora_product.product(x, a, b, n, 2.0)):
        out = f(x, a, b)
        grads = jax.grad(lambda x, a, b: jnp.sum(f(x, a, b) * ct), argnums=(0, 1, 2))(x, a, b)
        if f is plain:
            want, want_grads = out, grads
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    for name, g, w in zip(("x", "A", "B"), grads, want_grads):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(jnp.abs(w).max()), err_msg=f"d{name}")
