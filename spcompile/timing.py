"""GPU timing that every measurement in spcompile shares: benchmarks, ``calibrate``, the demo.

``triton.testing.do_bench`` with 200 ms of repeats times an 83 ms SDPA call twice and a 280 ms
one once, and warms it up once: a median of one or two runs, on a GPU whose clock is still
settling after the previous kernel. ``median_ms`` asks for at least ``min_reps`` timed runs and
two runs' worth of warm-up. ``interleaved_ms`` times several functions in alternating rounds, so
that a drift of the clock over the run (power, temperature) falls on all of them alike instead
of on whichever ran last.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["back_to_back_ms", "interleaved_ms", "median_ms"]


def back_to_back_ms(fn: Callable[[], Any], calls: int = 1) -> float:
    """Mean milliseconds per call of ``fn`` over ``calls`` calls issued back to back between
    one pair of events (the L2 not cleared between them), after one call of warm-up."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls


def median_ms(fn: Callable[[], Any], min_reps: int = 10, rep_ms: float = 200.0) -> float:
    """Median milliseconds of ``fn``: do_bench (the L2 cleared before every run) over at least
    ``min_reps`` runs and ``rep_ms`` milliseconds, after at least two runs and 25 ms of
    warm-up."""
    from triton.testing import do_bench

    one = max(back_to_back_ms(fn), 1e-3)
    return float(do_bench(fn, warmup=max(25.0, 2 * one), rep=max(rep_ms, min_reps * one),
                          return_mode="median"))


def interleaved_ms(fns: dict[str, Callable[[], Any]], rounds: int = 3,
                   min_reps: int = 5, rotate: bool = False) -> dict[str, list[float]]:
    """Per name, the ``median_ms`` of each of ``rounds`` rounds; every round times every
    function once, in the given order, or with ``rotate`` each round starting further into it
    (round r at ``r * len(fns) // rounds``), so that no function is always timed first or
    last: the clock still settling after the one before falls on each in turn."""
    out: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        shift = r * len(names) // rounds if rotate else 0
        for name in names[shift:] + names[:shift]:
            out[name].append(median_ms(fns[name], min_reps=min_reps))
    return out

