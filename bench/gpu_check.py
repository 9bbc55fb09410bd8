"""One-shot GPU check (run on an NVIDIA machine): cuDNN flash attention against the XLA reference,
Llama 3.1 8B LoRA training step throughput/MFU, and batch-1 decode speed of 8B in bf16/int8/int4.

    PYTHONPATH=. python bench/gpu_check.py [--skip-train] [--skip-decode]

Prints one JSON line per measurement. Weights are random (seeded); shapes are the real 8B ones.
"""

import argparse
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo, before bench/

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import model  # noqa: E402
from model.network.attention import cudnn_attention, xla_attention  # noqa: E402
from model.network.lora import LoraConfig  # noqa: E402
from serve.config import EngineConfig, ModelSpec  # noqa: E402
from serve.engine import Engine  # noqa: E402
from serve.sampling import SamplingParams  # noqa: E402
from serve.weights import build  # noqa: E402
from sharding import topology  # noqa: E402
from sharding.mesh import single_device_mesh  # noqa: E402
from train.program import StepShape, TrainProgram  # noqa: E402


def emit(**kw):
    print(json.dumps(kw), flush=True)


def timed(f, *args, n=10):
    jax.block_until_ready(f(*args))
    t0 = time.perf_counter()
    for _ in range(n):
        out = f(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / n


def attention_check():
    rng = np.random.default_rng(0)
    B, T, N, K, H = 2, 4096, 32, 8, 128
    q = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.bfloat16)
    k = jnp.asarray(rng.normal(size=(B, T, K, H)), jnp.bfloat16)
    v = jnp.asarray(rng.normal(size=(B, T, K, H)), jnp.bfloat16)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    seg = jnp.ones((B, T), jnp.int32)
    ref_f = jax.jit(lambda q, k, v: xla_attention(q, k, v, pos, pos, seg, seg))
    cud_f = jax.jit(cudnn_attention)
    ref, out = ref_f(q, k, v).astype(jnp.float32), cud_f(q, k, v).astype(jnp.float32)
    hlo = cud_f.lower(q, k, v).compile().as_text()
    emit(check="attention_cudnn_vs_xla", shape=[B, T, N, K, H], max_abs_diff=float(jnp.abs(out - ref).max()),
         max_abs_ref=float(jnp.abs(ref).max()), cudnn_in_hlo="cudnn" in hlo.lower(),
         xla_ms=round(1e3 * timed(ref_f, q, k, v), 3), cudnn_ms=round(1e3 * timed(cud_f, q, k, v), 3))


def model_attention_check(preset):
    cfg = model.LlamaConfig.preset(preset, num_layers=2, vocab_size=32768, param_dtype="bfloat16",
                                   compute_dtype="bfloat16")
    toks = np.random.default_rng(1).integers(0, 32768, size=(2, 1024), dtype=np.int32)
    outs = {}
    for impl in ("xla", "cudnn"):
        m = model.init(cfg.replace(attention=impl), seed=0)
        outs[impl] = np.asarray(m(toks))
    d = np.abs(outs["xla"] - outs["cudnn"]).max()
    emit(check="model_logits_cudnn_vs_xla", layers=2, dtype="bfloat16", max_abs_diff=float(d),
         max_abs_logit=float(np.abs(outs["xla"]).max()),
         top1_agreement=float((outs["xla"].argmax(-1) == outs["cudnn"].argmax(-1)).mean()))


def decode_check(preset):
    for quant in (None, "int8", "int4"):
        t0 = time.perf_counter()
        spec = ModelSpec(preset=preset, dtype="bfloat16", quant=quant, tokenizer="bytes")
        m, tok, _ = build(spec, single_device_mesh())
        eng = Engine(m, tok, EngineConfig(max_slots=1, max_len=512, prefill_chunk=128, prefill_tokens=128))
        prompt = list(np.random.default_rng(2).integers(0, 256, size=128))
        params = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
        eng.generate([prompt], params)  # compile
        t1 = time.perf_counter()
        out = eng.generate([prompt], params)
        dt = time.perf_counter() - t1
        n = len(out[0]["token_ids"])
        wbytes = sum(x.nbytes for x in jax.tree.leaves(m.state)) - m.config.vocab_size * m.config.dim * 2
        emit(check="decode_8b_batch1", quant=quant or "bf16", tokens=n, tokens_per_s=round(n / dt, 1),
             weight_gb=round(wbytes / 1e9, 2), achieved_gb_s=round(wbytes * n / dt / 1e9, 1),
             setup_s=round(t1 - t0, 1))
        del eng, m


def train_check(preset, T, remat):
    B = 1
    cfg = model.LlamaConfig.preset(preset, remat=remat, lora=LoraConfig(rank=16, alpha=32))
    mesh = single_device_mesh()
    m = model.init(cfg, mesh=mesh)
    program = TrainProgram.build(cfg, m.graphdef, m.state, mesh, StepShape(B, T))
    trainable, frozen = program.split(m.state)
    state, step = program.init_state(trainable), program.step
    toks = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T + 1), dtype=np.int32)
    batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:], "weights": np.ones((B, T), np.float32),
             "segments": np.ones((B, T), np.int32), "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))}
    t0 = time.perf_counter()
    state, mtr = step(state, frozen, batch)
    jax.block_until_ready(mtr)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        state, mtr = step(state, frozen, batch)
        jax.block_until_ready(mtr)
        times.append(time.perf_counter() - t0)
    dt = float(np.median(times))
    kind = jax.devices()[0].device_kind
    peak = topology.peak_flops(kind)  # the one table (sharding/topology.py), by device_kind
    flops = cfg.train_flops_per_token(T, lora_only=True) * B * T
    stats = jax.devices()[0].memory_stats() or {}
    emit(check="lora_train_8b", device=kind, batch=B, seq=T, remat=remat, step_s=round(dt, 3),
         tokens_per_s=round(B * T / dt, 1), mfu=round(flops / dt / peak, 3) if peak else None,
         compile_s=round(compile_s, 1), loss=float(mtr["loss"]),
         peak_gb=round(stats.get("peak_bytes_in_use", 0) / 1e9, 2))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--preset", default="llama3.1-8b")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--remat", nargs="+", default=["full", "dots", "none"])
    ap.add_argument("--skip-attention", action="store_true")
    args = ap.parse_args()
    emit(devices=[d.device_kind for d in jax.devices()], jax=jax.__version__)
    checks = [] if args.skip_attention else [attention_check, lambda: model_attention_check(args.preset)]
    checks += [] if args.skip_decode else [lambda: decode_check(args.preset)]
    checks += [] if args.skip_train else [lambda r=r: train_check(args.preset, args.seq, r) for r in args.remat]
    for check in checks:
        try:
            check()
        except Exception as e:  # report and go on: one broken check must not hide the others
            emit(check=check.__name__, error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-1500:])
