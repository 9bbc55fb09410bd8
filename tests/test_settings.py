"""Typed YAML job configs (model/settings.py): errors name the file, key and line, or the override."""

import pytest

from model.job.settings import ConfigError
from serve.config import load_config as serve_config
from train.config import load_config as train_config


def test_defaults_and_overrides():
    cfg = train_config(None, ["lora.rank=8", "steps=3"])
    assert cfg.lora.rank == 8 and cfg.steps == 3
    assert serve_config(None, ["engine.max_slots=2"]).engine.max_slots == 2


def test_errors_name_where(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: 5\nlora:\n  rank: 8\n  rnak: 4\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:lora \(line 2\)\.rnak \(line 4\): unknown key"):
        train_config(str(bad))
    with pytest.raises(ConfigError, match=r"max_slots \(from the command line\): expected an integer, got 'x'"):
        serve_config(None, ["engine.max_slots=x"])
    with pytest.raises(ConfigError, match="shipped configs: .*toy_cpu"):
        train_config("no_such_config")
    with pytest.raises(ConfigError, match="expected key=value"):
        train_config(None, ["steps"])
