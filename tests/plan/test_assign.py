"""plan.assign: the items of a persistent launch's programs."""

from __future__ import annotations

import heapq

import pytest
import torch

import spcompile as sp
from spcompile.plan.assign import (
    assign_items,
    assign_kv_items,
    greedy_lists,
    item_costs,
    kv_item_costs,
    stride_items,
)
from spcompile.plan.tiles import build_plan

# Q tiles of unequal length: a window shorter near both ends of the sequence, and an N-d grid.
PLANS = {
    "sliding": build_plan(sp.Sliding(left=300, right=300), 2000, 2000, (128,), (128,)),
    "na2d": build_plan(sp.Neighborhood(shape=(17, 23), window=7), 391, 391, (4, 8), (4, 8)),
}


def _loads(plan, heads, starts, items) -> list[float]:
    costs = item_costs(plan, heads)
    return [sum(costs[w] for w in items[a:b].tolist())
            for a, b in zip(starts[:-1].tolist(), starts[1:].tolist(), strict=True)]


@pytest.mark.parametrize("name", PLANS)
@pytest.mark.parametrize("heads, programs", [(3, 1), (3, 7), (5, 13), (2, 10_000)])
def test_every_item_runs_once_in_order(name, heads, programs):
    plan = PLANS[name]
    n = plan.num_q_tiles * heads
    programs = min(programs, n)
    starts, items = assign_items(plan, heads, programs)
    assert starts.dtype == items.dtype == torch.int32
    assert starts[0] == 0 and starts[-1] == n and bool((starts[1:] >= starts[:-1]).all())
    assert sorted(items.tolist()) == list(range(n))
    for a, b in zip(starts[:-1].tolist(), starts[1:].tolist(), strict=True):
        mine = items[a:b]
        assert bool((mine[1:] > mine[:-1]).all()), "a program runs its items in order"
    # As the hardware starts a grid of one item per program: program p starts with item p.
    assert [items[a].item() for a in starts[:-1].tolist()] == list(range(programs))


@pytest.mark.parametrize("name", PLANS)
def test_greedy_is_the_hardware_rule_and_beats_the_stride(name):
    """Each item goes to the program that would be free first; no program ends more than one
    item after the mean; the fixed stride leaves a costlier program."""
    plan, heads, programs = PLANS[name], 7, 11
    costs = item_costs(plan, heads)
    free = [(0.0, p) for p in range(programs)]
    expected = []
    for cost in costs:
        load, p = heapq.heappop(free)
        expected.append(p)
        heapq.heappush(free, (load + cost, p))
    starts, items = assign_items(plan, heads, programs)
    owner = torch.repeat_interleave(torch.arange(programs), torch.diff(starts).long())
    got = torch.empty(len(costs), dtype=torch.long)
    got[items.long()] = owner
    assert got.tolist() == expected
    loads = _loads(plan, heads, starts, items)
    assert max(loads) <= sum(costs) / programs + max(costs)
    assert max(loads) < max(_loads(plan, heads, *stride_items(len(costs), programs)))


def test_stride_rule():
    starts, items = stride_items(10, 4)
    assert starts.tolist() == [0, 3, 6, 8, 10]
    assert items.tolist() == [0, 4, 8, 1, 5, 9, 2, 6, 3, 7]


def test_costs_follow_the_schedule():
    plan = PLANS["sliding"]
    visits = (plan.full_cnt + plan.part_cnt)[plan.schedule.long()]
    costs = item_costs(plan, 2)
    assert len(costs) == 2 * plan.num_q_tiles
    assert costs[: plan.num_q_tiles] == costs[plan.num_q_tiles:]
    assert costs[0] == max(costs) and costs[0] == float(visits[0]) + 1.0
    with pytest.raises(ValueError, match="at least one program"):
        assign_items(plan, 2, 0)


@pytest.mark.parametrize("name", PLANS)
def test_kv_items_follow_the_transposed_schedule(name):
    """The dK/dV kernel's items: each KV tile's visiting Q tiles, over every head of the
    group, in ``t_schedule`` order; every item runs once, on the greedy rule's program."""
    plan, heads, group, programs = PLANS[name], 3, 2, 5
    _, full_cnt, _, part_cnt = plan.transposed()
    visits = (full_cnt + part_cnt)[plan.t_schedule.long()]
    costs = kv_item_costs(plan, heads, group)
    assert costs == [float(v) * group + 1.0 for v in visits.tolist()] * heads
    assert visits.tolist() == sorted(visits.tolist(), reverse=True)
    starts, items = assign_kv_items(plan, heads, group, programs)
    want_starts, want_items = greedy_lists(costs, programs)
    assert torch.equal(starts, want_starts) and torch.equal(items, want_items)
    assert sorted(items.tolist()) == list(range(heads * plan.num_kv_tiles))
