"""The training run's metrics: one record per logged step (loss, learning rate, gradient norm,
tokens/s, MFU, eval loss) to metrics.jsonl and TensorBoard (process 0), and the progress bar.

Records wait one step (`hold`, written by the next `flush`), so the host reads a step's metrics
while the device runs the next one and never stalls it.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
from tqdm import tqdm

from model.formats import paths
from sharding import topology
from train.config import WandbConfig
from train.program import TrainProgram

SYNC_SECONDS = 30  # metrics on gs:// are uploaded at most this often (and at the end)


def peak_flops(device) -> float:
    """Dense bf16 peak FLOP/s of one chip (sharding/topology.py's table, by device_kind); for CPUs and
    chips not in it, the rate of a large matmul measured once, the best this device does in practice."""
    peak = topology.peak_flops(device.device_kind)
    if peak is not None:
        return peak
    a = jnp.ones((2048, 2048), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(3):
        f(a).block_until_ready()
    return 3 * 2 * 2048 ** 3 / (time.perf_counter() - t0)


class Metrics:
    """metrics.jsonl, TensorBoard and the progress bar of a run that resumes at step `start`; `result`
    is the last record written."""

    def __init__(self, out: Path, program: TrainProgram, start: int, total: int, latest_checkpoint: Callable,
                 wandb: WandbConfig | None = None, run_config: dict | None = None):
        self.out, self.schedule, self.latest_checkpoint = out, program.schedule, latest_checkpoint
        self.tokens_per_step = program.shape.batch * program.shape.seq
        self.flops_per_token = program.flops_per_token()
        self.peak = peak_flops(jax.devices()[0]) * jax.device_count()
        self.main = jax.process_index() == 0
        # local, or on gs:// a local copy uploaded whole every SYNC_SECONDS and at the end (a resumed run appends)
        self.mirrors = [paths.Mirror(out / "metrics.jsonl"), paths.Mirror(out / "tensorboard", fetch=False)] \
            if self.main else []
        self.last_sync = time.monotonic()
        self.file = open(self.mirrors[0].local, "a") if self.main else None
        self.writer = _tensorboard(self.mirrors[1].local) if self.main else None
        self.wandb = _wandb(wandb, out, Path(self.mirrors[1].local).parent, run_config) \
            if self.main and wandb is not None and wandb.enabled else None
        self.bar = tqdm(total=total, initial=start, desc="train", unit="step", disable=not self.main,
                        dynamic_ncols=True)
        self.pending = None
        self.last_time, self.last_step = time.perf_counter(), start
        self.result: dict = {}  # the last record written

    def hold(self, step: int, metrics: dict, eval_loss: float | None = None) -> None:
        """Keeps this step's (device) metrics to write at the next flush."""
        self.pending = (step, metrics, eval_loss)

    def flush(self) -> None:
        if self.pending is not None:
            self._write(*self.pending)
            self.pending = None

    def _write(self, step: int, mtr: dict, eval_loss: float | None) -> None:
        loss = float(mtr["loss"])
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {step}; stopping. The last good checkpoint "
                                     f"in {self.out / 'checkpoints'} is kept (step {self.latest_checkpoint()}).")
        now = time.perf_counter()
        tokens_per_s = float(self.tokens_per_step) * (step - self.last_step) / max(now - self.last_time, 1e-9)
        self.last_time, self.last_step = now, step
        rec = {"step": step, "loss": loss, "learning_rate": float(self.schedule(step - 1)),
               "grad_norm": float(mtr["grad_norm"]), "tokens_per_s": round(tokens_per_s, 1),
               "mfu": round(tokens_per_s * self.flops_per_token / self.peak, 4)}
        if eval_loss is not None:
            rec["eval_loss"] = eval_loss
        self.result.update(rec)
        if self.main:
            self.file.write(json.dumps(rec) + "\n")
            self.file.flush()
            for k, v in rec.items():
                if k != "step":
                    self.writer.add_scalar(f"train/{k}", v, step)
            if self.wandb is not None:
                self.wandb.log({f"train/{k}": v for k, v in rec.items() if k != "step"}, step=step)
            if self.mirrors[0].remote and time.monotonic() - self.last_sync > SYNC_SECONDS:
                self.writer.flush()
                for m in self.mirrors:
                    m.sync()
                self.last_sync = time.monotonic()
        self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}")

    def close(self) -> None:
        self.bar.close()
        if self.main:
            self.file.close()
            self.writer.close()
            if self.wandb is not None:
                self.wandb.finish()
            for m in self.mirrors:
                m.close()


def _wandb(cfg: WandbConfig, out, local_dir: Path, run_config: dict | None):
    """The W&B run of this output directory, its files under `local_dir`/wandb; a resumed run continues the
    same W&B run (its id is kept in the output directory)."""
    try:
        # deferred: an optional dependency (the `wandb` extra), imported only when enabled
        import wandb
    except ImportError:
        raise ImportError('wandb.enabled=true needs the wandb package: pip install -e ".[wandb]"') from None
    id_file = out / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
    id_file.write_text(run_id)
    # console="off": W&B would otherwise wrap sys.stdout/stderr for the whole process, and never fully unwrap them
    return wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name or out.name, id=run_id, resume="allow",
                      dir=str(local_dir), config=run_config, settings=wandb.Settings(console="off"))


def _tensorboard(directory: Path):
    # deferred: tensorboardX pulls in protobuf; only process 0 writes events
    from tensorboardX import SummaryWriter

    return SummaryWriter(str(directory))
