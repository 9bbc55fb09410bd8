"""A conversion run as two processes (jax.distributed on 127.0.0.1, gloo CPU collectives) writes the
same checkpoint as one process."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

import model
from convert.hf_to_orbax import convert
from model.formats import checkpoint as ckpt
from tests.test_convert import same_hf_tensors, same_tree

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(args) -> list[subprocess.CompletedProcess]:
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    procs = [subprocess.Popen([sys.executable, "-m", "convert", *map(str, args), "--coordinator", f"127.0.0.1:{port}",
                               "--num-processes", "2", "--process-id", str(i)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    out = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def test_two_process_conversion_equals_one_process(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint(shards=True)
    one, two = tmp_path / "one", tmp_path / "two"
    convert(path, one, dtype="float32", block_bytes=4096, chunk_bytes=8192, progress=False)
    runs = _two_processes(["hf-to-orbax", "--hf", path, "--out", two, "--dtype", "float32",
                           "--block-mb", 4096 / 2**20, "--chunk-mb", 8192 / 2**20, "--no-progress"])
    for i, r in enumerate(runs):
        assert r.returncode == 0, f"process {i}:\n{r.stderr}"
    # each process converted its own share
    shares = [int(next(line for line in r.stderr.splitlines() if "converting" in line).split("converting ")[1].split()[0])
              for r in runs]
    assert all(s > 0 for s in shares) and sum(shares) == 21
    same_tree(one, two)
    assert ckpt.is_finished(two)
    toks = np.arange(18, dtype=np.int32).reshape(2, 9)
    np.testing.assert_array_equal(np.asarray(model.load(two, dtype="float32")(toks)),
                                  np.asarray(model.load(path, dtype="float32")(toks)))

    # and back to HF with two processes: the files are shared out, the result is the same
    back = tmp_path / "back"
    runs = _two_processes(["orbax-to-hf", "--orbax", two, "--out", back, "--max-shard-size", "100KB", "--no-progress"])
    for i, r in enumerate(runs):
        assert r.returncode == 0, f"process {i}:\n{r.stderr}"
    same_hf_tensors(path, back)
