"""The training job: build the model on the mesh, stream packed batches, step, log, evaluate,
checkpoint (async, resumable, preemption-safe), and export the adapter at the end."""

from __future__ import annotations

import dataclasses
import logging
import signal
from pathlib import Path

import jax
import orbax.checkpoint as ocp
import yaml
from flax import nnx
from jax.experimental import multihost_utils

import model
from model.formats import paths
from model.formats.peft import export_peft
from model.job import distributed, resolve, settings
from sharding.mesh import make_mesh
from train import checkpoints
from train import data as data_lib
from train.config import TrainConfig
from train.metrics import Metrics
from train.program import StepShape, TrainProgram

log = logging.getLogger("train")
TOY_DATA = Path(__file__).resolve().parent / "data"


def build_model(cfg: TrainConfig, mesh) -> model.Model:
    """The base model on the mesh (quantized for QLoRA), with fresh adapters."""
    spec = cfg.model
    return resolve.build_model(spec, mesh, seed=cfg.seed, lora=cfg.lora, remat=spec.remat)


def tokenizer_for(cfg: TrainConfig):
    try:
        return resolve.tokenizer(cfg.model, cfg.data.tokenizer)
    except FileNotFoundError as e:
        raise data_lib.DataError(f"{e} (data.tokenizer)") from None


def data_path(p: str, split: str):
    return TOY_DATA / f"toy_{split}.jsonl" if p == "toy" else paths.as_path(p)  # local or gs://


def _batches(cfg: TrainConfig, tok) -> tuple[data_lib.Batches, list | None]:
    """This process's training batches, and the eval documents (None without data.eval)."""
    d = cfg.data
    docs, _ = data_lib.read_documents(data_path(d.train, "train"), tok, d.seq_len, d.overlong, d.max_bad_fraction)
    batches = data_lib.Batches(docs, seq_len=d.seq_len, batch_size=d.batch_size, seed=d.seed, accum=d.grad_accum,
                               process_index=jax.process_index(), process_count=jax.process_count())
    eval_docs = None
    if d.eval:
        eval_docs, _ = data_lib.read_documents(data_path(d.eval, "eval"), tok, d.seq_len, d.overlong, 1.0)
    return batches, eval_docs


class Evaluator:
    """Mean loss per target token over the first `batches` batches of the eval documents (one pass at most)."""

    def __init__(self, program: TrainProgram, frozen, docs: list, batches: int):
        self.program, self.frozen, self.docs, self.batches = program, frozen, docs, batches

    def __call__(self, params) -> float:
        shape = self.program.shape
        eb = data_lib.Batches(self.docs, seq_len=shape.seq, batch_size=shape.batch, seed=0, shuffle=False,
                              process_index=jax.process_index(), process_count=jax.process_count())
        total, count = 0.0, 0.0
        for _ in range(self.batches):
            if eb.epoch > 0:
                break
            loss, n = self.program.evaluate(params, self.frozen, self.program.device_batch(next(eb), eval=True))
            total, count = total + float(loss), count + float(n)
        return total / max(count, 1.0)


