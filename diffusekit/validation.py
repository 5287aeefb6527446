"""Checking config values read from JSON / TOML: against type annotations, and names against the known ones."""

from __future__ import annotations

import difflib
import math
import types
import typing
from typing import Any, Callable, Collection


class ConfigError(ValueError):
    """A config with an unknown name or key, or a value of the wrong type."""


def _fits(value: Any, hint: Any) -> bool:
    """Whether a JSON / TOML value fits a type annotation: ints pass for floats but bools never for numbers, lists
    pass for tuples (of the annotated length and element types)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and Ellipsis not in args:
            return len(value) == len(args) and all(map(_fits, value, args))
        return not args or all(_fits(v, args[0]) for v in value)
    if hint in (int, float) and isinstance(value, bool):
        return False
    if hint is float:
        return isinstance(value, (int, float))
    return hint is Any or isinstance(value, origin or hint)


def _describe(hint: Any) -> str:
    """A type annotation in words: 'int or None', 'a list of 2 floats', 'a table'."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(map(_describe, args))
    if origin in (list, tuple):
        n = f"{len(args)} " if origin is tuple and Ellipsis not in args else ""
        return f"a list of {n}{_describe(args[0])}s" if args else "a list"
    if origin is dict:
        return "a table"
    return "None" if hint is type(None) else getattr(hint, "__name__", str(hint))


def type_problem(value: Any, hint: Any) -> str | None:
    """None if a JSON / TOML value fits the type annotation `hint`, else 'must be <type>, got <value>'."""
    return None if _fits(value, hint) else f"must be {_describe(hint)}, got {type(value).__name__} {value!r}"


def did_you_mean(name: Any, names: Collection[Any]) -> str:
    """'; did you mean X?' for the name in `names` closest to `name`, or ''."""
    strings = [n for n in names if isinstance(n, str)]
    close = difflib.get_close_matches(name, strings, n=1) if isinstance(name, str) else []
    return f"; did you mean {close[0]!r}?" if close else ""


Check = Callable[[Any], "str | None"]  # a value of the right type -> None, or 'must be ..., got ...'


def one_of(names: Collection[Any]) -> Check:
    """A check for membership in `names` (a registry dict is read when checking)."""
    return lambda v: None if v in names else f"must be one of {sorted(names)}, got {v!r}{did_you_mean(v, names)}"


def at_least(low: float) -> Check:
    """A check for values >= low."""
    return lambda v: None if v >= low else f"must be >= {low}, got {v!r}"


def within(low: float, high: float) -> Check:
    """A check for values in [low, high]."""
    return lambda v: None if low <= v <= high else f"must be in [{low}, {high}], got {v!r}"


def positive(v: float) -> str | None:
    """A check for finite values > 0."""
    return None if 0 < v < math.inf else f"must be finite and > 0, got {v!r}"


def finite(v: float) -> str | None:
    """A check for values that are neither nan nor inf."""
    return None if math.isfinite(v) else f"must be finite, got {v!r}"


def available_device(name: str) -> str | None:
    """A check for torch device names this machine has (cpu, cuda, cuda:1, mps, ...)."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as e:
        return f"must be a torch device, got {name!r} ({e})"
    backend = getattr(torch, device.type, None)
    if device.type not in ("cpu", "meta") and not (backend and backend.is_available()):
        return f"must be a device this machine has, got {name!r} (torch {torch.__version__})"
    return None
