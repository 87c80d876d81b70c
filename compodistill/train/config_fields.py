"""The field checks every config section shares: one error type naming the key, typed fields
with their allowed values (``choice``), and :func:`check_fields`, which coerces and checks them.

Below :mod:`.config` and :mod:`.cache_options`, which both build their sections from it.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import field


class ConfigError(ValueError):
    """A bad config value. ``key`` is its path in the file (``stages[1].lr``, ``kd.loss``)."""

    def __init__(self, key: str, message: str):
        self.key, self.message = key, message
        super().__init__(f"{key}: {message}" if key else message)

    def within(self, prefix: str) -> "ConfigError":
        """The same error, with its key placed under ``prefix``."""
        return ConfigError(f"{prefix}.{self.key}" if self.key else prefix, self.message)


def choice(default, choices: tuple, **kwargs):
    """A dataclass field that only accepts one of ``choices``."""
    return field(default=default, metadata={"choices": choices}, **kwargs)


def _type_name(hint) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        name = " or ".join(_type_name(a) for a in args)
        return name + " or null" if len(args) < len(typing.get_args(hint)) else name
    if typing.get_origin(hint) is list:
        return f"a list of {_type_name(args[0])}"
    return {float: "a number", int: "an integer", bool: "true or false", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint)))


def coerce(value, hint):
    """``value`` as ``hint``, or raise TypeError. YAML reads ``2e-4`` as a string: accept it."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        for arg in typing.get_args(hint):
            if arg is type(None):
                continue
            try:
                return coerce(value, arg)
            except TypeError:
                pass
        raise TypeError
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise TypeError
        return [coerce(v, typing.get_args(hint)[0]) for v in value]
    if hint is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise TypeError from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TypeError
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError
    if hint in (bool, str):
        if isinstance(value, hint):
            return value
        raise TypeError
    return value  # nested dataclasses are checked by their own __post_init__


def check_fields(obj) -> None:
    """Check (and normalise) every field of a config dataclass: type, then allowed values.

    Raises :class:`ConfigError` naming the field, the value and what is allowed.
    """
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        try:
            value = coerce(value, hints[f.name])
        except TypeError:
            raise ConfigError(f.name, f"expected {_type_name(hints[f.name])}, got {value!r} "
                                      f"({type(value).__name__})") from None
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise ConfigError(f.name, f"{value!r} is not one of "
                                      f"{', '.join(repr(c) for c in choices)}")
        setattr(obj, f.name, value)
