"""Strict YAML → dataclass loading with dotted overrides (nanotron-style: unknown keys are errors).

Each component owns its dataclass; this module only knows how to build any of them from plain data,
so a typo in a config file or on the command line fails before a worker starts, naming the key.
"""
from __future__ import annotations

import copy
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A config value that cannot be used; the message names the key path."""


def read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A config file's mapping, merged over its `extends:` parent (a path relative to it), recursively; shared by
    the run, SimCSE and table configs."""
    if path in seen:
        raise ConfigError(f"{path}: `extends` cycle through {', '.join(map(str, seen))}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    return deep_merge(read_yaml((path.parent / parent).resolve(), (*seen, path)), raw)


def deep_merge(base: dict, top: dict) -> dict:
    """`top` over a copy of `base`, mapping by mapping: a child file over its parent, a task over its defaults."""
    merged = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` → (["a", "b", "c"], YAML-parsed value)."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: expected dotted key=value, e.g. train.epochs=3")
    return key.split("."), yaml.safe_load(raw) if raw.strip() else ""


def apply_override(raw: dict, path: list[str], value: Any) -> None:
    node = raw
    for depth, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(path[:depth + 1])}: is a value, not a section; cannot set {'.'.join(path)}")
        node = child
    node[path[-1]] = value


def build(cls: type, data: Any, key: str = "") -> Any:
    """Build dataclass `cls` from plain `data`, checking every key and type; errors name the key path."""
    return _convert(cls, data, key)


def to_plain(obj: Any) -> Any:
    """Dataclass tree → plain dicts/lists (what YAML and Ray's config dicts carry)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    where = key or "<root>"
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, key)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _convert(option, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {tp}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not allowed; allowed: {', '.join(map(repr, allowed))}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_convert(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, value_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): _convert(value_tp, v, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 5e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{where}: unsupported config field type {tp!r}")


def _build_dataclass(cls: type, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(value) and isinstance(value, cls):
        return value
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key or '<root>'}: expected a section (mapping), got {value!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        prefix = f"{key}." if key else ""
        raise ConfigError(f"unknown key {prefix}{unknown[0]}; allowed in {key or 'the top level'}: {', '.join(sorted(fields))}")
    kwargs = {name: _convert(hints[name], raw, f"{key}.{name}" if key else name) for name, raw in value.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{key + '.' if key else ''}{exc}") from exc
