"""Multi-process jobs: `jax.distributed` start-up, this process's share, barriers.

A conversion run as N processes (one per host, or several on one machine) splits the work by
tensor; every process reads and writes its share into the same output directory (a shared
filesystem or gs://), and process 0 finalises the checkpoint once all shares are written.
"""

from __future__ import annotations

import logging

import jax

log = logging.getLogger(__name__)


def initialize(coordinator: str | None, num_processes: int | None, process_id: int | None,
               auto: bool = False) -> None:
    """Joins a multi-process job (explicit coordinator, or `auto` on a TPU pod / SLURM cluster)."""
    if coordinator is None and not auto:
        return
    if jax.config.jax_platforms and "cpu" in jax.config.jax_platforms:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if auto:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    log.info("process %d of %d joined the job", jax.process_index(), jax.process_count())


def index() -> int:
    return jax.process_index()


def count() -> int:
    return jax.process_count()


def barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def split(items: list, weights: list[int], n: int, i: int) -> list:
    """Contiguous ranges of `items` of about equal total weight; range i (keeps reads sequential)."""
    total = sum(weights) or 1
    out, acc = [], 0
    for item, w in zip(items, weights):
        # the item belongs to the process whose range holds the middle of its weight
        if min(int((acc + w / 2) * n // total), n - 1) == i:
            out.append(item)
        acc += w
    return out
