"""Two processes x 4 CPU devices, joined by jax.distributed over 127.0.0.1 (gloo collectives), build
one 8-device mesh, load the same checkpoint into it and give the logits of a single process."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import model
from sharding.mesh import single_device_mesh

ROOT = Path(__file__).resolve().parent.parent
CKPT = dict(vocab=512, dim=64, mlp=128, layers=2, heads=8, kv_heads=4, head_dim=8)

WORKER = textwrap.dedent("""
    import json, sys
    import numpy as np
    from model.job import distributed
    assert distributed.initialize()  # reads JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
    import jax
    from jax.experimental import multihost_utils
    import model
    from sharding.mesh import make_mesh

    ckpt, out, spec = sys.argv[1], sys.argv[2], sys.argv[3]
    mesh = make_mesh(spec)
    tokens = np.random.default_rng(0).integers(0, 512, (8, 16)).astype(np.int32)
    m = model.load(ckpt, dtype="float32", mesh=mesh)
    q = m.state["layers"]["attn"]["q"]["kernel"][...]
    logits = m(tokens)
    full = multihost_utils.process_allgather(logits, tiled=True)
    info = dict(process=jax.process_index(), processes=jax.process_count(), devices=jax.device_count(),
                local=jax.local_device_count(), mesh=dict(mesh.shape), q_spec=str(q.sharding.spec),
                q_processes=sorted({d.process_index for d in q.sharding.device_set}))
    if jax.process_index() == 0:
        np.save(out, np.asarray(full))
    with open(f"{out}.info-{jax.process_index()}.json", "w") as f:  # a file: gloo writes to the same stdout
        json.dump(info, f)
    jax.distributed.shutdown()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("spec", ["fsdp=2,tensor=4", "data=2,fsdp=2,tensor=2"])
def test_two_processes_match_one(hf_checkpoint, tmp_path, spec):
    path, _ = hf_checkpoint(**CKPT)
    tokens = np.random.default_rng(0).integers(0, 512, (8, 16)).astype(np.int32)
    want = np.asarray(model.load(path, dtype="float32", mesh=single_device_mesh())(tokens))

    port = _free_port()
    out = tmp_path / "logits.npy"
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    procs = []
    for i in range(2):
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
                   JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i),
                   PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        procs.append(subprocess.Popen([sys.executable, str(script), str(path), str(out), spec], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=420)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"process {i} failed:\n{log[-3000:]}"
    infos = [json.loads(Path(f"{out}.info-{i}.json").read_text()) for i in range(2)]
    assert sorted(i["process"] for i in infos) == [0, 1]
    for info in infos:
        assert info["processes"] == 2 and info["devices"] == 8 and info["local"] == 4
        assert info["q_processes"] == [0, 1]  # the parameter really spans both processes
    got = np.load(out)
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert rel <= 1e-5, f"{spec}: two-process logits differ from one process by {rel:.2e}"
