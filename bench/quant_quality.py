"""Quality of weight-only quantization: bf16 against int8 and int4.

    python bench/quant_quality.py [--train-steps 500] [--train-seconds S] [--skip-random] [--skip-trained]

1. Random-weight models (the `toy` shape and a wider one): KL(bf16 ‖ quantized) of the next-token
   distributions and top-1 agreement, on random tokens.
2. A real signal: a small Llama (byte-level tokenizer, model/tokenizer.py ByteTokenizer) trained here
   on CPU (500 steps of 8 x 256 bytes; 13 minutes on the shared 2-core development VM under a load
   of ~7, a few minutes on a quiet one) on the Python standard library's source files (every machine
   has them),
   then perplexity on held-out stdlib files (one file in ten, by a hash of its name) in bf16, int8,
   int4 (group 128) and int4 with smaller groups; and for bf16, int8 and int4-g128 also through the CPU
   serving path ("cpu-serving": model/cpu_gemv.cc, whose integer kernels quantize activations to int8).
Prints one JSON line per measurement. Everything runs on the host CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
import time
import zlib
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import model  # noqa: E402
from model import LlamaConfig  # noqa: E402
from model.formats.tokenizer import ByteTokenizer  # noqa: E402
from model.network import model as model_weights
from model.network.backends import cpu_kernels  # noqa: E402
from model.network.quant import QuantConfig  # noqa: E402

QUANTS = {
    "int8": QuantConfig(bits=8),
    "int4-g128": QuantConfig(bits=4, group_size=128),
    "int4-g64": QuantConfig(bits=4, group_size=64),
    "int4-g32": QuantConfig(bits=4, group_size=32),
    "int4-g128-f32scale": QuantConfig(bits=4, group_size=128, scale_dtype="float32"),
    "int4-per-channel": QuantConfig(bits=4, group_size=0),
}


def emit(**kw):
    print(json.dumps(kw), flush=True)


def cast_state(state, dtype):
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, state)


def forward_fn(graphdef):
    return jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))


def serving_forward(graphdef, state, cfg):
    """forward(state, tokens) through the CPU serving path instead (serve/engine.py on one CPU device):
    per-layer weights packed for model/cpu_gemv.cc, whose integer kernels quantize activations to int8,
    and attention by model/cpu_attention.cc over a KV cache."""
    from model.network import kv_cache, paged_attention
    from model.network.paged_attention import PagedMeta
    from serve.layout import pack_for_cpu, unstack

    weights = pack_for_cpu(graphdef, *unstack(state))
    kv_dtype = kv_cache.resolve_dtype("auto", cfg)

    @jax.jit
    def fwd(weights, tokens):
        rest, layers = weights
        B, T = tokens.shape  # B sequences of T tokens in one flattened step; sequence b in block b + 1 (of T)
        cache = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), kv_cache.abstract(cfg, B + 1, T, kv_dtype))
        module = nnx.merge(graphdef, nnx.State({**rest, "layers": layers[0]}))
        rows = jnp.arange(B, dtype=jnp.int32)
        meta = PagedMeta(((rows[:, None] + 1) * T + jnp.arange(T, dtype=jnp.int32)).reshape(-1),
                         jnp.full((B,), T, jnp.int32), (rows + 1)[:, None], jnp.arange(B + 1, dtype=jnp.int32) * T,
                         jnp.array([B], jnp.int32))
        update = kv_cache.CacheUpdate(cache, meta, paged_attention.choose(None, kv_dtype, cfg.head_dim, True), layers)
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)).reshape(1, -1)
        logits, _ = module(tokens.reshape(1, -1), positions, cache=update)
        return logits.reshape(B, T, -1).astype(jnp.float32)

    return lambda _, tokens: fwd(weights, tokens)


# ----------------------------------------------------------------------------------------------
# 1. random-weight models

def kl_top1(ref_logits, logits):
    lp, lq = jax.nn.log_softmax(ref_logits, -1), jax.nn.log_softmax(logits, -1)
    kl = jnp.mean(jnp.sum(jnp.exp(lp) * (lp - lq), -1))
    return float(kl), float(jnp.mean(ref_logits.argmax(-1) == logits.argmax(-1)))


def random_models():
    shapes = {
        "toy": LlamaConfig.preset("toy"),
        "wide": LlamaConfig.preset("toy", dim=512, mlp_dim=1536, num_layers=4, num_heads=8, num_kv_heads=4,
                                   head_dim=64),
    }
    for name, cfg in shapes.items():
        cfg = cfg.replace(param_dtype="bfloat16", compute_dtype="bfloat16")
        base = model.init(cfg, seed=0)
        tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (8, 128), dtype=np.int32)
        ref = base(tokens)
        for qname, qc in QUANTS.items():
            qcfg, qstate = model_weights.quantize_state(base.state, cfg, qc)
            graphdef, _ = model.abstract_model(qcfg)
            kl, top1 = kl_top1(ref, forward_fn(graphdef)(qstate, tokens))
            emit(bench="quant_quality", part="random_weights", model=name, dim=cfg.dim, layers=cfg.num_layers,
                 quant=qname, baseline="bf16", kl=kl, top1_agreement=top1, tokens=int(tokens.size))


# ----------------------------------------------------------------------------------------------
# 2. a small Llama trained on the standard library's source

def stdlib_corpus(max_bytes: int):
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts)
    train, held = [], []
    for p in files:
        rel = str(p.relative_to(root))
        (held if zlib.crc32(rel.encode()) % 10 == 0 else train).append(p)

    def read(paths):
        out, n = [], 0
        for p in paths:
            b = p.read_bytes()
            out.append(b)
            n += len(b)
            if n >= max_bytes:
                break
        return b"\n".join(out)

    return root, read(train), read(held), len(train), len(held)


def train_small_llama(cfg, data: np.ndarray, steps: int, seconds: float, batch: int, seq: int, seed: int = 0):
    m = model.init(cfg, seed=seed)
    graphdef, state = m.graphdef, m.state
    sched = optax.warmup_cosine_decay_schedule(0.0, 3e-3, min(50, steps // 10), steps, 3e-4)
    opt = optax.adamw(sched, b1=0.9, b2=0.95, weight_decay=0.1)
    opt_state = opt.init(state)

    def loss_fn(state, tokens):
        logits = nnx.merge(graphdef, state)(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    @jax.jit
    def step(state, opt_state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(state, tokens)
        updates, opt_state = opt.update(grads, opt_state, state)
        return optax.apply_updates(state, updates), opt_state, loss

    rng = np.random.default_rng(seed)

    def batch_of_windows():
        starts = rng.integers(0, len(data) - seq - 1, batch)
        return np.stack([data[s:s + seq + 1] for s in starts]).astype(np.int32)

    step = step.lower(state, opt_state, batch_of_windows()).compile()  # compile outside the timed loop
    t0, n = time.perf_counter(), 0
    while n < steps and time.perf_counter() - t0 < seconds:
        state, opt_state, loss = step(state, opt_state, batch_of_windows())
        loss.block_until_ready()  # so that the clock measures finished steps, not dispatched ones
        n += 1
        if n % 50 == 0:
            emit(bench="quant_quality", part="training_progress", step=n, loss=float(loss),
                 seconds=round(time.perf_counter() - t0, 1))
    return graphdef, state, n, time.perf_counter() - t0, float(loss)


def eval_windows(data: np.ndarray, n: int, seq: int) -> np.ndarray:
    stride = max((len(data) - seq - 1) // n, seq + 1)
    return np.stack([data[i * stride:i * stride + seq + 1] for i in range(n)]).astype(np.int32)


def perplexity(forward, state, windows, batch=16) -> float:
    nll, count = 0.0, 0
    for i in range(0, len(windows), batch):
        w = windows[i:i + batch]
        logits = forward(state, w[:, :-1])
        lp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        nll += float(-jnp.take_along_axis(lp, w[:, 1:, None], -1).sum())
        count += w[:, 1:].size
    return float(np.exp(nll / count))


def trained_model(steps: int, seconds: float, skip_serving: bool = False):
    tok = ByteTokenizer()
    root, train_bytes, held_bytes, n_train, n_held = stdlib_corpus(max_bytes=30_000_000)
    train_ids = np.frombuffer(train_bytes, np.uint8)  # ByteTokenizer: token id = byte value
    held_ids = np.frombuffer(held_bytes, np.uint8)
    assert tok.encode("def f():") == list(b"def f():")
    cfg = LlamaConfig.preset("toy", dim=256, mlp_dim=768, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64,
                             vocab_size=tok.vocab_size, param_dtype="float32", compute_dtype="float32",
                             remat="none")
    batch, seq = 8, 256
    graphdef, state, steps, secs, last_loss = train_small_llama(cfg, train_ids, steps, seconds, batch, seq)
    emit(bench="quant_quality", part="training", corpus=str(root), train_files=n_train, heldout_files=n_held,
         train_bytes=len(train_ids), heldout_bytes=len(held_ids), params=cfg.num_params(), dim=cfg.dim,
         layers=cfg.num_layers, mlp=cfg.mlp_dim, tokenizer="bytes", batch=batch, seq=seq, steps=steps,
         seconds=round(secs, 1), final_train_loss=last_loss)

    windows = eval_windows(held_ids, 64, 512)
    results = {}
    f32 = forward_fn(graphdef)
    results["fp32"] = perplexity(f32, state, windows)
    bcfg = cfg.replace(param_dtype="bfloat16", compute_dtype="bfloat16")
    bgraph, _ = model.abstract_model(bcfg)
    bstate = cast_state(state, jnp.bfloat16)
    results["bf16"] = perplexity(forward_fn(bgraph), bstate, windows)
    serving = cpu_kernels.available() and not skip_serving
    if serving:
        results["bf16 cpu-serving"] = perplexity(serving_forward(bgraph, bstate, bcfg), None, windows)
    for qname, qc in QUANTS.items():
        # quantized from the bf16 weights (as a bf16 checkpoint would be), computed in bf16
        qcfg, qstate = model_weights.quantize_state(bstate, bcfg, qc)
        qgraph, _ = model.abstract_model(qcfg)
        results[qname] = perplexity(forward_fn(qgraph), qstate, windows)
        if serving and qname in ("int8", "int4-g128"):  # the CPU kernels' formats (int8 activations)
            results[f"{qname} cpu-serving"] = perplexity(serving_forward(qgraph, qstate, qcfg), None, windows)
    for name, ppl in results.items():
        emit(bench="quant_quality", part="trained_perplexity", model="stdlib-bytes-4L-256d", quant=name,
             heldout_tokens=int(windows[:, 1:].size), perplexity=ppl,
             increase_vs_bf16=ppl / results["bf16"] - 1.0)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-steps", type=int, default=500)
    p.add_argument("--train-seconds", type=float, default=float("inf"), help="stop training earlier")
    p.add_argument("--skip-random", action="store_true")
    p.add_argument("--skip-trained", action="store_true")
    a = p.parse_args()
    emit(bench="quant_quality", part="machine", cpus=os.cpu_count(), backend=jax.default_backend(),
         jax=jax.__version__)
    if not a.skip_random:
        random_models()
    if not a.skip_trained:
        trained_model(a.train_steps, a.train_seconds)


if __name__ == "__main__":
    main()
