"""Preemption of a multi-process job: a SIGTERM that reaches only one of two processes (one CPU device each,
the weights split between them by fsdp=2, jax.distributed over 127.0.0.1) stops both at the same step with
the same checkpoint, both exit 0, and the rerun resumes bit for bit; a save killed half-way never looks
like a finished checkpoint. (2 x 4 devices with tensor parallelism took 20% longer and proves nothing more
here: tests/test_train_multihost.py runs that mesh across processes.)"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp

from train import checkpoints

ROOT = Path(__file__).resolve().parent.parent
STEPS = 12
ARGS = ["data.seq_len=64", "data.batch_size=8", "data.eval=", "log_every=1", "checkpoint.every=100",
        "optimizer.warmup_steps=1", f"steps={STEPS}", "mesh=fsdp=2", "lora.dropout=0.1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(out: Path, logs: Path) -> list[subprocess.Popen]:
    """Two processes of one job; their output goes to logs/process-<i>.log. (No persistent compilation
    cache: only process 0 writes it, and the other process, compiling alone, would reach the first
    collective more than gloo's 30 s rendezvous timeout later on a loaded machine.)"""
    port = _free_port()
    procs = []
    for i in range(2):
        env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") and k != "XLA_FLAGS"}
        env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1", PYTHONPATH=str(ROOT),
                   JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
        logs.mkdir(parents=True, exist_ok=True)
        with open(logs / f"process-{i}.log", "w") as f:
            procs.append(subprocess.Popen([sys.executable, "-m", "train", *ARGS, f"output_dir={out}"], cwd=ROOT,
                                          env=env, stdout=f, stderr=subprocess.STDOUT))
    return procs


def _finish(procs, logs: Path) -> list[str]:
    try:
        for p in procs:
            p.wait(timeout=600)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    outs = [(logs / f"process-{i}.log").read_text() for i in range(2)]
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{out[-3000:]}"
    return outs


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _saved(out: Path) -> list[int]:
    return sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())


def test_sigterm_to_one_process_stops_both_at_one_step(tmp_path):
    straight = tmp_path / "straight"
    _finish(_start(straight, tmp_path / "logs-straight"), tmp_path / "logs-straight")
    want = {r["step"]: r["loss"] for r in _records(straight)}
    assert sorted(want) == list(range(1, STEPS + 1))

    out, logs = tmp_path / "preempted", tmp_path / "logs-preempted"
    procs = _start(out, logs)
    deadline = time.time() + 600
    while time.time() < deadline and procs[1].poll() is None:
        if (out / "metrics.jsonl").exists() and len(_records(out)) >= 3:
            procs[1].send_signal(signal.SIGTERM)  # the notice reaches one worker only
            break
        time.sleep(0.05)
    outs = _finish(procs, logs)
    assert "received SIGTERM" in outs[1] and "received SIGTERM" not in outs[0]
    stopped = [int(o.split("stopped by SIGTERM after step ")[1].split()[0]) for o in outs]
    assert stopped[0] == stopped[1] < STEPS, stopped  # both processes, one step
    n = stopped[0]
    assert _saved(out) == [n]  # checkpoint.every=100: the preemption save is the only one
    assert [r["step"] for r in _records(out)] == list(range(1, n + 1))

    logs = tmp_path / "logs-resumed"
    outs = _finish(_start(out, logs), logs)
    assert all(f"resumed at step {n} " in o for o in outs)
    recs = _records(out)
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))  # every step logged once
    assert [r["loss"] for r in recs] == [want[s] for s in range(1, STEPS + 1)]  # bitwise
    assert (out / "adapter" / "adapter_model.safetensors").exists()


KILLED_MID_SAVE = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    import numpy as np
    from train import checkpoints
    d = Path(sys.argv[1])
    mgr = checkpoints.manager(d, keep=3)
    checkpoints.save(mgr, 1, {"w": np.ones(4, np.float32)}, {"position": 1})
    mgr.wait_until_finished()
    big = {f"w{i}": np.full((1 << 20,), 2.0, np.float32) for i in range(64)}  # 256 MiB: a save that takes a while
    checkpoints.save(mgr, 2, big, {"position": 2})
    while not any(p.name.startswith("2") for p in d.iterdir()):
        time.sleep(0.001)
    os.kill(os.getpid(), signal.SIGKILL)  # mid-save
""")


def test_save_killed_midway_is_not_a_checkpoint(tmp_path):
    d = tmp_path / "checkpoints"
    script = tmp_path / "killed.py"
    script.write_text(KILLED_MID_SAVE)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    p = subprocess.run([sys.executable, str(script), str(d)], cwd=ROOT, env=dict(env, PYTHONPATH=str(ROOT)),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    left = sorted(x.name for x in d.iterdir())
    assert "1" in left and any(name.startswith("2") for name in left), left  # the interrupted save's remains
    mgr = checkpoints.manager(d, keep=3)
    assert mgr.latest_step() == 1 and mgr.all_steps() == [1]
    abstract = {"w": np.zeros(4, np.float32)}
    got = mgr.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                 data=ocp.args.JsonRestore()))
    np.testing.assert_array_equal(got["state"]["w"], np.ones(4, np.float32))
    assert got["data"] == {"position": 1}
    checkpoints.save(mgr, 3, {"w": np.full(4, 3.0, np.float32)}, {"position": 3})  # the rerun's next save
    mgr.wait_until_finished()
    assert sorted(x.name for x in d.iterdir()) == ["1", "3"]  # and the remains are gone