class StopSignal:
    """While active, SIGTERM and SIGINT do not kill the run: they are recorded, and the step loop saves a
    checkpoint at the end of a step and stops.

    Several processes (a pod slice) must save and stop at the same step, however many of them the notice
    reached and at whichever step: each step every process dispatches its vote (the signal it received, or
    0) as one tiny all-reduce, and reads the previous step's result, the same number on every process, so
    all of them stop one step after any of them was signalled. The read waits only for the previous step
    (the metrics of which are read there too), so the host never stalls the device. One process stops at
    the end of the step in which the signal came."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __enter__(self) -> StopSignal:
        self.received, self._vote = 0, None
        self._previous = {s: signal.getsignal(s) for s in self.SIGNALS}
        for s in self.SIGNALS:
            signal.signal(s, self._received)
        return self

    def _received(self, signum, _frame) -> None:
        self.received = signum
        log.warning("received %s: saving a checkpoint at the end of a step, then exiting", signal.Signals(signum).name)

    def agreed(self) -> str | None:
        """Once per step, on every process: the name of the signal that stops all processes after this
        step, or None to go on."""
        if jax.process_count() == 1:
            return signal.Signals(self.received).name if self.received else None
        previous, self._vote = self._vote, distributed.max_over_processes(self.received)
        verdict = int(previous.addressable_data(0)) if previous is not None else 0
        return signal.Signals(verdict).name if verdict else None

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            # None: a handler not set from Python (JAX's preemption notifier); the default is the safe choice
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def last_step(cfg: TrainConfig) -> int:
    """The step this run ends at: `steps`, or `stop_after` when it comes first."""
    return min(cfg.steps, cfg.stop_after or cfg.steps)


def _resume(manager, program: TrainProgram, state, batches, directory: Path) -> tuple[int, dict]:
    """(first step to run, train state): the latest checkpoint's, or step 0's."""
    start = manager.latest_step()
    if start is None:
        return 0, state
    state, data_state = checkpoints.restore(manager, start, program.abstract_state, program.state_shardings)
    batches.restore(data_state)
    log.info("resumed at step %d from %s", start, directory)
    return start, state


@dataclasses.dataclass
class _Loop:
    """The step loop and what it works with."""
    cfg: TrainConfig
    program: TrainProgram
    frozen: nnx.State
    batches: data_lib.Batches
    manager: ocp.CheckpointManager
    metrics: Metrics
    evaluate: Evaluator | None

    def run(self, state: dict, start: int, stop: StopSignal) -> tuple[dict, int, str | None]:
        """Steps start+1 .. the last; (train state, last step run, the signal that stopped it early, after
        saving a checkpoint, or None)."""
        cfg, program, metrics = self.cfg, self.program, self.metrics
        last, profile = last_step(cfg), tuple(cfg.profile_steps)
        step = start
        for step in range(start + 1, last + 1):
            if profile and step == profile[0]:
                jax.profiler.start_trace(str(paths.as_path(cfg.output_dir) / "profile"))
            state, mtr = program.step(state, self.frozen, program.device_batch(next(self.batches)))
            if profile and step == profile[-1]:
                jax.block_until_ready(state)
                jax.profiler.stop_trace()
            metrics.flush()  # the previous step's: read one step late, so the host never waits on the device
            do_eval = self.evaluate is not None and (step % cfg.eval_every == 0 or step == cfg.steps)
            if step % cfg.log_every == 0 or step in (1, last) or do_eval:
                metrics.hold(step, mtr, self.evaluate(state["params"]) if do_eval else None)
            metrics.bar.update(1)
            stopping = stop.agreed()
            if step % cfg.checkpoint.every == 0 or step == last or stopping:
                metrics.flush()
                checkpoints.save(self.manager, step, state, self.batches.state())
            if stopping:
                return state, step, stopping
        metrics.flush()
        return state, step, None


def run(cfg: TrainConfig) -> dict:
    out = paths.as_path(cfg.output_dir)  # local or gs://
    out.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:  # the run's resolved config: lets `convert lora-to-peft` read the run alone
        (out / "config.yaml").write_text(yaml.safe_dump(settings.to_dict(cfg), sort_keys=False))
    mesh = make_mesh(cfg.mesh)
    log.info("mesh %s over %d devices (%s), %d process(es)", dict(mesh.shape), mesh.size,
             jax.devices()[0].device_kind, jax.process_count())

    tok = tokenizer_for(cfg)
    batches, eval_docs = _batches(cfg, tok)
    m = build_model(cfg, mesh)
    mcfg, d = m.config, cfg.data
    if tok.vocab_size > mcfg.vocab_size:
        raise data_lib.DataError(f"tokenizer has {tok.vocab_size} tokens, model vocab_size is {mcfg.vocab_size}")
    program = TrainProgram.build(mcfg, m.graphdef, m.state, mesh, StepShape(d.batch_size, d.seq_len, d.grad_accum),
                                 cfg.optimizer, cfg.steps, cfg.seed)
    trainable, frozen = program.split(m.state)
    state = program.init_state(trainable)
    log.info("model: %s parameters, %s trainable (%s)", f"{mcfg.num_params():,}",
             f"{sum(x.size for x in jax.tree.leaves(trainable)):,}", "LoRA adapters" if mcfg.lora else "all")
    del m, trainable

    manager = checkpoints.manager(out / "checkpoints", cfg.checkpoint.keep)
    start, state = _resume(manager, program, state, batches, out / "checkpoints")
    evaluate = Evaluator(program, frozen, eval_docs, cfg.eval_batches) if eval_docs is not None else None
    metrics = Metrics(out, program, start, cfg.steps, manager.latest_step, cfg.wandb, settings.to_dict(cfg))
    loop = _Loop(cfg, program, frozen, batches, manager, metrics, evaluate)
    try:
        with StopSignal() as stop:
            state, step, stopped_by = loop.run(state, start, stop)
    finally:
        manager.wait_until_finished()
        metrics.close()
    result = metrics.result
    if stopped_by:
        log.warning("stopped by %s after step %d (on all %d processes); checkpoint saved, rerun the same command "
                    "to resume", stopped_by, step, jax.process_count())
        result["preempted"] = stopped_by
        return result
    if last_step(cfg) < cfg.steps:
        log.info("stopped at step %d of %d as configured (stop_after); rerun to continue", step, cfg.steps)
        return result
    if mcfg.lora is not None:
        # Every process takes part in the gather (a collective); the first one writes the files.
        adapters = multihost_utils.process_allgather(state["params"], tiled=True)
        if jax.process_index() == 0:
            export_adapter(adapters, mcfg, out / "adapter", cfg)
    result["output_dir"] = str(out)
    return result


def export_adapter(params, mcfg, out_dir, cfg: TrainConfig):
    export_peft(params, mcfg, out_dir, base_model=cfg.model.checkpoint or cfg.model.preset)
    log.info("wrote the PEFT adapter to %s", out_dir)

