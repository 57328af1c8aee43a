"""Config dataclasses to plain dicts and JSON, and back with every type checked.

:func:`to_dict` / :func:`to_json` write a config (enums as their ``str`` values, sorted
keys); :func:`decode` and :func:`decode_search` read one back, parsing enums and checking
each value against its declared type, with no range checks: for anything received, use
:func:`fedimg.config.from_dict`, which also validates.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import typing
from typing import Any

from fedimg.config.choices import Choice
from fedimg.config.schema import FedimgConfig, SearchConfig
from fedimg.errors import ConfigError


def _plain(value: Any) -> Any:
    """``value`` with every enum member replaced by its plain ``str`` value."""
    if isinstance(value, Choice):
        return str(value.value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass (JSON/YAML serialisable; enums as ``str``)."""
    return dataclasses.asdict(cfg, dict_factory=lambda items: {k: _plain(v) for k, v in items})


def to_json(cfg: FedimgConfig) -> str:
    """Canonical JSON of a config: sorted keys, so equal configs give equal text."""
    return json.dumps(to_dict(cfg), sort_keys=True)


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The resolved type of each field of the config dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _type_error(key: str, value: Any, kind: Any) -> ConfigError:
    name = getattr(kind, "__name__", None) or str(kind).replace("typing.", "")
    return ConfigError(f"{key}={value!r} must be {name}. Fix: give {key} a value of that type")


def _leaf(key: str, value: Any, kind: Any) -> Any:
    """``value`` checked against the declared type ``kind``; enums parsed, ints as floats."""
    args = typing.get_args(kind)
    if type(None) in args:  # Optional[X]
        return None if value is None else _leaf(key, value, args[0])
    if isinstance(kind, type) and issubclass(kind, Choice):
        return kind.parse(value, key=key)
    origin = typing.get_origin(kind)
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise _type_error(key, value, kind)
        return {k: _leaf(f"{key}.{k}", v, args[1]) for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise _type_error(key, value, kind)
        return [_leaf(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if origin is not None or not isinstance(kind, type):  # other generics: not checked here
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _type_error(key, value, kind)
    return value


def _section(cls: type, values: Any, prefix: str) -> Any:
    if not isinstance(values, dict):
        raise _type_error(prefix.rstrip(".") or "config", values, cls)
    types, kwargs = field_types(cls), {}
    for key, value in values.items():
        if key not in types:
            raise ConfigError(f"unknown config key '{prefix}{key}' in {cls.__name__}; valid "
                              f"keys: {', '.join(types)}. Fix: correct or remove it")
        kind = types[key]
        kwargs[key] = (_section(kind, value, f"{prefix}{key}.") if dataclasses.is_dataclass(kind)
                       else _leaf(prefix + key, value, kind))
    return cls(**kwargs)


def decode(values: dict[str, Any]) -> FedimgConfig:
    """Inverse of :func:`to_dict`: types checked, enums parsed, but no range checks.

    Use :func:`fedimg.config.from_dict`, which also validates, for anything received.
    """
    return _section(FedimgConfig, values, "")


def decode_search(values: dict[str, Any]) -> SearchConfig:
    """``compare.*`` search values as a :class:`SearchConfig`, types checked (no ranges)."""
    return _section(SearchConfig, values, "compare.")
