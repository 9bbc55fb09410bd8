"""The attention kernels over the paged KV cache (model/network/backends: the CPU custom call and the TPU
Pallas ragged kernel, here in interpret mode) against two oracles: the dense reference
`model.network.attention.attend` over keys/values gathered from each sequence's blocks by this test, and
the engine's XLA paged reference (`model.network.paged_attention.attend(..., "xla")`). The batches are ragged:
decode tokens and prompt chunks (fresh and continuing) in one flattened step, GQA, padding sequences and
padding tokens, block tables in shuffled order.

Tolerances: float32 pools 2e-5 absolute (same arithmetic, different summation order); bfloat16 3e-2
absolute on outputs of magnitude ~1 (a few bfloat16 ulps: both sides round the probabilities to bfloat16
before the value sum, but the sums differ in order and the Pallas kernel runs an online softmax).
"""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.job import resolve
from model.network import attention, paged_attention
from model.network.backends import cpu_kernels, tpu_paged
from serve.compile_check import lower_step
from sharding import aot_compile, topology
from sharding.mesh import make_mesh

needs_kernels = pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler for the CPU kernels")

# (q_len, kv_len) per sequence: decode tokens first, then a fresh prompt chunk and a continuing one
SEQS = [(1, 37), (1, 5), (1, 16), (7, 7), (5, 21)]


