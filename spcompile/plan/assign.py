"""Which work items each program of a persistent launch runs.

A work item is one Q tile of one (batch, head), numbered head-major with each head's Q tiles in
the plan's schedule order (longest first). A launch of one program per item leaves the order
to the hardware, which starts each item on the first SM that frees up. A persistent launch
(one program per SM, ``codegen.sm90``) must decide it ahead: here, by running that same greedy
rule on the host, with each item costed by its KV tiles.

A fixed stride (program p runs items p, p + P, p + 2P, ...) was the first rule. Where items
differ in length it leaves programs unbalanced: its costliest program, in this cost model, is
6.5% above the mean on the suite's sw16k row (24 heads of 128 Q tiles, 132 programs; the Q
tiles near the sequence's ends are short), 11.8% on na2d31 and 4.0% on csw32k, against 1.3%,
0.8% and 0.8% for the greedy rule. (Measured on the H100, the two rules ran alike on 1-D plans;
on N-d plans the greedy rule ran 2-5% faster: ``codegen.sm90.persistent_for``.) Each program
runs its items in increasing order, so the items in flight at once start as neighbours, mostly
of one head, as in the hardware's order: they share K/V in L2. Over long lists the programs
drift apart (``persistent_for`` says where that costs).

The dK/dV kernel's items are the KV tiles of each (batch, KV head), numbered the same way in
its own schedule (``TilePlan.transposed``: the Q tiles visiting each KV tile), each costed by
its visits over every head of the GQA group (``kv_item_costs``, ``assign_kv_items``).
"""

from __future__ import annotations

import functools
import heapq

import torch
from torch import Tensor

from .tiles import TilePlan

#: What an item costs beyond its KV tiles, in tiles: the start of a Q tile (its Q load, the
#: first scores) and its end (the last P V, the output's store). Chosen from the simulator's
#: per-program overhead (~1.3 full 128x128 tiles' time on the H100, ``sim.profiles.h100``).
#: Since session 12 the forward loads an item's Q tile and waits for its store behind the
#: neighbouring items, and the fit puts a persistent item's own overhead at ~0; the lists were
#: not re-balanced for that (a change of launch, to be measured).
ITEM_OVERHEAD_TILES = 1.0


def item_costs(plan: TilePlan, heads: int) -> list[float]:
    """Each item's cost in tiles (visited KV tiles + ``ITEM_OVERHEAD_TILES``), in item order:
    ``heads`` (batch x heads) runs of the plan's Q tiles in schedule order."""
    visits = (plan.full_cnt + plan.part_cnt)[plan.schedule.long()]
    return [float(v) + ITEM_OVERHEAD_TILES for v in visits.tolist()] * heads


def kv_item_costs(plan: TilePlan, heads: int, group: int) -> list[float]:
    """The dK/dV kernel's items' costs in tiles (visiting Q tiles x ``group`` query heads per
    KV head + ``ITEM_OVERHEAD_TILES``), in item order: ``heads`` (batch x KV heads) runs of
    the plan's KV tiles in their schedule order (``TilePlan.t_schedule``)."""
    _, full_cnt, _, part_cnt = plan.transposed()
    visits = (full_cnt + part_cnt)[plan.t_schedule.long()] * group
    return [float(v) + ITEM_OVERHEAD_TILES for v in visits.tolist()] * heads


@functools.lru_cache(maxsize=64)
def assign_items(plan: TilePlan, heads: int, programs: int) -> tuple[Tensor, Tensor]:
    """(starts int32 [programs + 1], items int32 [heads x Q tiles]): program p runs
    ``items[starts[p]:starts[p + 1]]``, in increasing order (``greedy_lists`` of
    ``item_costs``)."""
    return greedy_lists(item_costs(plan, heads), programs)


@functools.lru_cache(maxsize=64)
def assign_kv_items(plan: TilePlan, heads: int, group: int, programs: int
                    ) -> tuple[Tensor, Tensor]:
    """``assign_items`` for the dK/dV kernel's items (``kv_item_costs``)."""
    return greedy_lists(kv_item_costs(plan, heads, group), programs)


def greedy_lists(costs: list[float], programs: int) -> tuple[Tensor, Tensor]:
    """(starts, items) of ``programs`` programs running the items of these costs, each program
    its items in increasing order.

    Items are taken in order, each by the program whose items so far cost least (the lowest
    index among equals), so with at least as many items as programs program p starts with
    item p, as the hardware would start it. Every item is run by exactly one program.
    """
    if programs < 1:
        raise ValueError(f"assign_items: expected at least one program, got {programs}")
    owner = [0] * len(costs)
    free = [(0.0, p) for p in range(programs)]  # (cost so far, program): a heap
    for w, cost in enumerate(costs):
        load, p = free[0]
        owner[w] = p
        heapq.heapreplace(free, (load + cost, p))
    return _lists(torch.tensor(owner, dtype=torch.int64), programs)


def stride_items(items: int, programs: int) -> tuple[Tensor, Tensor]:
    """The fixed-stride rule in ``assign_items``' form (program p runs p, p + P, ...): kept to
    measure the two against each other (``benchmarks/tune.py --sm90``)."""
    return _lists(torch.arange(items, dtype=torch.int64) % programs, programs)


def _lists(owner: Tensor, programs: int) -> tuple[Tensor, Tensor]:
    """(starts, items) of the programs that ``owner[w]`` gives each item ``w``: each
    program's items in increasing order."""
    starts = torch.zeros(programs + 1, dtype=torch.int32)
    starts[1:] = torch.cumsum(torch.bincount(owner, minlength=programs), 0)
    return starts, torch.sort(owner, stable=True).indices.to(torch.int32)
