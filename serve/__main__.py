"""python -m serve [--config NAME_OR_PATH] [--compile-only] [key=value ...]
python -m serve generate --prompt "..." [--chat] [--max-tokens N] [--temperature T] [--config ...] [key=value ...]

With no arguments: an OpenAI-compatible server for the toy model (random weights, byte tokenizer) on
http://127.0.0.1:8000, on this machine's CPU. `generate` runs one completion and prints it.
`--compile-only` compiles the prefill and decode steps for the config's topology (ahead of time for TPU
slices, on a machine without a TPU) or local devices, prints per-chip memory, and exits 0 if it fits.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time


def _parser(generate: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serve" + (" generate" if generate else ""), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="a config in configs/ (by name) or a YAML path; default: serve_toy")
    if generate:
        p.add_argument("--prompt", required=True, help="the prompt (text)")
        p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message (chat format)")
        p.add_argument("--max-tokens", type=int, default=64)
        p.add_argument("--temperature", type=float, default=0.0)
        p.add_argument("--top-p", type=float, default=1.0)
        p.add_argument("--top-k", type=int, default=0)
        p.add_argument("--seed", type=int, default=None)
        p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    else:
        p.add_argument("--compile-only", action="store_true",
                       help="compile the serving steps for the config's topology/mesh, print per-chip memory, exit")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. engine.max_slots=16 server.port=8080")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    generate = bool(argv) and argv[0] == "generate"
    args = _parser(generate).parse_args(argv[1:] if generate else argv)
    # imported after parsing, so that --help and usage errors answer without loading JAX
    import jax

    from model.job.startup import start_job
    from serve.compile_check import compile_only
    from serve.config import load_config
    from serve.engine import Engine
    from serve.sampling import SamplingParams
    from serve.server import check_exposure, run_server
    from serve.weights import adapter_slots, build, load_modules, served_names
    from sharding.mesh import make_mesh

    cfg = start_job(load_config, args.config, args.overrides)
    if cfg is None:
        return 2
    if not generate and args.compile_only:
        return compile_only(cfg)

    try:
        if not generate:
            check_exposure(cfg.server)  # before the weights load: a refused start is quick
        devices = jax.devices()[:cfg.devices] if cfg.devices else jax.devices()
        mesh = make_mesh(cfg.mesh, devices)
        model, tokenizer, name = build(cfg.model, mesh, adapter_slots(cfg))
        engine = Engine(model, tokenizer, cfg.engine)
        engine.release_model_weights()  # the engine holds what it runs (per-layer copies on CPU)
        load_modules(engine, cfg.model)  # model.lora_modules into adapter slots
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log = logging.getLogger("serve")
    e = engine.cfg  # block_size and prefill_chunk resolved for the platform
    log.info("model %s: %s parameters%s, mesh %s; up to %d requests of %d tokens; KV pool %s, %d blocks of %d "
             "tokens (%.1f MiB); prompt chunks of %d tokens", name, f"{model.config.num_params():,}",
             f", {model.config.quant.name}" if model.config.quant else "", dict(mesh.shape), e.max_slots, e.max_len,
             engine.kv_dtype, e.num_blocks, e.block_size, engine.cache.nbytes / 2**20, e.prefill_chunk)
    if cfg.engine.warmup:
        engine.warmup()

    if generate:
        ids = tokenizer.encode_chat([{"role": "user", "content": args.prompt}]) if args.chat else \
            tokenizer.encode(args.prompt, bos=True)
        try:
            params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                    top_k=args.top_k, seed=args.seed, stop=tuple(args.stop))
            t0 = time.perf_counter()
            (r,) = engine.generate([ids], params)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        dt = time.perf_counter() - t0
        print(r["text"])
        log.info("%d prompt + %d completion tokens in %.2f s (finish: %s, first token after %.2f s)", len(ids),
                 r["completion_tokens"], dt, r["finish_reason"], r.get("ttft", float("nan")))
        return 0 if r["finish_reason"] != "error" else 1

    log.info("serving %s on http://%s:%d/v1", name, cfg.server.host, cfg.server.port)
    run_server(engine, tokenizer, name, cfg.server, served_names(cfg.model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