def ragged_batch(seed, *, N, K, H, dtype, block_size=8, seqs=SEQS, layers=1, pad_seqs=2, pad_tokens=3):
    """(q [T, N, H], pool [layers, blocks, block_size, 2K, H] (int8 with its scales for dtype "int8"), meta)."""
    rng = np.random.default_rng(seed)
    S = len(seqs) + pad_seqs
    P = max(-(-kv // block_size) for _, kv in seqs) + 1
    need = sum(-(-kv // block_size) for _, kv in seqs)
    blocks = 1 + need + 3  # block 0 is scratch; a few never used
    order = rng.permutation(np.arange(1, blocks))
    pages = np.zeros((S, P), np.int32)
    used = 0
    for i, (_, kv) in enumerate(seqs):
        n = -(-kv // block_size)
        pages[i, :n] = order[used:used + n]
        used += n
    T = sum(q for q, _ in seqs) + pad_tokens
    cu = np.zeros(S + 1, np.int32)
    cu[1:len(seqs) + 1] = np.cumsum([q for q, _ in seqs])
    cu[len(seqs) + 1:] = cu[len(seqs)]
    kv_lens = np.zeros(S, np.int32)
    kv_lens[:len(seqs)] = [kv for _, kv in seqs]
    shape = (layers, blocks, block_size, 2 * K, H)
    x = rng.standard_normal(shape).astype(np.float32)
    if dtype == "int8":
        amax = np.abs(x).max(-1)
        scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
        pool = (jnp.asarray(np.clip(np.round(x / scale[..., None]), -127, 127), jnp.int8), jnp.asarray(scale))
        qdt = jnp.bfloat16
    else:
        pool = (jnp.asarray(x, dtype), None)
        qdt = dtype
    q = jnp.asarray(rng.standard_normal((T, N, H)), qdt)
    meta = paged_attention.PagedMeta(
        slot_mapping=jnp.zeros((T,), jnp.int32), kv_lens=jnp.asarray(kv_lens), page_indices=jnp.asarray(pages),
        cu_q_lens=jnp.asarray(cu), num_seqs=jnp.asarray([len(seqs)], jnp.int32))
    return q, pool, meta


def dense_oracle(q, kv, scale, meta):
    """Each sequence through `attention.attend` over the keys/values its block table names (real tokens
    only; padding tokens are not compared)."""
    kv_lens, pages, cu = (np.asarray(a) for a in (meta.kv_lens, meta.page_indices, meta.cu_q_lens))
    K2, H = kv.shape[-2:]
    outs = []
    for i in range(int(meta.num_seqs[0])):
        q_len, kv_len = int(cu[i + 1] - cu[i]), int(kv_lens[i])
        x = kv[pages[i]].reshape(-1, K2, H)[:kv_len]
        if scale is not None:
            x = x.astype(jnp.float32) * scale[pages[i]].reshape(-1, K2)[:kv_len, :, None]
        x = x.astype(q.dtype)
        k, v = x[None, :, 0::2], x[None, :, 1::2]
        q_pos = (kv_len - q_len + jnp.arange(q_len))[None]
        out = attention.attend(q[None, cu[i]:cu[i + 1]], k, v, q_pos=q_pos, k_pos=jnp.arange(kv_len)[None],
                               q_seg=jnp.ones_like(q_pos), k_seg=jnp.ones((1, kv_len), jnp.int32))
        outs.append(out[0])
    return np.asarray(jnp.concatenate(outs).astype(jnp.float32))


def check(out, q, kv, scale, meta, atol):
    """`out` against both oracles on the real tokens."""
    real = int(meta.cu_q_lens[int(meta.num_seqs[0])])
    got = np.asarray(out.astype(jnp.float32))[:real]
    np.testing.assert_allclose(got, dense_oracle(q, kv, scale, meta), atol=atol, rtol=0)
    ref = np.asarray(paged_attention.attend(q, kv, scale, meta, "xla").astype(jnp.float32))[:real]
    np.testing.assert_allclose(got, ref, atol=atol, rtol=0)


TOL = {"float32": 2e-5, "bfloat16": 3e-2, "int8": 3e-2}


@needs_kernels
@pytest.mark.parametrize("N,K,H", [(8, 2, 128), (4, 4, 64), (8, 1, 64)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_cpu_paged_kernel_matches_the_references(N, K, H, dtype):
    q, (kv, scale), meta = ragged_batch(0, N=N, K=K, H=H, dtype=jnp.float32 if dtype == "float32" else
                                        jnp.bfloat16 if dtype == "bfloat16" else "int8")
    out = jax.jit(cpu_kernels.paged_attention)(q, kv[0], None if scale is None else scale[0], meta)
    assert out.dtype == q.dtype and out.shape == q.shape
    check(out, q, kv[0], None if scale is None else scale[0], meta, TOL[dtype])
    T = q.shape[0]
    real = int(meta.cu_q_lens[int(meta.num_seqs[0])])
    assert real < T and not np.asarray(out[real:].astype(jnp.float32)).any()  # padding tokens: zeros


@needs_kernels
@pytest.mark.parametrize("N,K,H", [(16, 4, 64), (8, 2, 128), (4, 4, 64)])
def test_cpu_paged_kernel_bf16_blocks_of_16(N, K, H):
    """The engine's block size: full blocks take the bfloat16 kernel's 16-key path (AVX512-BF16 CPUs), the
    last partial block and odd key counts its tail; a prompt chunk's tokens see different key counts."""
    q, (kv, _), meta = ragged_batch(4, N=N, K=K, H=H, dtype=jnp.bfloat16, block_size=16,
                                    seqs=[(1, 37), (1, 16), (9, 40), (1, 3), (1, 64)])
    out = jax.jit(cpu_kernels.paged_attention)(q, kv[0], None, meta)
    check(out, q, kv[0], None, meta, TOL["bfloat16"])


@needs_kernels
@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_cpu_paged_kernel_reads_the_layer_of_a_stacked_pool(dtype):
    """The whole pool [L, ...] with a (traced) layer index: the layer's blocks, no copy of the layer."""
    q, (kv, scale), meta = ragged_batch(1, N=8, K=2, H=64, dtype=jnp.bfloat16 if dtype == "bfloat16" else "int8",
                                        layers=3, seqs=[(1, 9), (3, 12)])
    bits = kv if dtype == "int8" else jax.lax.bitcast_convert_type(kv, jnp.uint16)  # the pool's storage
    out = jax.jit(cpu_kernels.paged_attention)(q, bits, scale, meta, jnp.int32(2))
    check(out, q, kv[2], None if scale is None else scale[2], meta, TOL[dtype])


@needs_kernels
def test_cpu_paged_kernel_long_prompt_runs_threaded():
    """Enough work to go multi-threaded: a 300-token chunk after 200 cached keys, and decode rows."""
    q, (kv, _), meta = ragged_batch(2, N=8, K=2, H=128, dtype=jnp.float32, block_size=16,
                                    seqs=[(1, 500), (300, 500), (1, 64)])
    out = jax.jit(cpu_kernels.paged_attention)(q, kv[0], None, meta)
    check(out, q, kv[0], None, meta, TOL["float32"])


@needs_kernels
def test_cpu_paged_kernel_rejects_a_page_outside_the_pool():
    q, (kv, _), meta = ragged_batch(3, N=4, K=2, H=64, dtype=jnp.float32, seqs=[(1, 9)])
    meta = dataclasses.replace(meta, page_indices=meta.page_indices.at[0, 1].set(kv.shape[1]))
    with pytest.raises(Exception, match="page index out of range"):
        jax.block_until_ready(cpu_kernels.paged_attention(q, kv[0], None, meta))


@pytest.mark.parametrize("N,K,dtype,seqs", [(8, 2, jnp.bfloat16, [(1, 37), (1, 5), (6, 6), (5, 21)]),
                                             (4, 2, jnp.float32, [(1, 19), (3, 11)])])
def test_pallas_ragged_kernel_in_interpret_mode_matches_the_references(N, K, dtype, seqs):
    """JAX's TPU ragged paged attention kernel, interpreted on CPU; 2 pages per kernel block, so a
    sequence's keys span several blocks and several DMAs."""
    q, (kv, _), meta = ragged_batch(4, N=N, K=K, H=128, dtype=dtype, seqs=seqs)
    out = tpu_paged.attend(q, kv[0], None, meta, interpret=True, pages_per_block=2)
    assert out.dtype == q.dtype and out.shape == q.shape
    check(out, q, kv[0], None, meta, TOL[jnp.dtype(dtype).name])


@pytest.mark.parametrize("impl,dtype", [("xla", jnp.bfloat16), ("xla", "int8"), ("pallas", jnp.bfloat16)])
def test_layer_cache_reads_its_layer_of_the_stacked_pool(impl, dtype, monkeypatch):
    """kv_cache.LayerCache over a pool stored as on TPU and GPU (floats as they are; int8 with scales): the
    stacked pool is read as one run of pages, this layer's at page indices offset by layer x blocks. Equal
    to attending over that layer alone; the layer index is traced, as in the layer loop."""
    from model.network import kv_cache

    if impl == "pallas":  # the TPU kernel, interpreted
        monkeypatch.setattr(tpu_paged, "attend", functools.partial(tpu_paged.attend, interpret=True, pages_per_block=2))
    q, (kv, scale), meta = ragged_batch(5, N=8, K=2, H=128, dtype=dtype, layers=3, seqs=[(1, 9), (3, 12), (1, 30)])
    pool = kv_cache.KVPool(kv, scale, "int8" if scale is not None else "bfloat16")
    k, v = (jnp.asarray(np.random.default_rng(i).standard_normal((1, q.shape[0], 2, 128)), q.dtype) for i in (1, 2))

    @jax.jit
    def run(pool, layer):
        return kv_cache.LayerCache(pool, layer, meta, impl).attend(q[None], k, v)

    out, after = run(pool, jnp.int32(2))
    check(out[0], q, after.kv[2], None if scale is None else after.scale[2], meta, TOL[jnp.dtype(q.dtype).name])


def test_pallas_ragged_kernel_refuses_what_it_cannot_take():
    """int8 pools (per-token scales) and head dims that are not multiples of 128 (the kernel's lanes; its
    own assertion): a clear error, and `applies` says so first (head dim 64 runs on the CPU kernel and the
    XLA reference)."""
    assert tpu_paged.applies("bfloat16", 128) and tpu_paged.applies("float32", 256)
    assert not tpu_paged.applies("int8", 128) and not tpu_paged.applies("bfloat16", 64)
    q, (kv, scale), meta = ragged_batch(5, N=4, K=2, H=128, dtype="int8", seqs=[(1, 9)])
    with pytest.raises(ValueError, match="int8 pools"):
        tpu_paged.attend(q, kv[0], scale[0], meta, interpret=True)
    q, (kv, _), meta = ragged_batch(5, N=4, K=2, H=64, dtype=jnp.bfloat16, seqs=[(1, 9)])
    with pytest.raises(ValueError, match="head_dim 64"):
        tpu_paged.attend(q, kv[0], None, meta, interpret=True)


# ---------------------------------------------------------------------------------------------
# The serving step compiled ahead of time for TPU (libtpu; no TPU needed)

INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = ([a-z0-9]+)\[([0-9,]*)\]\{[^}]*\} ([a-z\-]+)\(")
BITS = {"s4": 4, "u4": 4, "s8": 8, "u8": 8, "pred": 8, "bf16": 16, "f16": 16, "u16": 16, "s16": 16}


def whole_weight_copies(hlo: str, min_bytes: int = 16 << 20):
    """Buffers of the compiled program's entry computation (what its buffer assignment allocates: arguments
    and temporaries; a fusion's insides never materialise) that are not weight parameters but hold as many
    elements as one: [(instruction, dtype, opcode, [(weight, its dtype)])]. A dequantized weight (or any
    converted whole copy) shows up here; per-chunk dequantization inside a fusion does not."""
    entry = hlo[hlo.index("\nENTRY"):]
    weights, others = {}, []
    for line in entry.splitlines():
        m = INSTRUCTION.match(line)
        if not m:
            continue
        name, dtype, dims, op = m.groups()
        if "S(1)" in line.split("=", 1)[1].split(" ", 2)[1]:
            continue  # memory space 1, on-chip VMEM: a prefetch of a weight (copy-start/copy-done), not an HBM buffer
        n = int(np.prod([int(d) for d in dims.split(",") if d]))
        w = re.search(r"op_name=\"weights\[0\](\S*?)\.value", line)
        if op == "parameter" and w:
            weights.setdefault(n, []).append((re.sub(r"[\[\]\\']+", "/", w.group(1)).strip("/"), dtype))
        elif op not in ("parameter", "get-tuple-element", "bitcast", "tuple") and n * BITS.get(dtype, 32) // 8 >= min_bytes:
            others.append((name, dtype, n, op))
    return [(name, dtype, op, weights[n]) for name, dtype, n, op in others if n in weights]


def decode_step_hlo(preset: str, layers: int, **shape) -> str:
    """The engine's decode step (16 sequences, one token each) of an int4 model of `preset`'s width with
    `layers` layers, tensor-parallel over a v6e-8, compiled ahead of time: its optimized HLO text."""
    try:
        devices = topology.parse("v6e-8").devices()
    except ImportError as e:
        pytest.skip(f"libtpu is not installed: {e}")
    mcfg = resolve.model_config(resolve.ModelSpec(preset=preset, quant="int4"), remat="none", lora=None,
                                num_layers=layers)
    lowered = lower_step(mcfg, make_mesh("tensor=8", devices), tokens=16, seqs=16, kv_dtype="auto", **shape)
    return aot_compile.compile(lowered, devices).as_text()


@pytest.fixture(scope="module")
def decode_405b_v6e():
    """One layer at 405B width."""
    return decode_step_hlo("llama3.1-405b", 1, max_len=512, kv_tokens=16 * 512)


def test_405b_width_decode_step_runs_the_pallas_kernel_and_keeps_int4_weights_packed(decode_405b_v6e):
    """Issue 12: the TPU step's attention is JAX's ragged paged attention kernel. Issue 17: no
    temporary holds a dequantized (or otherwise converted) copy of a whole int4 weight shard."""
    assert "ragged_paged_attention" in decode_405b_v6e
    copies = whole_weight_copies(decode_405b_v6e)
    quantized = [c for c in copies if any(dtype == "s4" for _, dtype in c[3])]
    assert not quantized, f"whole copies of int4 weights in the decode step: {quantized}"


def test_405b_width_decode_step_copies_no_whole_weight(decode_405b_v6e):
    """No temporary is a whole copy of any weight shard. The embedding rows were gathered through a uint16
    bitcast, for XLA:CPU; on TPU that bitcast-convert copied the whole table shard (0.49 GiB per chip at
    405B on v6e-8); bits are now for CPU only (kv_cache.as_bits; mutant embedding_gathered_as_bits_on_tpu)."""
    assert whole_weight_copies(decode_405b_v6e) == []


def materialized(hlo: str, elements: int) -> list[str]:
    """Instructions of a compiled program that allocate a buffer of `elements` elements: in every computation
    but the insides of fusions (which never materialise); parameters, tuples and bitcasts allocate nothing."""
    fused = set(re.findall(r" fusion\(.*?calls=%([\w.\-]+)", hlo))
    found, inside_fusion = [], False
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%([\w.\-]+) ", line)
        if head and line.rstrip().endswith("{"):
            inside_fusion = head.group(1) in fused
            continue
        m = INSTRUCTION.match(line)
        if inside_fusion or not m:
            continue
        name, dtype, dims, op = m.groups()
        if int(np.prod([int(d) for d in dims.split(",") if d])) == elements and op not in (
                "parameter", "get-tuple-element", "bitcast", "tuple"):
            found.append(f"{name} = {dtype}[{dims}] {op}")
    return found


def test_405b_width_decode_step_gathers_no_weight(decode_405b_v6e):
    """Tensor parallelism keeps every weight shard on its chip: no all-gather of integer weights (or their
    scales' groups) anywhere in the step, the layer loop included. The int4 row loop's view of the 405B
    down projection ([A, steps, 128] rows with A = 52 over 8 chips) made the partitioner all-gather half
    of it from a neighbour in every layer of every step."""
    gathers = [line.strip()[:160] for line in decode_405b_v6e.splitlines()
               if re.search(r"= \(?[su][48]\[[^=]*all-gather(-start)?\(", line)]
    assert gathers == []


@pytest.fixture(scope="module")
def step_two_layers_v6e():
    """Two layers at 8B width, with a pool of 1,025 blocks of 256 tokens (more than a chip's on-chip memory)."""
    return decode_step_hlo("llama3.1-8b", 2, max_len=4096, kv_tokens=1024 * 256, block_size=256)


def test_tpu_step_reads_the_pool_in_place(step_two_layers_v6e):
    """Issue 12: on TPU the kernel reads the stacked pool as one run of pages (this layer's at page indices
    offset by layer x blocks), stored as bfloat16. Slicing a layer out in the layer loop, or converting
    stored bits to bfloat16, materialises a copy of that layer's pool (per chip: 1,025 blocks x 256 tokens x
    one KV head's key and value x 128) every layer of every step."""
    hlo = step_two_layers_v6e
    one_layer = 1025 * 256 * 2 * 128
    assert "ragged_paged_attention" in hlo
    assert materialized(hlo, one_layer) == []
    assert "bf16[2,1025,256,2,128]" in hlo and "u16[2,1025,256,2,128]" not in hlo
