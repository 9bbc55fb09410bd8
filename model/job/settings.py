"""Typed configs from YAML files plus `key=value` overrides.

A job's config is a tree of frozen dataclasses (one per concern); YAML only sets values. Unknown
keys and values of the wrong type are errors that name the key and the file (with its line).
A `key=value` override is YAML-typed, except for a field typed `str` (or `str | None`, or a tuple of
strings): that takes the text literally. A field typed `dict[K, V]` takes a mapping (YAML, or a flow mapping
on the command line: `model.lora_modules='{sql: /path/a, chat: /path/b}'`). A field declared with
`metadata={"non_empty": True}` refuses "".
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path

import yaml


class ConfigError(ValueError):
    pass


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that remembers the line of each mapping key."""


def _construct_mapping(loader, node, deep=False):
    mapping = yaml.SafeLoader.construct_mapping(loader, node, deep=True)
    mapping["__lines__"] = {k.value: k.start_mark.line + 1 for k, _ in node.value if hasattr(k, "value")}
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


class _Override:
    """A `key=value` from the command line: taken literally by a string field (a secret such as `0x1A`,
    `yes`, `abc #x`, `null` or `~` stays what was typed), YAML-typed for any other field."""

    def __init__(self, raw: str):
        self.raw = raw

    def parsed(self, where: str):
        try:
            return yaml.safe_load(self.raw) if self.raw else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"{where}: invalid value {self.raw!r}: {e}") from None


def _takes_str(tp) -> bool:
    return tp is str or (typing.get_origin(tp) in (typing.Union, types.UnionType) and str in typing.get_args(tp))


def _coerce(value, tp, where: str):
    origin = typing.get_origin(tp)
    if isinstance(value, _Override):
        if _takes_str(tp):
            return value.raw
        parsed = value.parsed(where)
        if origin is tuple and (typing.get_args(tp) or (None,))[0] is str and not isinstance(parsed, list):
            parsed = value.raw  # a comma-separated list of strings, each taken literally
        value = parsed
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: cannot be null")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return build(tp, value, where)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping ({{name: value, ...}}), got {value!r}")
        key_tp, value_tp = typing.get_args(tp) or (typing.Any, typing.Any)
        return {_coerce(k, key_tp, f"{where}[{k!r}]"): _coerce(v, value_tp, f"{where}.{k}")
                for k, v in value.items() if k != "__lines__"}
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            value = [v.strip() for v in str(value).split(",") if v.strip()] if isinstance(value, str) else [value]
        (inner, *_) = typing.get_args(tp) or (typing.Any,)
        return tuple(_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is typing.Any or tp is object:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if value is None or isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def build(cls, values: dict, where: str = ""):
    """`cls(**values)` recursively, checking names and types."""
    lines = values.get("__lines__", {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kw = {}
    for key, value in values.items():
        if key == "__lines__":
            continue
        at = f"{where}{'.' if where and not where.endswith(':') else ''}{key}"
        if key in lines:
            at = f"{at} (line {lines[key]})" if lines[key] != "command line" else f"{at} (from the command line)"
        if key not in fields:
            raise ConfigError(f"{at}: unknown key; {cls.__name__} has {', '.join(fields)}")
        kw[key] = _coerce(value, hints[key], at)
        if kw[key] == "" and fields[key].metadata.get("non_empty"):
            raise ConfigError(f"{at}: must not be empty")
    try:
        return cls(**kw)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from None


def _set_path(tree: dict, dotted: str, value):
    keys = dotted.split(".")
    for k in keys[:-1]:
        node = tree.get(k)
        if not isinstance(node, dict):
            node = tree[k] = {}
        tree = node
    tree[keys[-1]] = value
    tree.setdefault("__lines__", {})[keys[-1]] = "command line"  # errors name where the value came from


def load(cls, path: str | Path | None, overrides: list[str] = (), search_dir: Path | None = None):
    """Reads `path` (a bare name resolves to `search_dir/NAME[.yaml]`) and applies `key=value` overrides."""
    values: dict = {}
    where = "defaults"
    if path is not None:
        p = Path(path)
        if not p.exists() and search_dir is not None:
            for cand in (search_dir / str(path), search_dir / f"{path}.yaml"):
                if cand.exists():
                    p = cand
                    break
        if not p.exists():
            known = sorted(x.stem for x in search_dir.glob("*.yaml")) if search_dir else []
            raise ConfigError(f"config {path!r} not found" + (f"; shipped configs: {', '.join(known)}" if known else ""))
        try:
            values = yaml.load(p.read_text(), Loader=_LineLoader) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML: {e}") from None
        where = f"{p}:"
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        _set_path(values, key.strip(), _Override(raw))
    return build(cls, values, where)


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)
