"""Argument helpers: normalize user values and fail with what was expected and what came.

Every pattern constructor funnels its arguments through these, so that an error from Python code
and an error from a spec file read the same way ("Neighborhood: expected window to be an integer
>= 1 or one per axis, got window=0").
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def _is_int(value: Any) -> bool:
    # bool is an int subclass; a bool where a count is expected is always a mistake.
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    try:  # sympy Integer, numpy integer, 0-d int tensors
        import operator

        operator.index(value)
        return True
    except TypeError:
        return False


def as_int(owner: str, name: str, value: Any, *, minimum: int | None = None) -> int:
    """One integer, at least ``minimum``."""
    if not _is_int(value):
        raise TypeError(f"{owner}: expected {name} to be an integer, got {name}={value!r}")
    import operator

    out = operator.index(value)
    if minimum is not None and out < minimum:
        raise ValueError(f"{owner}: expected {name} >= {minimum}, got {name}={out}")
    return out


def as_bool(owner: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{owner}: expected {name} to be true or false, got {name}={value!r}")
    return value


def per_axis_int(
    owner: str, name: str, value: Any, n_axes: int, *, minimum: int
) -> tuple[int, ...]:
    """An int (same on every axis) or one int per axis, each at least ``minimum``."""
    if _is_int(value):
        values = (value,) * n_axes
    elif isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
        values = tuple(value)
    else:
        raise TypeError(
            f"{owner}: expected {name} to be an integer or {n_axes} integers (one per axis), "
            f"got {name}={value!r}"
        )
    if len(values) != n_axes or not all(_is_int(v) for v in values):
        raise TypeError(
            f"{owner}: expected {name} to be an integer or {n_axes} integers (one per axis), "
            f"got {name}={value!r}"
        )
    out = tuple(int(v) for v in values)
    if any(v < minimum for v in out):
        raise ValueError(f"{owner}: expected every {name} >= {minimum}, got {name}={out}")
    return out


def per_axis_bool(owner: str, name: str, value: Any, n_axes: int) -> tuple[bool, ...]:
    """A bool (same on every axis) or one bool per axis."""
    if isinstance(value, bool):
        return (value,) * n_axes
    if isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
        out = tuple(value)
        if len(out) == n_axes and all(isinstance(v, bool) for v in out):
            return out
    raise TypeError(
        f"{owner}: expected {name} to be true/false or {n_axes} of them (one per axis), "
        f"got {name}={value!r}"
    )


def one_of(owner: str, name: str, value: Any, allowed: Iterable[str]) -> str:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(
            f"{owner}: expected {name} to be one of {', '.join(map(repr, allowed))}, "
            f"got {name}={value!r}"
        )
    return value
