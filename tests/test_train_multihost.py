"""The training job under jax.distributed: 2 processes x 4 CPU devices vs 1 process x 8 devices."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARGS = ["data.seq_len=64", "data.batch_size=8", "data.grad_accum=2", "data.eval=", "log_every=1",
        "checkpoint.every=3", "optimizer.warmup_steps=1", "steps=6", "mesh=fsdp=4,tensor=2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, cache: bool = False, **extra) -> dict:
    """The test session's persistent compilation cache only for one process: in a two-process job process 0
    found its programs there and process 1 none, so it compiled alone and could reach the first collective
    after gloo's 30 s."""
    keep = ("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE") if cache else ()
    env = {k: v for k, v in os.environ.items() if (not k.startswith("JAX_") or k.startswith(keep)) and k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=str(ROOT), **extra)
    return env


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_match_one(tmp_path):
    one = tmp_path / "one"
    subprocess.run([sys.executable, "-m", "train", *ARGS, f"output_dir={one}"], cwd=ROOT, env=_env(8, cache=True),
                   check=True, capture_output=True, timeout=600)
    two = tmp_path / "two"
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "train", *ARGS, f"output_dir={two}"], cwd=ROOT,
                              env=_env(4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                                       JAX_PROCESS_ID=str(i)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    assert "2 process(es)" in outs[0]
    a, b = _losses(one), _losses(two)
    assert len(a) == len(b) == 6
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-5 * max(abs(x) for x in a), (a, b)
