"""The training job: build the model on the mesh, stream packed batches, step, log, evaluate,
checkpoint (async, resumable, preemption-safe), and export the adapter at the end."""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import yaml
from jax.experimental import multihost_utils
from tqdm import tqdm

import model
from model.formats.peft import export_peft
from model.job import resolve, settings
from model.network.model import state_shardings
from sharding.mesh import make_mesh
from train import checkpoints
from train import data as data_lib
from train.config import TrainConfig
from train.step import (
    batch_shardings,
    eval_fn,
    init_train_state,
    make_step_fn,
    model_flops_per_token,
    optimizer,
    split_trainable,
    train_state_shardings,
)

log = logging.getLogger("train")
TOY_DATA = Path(__file__).resolve().parent / "data"

# Dense bf16 peak FLOP/s per chip, by jax device_kind prefix (for MFU).
PEAK_FLOPS = {"TPU v6": 918e12, "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v4": 275e12,
              "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12}


def peak_flops(device) -> float:
    for prefix, flops in PEAK_FLOPS.items():
        if device.device_kind.startswith(prefix):
            return flops
    # CPU or unknown: measure a large matmul once, the best this device does in practice.
    a = jnp.ones((2048, 2048), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(3):
        f(a).block_until_ready()
    return 3 * 2 * 2048 ** 3 / (time.perf_counter() - t0)


def build_model(cfg: TrainConfig, mesh) -> model.Model:
    """The base model on the mesh (quantized for QLoRA), with fresh adapters."""
    spec = cfg.model
    return resolve.build_model(spec, mesh, seed=cfg.seed, lora=cfg.lora, remat=spec.remat)


def tokenizer_for(cfg: TrainConfig):
    try:
        return resolve.tokenizer(cfg.model, cfg.data.tokenizer)
    except FileNotFoundError as e:
        raise data_lib.DataError(f"{e} (data.tokenizer)") from None


def data_path(p: str, split: str) -> Path:
    return TOY_DATA / f"toy_{split}.jsonl" if p == "toy" else Path(p)


class Preempted(Exception):
    pass


def run(cfg: TrainConfig) -> dict:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:  # the run's resolved config: lets `convert lora-to-peft` read the run alone
        (out / "config.yaml").write_text(yaml.safe_dump(settings.to_dict(cfg), sort_keys=False))
    mesh = make_mesh(cfg.mesh)
    log.info("mesh %s over %d devices (%s), %d process(es)", dict(mesh.shape), mesh.size,
             jax.devices()[0].device_kind, jax.process_count())

    tok = tokenizer_for(cfg)
    d = cfg.data
    docs, _ = data_lib.read_documents(data_path(d.train, "train"), tok, d.seq_len, d.overlong, d.max_bad_fraction)
    batches = data_lib.Batches(docs, seq_len=d.seq_len, batch_size=d.batch_size, seed=d.seed, accum=d.grad_accum,
                               process_index=jax.process_index(), process_count=jax.process_count())
    eval_docs = None
    if d.eval:
        eval_docs, _ = data_lib.read_documents(data_path(d.eval, "eval"), tok, d.seq_len, d.overlong, 1.0)

    m = build_model(cfg, mesh)
    mcfg = m.config
    if tok.vocab_size > mcfg.vocab_size:
        raise data_lib.DataError(f"tokenizer has {tok.vocab_size} tokens, model vocab_size is {mcfg.vocab_size}")
    trainable, frozen = split_trainable(mcfg, m.state)
    tx, schedule = optimizer(cfg.optimizer, cfg.steps)
    t_sh = state_shardings(trainable, mesh)
    abstract_state = jax.eval_shape(lambda p: init_train_state(p, tx, cfg.seed), trainable)
    s_sh = train_state_shardings(tx, abstract_state, t_sh, mesh)
    state = jax.jit(lambda p: init_train_state(p, tx, cfg.seed), out_shardings=s_sh)(trainable)
    n_train = sum(x.size for x in jax.tree.leaves(trainable))
    log.info("model: %s parameters, %s trainable (%s)", f"{mcfg.num_params():,}", f"{n_train:,}",
             "LoRA adapters" if mcfg.lora else "all")

    manager = checkpoints.manager(out / "checkpoints", cfg.checkpoint.keep)
    start = 0
    if manager.latest_step() is not None:
        start = manager.latest_step()
        state, data_state = checkpoints.restore(manager, start, abstract_state, s_sh)
        batches.restore(data_state)
        log.info("resumed from %s at step %d", out / "checkpoints", start)

    def save(step):
        checkpoints.save(manager, step, state, batches.state())

    accum = d.grad_accum
    b_sh = batch_shardings(mesh, d.batch_size, d.seq_len, accum)
    step_fn = jax.jit(make_step_fn(m.graphdef, mcfg, tx, mesh, accum, dropout=mcfg.lora is not None and mcfg.lora.dropout > 0),
                      donate_argnums=0, out_shardings=(s_sh, None))
    evaluate = eval_fn(m.graphdef, mesh)

    def to_device(batch, shardings, global_rows):
        shape = lambda a: (global_rows, *a.shape[1:]) if accum == 1 or a.ndim == 2 else (a.shape[0], global_rows // accum, *a.shape[2:])
        return {k: jax.make_array_from_process_local_data(shardings[k], v, shape(v)) for k, v in batch.items()}

    def run_eval(params):
        eb = data_lib.Batches(eval_docs, seq_len=d.seq_len, batch_size=d.batch_size, seed=0, shuffle=False,
                              process_index=jax.process_index(), process_count=jax.process_count())
        e_sh = batch_shardings(mesh, d.batch_size, d.seq_len)
        total, count = 0.0, 0.0
        for _ in range(cfg.eval_batches):
            if eb.epoch > 0:
                break
            loss, n = evaluate(params, frozen, to_device(next(eb), e_sh, d.batch_size))
            total, count = total + float(loss), count + float(n)
        return total / max(count, 1.0)

    flops_tok = model_flops_per_token(mcfg, d.seq_len, lora_only=mcfg.lora is not None)
    peak = peak_flops(jax.devices()[0]) * jax.device_count()
    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signal.Signals(signum).name
        log.warning("received %s: saving a checkpoint at the end of this step, then exiting", stop["signal"])

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    writer = None
    if jax.process_index() == 0:
        from tensorboardX import SummaryWriter
        writer = SummaryWriter(str(out / "tensorboard"))
    metrics_file = open(out / "metrics.jsonl", "a") if jax.process_index() == 0 else None
    bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", disable=jax.process_index() != 0,
               dynamic_ncols=True)
    pending, last_time, last_step, result = None, time.perf_counter(), start, {}

    def emit(step, mtr, eval_loss=None):
        nonlocal last_time, last_step
        loss = float(mtr["loss"])
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {step}; stopping. The last good checkpoint "
                                     f"in {out / 'checkpoints'} is kept (step {manager.latest_step()}).")
        now = time.perf_counter()
        tokens_per_s = float(mtr["tokens_all"]) * (step - last_step) / max(now - last_time, 1e-9)
        last_time, last_step = now, step
        rec = {"step": step, "loss": loss, "learning_rate": float(schedule(step - 1)),
               "grad_norm": float(mtr["grad_norm"]), "tokens_per_s": round(tokens_per_s, 1),
               "mfu": round(tokens_per_s * flops_tok / peak, 4)}
        if eval_loss is not None:
            rec["eval_loss"] = eval_loss
        result.update(rec)
        if metrics_file:
            metrics_file.write(json.dumps(rec) + "\n")
            metrics_file.flush()
            for k, v in rec.items():
                if k != "step":
                    writer.add_scalar(f"train/{k}", v, step)
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}")

    profile = tuple(cfg.profile_steps)
    try:
        last = min(cfg.steps, cfg.stop_after or cfg.steps)
        for step in range(start + 1, last + 1):
            if profile and step == profile[0]:
                jax.profiler.start_trace(str(out / "profile"))
            batch = to_device(next(batches), b_sh, d.batch_size)
            state, mtr = step_fn(state, frozen, batch)
            mtr["tokens_all"] = d.batch_size * d.seq_len
            if profile and step == profile[-1]:
                jax.block_until_ready(state)
                jax.profiler.stop_trace()
            # Metrics are read one step late, so the host never waits on the device it just fed.
            if pending is not None:
                emit(*pending)
                pending = None
            do_eval = eval_docs is not None and (step % cfg.eval_every == 0 or step == cfg.steps)
            if step % cfg.log_every == 0 or step in (1, last) or do_eval:
                pending = (step, mtr, run_eval(state["params"]) if do_eval else None)
            bar.update(1)
            if step % cfg.checkpoint.every == 0 or step == last or stop["signal"]:
                if pending is not None:
                    emit(*pending)
                    pending = None
                save(step)
            if stop["signal"]:
                raise Preempted(stop["signal"])
        if pending is not None:
            emit(*pending)
    except Preempted as e:
        manager.wait_until_finished()
        log.warning("stopped by %s after step %d; checkpoint saved, rerun the same command to resume", e, step)
        result["preempted"] = str(e)
        return result
    finally:
        bar.close()
        manager.wait_until_finished()
        if metrics_file:
            metrics_file.close()
            writer.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)

    if last < cfg.steps:
        log.info("stopped at step %d of %d as configured (stop_after); rerun to continue", last, cfg.steps)
        return result
    if mcfg.lora is not None:
        # Every process takes part in the gather (a collective); the first one writes the files.
        adapters = multihost_utils.process_allgather(state["params"], tiled=True)
        if jax.process_index() == 0:
            export_adapter(adapters, mcfg, out / "adapter", cfg)
    result["output_dir"] = str(out)
    return result


def export_adapter(params, mcfg, out_dir: Path, cfg: TrainConfig):
    export_peft(params, mcfg, out_dir, base_model=cfg.model.checkpoint or cfg.model.preset)
    log.info("wrote the PEFT adapter to %s", out_dir)
