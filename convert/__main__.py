"""`python -m convert <job> …`: checkpoint conversion and export jobs.

  hf-to-orbax  --hf DIR --out DIR [--quant int8|int4] [--dtype bfloat16] [--mesh fsdp=…,tensor=…]
  verify       --orbax DIR --hf DIR
  orbax-to-hf  --orbax DIR --out DIR [--dtype …] [--max-shard-size 5GB]
  lora-to-peft --ckpt DIR --out DIR [--base-model NAME]
  merge-lora   --base DIR --ckpt DIR --out DIR [--dtype bfloat16]

Multi-process (hf-to-orbax, orbax-to-hf): start one process per host with --coordinator HOST:PORT
--num-processes N --process-id I (or --distributed on a TPU pod / SLURM, where jax.distributed finds
them); all processes must see the same output path (shared filesystem or gs://).
Errors (bad files, refused inputs) print one message naming the file and tensor and exit with 2.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import sys
from pathlib import Path

from convert.export import merge_lora, orbax_to_hf
from convert.hf_to_orbax import convert
from convert.verify import verify
from model.formats.checkpoint import CheckpointFormatError
from model.formats.peft import lora_to_peft
from model.formats.safetensors_io import CheckpointError
from model.job import distributed, resolve
from train.config import load_config  # an entry point may reach across jobs: a run's config


def _common(p, multi=False):
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output (or unfinished job)")
    if multi:
        g = p.add_argument_group("multi-process")
        g.add_argument("--coordinator", help="HOST:PORT of process 0 (jax.distributed)")
        g.add_argument("--num-processes", type=int)
        g.add_argument("--process-id", type=int)
        g.add_argument("--distributed", action="store_true", help="jax.distributed.initialize() with auto-detection")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m convert", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="job", required=True)

    p = sub.add_parser("hf-to-orbax", help="HF safetensors -> sharded Orbax checkpoint (streaming, resumable)")
    p.add_argument("--hf", required=True, help="HF checkpoint directory (config.json + *.safetensors)")
    p.add_argument("--out", required=True, help="output checkpoint directory (local or gs://)")
    p.add_argument("--dtype", default="bfloat16", help="dtype of float parameters (default bfloat16)")
    p.add_argument("--quant", default=None, help="int8 (per channel), int4 (group 128) or int4-g<N>")
    p.add_argument("--mesh", default=None,
                   help="chunk arrays for this mesh's shards, e.g. fsdp=16,tensor=4 (any mesh can restore)")
    p.add_argument("--kv-heads", type=int, default=None,
                   help="KV heads to keep (default: the file's, except 16 -> 8 for the 405B upload with repeated heads)")
    p.add_argument("--block-mb", type=float, default=64, help="MiB of source rows handled at a time (memory)")
    p.add_argument("--chunk-mb", type=float, default=64, help="largest chunk of an output array, MiB")
    _common(p, multi=True)

    p = sub.add_parser("verify", help="compare every tensor of an Orbax checkpoint with its HF source")
    p.add_argument("--orbax", required=True)
    p.add_argument("--hf", required=True)
    p.add_argument("--block-mb", type=float, default=64)
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("orbax-to-hf", help="Orbax checkpoint -> HF safetensors + index + config.json")
    p.add_argument("--orbax", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default=None, help="output dtype (default: the checkpoint's; bfloat16 if quantized)")
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--block-mb", type=float, default=64)
    _common(p, multi=True)

    p = sub.add_parser("lora-to-peft", help="LoRA adapters of a checkpoint -> PEFT adapter directory")
    p.add_argument("--ckpt", required=True, help="checkpoint directory holding lora_a/lora_b (or a run's step dirs)")
    p.add_argument("--out", required=True)
    p.add_argument("--base-model", default=None, help="base_model_name_or_path for adapter_config.json")
    p.add_argument("--dtype", default=None, help="adapter tensor dtype (default: as stored)")
    p.add_argument("--config", nargs="+", default=None, metavar="[YAML] [key=value …]",
                   help="for a `python -m train` run directory: the run's config (model and LoRA settings), "
                        "as given to python -m train")

    p = sub.add_parser("merge-lora", help="base + LoRA adapters -> merged HF checkpoint")
    p.add_argument("--base", required=True, help="base model: Orbax checkpoint or HF directory")
    p.add_argument("--ckpt", required=True, help="checkpoint holding the adapters")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--config", nargs="+", default=None, metavar="[YAML] [key=value …]",
                   help="for a `python -m train` run directory: the run's config, as given to python -m train")
    _common(p)
    return ap


def _train_config(argv, ckpt=None):
    """The model config (with LoRA settings) of a `python -m train` config file, or of the run
    directory holding `ckpt` (python -m train writes its resolved config.yaml there)."""
    if not argv and ckpt is not None:
        run_dir = next((d for d in (Path(ckpt), *Path(ckpt).parents[:2]) if (d / "config.yaml").exists()), None)
        argv = [str(run_dir / "config.yaml")] if run_dir else None
    if not argv:
        return None
    path, overrides = (None, argv) if "=" in argv[0] else (argv[0], argv[1:])
    tc = load_config(path, overrides)
    cfg = resolve.base_config(tc.model)
    return cfg.replace(lora=tc.lora)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    for noisy in ("absl", "jax", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        return _main(args)
    finally:  # leave logging as found (matters when called in-process, e.g. by tests)
        root.removeHandler(handler)
        root.setLevel(level)


def _bounded_malloc() -> None:
    """glibc only: hand every freed buffer of 1 MiB or more straight back to the OS (a fixed mmap
    threshold). By default the threshold rises to the size of freed blocks and later frees stay in
    per-thread heaps, so a long job's resident memory creeps up; with this it stays at the few
    blocks in flight, whatever the number of layers."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _main(args) -> int:
    _bounded_malloc()
    try:
        if getattr(args, "coordinator", None) or getattr(args, "distributed", False):
            distributed.initialize(args.coordinator, args.num_processes, args.process_id, auto=args.distributed)
        progress = not getattr(args, "no_progress", False)
        if args.job == "hf-to-orbax":
            convert(args.hf, args.out, dtype=args.dtype, quant=args.quant, kv_heads=args.kv_heads, mesh=args.mesh,
                    chunk_bytes=int(args.chunk_mb * 2**20), block_bytes=int(args.block_mb * 2**20),
                    overwrite=args.overwrite, progress=progress)
        elif args.job == "verify":
            return 0 if verify(args.orbax, args.hf, block_bytes=int(args.block_mb * 2**20), progress=progress) else 1
        elif args.job == "orbax-to-hf":
            orbax_to_hf(args.orbax, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
                        block_bytes=int(args.block_mb * 2**20), overwrite=args.overwrite, progress=progress)
        elif args.job == "lora-to-peft":
            lora_to_peft(args.ckpt, args.out, base_model=args.base_model, dtype=args.dtype,
                         config=_train_config(args.config, args.ckpt))
        elif args.job == "merge-lora":
            merge_lora(args.base, args.ckpt, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
                       overwrite=args.overwrite, progress=progress, config=_train_config(args.config, args.ckpt))
    except (CheckpointError, CheckpointFormatError, FileExistsError, FileNotFoundError, NotImplementedError,
            ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
