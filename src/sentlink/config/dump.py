"""The effective configuration as data: ``sentlink config`` (postconf -n / -d style)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from sentlink.config.models import Config

JSONValue = Any


def yaml_key(field: dataclasses.Field[Any]) -> str:
    """The key a field has in sentlink.yaml (``if``, ``from``, ``continue`` are keywords)."""
    key = field.metadata.get("key")
    return key if isinstance(key, str) else field.name


def as_data(value: object) -> JSONValue:
    """A JSON-able form of a config value, with the YAML key names."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {yaml_key(f): as_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [as_data(v) for v in value]
    if isinstance(value, dict):
        return {str(k): as_data(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def flatten(data: JSONValue, prefix: str = "") -> list[tuple[str, JSONValue]]:
    """``milter.outbound.auth``-style names for every scalar (and for lists of scalars)."""
    if isinstance(data, dict):
        if not data and prefix:
            return [(prefix, {})]
        out: list[tuple[str, JSONValue]] = []
        for key, value in data.items():
            out.extend(flatten(value, f"{prefix}.{key}" if prefix else key))
        return out
    if isinstance(data, list) and any(isinstance(v, dict | list) for v in data):
        out = []
        for i, value in enumerate(data):
            out.extend(flatten(value, f"{prefix}[{i}]"))
        return out
    return [(prefix, data)]


def non_default(config: Config) -> JSONValue:
    """Only the keys whose value differs from the built-in default (nested)."""
    return _diff(as_data(config), as_data(Config()))


def _diff(value: JSONValue, default: JSONValue) -> JSONValue:
    if isinstance(value, dict) and isinstance(default, dict):
        out = {}
        for key, sub in value.items():
            if key not in default:
                out[key] = sub
                continue
            changed = _diff(sub, default[key])
            if changed is not _SAME:
                out[key] = changed
        return out if out else _SAME
    return _SAME if value == default else value


_SAME: Any = object()


def render_lines(data: JSONValue) -> str:
    """``name = value`` lines, as postconf prints them."""
    if data is _SAME:
        return ""
    lines = []
    for name, value in flatten(data):
        if isinstance(value, list):
            text = ", ".join(json.dumps(v) if not isinstance(v, str) else v for v in value)
        elif value is None:
            text = "null"
        elif isinstance(value, bool):
            text = "true" if value else "false"
        else:
            text = str(value)
        lines.append(f"{name} = {text}")
    return "".join(f"{line}\n" for line in lines)


def render_json(data: JSONValue) -> str:
    return json.dumps({} if data is _SAME else data, ensure_ascii=False)
