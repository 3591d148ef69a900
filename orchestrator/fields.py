"""Config dataclasses check their own field types from their annotations (no hand-kept
table to drift), and command lines take their defaults from the same fields."""

from __future__ import annotations

import types
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from orchestrator.errors import ConfigError


def check_types(instance: Any) -> None:
    """ConfigError naming ``Class.field`` for the first field whose value does not match its
    annotation. ``bool`` is not taken for ``int`` or ``float``, nor an ``int`` for ``bool``."""
    cls = type(instance)
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if not f.init:
            continue
        value = getattr(instance, f.name)
        if not matches(value, hints[f.name]):
            raise ConfigError(f"{cls.__name__}.{f.name} must be {describe(hints[f.name])}, "
                              f"got {value!r}")


def matches(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint in (int, float, bool):
        # bool is an int subclass: True is neither a TP size nor a timeout.
        if isinstance(value, bool):
            return hint is bool
        return isinstance(value, (int, float) if hint is float else hint)
    if origin is list:
        return isinstance(value, list) and all(matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(
            matches(k, args[0]) and matches(v, args[1]) for k, v in value.items())
    return isinstance(value, origin or hint)


def describe(hint: Any) -> str:
    """How a type reads in an error message: ``int``, ``a number``, ``str or None``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(describe(arg) for arg in typing.get_args(hint))
    return {float: "a number", Path: "a path"}.get(hint) or _spelled(hint)


def _spelled(hint: Any) -> str:
    if hint is type(None):
        return "None"
    if hint is Any:
        return "Any"
    origin = typing.get_origin(hint)
    if origin is None:
        return hint.__name__
    return f"{origin.__name__}[{', '.join(_spelled(a) for a in typing.get_args(hint))}]"


def default(cls: type, name: str) -> Any:
    """The default of field ``name`` of dataclass ``cls`` (for command-line defaults)."""
    for f in fields(cls):
        if f.name == name:
            if f.default is not MISSING:
                return f.default
            if f.default_factory is not MISSING:
                return f.default_factory()
            raise KeyError(f"{cls.__name__}.{name} has no default")
    raise KeyError(f"{cls.__name__} has no field {name!r}")
