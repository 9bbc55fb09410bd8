"""Attention over the paged KV cache on TPU: the ragged paged attention Pallas kernel that ships with JAX
(`jax.experimental.pallas.ops.tpu.ragged_paged_attention`), behind model/network/paged_attention.py's
interface: `attend(q [T, N, H], kv [num_blocks, block_size, 2K, H], None, meta)` -> [T, N, H].

The pool's layout is the kernel's (key head i at combined head 2i, value head i at 2i + 1) and so is the
step's metadata, so nothing is converted. Float pools only (the kernel takes one scalar scale per cache,
not the int8 pool's per-token scales) and head sizes that are multiples of 128 (`applies`). On a mesh
(the one `sharding.rules.use_mesh` made active) the kernel runs per device under `shard_map`: queries
split over their heads and the pool over its combined heads as SERVE_RULES split them (one KV head's
queries and its key/value pair stay together), the metadata replicated; no device reads another's heads.
Block sizes come from JAX's tuned table for the mesh's chip (`tuned_block_sizes`), also when compiling
ahead of time on a machine without a TPU.

`interpret=True` runs the same kernel on CPU in Pallas' TPU interpret mode (tests). JAX 0.10.2's
interpreter cannot read a reshaped or bitcast ref, which this kernel does: `_teach_interpreter` resolves
such reads in NumPy (the TPU semantics of `state.utils.bitcast`: rows packed along the second-minor
axis). It also marks valid masked stores out of bounds when a stored block has fewer heads than query
rows, so interpret mode uses query blocks no longer than a KV head's query heads.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpreter
from jax._src.state import indexing
from jax._src.state import types as state_types
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu.ragged_paged_attention import kernel as rpa_kernel
from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ragged_paged_attention
from jax.experimental.pallas.ops.tpu.ragged_paged_attention import tuned_block_sizes as rpa_tuned
from jax.sharding import PartitionSpec as P

from sharding.rules import SERVE_RULES, active_mesh, logical_to_spec

DTYPES = ("bfloat16", "float32")


def applies(kv_dtype: str, head_dim: int) -> bool:
    """Pools (`KVPool.dtype`) and head sizes the kernel takes (its lanes: a multiple of 128)."""
    return kv_dtype in DTYPES and head_dim % 128 == 0


def attend(q_TNH, kv, scale, meta, *, interpret: bool = False, pages_per_block: int | None = None,
           queries_per_block: int | None = None):
    """The kernel over one layer of the pool (see the module docstring); block sizes default to JAX's
    tuned ones on TPU. Tokens past cu_q_lens[num_seqs] are padding: their output is undefined."""
    if scale is not None:
        raise ValueError("tpu paged attention: int8 pools (per-token scales) are not supported by the Pallas "
                         "kernel; use the xla implementation")
    if kv.dtype not in (jnp.bfloat16, jnp.float32):
        raise ValueError(f"tpu paged attention: pool dtype {kv.dtype}: expected bfloat16 or float32")
    H = q_TNH.shape[-1]
    if H % 128:
        raise ValueError(f"tpu paged attention: head_dim {H}: the Pallas kernel takes multiples of 128; use the "
                         "xla implementation")
    mesh = active_mesh()
    kind = (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]).device_kind
    fn = functools.partial(_kernel, sm_scale=H ** -0.5, interpret=interpret,
                           blocks=(pages_per_block, queries_per_block), device_kind=kind)
    args = (q_TNH, kv, meta.kv_lens, meta.page_indices, meta.cu_q_lens, meta.num_seqs)
    if mesh is None or mesh.size == 1:
        return fn(*args)
    q_spec = logical_to_spec((None, "heads", "head_dim"), mesh, q_TNH.shape, SERVE_RULES, "queries", strict=False)
    kv_spec = logical_to_spec((None, None, "kv_heads", "head_dim"), mesh, kv.shape, SERVE_RULES, "kv pool",
                              strict=False)
    if q_spec[1] != kv_spec[2]:
        raise ValueError(f"tpu paged attention: queries split {q_spec} but the pool {kv_spec}; the heads of a KV "
                         f"head must live on its device")
    rep = P()
    return jax.shard_map(fn, mesh=mesh, in_specs=(q_spec, kv_spec, rep, rep, rep, rep), out_specs=q_spec,
                         check_vma=False)(*args)


def tuned_block_sizes(q, kv, pages_per_seq: int, device_kind: str) -> tuple[int, int]:
    """(pages, queries) per kernel block from JAX's tuned table for the chip `device_kind` names (JAX's own
    lookup asks jax.devices(), which is this machine's CPU when compiling ahead of time for a TPU)."""
    q_heads, kv_heads2 = rpa_kernel.get_min_heads_per_blk(q.shape[1], kv.shape[2], q.dtype, kv.dtype)
    key = rpa_tuned.simplify_key((q.dtype, kv.dtype, q_heads, kv_heads2 // 2, q.shape[2], kv.shape[1], q.shape[0],
                                  pages_per_seq))
    name = " ".join(device_kind.split()[:2])
    default = (32, 32) if name == "TPU v4" else (128, 32)
    pages, queries = rpa_tuned.TUNED_BLOCK_SIZES.get(name, {}).get(key, default)
    return min(pages_per_seq, pages), min(q.shape[0], queries)


def _kernel(q, kv, kv_lens, page_indices, cu_q_lens, num_seqs, *, sm_scale, interpret, blocks, device_kind):
    pages_per_block, queries_per_block = blocks
    kw = dict(sm_scale=sm_scale, num_kv_pages_per_block=pages_per_block, num_queries_per_block=queries_per_block)
    if not interpret:
        if pages_per_block is None or queries_per_block is None:
            tuned = tuned_block_sizes(q, kv, page_indices.shape[1], device_kind)
            kw["num_kv_pages_per_block"] = pages_per_block or tuned[0]
            kw["num_queries_per_block"] = queries_per_block or tuned[1]
        return ragged_paged_attention(q, kv, kv_lens, page_indices, cu_q_lens, num_seqs, **kw)
    G = q.shape[1] // (kv.shape[2] // 2)
    kw["num_kv_pages_per_block"] = pages_per_block or min(page_indices.shape[1], 4)
    kw["num_queries_per_block"] = min(queries_per_block or G, G, max(128 // G, 1))
    _teach_interpreter()
    with pltpu.force_tpu_interpret_mode():
        return ragged_paged_attention(q, kv, kv_lens, page_indices, cu_q_lens, num_seqs, **kw)


# ---------------------------------------------------------------------------------------------
# Interpret mode on CPU (tests): reads through reshaped and bitcast refs (see the module docstring)

def _apply(transform, a: np.ndarray) -> np.ndarray:
    if isinstance(transform, indexing.NDIndexer):
        return a[tuple(i if isinstance(i, (int, np.integer)) else slice(i.start, i.start + i.size * i.stride, i.stride)
                       for i in jax.tree.map(int, transform).indices)]
    if isinstance(transform, state_types.ReshapeTransform):
        return a.reshape(transform.shape)
    if isinstance(transform, state_types.BitcastTransform):
        to = np.dtype(transform.dtype)
        r = to.itemsize // a.dtype.itemsize
        if r < 1 or to.itemsize % a.dtype.itemsize:
            raise NotImplementedError(f"interpret mode: bitcast {a.dtype} -> {to}")
        a = a.reshape(*a.shape[:-2], a.shape[-2] // r, r, a.shape[-1]).swapaxes(-1, -2)
        return np.ascontiguousarray(a).view(to)[..., 0]
    raise NotImplementedError(f"interpret mode: ref transform {type(transform).__name__}")


def _teach_interpreter() -> None:
    ipc = tpu_interpreter
    if getattr(ipc.get, "_llama_jax", False):
        return
    original = ipc.get

    def get(token, device_id, local_core_id, memory_space, buffer_id, transforms, *args, **kwargs):
        ts = tuple(transforms)
        n = next((i for i, t in enumerate(ts) if not isinstance(t, indexing.NDIndexer)), len(ts))
        if n == len(ts):
            return original(token, device_id, local_core_id, memory_space, buffer_id, transforms, *args, **kwargs)
        token, a = original(token, device_id, local_core_id, memory_space, buffer_id, ts[:n], *args, **kwargs)
        a = np.asarray(a)
        for t in ts[n:]:
            a = _apply(t, a)
        return token, a

    get.__wrapped__ = original.__wrapped__  # the interpreter's DMAs call the undecorated reader
    get._llama_jax = True
    ipc.get = get
