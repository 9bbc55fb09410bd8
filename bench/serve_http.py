"""Issue 12's concurrency targets through the HTTP API: `python -m serve` on the bench-shape checkpoint
(written by transformers, as bench/serve.py writes it), driven by streamed completions of token-id prompts
(raw HTTP, as vLLM's benchmark_serving; tests/test_serve_openai.py drives the server with the openai client).

    python bench/serve_http.py [--weights bf16|int8|int4] [--prefill-chunk 32] [--dir CKPT]

Measured, one JSON line each, after a warm-up pass that compiles every step shape:
  - batch-1 decode tokens/s (128-token prompt, 128 new tokens, after the first; best of 3);
  - steady decode tokens/s with 16 and with 64 streams all decoding, at batch-1's prompt length and over as
    many tokens a stream (best of 3);
  - while 15 streams decode, a 1,024-token prompt arrives: the 15's longest gap between chunks ÷ their
    normal interval (and ÷ their normal longest gap: on a CPU tokens come 4 to a call, so a normal gap is
    already ~4 intervals, and a prompt arriving mid-call waits for it), and the prompt's time to first
    token ÷ that of another 1,024-token prompt alone.
Tokens are counted by the sampled token's log-prob that each chunk carries (`logprobs=0`: one entry per
token, whatever its text; the usage at the end of the batch-1 stream checks the count). The engine is
configured as bench/serve.py's (64 slots, max_len 2048, block 16, prefill_tokens = max(2 x prefill_chunk,
128)) and compiles every decode bucket before serving (`engine.warmup`: without it, sequences growing into
a longer page bucket compiled inside the measured windows), with the byte tokenizer (token-id prompts; the
model's ids past 511 stream as empty text).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent

QUANT = {"bf16": None, "int8": "int8", "int4": "int4"}


def emit(**kw):
    print(json.dumps(kw), flush=True)


def start_server(ckpt: Path, weights: str, chunk: int) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "serve", f"server.port={port}", f"model.checkpoint={ckpt}", "model.name=bench",
           "model.dtype=bfloat16", "model.tokenizer=bytes", "engine.max_slots=64", "engine.max_len=2048",
           f"engine.prefill_chunk={chunk}", f"engine.prefill_tokens={max(2 * chunk, 128)}", "engine.block_size=16",
           "engine.warmup=true"]  # every decode bucket compiled first: none compiles inside a measured window
    if QUANT[weights]:
        cmd.append(f"model.quant={QUANT[weights]}")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc, port
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"server did not start: {' '.join(cmd)}")


class Streams:
    """Streamed completions; the arrival time of every token per stream. The client is raw HTTP and one
    json.loads per chunk, as vLLM's benchmark_serving: the openai client's pydantic parsing cost a seventh of
    a core at 16 streams, taken from the two cores the server computes on."""

    def __init__(self, client: httpx.AsyncClient):
        self.client, self.stamps, self.tasks, self.usage = client, {}, [], {}

    def start(self, key, prompt: list[int], max_tokens: int):
        self.stamps[key] = []
        self.tasks.append(asyncio.create_task(self._run(key, prompt, max_tokens)))

    async def _run(self, key, prompt, max_tokens):
        body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
                "logprobs": 0, "stream_options": {"include_usage": True}, "ignore_eos": True}
        async with self.client.stream("POST", "/v1/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["logprobs"]:
                    self.stamps[key] += [time.perf_counter()] * len(chunk["choices"][0]["logprobs"]["tokens"])
                if chunk.get("usage"):
                    self.usage[key] = chunk["usage"]["completion_tokens"]

    async def until(self, cond, timeout: float = 300):
        t = time.perf_counter()
        while not cond():
            if time.perf_counter() - t > timeout:
                raise TimeoutError("streams did not get there")
            await asyncio.sleep(0.005)

    async def stop(self):
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await asyncio.sleep(0.5)  # the server cancels the closed streams' requests


def prompts(rng, n: int, length: int) -> list[list[int]]:
    return [[int(t) for t in rng.integers(1000, 30000, length)] for _ in range(n)]


async def batch1(client, rng, repeats: int = 3) -> float:
    """The best of `repeats` streams (one 128-token stream varied by 10% from run to run here)."""
    best = 0.0
    for _ in range(repeats):
        s = Streams(client)
        s.start(0, prompts(rng, 1, 128)[0], 128)
        await asyncio.gather(*s.tasks)
        t = s.stamps[0]
        assert s.usage[0] == len(t) == 128, (s.usage, len(t))  # every token counted
        best = max(best, (len(t) - 1) / (t[-1] - t[0]))
    return best


async def steady(client, rng, n: int) -> tuple[float, float]:
    """n streams of batch-1's prompt length all decoding, timed over as many tokens a stream as batch-1 (127
    after the first): from when every stream has its first token until they have n x 127 more. (An 8 s
    window after 32-token prompts took contexts to ~600 tokens, where attention costs ~25% of a step more
    than over batch-1's 128-256.) Also the cores this client used meanwhile."""
    s = Streams(client)
    for i, p in enumerate(prompts(rng, n, 128)):
        s.start(i, p, 1500)
    await s.until(lambda: all(s.stamps[i] for i in range(n)))
    count = lambda: sum(len(st) for st in s.stamps.values())  # noqa: E731
    t0, c0, n0 = time.perf_counter(), time.process_time(), count()
    await s.until(lambda: count() - n0 >= n * 127)
    t1, c1 = time.perf_counter(), time.process_time()
    rate = (count() - n0) / (t1 - t0)
    await s.stop()
    return rate, (c1 - c0) / (t1 - t0)


async def interruption(client, rng) -> dict:
    s = Streams(client)
    for i, p in enumerate(prompts(rng, 15, 32)):
        s.start(i, p, 1500)
    await s.until(lambda: all(len(s.stamps[i]) >= 9 for i in range(15)))
    normal = float(np.median([(s.stamps[i][-1] - s.stamps[i][-9]) / 8 for i in range(15)]))
    # tokens come decode_steps to a call, together: the longest normal gap is a call, not a token's interval
    normal_gap = float(np.median([max(np.diff(s.stamps[i][-9:])) for i in range(15)]))
    t_long = time.perf_counter()
    s.start(-1, prompts(rng, 1, 1024)[0], 1)
    await s.until(lambda: bool(s.stamps[-1]))
    gaps = [max(np.diff([t_long] + [t for t in s.stamps[i] if t >= t_long] + [s.stamps[-1][0]])) for i in range(15)]
    await s.stop()
    alone = Streams(client)
    t = time.perf_counter()
    alone.start(0, prompts(rng, 1, 1024)[0], 1)
    await asyncio.gather(*alone.tasks)
    prefill_alone = alone.stamps[0][0] - t
    return {"normal_interval_s": normal, "worst_gap_s": float(max(gaps)), "delay_factor": float(max(gaps)) / normal,
            "normal_longest_gap_s": normal_gap, "worst_gap_vs_normal_longest": float(max(gaps)) / normal_gap,
            "long_ttft_s": s.stamps[-1][0] - t_long, "prefill_alone_s": prefill_alone,
            "long_ttft_vs_prefill_alone": (s.stamps[-1][0] - t_long) / prefill_alone}


async def measure(port: int, repeats: int) -> dict:
    client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=httpx.Limits(max_connections=200),
                               timeout=600)
    rng = np.random.default_rng(5)
    await batch1(client, rng), await steady(client, rng, 16), await steady(client, rng, 64)  # compiles
    await interruption(client, rng)
    out = {"batch1_decode_tokens_per_s": await batch1(client, rng, repeats)}
    for n in (16, 64):  # the best of `repeats`, as batch-1; and the cores this client used meanwhile
        runs = [await steady(client, rng, n) for _ in range(repeats)]
        out[f"steady_decode_{n}_tokens_per_s"], out[f"client_cpu_cores_{n}"] = max(runs)
    out.update(await interruption(client, rng))
    out["steady_16_vs_batch1"] = out["steady_decode_16_tokens_per_s"] / out["batch1_decode_tokens_per_s"]
    out["steady_64_vs_16"] = out["steady_decode_64_tokens_per_s"] / out["steady_decode_16_tokens_per_s"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", nargs="*", default=["bf16"], choices=sorted(QUANT))
    p.add_argument("--prefill-chunk", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="runs of batch-1 and of each steady decode (best kept)")
    p.add_argument("--dir", default=None, help="the bench checkpoint (written there if missing)")
    args = p.parse_args(argv)
    tmp = tempfile.TemporaryDirectory() if args.dir is None else None
    ckpt = Path(args.dir or tmp.name)
    if not (ckpt / "config.json").exists():
        import importlib.util

        spec = importlib.util.spec_from_file_location("bench_serve", ROOT / "bench" / "serve.py")
        bench_serve = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench_serve)
        bench_serve.make_checkpoint(ckpt)
    emit(what="machine", cpus=os.cpu_count(), load_avg=os.getloadavg())
    for w in args.weights:
        proc, port = start_server(ckpt, w, args.prefill_chunk)
        try:
            emit(what="http", weights=w, prefill_chunk=args.prefill_chunk, **asyncio.run(measure(port, args.repeats)),
                 load_avg=os.getloadavg())
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
