"""Serving benchmark on this machine: the engine (serve/engine.py) beside transformers' generate, same
weights, same CPU, same invocation. Prints one JSON line per measurement.

    python bench/serve.py                       # bench shape of shared/reference/anchors.md, bf16 int8 int4
    python bench/serve.py --formats f32 bf16 --new-tokens 64
    python bench/serve.py --preset llama3.1-8b --layouts scan unrolled   # ours only, random weights, on
                                                                         # this machine's first device (GPU)

Measured:
  - memory copy bandwidth (numpy copy of a large array; bytes read + written), before and after our
    runs, the higher of the two used;
  - batch-1 greedy decode tokens/s (128-token prompt), ours per weight format and the peer's per dtype;
  - roofline: copy bandwidth / weight bytes read per token (every weight but the embedding table,
    int4 packed, scales included), and our fraction of it;
  - aggregate tokens/s with 16 concurrent requests, and time to first token (batch 1 and under load);
  - --paged: steady decode at 16 and 64 requests, prefill rate, a long prompt's interruption, shared-prefix
    TTFT; and capacity: the most requests running at once in a pool of a fixed-slot engine's bytes (8 slots
    x 2,048 tokens), measured at 1:1 and 1:3 mixes of 1,500- and 64-token prompts, and the block arithmetic;
  - several LoRA adapters (--lora): 16 concurrent requests spread over 8 adapters vs the same load on one
    adapter (same engine, adapter slots of serve/adapters.py), and batch-1 decode with an adapter vs an
    engine without adapter slots (targets: >= 70% and within 15%).
Weights are random (seeded), written once as an HF safetensors directory that both sides load.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

SHAPE = dict(vocab=32768, dim=1024, layers=8, heads=16, kv_heads=4, ffn=3584, head_dim=64)


def emit(**kw):
    print(json.dumps(kw), flush=True)


def copy_bandwidth(nbytes: int = 512 << 20, repeats: int = 5) -> float:
    """Bytes read + written per second by a numpy copy (best of `repeats`)."""
    a = np.ones(nbytes // 4, np.float32)
    b = np.empty_like(a)
    np.copyto(b, a)
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(b, a)
        best = max(best, 2 * a.nbytes / (time.perf_counter() - t))
    return best


def make_checkpoint(path: Path, seed: int = 0):
    import torch
    import transformers

    torch.manual_seed(seed)
    s = SHAPE
    cfg = transformers.LlamaConfig(vocab_size=s["vocab"], hidden_size=s["dim"], intermediate_size=s["ffn"],
                                   num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                                   num_key_value_heads=s["kv_heads"], head_dim=s["head_dim"],
                                   max_position_embeddings=4096, rope_theta=500000.0, tie_word_embeddings=False)
    m = transformers.LlamaForCausalLM(cfg).eval()
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = 0
    m.save_pretrained(path)
    return m


def peer_decode(m, dtype: str, prompt: np.ndarray, new_tokens: int, repeats: int) -> dict:
    """transformers generate, greedy, batch 1: decode tokens/s excluding the first token, and TTFT. Best
    over repeats and over torch thread counts (all cores, and 1: on a busy machine one can be faster)."""
    import torch

    mm = m.to(getattr(torch, dtype))
    ids = torch.tensor(prompt[None], dtype=torch.long)
    kw = dict(do_sample=False, pad_token_id=0)
    cores = torch.get_num_threads()
    best, ttft, best_threads = 0.0, float("inf"), cores
    with torch.no_grad():
        for threads in sorted({cores, 1}, reverse=True):
            torch.set_num_threads(threads)
            mm.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)  # warm up
            for _ in range(repeats):
                t = time.perf_counter()
                mm.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
                t1 = time.perf_counter() - t
                t = time.perf_counter()
                mm.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
                tn = time.perf_counter() - t
                rate = (new_tokens - 1) / max(tn - t1, 1e-9)
                if rate > best:
                    best, best_threads = rate, threads
                ttft = min(ttft, t1)
    torch.set_num_threads(cores)
    return {"decode_tokens_per_s": best, "ttft_s": ttft, "torch_threads": best_threads}


def weight_bytes_per_token(m) -> int:
    """Bytes of every parameter a decode step reads: all but the embedding table (one row of it)."""
    import jax
    from flax import nnx

    from model.network.quant import array_bytes

    total = 0
    for path, v in nnx.to_flat_state(m.state):
        shape, dtype = v.shape, v.dtype
        if tuple(str(k) for k in path) == ("embed", "embedding"):
            total += array_bytes(shape[1:], dtype)
            continue
        total += array_bytes(shape, dtype)
    del jax
    return total


def ours(ckpt: Path | None, dtype: str, quant: str | None, prompt: list[int], new_tokens: int, repeats: int,
         concurrency: int, kv_dtype: str, layout: str = "auto", preset: str | None = None) -> dict:
    import model
    from model.formats.tokenizer import ByteTokenizer
    from serve.config import EngineConfig
    from serve.engine import Engine
    from serve.sampling import SamplingParams

    if ckpt is not None:
        m = model.load(ckpt, dtype=dtype, quant=quant)
    else:  # random weights of a preset on the default device
        from model.network import quant as quant_lib

        cfg = model.LlamaConfig.preset(preset, param_dtype=dtype, compute_dtype=dtype, remat="none",
                                       quant=quant_lib.parse(quant))
        m = model.init(cfg)

    class Tok(ByteTokenizer):  # ids beyond bytes decode to nothing: text is irrelevant here
        vocab_size = m.config.vocab_size

        def token_bytes(self, i):
            return bytes([i]) if i < 256 else b""

    max_len = 1 << (len(prompt) + new_tokens + 1).bit_length()
    eng = Engine(m, Tok(), EngineConfig(max_slots=concurrency, max_len=max_len, prefill_chunk=len(prompt),
                                        prefill_tokens=len(prompt) * 4, min_kv_bucket=max_len, kv_dtype=kv_dtype,
                                        layout=layout))
    sp = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)

    def timed(prompts):
        stamps = {i: [] for i in range(len(prompts))}
        done = []
        t0 = time.perf_counter()
        for i, p in enumerate(prompts):
            eng.submit(p, sp, lambda ev, i=i: (stamps[i].append(time.perf_counter()), ev.finished and done.append(i)))
        while len(done) < len(prompts):
            eng.step()
        return t0, stamps

    timed([prompt])  # compile the batch-1 buckets
    best, ttft = 0.0, float("inf")
    for _ in range(repeats):
        t0, st = timed([prompt])
        s = st[0]
        best = max(best, (len(s) - 1) / (s[-1] - s[0]))
        ttft = min(ttft, s[0] - t0)
    rng = np.random.default_rng(1)
    many = [list(rng.integers(0, 256, len(prompt))) for _ in range(concurrency)]
    timed(many)  # compile the batched buckets
    agg, ttft_load = 0.0, float("inf")
    for _ in range(max(1, repeats // 2)):
        t0, st = timed(many)
        end = max(s[-1] for s in st.values())
        agg = max(agg, sum(len(s) for s in st.values()) / (end - t0))
        ttft_load = min(ttft_load, float(np.mean([s[0] - t0 for s in st.values()])))
    return {"decode_tokens_per_s": best, "ttft_s": ttft, "aggregate_tokens_per_s": agg,
            "mean_ttft_under_load_s": ttft_load, "weight_bytes_per_token": weight_bytes_per_token(m),
            "layout": eng.layout, "cpu_kernels": eng.cpu_kernels}


def matmul_params(ckpt: Path, dtype: str, quant: str | None) -> int:
    """Parameters a token's forward pass multiplies with (all but the embedding table)."""
    import model

    cfg = model.load(ckpt, dtype=dtype, quant=quant).config
    return cfg.num_params() - cfg.vocab_size * cfg.dim


