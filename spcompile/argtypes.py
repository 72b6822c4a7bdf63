"""Argument types shared by the command-line modules: sizes like 16x48x80, positive ints."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def sizes(example: str, max_axes: int | None = 3) -> Callable[[str], tuple[int, ...]]:
    """An argparse type for ``AxBxC`` sizes (each >= 1, at most ``max_axes`` of them)."""

    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(part) for part in text.lower().split("x"))
        except ValueError:
            values = ()
        too_many = max_axes is not None and len(values) > max_axes
        if not values or too_many or any(v < 1 for v in values):
            raise argparse.ArgumentTypeError(f"expected sizes like {example}, got {text!r}")
        return values

    return parse


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value
