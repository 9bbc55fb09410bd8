"""Soak test of `python -m serve`: many concurrent streaming clients for a while, some dropping mid-stream.

    python bench/soak.py [--seconds 240] [--clients 64] [--drop 0.2]

Starts the toy server (random weights, CPU) on a free loopback port, runs `--clients` concurrent
clients through the official openai client (completions and chat, streamed), a `--drop` fraction of
them closing their stream after a few chunks, for `--seconds`; samples the server's resident memory
every 10 s. Prints one JSON line per sample and a summary: requests, errors, memory first/last/max.
"""

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time

import httpx
import openai
import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "serve", f"server.port={port}", "engine.max_slots=16", "engine.max_len=512",
           "server.max_queue=4096"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not start")


async def client(aclient, i: int, stop_at: float, drop: float, counts: dict):
    rng = random.Random(i)
    while time.time() < stop_at:
        n = rng.randint(8, 48)
        try:
            if rng.random() < 0.5:
                stream = await aclient.chat.completions.create(
                    model="toy", messages=[{"role": "user", "content": f"client {i}"}], max_tokens=n, stream=True,
                    temperature=0.8, extra_body={"ignore_eos": True})
            else:
                stream = await aclient.completions.create(model="toy", prompt=f"client {i} " * rng.randint(1, 20),
                                                          max_tokens=n, stream=True, extra_body={"ignore_eos": True})
            dropping = rng.random() < drop
            k = 0
            async for _ in stream:
                k += 1
                if dropping and k >= 3:
                    await stream.close()
                    counts["dropped"] += 1
                    break
            counts["requests"] += 1
        except Exception as e:  # noqa: BLE001 - every failure is counted and reported, the soak goes on
            counts["errors"] += 1
            counts.setdefault("first_error", repr(e)[:300])


async def soak(port: int, proc: subprocess.Popen, seconds: float, clients: int, drop: float) -> dict:
    aclient = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0,
                                 timeout=120, http_client=openai.DefaultAsyncHttpxClient(
                                     limits=httpx.Limits(max_connections=clients + 8)))
    counts = {"requests": 0, "errors": 0, "dropped": 0}
    stop_at = time.time() + seconds
    mem = psutil.Process(proc.pid)
    samples = []

    async def sample():
        while time.time() < stop_at:
            rss = mem.memory_info().rss
            samples.append(rss)
            print(json.dumps({"t": round(seconds - (stop_at - time.time())), "rss_mib": round(rss / 2**20, 1),
                              **{k: v for k, v in counts.items() if k != "first_error"}}), flush=True)
            await asyncio.sleep(10)

    await asyncio.gather(sample(), *(client(aclient, i, stop_at, drop, counts) for i in range(clients)))
    await asyncio.sleep(2)
    health = httpx.get(f"http://127.0.0.1:{port}/health").json()
    mib = [s / 2**20 for s in samples]
    return {"summary": True, **counts, "seconds": seconds, "clients": clients, "drop": drop,
            "rss_mib_first": round(mib[0], 1), "rss_mib_last": round(mib[-1], 1), "rss_mib_max": round(max(mib), 1),
            "rss_mib_after_first_minute": [round(x, 1) for x in mib[6:]], "active_after": health.get("active")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=240)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--drop", type=float, default=0.2)
    args = ap.parse_args()
    port = free_port()
    proc = start_server(port)
    try:
        print(json.dumps(asyncio.run(soak(port, proc, args.seconds, args.clients, args.drop))))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
