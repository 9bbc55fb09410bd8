"""What every job's command line does first: logging in plain words, multi-host start-up, its config."""

from __future__ import annotations

import logging
import sys

from model.job import distributed
from model.job.settings import ConfigError


def setup_logging() -> None:
    # force: importing Orbax runs absl's logging set-up, which would make basicConfig a no-op
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax narrates every file it writes at INFO


def start_job(load_config, path: str | None, overrides: list[str]):
    """Logging, multi-host start-up, then `load_config(path, overrides)`. None (after printing the error)
    when the config is bad."""
    setup_logging()
    distributed.initialize()
    try:
        return load_config(path, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return None
