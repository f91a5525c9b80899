"""Typed dataclass trees from plain data, with errors that name the dotted path.

``from_dict(Cls, raw, path)`` checks every key against the dataclass fields,
every value against its annotation (int, float, bool, str, Literal, Optional,
list[...], nested dataclasses), then calls the instance's ``validate(path)``
for range checks. Each error reads ``path: got VALUE; expected WHAT``.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from typing import Any, Literal, Union


class ConfigError(ValueError):
    """A setting is unknown, of the wrong type, or impossible."""


def check(ok: bool, path: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{path}: got {value!r}; expected {expected}")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping of settings"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: got {value!r}; expected {_describe(tp)}")
        return from_dict(tp, value, path)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{path}: got null; expected {_describe(tp)}")
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, path)
            except ConfigError:
                continue
        raise ConfigError(f"{path}: got {value!r}; expected {_describe(tp)}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{path}: got {value!r}; expected {_describe(tp)}")
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: got {value!r}; expected {_describe(tp)}")
        return {_convert(key_tp, k, path): _convert(value_tp, v, f"{path}.{k}") for k, v in value.items()}
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and item in (str, int, float):
            value = [value]  # a single site or task is a list of one
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: got {value!r}; expected {_describe(tp)}")
        return [_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Any:
        return value
    raise ConfigError(f"{path}: got {value!r}; expected {_describe(tp)}")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """``cls``'s field types, its annotations evaluated once (they are text: ``from __future__ import annotations``)."""
    return typing.get_type_hints(cls)


def from_dict(cls: type, raw: dict, path: str = ""):
    """Build dataclass ``cls`` from ``raw``, validating as described above."""
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {_join(path, close[0])}?" if close else ""
            raise ConfigError(f"{_join(path, str(key))}: unknown setting; "
                              f"valid keys here: {', '.join(names)}{hint}")
    kwargs = {key: _convert(hints[key], value, _join(path, key)) for key, value in raw.items()}
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate(path or "")
    return obj


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain dicts and lists (YAML- and JSON-ready)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj
