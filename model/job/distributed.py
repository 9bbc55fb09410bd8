"""Multi-host start-up (before any other JAX call) and the helpers multi-process jobs share."""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, auto: bool = False) -> bool:
    """Joins a multi-process job; True when a multi-process runtime is running.

    - explicit arguments, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID in the
      environment (GPU nodes, CPU clusters, the two-process tests): `host:port` of process 0;
    - `auto`, or a multi-host Cloud TPU VM slice (TPU_WORKER_HOSTNAMES lists several workers, or
      MEGASCALE_* for multi-slice): JAX finds the coordinator by itself;
    - otherwise (one host) nothing is done.
    CPU processes use gloo for cross-process collectives.
    """
    if jax.distributed.is_initialized():
        return True
    env = os.environ
    coordinator = coordinator or env.get("JAX_COORDINATOR_ADDRESS")
    if coordinator:
        try:
            n = int(num_processes if num_processes is not None else env["JAX_NUM_PROCESSES"])
            i = int(process_id if process_id is not None else env["JAX_PROCESS_ID"])
        except KeyError as e:
            raise ValueError(f"JAX_COORDINATOR_ADDRESS={coordinator!r} is set but {e.args[0]} is not "
                             f"(set JAX_NUM_PROCESSES and JAX_PROCESS_ID on every process)") from None
        if not 0 <= i < n:
            raise ValueError(f"JAX_PROCESS_ID={i} must be in [0, {n}) (JAX_NUM_PROCESSES={n})")
        _cpu_collectives()
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=n, process_id=i)
        log.info("process %d of %d (coordinator %s): %d local devices, %d in all", i, n, coordinator,
                 jax.local_device_count(), jax.device_count())
        return True
    if auto or env.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        _cpu_collectives()
        jax.distributed.initialize()
        log.info("process %d of %d joined the job", jax.process_index(), jax.process_count())
        return True
    return False


def _cpu_collectives() -> None:
    platforms = os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms or ""
    if "cpu" in platforms.split(","):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (no-op for one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


_VOTE: dict = {}


def max_over_processes(value: int) -> jax.Array:
    """Dispatches the maximum of every process's `value` (one int32 per device, all-reduced over all of
    `jax.devices()`) without waiting for it: read it later with `int(result.addressable_data(0))`, and every
    process reads the same number. Every process must call it the same number of times."""
    if "fn" not in _VOTE:
        mesh = Mesh(np.asarray(jax.devices()), ("all",))
        _VOTE.update(sharding=NamedSharding(mesh, PartitionSpec("all")),
                     fn=jax.jit(lambda x: x.max(), out_shardings=NamedSharding(mesh, PartitionSpec())))
    sharding = _VOTE["sharding"]
    shards = [jax.device_put(np.full((1,), value, np.int32), d) for d in sharding.addressable_devices]
    return _VOTE["fn"](jax.make_array_from_single_device_arrays((jax.device_count(),), sharding, shards))


def share(items: list, weights: list[int], n: int, i: int) -> list:
    """Contiguous ranges of `items` of about equal total weight; range i (keeps reads sequential)."""
    total = sum(weights) or 1
    out, acc = [], 0
    for item, w in zip(items, weights):
        # the item belongs to the process whose range holds the middle of its weight
        if min(int((acc + w / 2) * n // total), n - 1) == i:
            out.append(item)
        acc += w
    return out
