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


@pytest.mark.parametrize("raw", ["0x1A", "yes", "abc #x", "null", "~", "no", "1e3", "[a, b]", "{k: v}", "'q'"])
def test_string_overrides_are_taken_literally(raw):
    """A secret or name typed on the command line is the text typed, never YAML-typed or cut at '#'."""
    assert serve_config(None, [f"server.api_key={raw}"]).server.api_key == raw
    assert train_config(None, [f"data.eval={raw}"]).data.eval == raw


def test_non_string_overrides_are_still_typed(tmp_path):
    cfg = train_config(None, ["steps=0x10", "lora.rank=8", "data.seq_len=64"])
    assert cfg.steps == 16 and cfg.lora.rank == 8
    assert serve_config(None, ["devices=null"]).devices is None
    with pytest.raises(ConfigError, match=r"steps \(from the command line\): invalid value '\[': "):
        train_config(None, ["steps=["])


def test_non_empty_fields_refuse_an_empty_value():
    import dataclasses

    from model.job import settings

    @dataclasses.dataclass(frozen=True)
    class Cfg:
        key: str | None = dataclasses.field(default=None, metadata={"non_empty": True})
        name: str = ""

    assert settings.load(Cfg, None, ["name="]).name == ""
    assert settings.load(Cfg, None, ["key=~"]).key == "~"
    with pytest.raises(ConfigError, match=r"key \(from the command line\): must not be empty"):
        settings.load(Cfg, None, ["key="])


def test_serve_api_key_is_literal_and_never_empty():
    """`server.api_key=` must not silently turn authentication off, and a key is never YAML-typed."""
    assert serve_config(None, ["server.api_key=0x1A"]).server.api_key == "0x1A"
    assert serve_config(None, ["server.api_key=null"]).server.api_key == "null"
    with pytest.raises(ConfigError, match="api_key.*must not be empty"):
        serve_config(None, ["server.api_key="])


def test_headroom_is_a_config_field_and_the_flag_sets_it(monkeypatch):
    """`headroom` in the config (so every worker of a pod run reads the same), `--headroom` a shorthand for it,
    and what --compile-only / model.remat=auto are given."""
    from train import __main__ as train_main
    assert train_config(None, ["headroom=0.25"]).headroom == 0.25
    with pytest.raises((ConfigError, ValueError), match="headroom"):
        train_config(None, ["headroom=1.5"])
    seen = []
    monkeypatch.setattr(train_main, "compile_only", lambda cfg, headroom: seen.append(headroom) or 0)
    assert train_main.main(["--compile-only", "--headroom", "0.3"]) == 0
    assert train_main.main(["--compile-only", "headroom=0.2"]) == 0
    assert seen == [0.3, 0.2]
