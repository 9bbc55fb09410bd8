"""python -m train [--config NAME_OR_PATH] [--compile-only] [key=value ...]

With no arguments: LoRA fine-tuning of the toy model on the bundled toy task, on this machine's CPU.
"""

import argparse
import logging
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="a config in configs/ (by name) or a YAML path; default: toy_cpu")
    parser.add_argument("--compile-only", action="store_true",
                        help="compile the step for the config's mesh/topology, print per-chip memory, exit 0 if it fits")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=50 lora.rank=8")
    args = parser.parse_args(argv)
    from model.job.startup import start_job
    from train.config import load_config

    cfg = start_job(load_config, args.config, args.overrides)
    if cfg is None:
        return 2
    if args.compile_only:
        from train.compile_check import compile_only
        return compile_only(cfg)
    from train.data import DataError
    from train.loop import run
    try:
        result = run(cfg)
    except (DataError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    logging.getLogger("train").info("done: %s", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
