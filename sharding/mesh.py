"""Device meshes with named axes: `data` (across slices/hosts), `fsdp`, `sequence`, `tensor`."""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh

AXES = ("data", "fsdp", "sequence", "tensor")


def parse_spec(spec: str | dict | None) -> dict[str, int]:
    """`"fsdp=-1,tensor=4"` -> {"fsdp": -1, "tensor": 4}; -1 fills the rest."""
    if spec is None or spec == "":
        return {"fsdp": -1}
    if isinstance(spec, dict):
        items = spec.items()
    else:
        items = []
        for part in spec.split(","):
            if "=" not in part:
                raise ValueError(f"mesh spec {spec!r}: expected axis=size pairs such as 'fsdp=-1,tensor=4'")
            k, v = part.split("=", 1)
            items.append((k.strip(), v.strip()))
    out = {}
    for k, v in items:
        if k not in AXES:
            raise ValueError(f"mesh spec {spec!r}: unknown axis {k!r}; axes are {', '.join(AXES)}")
        try:
            out[k] = int(v)
        except ValueError:
            raise ValueError(f"mesh spec {spec!r}: size of {k!r} must be an integer, got {v!r}") from None
    return out


def make_mesh(spec: str | dict | None = None, devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_spec(spec)
    fill = [k for k, v in sizes.items() if v == -1]
    if len(fill) > 1:
        raise ValueError(f"mesh spec {spec!r}: only one axis may be -1")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if fill:
        if len(devices) % fixed:
            raise ValueError(f"mesh spec {spec!r}: {len(devices)} devices are not divisible by {fixed}")
        sizes[fill[0]] = len(devices) // fixed
    shape = tuple(sizes.get(a, 1) for a in AXES)
    if math.prod(shape) != len(devices):
        raise ValueError(f"mesh spec {spec!r} needs {math.prod(shape)} devices, there are {len(devices)}")
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), AXES)


def single_device_mesh() -> Mesh:
    return make_mesh({}, devices=jax.devices()[:1])


def maybe_initialize_distributed() -> None:
    """Multi-host start-up: on a TPU VM slice (auto-detected by JAX) or with an explicit coordinator
    in JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (e.g. GPU nodes, CPU tests)."""
    import os

    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        if os.environ.get("JAX_PLATFORMS", "") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    elif os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
        jax.distributed.initialize()
