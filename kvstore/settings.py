"""Layered configuration: command-line values, then ``KVSTORE_*`` environment
variables, then a YAML file, then the defaults of a config dataclass.

Each process role has one frozen dataclass (``kvstore.server.config.ServerConfig``,
``kvstore.client.config.ClientConfig``); this module only merges the layers and
converts values, naming the field in every error.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Mapping

import yaml

from kvstore.errors import ConfigError
from kvstore.units import parse_size

ENV_PREFIX = "KVSTORE_"


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings, not {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def read_env(fields: set[str], environ: Mapping[str, str] | None = None) -> dict[str, str]:
    environ = os.environ if environ is None else environ
    found = {}
    for name in fields:
        value = environ.get(ENV_PREFIX + name.upper())
        if value is not None:
            found[name] = value
    return found


def merge_layers(cls, *, args: Mapping[str, Any], environ: Mapping[str, str] | None, file: str | None):
    """Build ``cls`` from args over env over file over defaults."""
    names = {f.name for f in dataclasses.fields(cls)}
    env = read_env(names | {"config"}, environ)
    file = file or env.pop("config", None)
    env.pop("config", None)
    layers: dict[str, Any] = {}
    if file:
        from_file = read_yaml(file)
        unknown = sorted(set(from_file) - names)
        if unknown:
            raise ConfigError(f"config file {file}: unknown setting(s) {', '.join(unknown)}")
        layers.update(from_file)
    layers.update(env)
    layers.update({k: v for k, v in args.items() if v is not None})
    layers.pop("config", None)
    hints = typing.get_type_hints(cls)
    sizes = {f.name for f in dataclasses.fields(cls) if f.metadata.get("size")}
    values = {}
    for name, value in layers.items():
        if name in sizes:
            try:
                values[name] = parse_size(value)
            except ValueError as exc:
                raise ConfigError(f"{name}: {exc}") from None
        else:
            values[name] = coerce(name, hints[name], value)
    return cls(**values)


def size_field(default: int):
    """A dataclass field holding bytes that accepts "64MiB"-style strings."""
    return dataclasses.field(default=default, metadata={"size": True})


def coerce(name: str, hint, value):
    """Convert a string from env/CLI to the field's type; pass typed values through."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("", "none", "null")):
            return None
        hint = args[0]
        origin = typing.get_origin(hint)
    if not isinstance(value, str):
        return value
    try:
        if hint is bool:
            lowered = value.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"expected true/false, got {value!r}")
        if hint is int:
            return int(value)
        if hint is float:
            return float(value)
        if origin in (tuple, list):
            return tuple(part.strip() for part in value.split(",") if part.strip())
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from exc
    return value
