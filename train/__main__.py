"""python -m train [--config NAME_OR_PATH] [--compile-only] [key=value ...]

With no arguments: LoRA fine-tuning of the toy model on the bundled toy task, on this machine's CPU.

`--compile-only` compiles the config's real training step (train/program.py) for its mesh and
topology and says whether it fits, per chip: a TPU slice (v6e-16, …) is compiled ahead of time with
libtpu on any machine; a GPU node (h100x8, …) when its GPUs are attached, else planned analytically;
no topology: this machine's own devices. Exit status 0 only if it fits. The planner does the
planning; this entry point hands it train's program (the one place train meets the planner).
"""

import argparse
import dataclasses
import functools
import logging
import math
import sys
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from model.formats.hub import HubError
from model.job.startup import start_job
from planner import remat as remat_search
from planner.check import compile_only as plan_compile_only
from planner.job import Job, Programs
from planner.plan import plan_local
from sharding import topology
from sharding.mesh import parse_spec
from train.config import TrainConfig, load_config
from train.data import DataError
from train.loop import run
from train.program import lower_step, trace_step


def job_for(cfg: TrainConfig) -> Job:
    """The planner's Job for a TrainConfig."""
    spec = cfg.model
    model = spec.preset
    if spec.checkpoint:
        p = Path(spec.checkpoint)
        model = str(p / "config.json") if (p / "config.json").exists() else str(p)
    quant = spec.quant or "bf16"
    return Job(model=model, mode="qlora" if spec.quant else "lora", quant=quant, batch=cfg.data.batch_size,
               seq=cfg.data.seq_len, lora_rank=cfg.lora.rank, lora_targets=tuple(cfg.lora.targets),
               remat=spec.remat, accum=cfg.data.grad_accum, layers=spec.num_layers)


def _programs(cfg: TrainConfig) -> Programs:
    kw = dict(optimizer_cfg=cfg.optimizer, total_steps=cfg.steps)
    return Programs(lower_train=functools.partial(lower_step, **kw), trace_train=functools.partial(trace_step, **kw))


def compile_only(cfg: TrainConfig, out=None, headroom: float = 0.0) -> int:
    """Compiles (or, for GPU nodes without their GPUs, plans) the config's step; prints FITS or DOES NOT
    FIT with the per-chip numbers. Returns the exit status: 0 fits, 1 does not fit, 2 bad config."""
    return plan_compile_only(job_for(cfg), cfg.topology, cfg.mesh, _programs(cfg), out, headroom)


def resolve_remat(cfg: TrainConfig, headroom: float) -> TrainConfig:
    """`model.remat: auto` at run time: the policy that recomputes least among those whose step, compiled
    for this job's devices, fits with `headroom` (planner/remat.py). Process 0's choice holds for all."""
    log = logging.getLogger("train")
    log.info("remat auto: compiling the step per policy on this job's devices to find the cheapest that fits")
    r = plan_local(job_for(cfg), cfg.mesh, programs=_programs(cfg), headroom=headroom, log=log.info)
    index = int(multihost_utils.broadcast_one_to_all(np.int32(remat_search.ORDER.index(r["remat"]))))
    choice = remat_search.ORDER[index]
    if not r["fits"]:
        log.warning("remat auto: no policy fits with %.0f%% headroom; using %s", headroom * 100, choice)
    log.info("remat auto: %s", choice)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, remat=choice))


def missing_devices(cfg: TrainConfig, config_name: str | None) -> str | None:
    """One line when the config's mesh needs more (or other) devices than this job sees; else None."""
    sizes = parse_spec(cfg.mesh)
    need, have = math.prod(v for v in sizes.values() if v != -1), jax.device_count()
    if (have % need == 0) if -1 in sizes.values() else have == need:
        return None
    tpu = cfg.topology is not None and topology.parse(cfg.topology).kind == "tpu"
    where = f" ({'a ' + cfg.topology + ' slice' if tpu else cfg.topology})" if cfg.topology else ""
    how = ("start it on every worker of the slice (README: 'Launch on a TPU slice')" if tpu else
           "start it where they are (README: '…and on one 8-GPU node')")
    flag = f"--config {config_name} " if config_name else ""
    return (f"error: {config_name or 'this config'} needs {need} devices{where} for its mesh {cfg.mesh}, this job sees "
            f"{have} ({jax.devices()[0].platform}): {how}, or check it fits from here with: "
            f"python -m train {flag}--compile-only")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="a config in configs/ (by name) or a YAML path; default: toy_cpu")
    parser.add_argument("--compile-only", action="store_true",
                        help="compile the step for the config's mesh/topology, print per-chip memory, exit 0 if it fits")
    parser.add_argument("--headroom", type=float, default=None,
                        help="fraction of device memory to keep free (--compile-only's verdict, model.remat=auto); "
                             "the same as the override headroom=X")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=50 lora.rank=8")
    args = parser.parse_args(argv)
    overrides = args.overrides + ([] if args.headroom is None else [f"headroom={args.headroom}"])
    cfg = start_job(load_config, args.config, overrides)
    if cfg is None:
        return 2
    if args.compile_only:
        return compile_only(cfg, headroom=cfg.headroom)
    try:
        line = missing_devices(cfg, args.config)
    except ValueError as e:  # a malformed mesh spec
        line = f"error: {e}"
    if line is not None:
        print(line, file=sys.stderr)
        return 2
    if cfg.model.remat == "auto":
        cfg = resolve_remat(cfg, cfg.headroom)
    try:
        result = run(cfg)
    except (DataError, FloatingPointError, HubError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    logging.getLogger("train").info("done: %s", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