def matmul_flops(dtype: str, m: int = 256, k: int = 1024, n: int = 3584, repeats: int = 5) -> float:
    """FLOP/s of one [m, k] x [k, n] product in `dtype` by XLA on this device (the engine's prefill-sized dot)."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((m, k), dtype)
    b = jnp.ones((k, n), dtype)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * m * k * n / best


class Driver:
    """Runs requests on an engine from this thread and records when each token arrived."""

    def __init__(self, eng, new_tokens: int):
        from serve.sampling import SamplingParams

        self.eng, self.sp = eng, SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        self.stamps: dict[int, list[float]] = {}
        self.submitted: dict[int, float] = {}
        self.done: set[int] = set()

    def submit(self, key: int, prompt: list[int], max_tokens: int | None = None, adapter: str | None = None):
        from serve.sampling import SamplingParams

        sp = self.sp if max_tokens is None else SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        self.stamps[key], self.submitted[key] = [], time.perf_counter()
        self.eng.submit(prompt, sp, lambda ev: (self.stamps[key].append(time.perf_counter()),
                                                ev.finished and self.done.add(key)), adapter=adapter)

    def run_until(self, cond):
        while not cond():
            self.eng.step()

    def finish(self):
        self.run_until(lambda: self.done >= set(self.stamps))

    def ttft(self, keys) -> float:
        return float(np.mean([self.stamps[k][0] - self.submitted[k] for k in keys]))


def steady_decode(eng, prompts: list[list[int]], new_tokens: int) -> float:
    """Tokens/s of len(prompts) requests all decoding, over as many tokens a request as batch-1 decode is timed
    on (new_tokens - 1 after the first), at the same prompt length: from when every request has its first
    token until they have made len(prompts) * (new_tokens - 1) more. (Over a fixed number of steps after
    32-token prompts, the contexts were shorter than batch-1's, so attention weighed less than there.)"""
    d = Driver(eng, 4 * new_tokens)  # prompts are prefilled in turns: the first ones run ahead meanwhile
    for i, p in enumerate(prompts):
        d.submit(i, p)
    d.run_until(lambda: all(d.stamps[i] for i in range(len(prompts))))
    n0, t0 = sum(len(s) for s in d.stamps.values()), time.perf_counter()
    d.run_until(lambda: sum(len(s) for s in d.stamps.values()) - n0 >= len(prompts) * (new_tokens - 1))
    rate = (sum(len(s) for s in d.stamps.values()) - n0) / (time.perf_counter() - t0)
    _cancel_all(eng)
    return rate


def _cancel_all(eng):
    for rid in list(eng.scheduler.requests):
        eng.cancel(rid)
    for r in list(eng.scheduler.waiting):
        eng.cancel(r.id)
    while eng.scheduler.requests or eng.pending:
        eng.step()


def interruption(eng, short: list[list[int]], long_prompt: list[int]) -> dict:
    """len(short) requests decode; then a long prompt arrives. Their normal interval between tokens, the
    longest gap while the long prompt is prefilled, and the long prompt's time to first token."""
    d = Driver(eng, 1000)
    for i, p in enumerate(short):
        d.submit(i, p)
    d.run_until(lambda: all(len(d.stamps[i]) >= 9 for i in range(len(short))))
    # tokens come `decode_steps` per call: the interval is the mean over the last 8 tokens
    normal = float(np.median([(d.stamps[i][-1] - d.stamps[i][-9]) / 8 for i in range(len(short))]))
    t_long = time.perf_counter()
    d.submit(-1, long_prompt, max_tokens=1)
    d.run_until(lambda: bool(d.stamps[-1]))
    gaps = [max(np.diff([t_long] + [t for t in d.stamps[i] if t >= t_long] + [d.stamps[-1][0]]))
            for i in range(len(short))]
    _cancel_all(eng)
    return {"normal_interval_s": normal, "worst_gap_s": float(max(gaps)),
            "delay_factor": float(max(gaps)) / normal, "long_ttft_s": d.stamps[-1][0] - t_long}


def shared_prefix(eng, prefix: list[int], n: int, caching: bool) -> float:
    """Mean TTFT of n requests sharing `prefix` (distinct 8-token tails), after one request with it ran."""
    eng.scheduler.blocks.prefix_caching = caching
    rng = np.random.default_rng(7)
    d = Driver(eng, 1)
    d.submit(-1, prefix + [1] * 8)
    d.finish()
    for i in range(n):
        d.submit(i, prefix + [int(t) for t in rng.integers(0, 256, 8)])
    d.finish()
    eng.scheduler.blocks.prefix_caching = True
    return d.ttft(range(n))


def capacity_ratio(block_size: int, max_len: int, short: int = 64, long: int = 1500, new_tokens: int = 64) -> dict:
    """Requests held by the same cache bytes, paged vs fixed slots of max_len, for a 1:1 mix of short and long
    prompts (each with new_tokens of completion): block accounting, no run."""
    per = [-(-(n + new_tokens) // block_size) * block_size for n in (short, long)]
    return {"mix": f"1:1 {short}/{long}-token prompts + {new_tokens} new", "fixed_slot_tokens": max_len,
            "paged_tokens_per_request": float(np.mean(per)), "ratio": max_len / float(np.mean(per))}


def capacity(ckpt: Path, long_share: float, n: int, slots: int = 8, max_len: int = 2048, short: int = 64,
             long: int = 1500, new_tokens: int = 64, block_size: int = 16, prefill_chunk: int = 128) -> dict:
    """Requests held at once by the KV bytes of a fixed-slot engine (`slots` x `max_len` tokens), measured: an
    engine whose pool holds that many tokens runs n requests (a `long_share` of them long prompts, shuffled,
    each with new_tokens of completion, all submitted at once) and records the most that were running together
    (and preemptions). The fixed-slot engine holds `slots`, whatever the mix."""
    import model
    from serve.config import EngineConfig
    from serve.engine import Engine

    m = model.load(ckpt, dtype="bfloat16")  # the count is block accounting: any weights do
    eng = Engine(m, _tokenizer(m), EngineConfig(max_slots=64, max_len=max_len, kv_tokens=slots * max_len,
                                            prefill_chunk=prefill_chunk, prefill_tokens=2 * prefill_chunk,
                                            block_size=block_size))
    rng = np.random.default_rng(11)
    lengths = [long] * round(long_share * n) + [short] * (n - round(long_share * n))
    rng.shuffle(lengths)
    d = Driver(eng, new_tokens)
    for i, length in enumerate(lengths):
        d.submit(i, [int(t) for t in rng.integers(0, 256, length)])
    peak = 0
    while d.done < set(d.stamps):
        eng.step()
        peak = max(peak, len(eng.scheduler.running))
    return {"long_share": long_share, "requests": n, "pool_tokens": slots * max_len, "fixed_slots": slots,
            "peak_running": peak, "ratio": peak / slots, "preemptions": eng.scheduler.stats["preemptions"]}


def concurrency(ckpt: Path, dtype: str, quant: str | None, kv_dtype: str, prompt_len: int, new_tokens: int,
                block_size: int, repeats: int, prefill_chunk: int = 128) -> dict:
    """The issue-12 measurements on one engine (see the module docstring)."""
    import model
    from serve.config import EngineConfig
    from serve.engine import Engine

    m = model.load(ckpt, dtype=dtype, quant=quant)
    eng = Engine(m, _tokenizer(m), EngineConfig(max_slots=64, max_len=2048, prefill_chunk=prefill_chunk,
                                                prefill_tokens=max(2 * prefill_chunk, 128),
                                                kv_dtype=kv_dtype, block_size=block_size))
    rng = np.random.default_rng(3)

    def prompts(n, length):
        return [[int(t) for t in rng.integers(0, 256, length)] for _ in range(n)]

    out = {"block_size": block_size, "prefill_chunk": prefill_chunk, "steady_prompt_tokens": prompt_len,
           "steady_timed_tokens_per_request": new_tokens - 1}
    for n in (16, 64):
        steady_decode(eng, prompts(n, prompt_len), new_tokens)  # compiles
        out[f"steady_decode_{n}_tokens_per_s"] = max(steady_decode(eng, prompts(n, prompt_len), new_tokens)
                                                     for _ in range(repeats))
    long_prompt = prompts(1, 1024)[0]
    d = Driver(eng, 1)
    for i in range(2):  # the first compiles
        d.submit(i, long_prompt if i else prompts(1, 1024)[0])
        d.finish()
    out["prefill_tokens_per_s"] = 1024 / (d.stamps[1][0] - d.submitted[1])
    interruption(eng, prompts(15, 32), prompts(1, 1024)[0])  # compiles
    out.update(interruption(eng, prompts(15, 32), prompts(1, 1024)[0]))
    out["long_ttft_vs_prefill_alone"] = out["long_ttft_s"] / (1024 / out["prefill_tokens_per_s"])
    prefix = prompts(1, 1024)[0]
    out["shared_prefix_ttft_off_s"] = shared_prefix(eng, prefix, 16, False)
    shared_prefix(eng, prompts(1, 1024)[0], 16, True)  # compiles the steps of cached prefixes
    out["shared_prefix_ttft_on_s"] = shared_prefix(eng, prompts(1, 1024)[0], 16, True)
    out["shared_prefix_speedup"] = out["shared_prefix_ttft_off_s"] / out["shared_prefix_ttft_on_s"]
    out["pool"] = eng.pool_stats()
    return out


def random_peft(cfg, out: Path, rank: int, seed: int) -> Path:
    """A random PEFT adapter (every target, rank `rank`, non-zero B) for models of config `cfg`."""
    from flax import nnx

    from model.formats.peft import export_peft
    from model.network.lora import LoraConfig
    from model.network.model import abstract_model

    cfg = cfg.replace(lora=LoraConfig(rank=rank, alpha=2.0 * rank), quant=None)
    rng = np.random.default_rng(seed)
    flat = {tuple(str(k) for k in p): rng.normal(0, 0.02, v.shape).astype(np.float32)
            for p, v in nnx.to_flat_state(abstract_model(cfg)[1].filter(nnx.LoRAParam))}
    return export_peft(flat, cfg, out)


def _rate(eng, jobs: list[tuple[list[int], str | None]], new_tokens: int) -> float:
    """Aggregate tokens/s of `jobs` (prompt, adapter) submitted at once, first submission to last token."""
    d = Driver(eng, new_tokens)
    for i, (p, a) in enumerate(jobs):
        d.submit(i, p, adapter=a)
    t0 = time.perf_counter()
    d.finish()
    return sum(len(s) for s in d.stamps.values()) / (max(s[-1] for s in d.stamps.values()) - t0)


def _batch1(eng, prompt, new_tokens: int, adapter: str | None) -> float:
    d = Driver(eng, new_tokens)
    d.submit(0, prompt, adapter=adapter)
    d.finish()
    s = d.stamps[0]
    return (len(s) - 1) / (s[-1] - s[0])


def multi_lora(ckpt: Path, dtype: str, prompt: list[int], new_tokens: int, repeats: int, concurrency: int,
               adapters: int = 8, rank: int = 16) -> dict:
    """Several adapters in the same steps vs one; batch-1 decode with an adapter vs no adapter slots at all."""
    import model
    from model.network.lora import LoraSlots
    from serve.config import EngineConfig
    from serve.engine import Engine

    max_len = 1 << (len(prompt) + new_tokens + 1).bit_length()
    ecfg = EngineConfig(max_slots=concurrency, max_len=max_len, prefill_chunk=len(prompt),
                        prefill_tokens=len(prompt) * 4, min_kv_bucket=max_len, max_loras=adapters, max_lora_rank=rank)
    m = model.load(ckpt, dtype=dtype, lora=LoraSlots(rank=rank, slots=adapters, dtype=dtype))
    eng = Engine(m, _tokenizer(m), ecfg)
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(adapters):
            eng.load_adapter(f"a{i}", str(random_peft(m.config, Path(tmp) / f"a{i}", rank, seed=i)))
    rng = np.random.default_rng(5)
    many = [[int(t) for t in rng.integers(0, 256, len(prompt))] for _ in range(concurrency)]
    spread = [(p, f"a{i % adapters}") for i, p in enumerate(many)]
    one = [(p, "a0") for p in many]
    _rate(eng, spread, new_tokens)  # compiles
    best = {"spread": 0.0, "one": 0.0}
    for k in range(repeats):  # interleaved, in alternating order, so a change of machine load hits both
        for name in (("one", "spread") if k % 2 == 0 else ("spread", "one")):
            best[name] = max(best[name], _rate(eng, spread if name == "spread" else one, new_tokens))
    best_spread, best_one = best["spread"], best["one"]
    _batch1(eng, prompt, new_tokens, "a0")  # compiles the batch-1 buckets
    plain = Engine(model.load(ckpt, dtype=dtype), _tokenizer(m), ecfg)
    _batch1(plain, prompt, new_tokens, None)
    b1 = {"with": 0.0, "without": 0.0, "base_same": 0.0}
    runs = {"with": (eng, "a0"), "without": (plain, None), "base_same": (eng, None)}
    for k in range(repeats):
        for name in (list(runs) if k % 2 == 0 else list(runs)[::-1]):
            b1[name] = max(b1[name], _batch1(runs[name][0], prompt, new_tokens, runs[name][1]))
    with_a, without, base_same = b1["with"], b1["without"], b1["base_same"]
    return {"adapters": adapters, "rank": rank, "concurrency": concurrency,
            "spread_tokens_per_s": best_spread, "one_adapter_tokens_per_s": best_one,
            "spread_vs_one": best_spread / best_one,
            "batch1_adapter_tokens_per_s": with_a, "batch1_no_slots_tokens_per_s": without,
            "batch1_base_on_slot_engine_tokens_per_s": base_same, "batch1_adapter_vs_no_slots": with_a / without,
            "layout": eng.layout, "cpu_kernels": eng.cpu_kernels}


def _tokenizer(m):
    from model.formats.tokenizer import ByteTokenizer

    class Tok(ByteTokenizer):  # ids beyond bytes decode to nothing: text is irrelevant here
        vocab_size = m.config.vocab_size

        def token_bytes(self, i):
            return bytes([i]) if i < 256 else b""

    return Tok()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--formats", nargs="*", default=["bf16", "int8", "int4"], help="ours: bf16 f32 int8 int4")
    p.add_argument("--peer-dtypes", nargs="*", default=["float32", "bfloat16"])
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--kv-dtype", default="auto")
    p.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temporary directory)")
    p.add_argument("--preset", default=None, help="ours only: random weights of this preset (e.g. llama3.1-8b) "
                                                   "on the default device, no peer")
    p.add_argument("--layouts", nargs="*", default=["auto"], help="engine layouts to compare: auto scan unrolled")
    p.add_argument("--paged", nargs="*", default=[], help="also the paged engine's concurrency measurements for "
                                                          "these formats (steady decode at 16/64, prefill rate, "
                                                          "interruption, shared prefix, capacity)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--prefill-chunk", type=int, default=128, help="--paged: prompt tokens of one request per step "
                   "(smaller: decoding requests wait less behind a long prompt, which itself takes longer)")
    p.add_argument("--skip-batch1", action="store_true", help="only the --paged measurements (and the peer)")
    p.add_argument("--lora", nargs="*", default=[], help="also the multi-adapter measurements for these formats")
    args = p.parse_args(argv)
    formats = {"f32": ("float32", None), "bf16": ("bfloat16", None), "int8": ("bfloat16", "int8"),
               "int4": ("bfloat16", "int4")}
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, 256, args.prompt)]
    if args.preset:
        import jax

        emit(what="machine", device=jax.devices()[0].device_kind, jax=jax.__version__)
        for f in args.formats:
            for layout in args.layouts:
                dtype, quant = formats[f]
                r = ours(None, dtype, quant, prompt, args.new_tokens, args.repeats, args.concurrency, args.kv_dtype,
                         layout, args.preset)
                emit(what="ours", preset=args.preset, weights=f, **r,
                     weight_bytes_per_s=r["decode_tokens_per_s"] * r["weight_bytes_per_token"])
        return 0

    import jax
    import torch

    emit(what="machine", cpus=os.cpu_count(), torch_threads=torch.get_num_threads(), jax=jax.__version__,
         torch=torch.__version__, device=jax.devices()[0].device_kind, load_avg=os.getloadavg())
    bw = copy_bandwidth()
    emit(what="copy_bandwidth", bytes_per_s=bw, note="numpy copy, bytes read + written")
    tmp = tempfile.TemporaryDirectory() if args.dir is None else None
    ckpt = Path(args.dir or tmp.name)
    hf = make_checkpoint(ckpt)
    peers = {}
    for dt in args.peer_dtypes:
        r = peer_decode(hf, dt, np.array(prompt), args.new_tokens, args.repeats)
        peers[dt] = r["decode_tokens_per_s"]
        emit(what="peer", impl="transformers generate", dtype=dt, **r)
    best_peer = max(peers.values()) if peers else None
    results = {}
    for f in args.paged:
        dtype, quant = formats[f]
        r = concurrency(ckpt, dtype, quant, args.kv_dtype, args.prompt, args.new_tokens, args.block_size,
                        args.repeats, args.prefill_chunk)
        flops = matmul_flops(dtype)
        params = matmul_params(ckpt, dtype, quant)
        emit(what="ours_paged", weights=f, **r, matmul_flops=flops,
             prefill_fraction_of_matmul=2 * params * r["prefill_tokens_per_s"] / flops, load_avg=os.getloadavg())
    if args.paged:  # the same for every weight format
        emit(what="capacity", arithmetic=capacity_ratio(args.block_size, 2048),
             measured=[capacity(ckpt, share, n, block_size=args.block_size) for share, n in ((0.5, 24), (0.25, 48))])
    for f in args.lora:
        dtype, quant = formats[f]
        emit(what="ours_multi_lora", weights=f, **multi_lora(ckpt, dtype, prompt, args.new_tokens, args.repeats,
                                                             args.concurrency), load_avg=os.getloadavg())
    for f in ([] if args.skip_batch1 else args.formats):
        dtype, quant = formats[f]
        results[f] = ours(ckpt, dtype, quant, prompt, args.new_tokens, args.repeats, args.concurrency,
                          args.kv_dtype, args.layouts[0])
        emit(what="ours_raw", weights=f, **results[f], load_avg=os.getloadavg())
    bw_end = copy_bandwidth()
    emit(what="copy_bandwidth_end", bytes_per_s=bw_end, load_avg=os.getloadavg())
    bw = max(bw, bw_end)  # the better of the two: a bandwidth dip must not flatter the fractions
    for f, r in results.items():
        roofline = bw / r["weight_bytes_per_token"]
        emit(what="ours", weights=f, kv_dtype=args.kv_dtype, **r, copy_bandwidth=bw, roofline_tokens_per_s=roofline,
             fraction_of_roofline=r["decode_tokens_per_s"] / roofline,
             vs_best_peer=(r["decode_tokens_per_s"] / best_peer) if best_peer else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
