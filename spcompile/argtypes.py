"""Pieces shared by the command-line modules: argument types (sizes like 16x48x80, positive
ints) and the spec/rule/site arguments that ``explain`` and ``simulate`` both take."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any


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


def has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def rules_and_site(args: argparse.Namespace) -> tuple[list[Any], Any]:
    """The rules of ``args.spec`` (all, or ``args.rule`` alone) and the site that ``--seq-len``
    / ``--shape``, ``--kv-len``, ``--heads`` and ``--head-dim`` describe.

    Raises KeyError (with a message for the user) for an unknown ``--rule``.
    """
    from .spec.loading import load_spec
    from .spec.rules import SiteKey

    spec = load_spec(args.spec)
    rules = [spec.rule(args.rule)] if args.rule else list(spec.rules)
    seq_len = math.prod(args.shape) if args.shape else args.seq_len
    site = SiteKey("", seq_len=seq_len, kv_len=args.kv_len or seq_len, num_heads=args.heads,
                   head_dim=args.head_dim)
    return rules, site
