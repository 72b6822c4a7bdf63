"""The cost model: what one launch of the forward kernel costs, tile by tile, on one GPU.

In the spirit of the GNA paper's simulator (Hassani et al., 2025: cost the tiles a kernel
visits, not the FLOPs a pattern allows), but of *our* kernel (``codegen.fwd``): one program
per (Q tile, batch x head), numbered head-major with each head's Q tiles longest-first, each
running a loop over its FULL tiles (no mask) and one over its PARTIAL tiles (mask), then the
plan's gathered tiles. The schedule below dispatches the same programs rank-major (all heads'
longest tiles first): both orders end on the shortest tiles, and rank-major keeps the
simulation to one greedy fill per distinct tile count. The memory floor assumes what the
head-major order makes true on an H100: the programs in flight share one head's K/V in L2.

With D the padded head dim and one SM to itself, a program takes

    t_program = q_tile_overhead + n_full * t_full + n_partial * t_partial
    t_full    = 4 Tq Tk D / (peak / num_SMs * efficiency[launch]) + permute * Tk
    t_partial = t_full + partial_extra * (the matrix part of t_full)
    t_gather  = t_partial + gather_extra * (the matrix part) + permute * Tk   (plan.gather tiles)

and, where the KV tiles come from run-time lists (TopK), every tile takes ``list_tile_us``
more (the list load that each K/V load waits for).

where ``launch`` is the tile volumes, warps, stages and whether the tiles are boxes of an N-d
grid (those load through the token layout / 2-D-3-D TMA boxes and have their own efficiency).

``occupancy`` programs share an SM (shared memory decides how many), so the GPU has
``num_SMs * occupancy`` slots, each running one program at 1/occupancy of the SM. Programs are
dispatched in order to the earliest free slot (the hardware block scheduler); the makespan of
that greedy schedule carries wave quantization and load imbalance. The kernel cannot beat its
memory floor either: every visited K/V tile streams through L2, and q, k, v, o cross HBM once.

    kernel = max(makespan, L2 bytes / L2 bandwidth, HBM bytes / HBM bandwidth) + launch

Dense SDPA, the baseline every speedup is against, is ``4 B H Sq Skv D / sdpa_rate``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..plan.tiles import TilePlan
from .hardware import DTYPES, LaunchKey, Profile

__all__ = [
    "LaunchCost",
    "Problem",
    "Workload",
    "dense_sdpa_ms",
    "gluon_persistent",
    "launch_cost",
    "makespan",
    "padded_dim",
    "workload_from_counts",
    "workload_from_plan",
]


def padded_dim(d: int) -> int:
    """The kernel's BLOCK_D: the next power of two, at least 16 (``codegen.fwd.attn_fwd``)."""
    return max(16, 1 << (d - 1).bit_length())


@dataclass(frozen=True)
class Problem:
    """The attention call: q [batch, heads, q_len, head_dim], k/v [batch, kv_heads, kv_len, .]."""

    batch: int
    heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    dtype: str  # "bf16" | "fp16" | "fp32"
    head_dim_v: int | None = None

    @property
    def dv(self) -> int:
        return self.head_dim if self.head_dim_v is None else self.head_dim_v

    @property
    def elem_bytes(self) -> int:
        return DTYPES[self.dtype]

    @property
    def dense_flops(self) -> float:
        """FLOPs of dense attention forward: QK^T and PV, 2 * Sq * Skv * D each, per head."""
        return 2.0 * self.batch * self.heads * self.q_len * self.kv_len * (self.head_dim + self.dv)


@dataclass(frozen=True, eq=False)
class Workload:
    """What one launch does: per schedule rank, the tiles of its programs (``copies`` each)."""

    full: Tensor  # long [ranks], dispatch (longest-first) order
    partial: Tensor  # long [ranks]; includes the plan's gathered tiles
    copies: int  # programs per rank: batch x heads
    key: LaunchKey
    block_d: int
    block_dv: int
    elem_bytes: int
    q_permuted: bool
    kv_permuted: bool
    gathered: int  # gathered tiles per program (loaded through a token index)
    hbm_bytes: float  # q, k, v, o (and lse) once
    runtime_lists: bool = False  # KV tiles come from run-time lists (TopK)
    persistent: bool = False  # one program per SM over plan.assign's item lists

    @property
    def programs(self) -> int:
        return self.full.numel() * self.copies

    @property
    def tiles(self) -> int:
        """Visited tiles summed over every program of the launch."""
        return int(self.full.sum() + self.partial.sum()) * self.copies

    @property
    def kv_tile_bytes(self) -> int:
        return self.key.kv_tokens * (self.block_d + self.block_dv) * self.elem_bytes

    @property
    def tile_flops(self) -> float:
        return 2.0 * self.key.q_tokens * self.key.kv_tokens * (self.block_d + self.block_dv)


def _hbm_bytes(problem: Problem) -> float:
    b, e = problem.batch, problem.elem_bytes
    q_o = b * problem.heads * problem.q_len * (problem.head_dim + problem.dv) * e
    k_v = b * problem.kv_heads * problem.kv_len * (problem.head_dim + problem.dv) * e
    lse = b * problem.heads * problem.q_len * 4
    return float(q_o + k_v + lse)


def gluon_persistent(problem: Problem, profile: Profile) -> bool:
    """Whether the warp-specialized forward launches persistent for this problem on this GPU
    (``codegen.sm90.persistent_for``, with the profile's L2)."""
    from ..codegen import sm90

    return sm90.persistent_for(problem.kv_len, problem.head_dim, problem.elem_bytes,
                               profile.l2_bytes)


def workload_from_plan(plan: TilePlan, problem: Problem, warps: int, stages: int,
                       specialized: bool = False, persistent: bool = False) -> Workload:
    """The launch ``codegen.fwd.attn_fwd`` (``specialized``: ``codegen.sm90.attn_fwd_sm90``,
    ``persistent`` or one program per item) makes for this plan (schedule order, gather
    tiles). A persistent launch is costed by the same greedy schedule: its item lists are that
    rule run ahead (``plan.assign``); only an item's start and end cost less."""
    order = plan.schedule.long()
    gathered = plan.gather.num_tiles if plan.gather is not None else 0
    return Workload(
        full=plan.full_cnt.long()[order],
        partial=plan.part_cnt.long()[order] + gathered,
        copies=problem.batch * problem.heads,
        key=LaunchKey(plan.q_layout.tile_size, plan.kv_layout.tile_size, warps, stages,
                      plan.permuted, specialized),
        block_d=padded_dim(problem.head_dim),
        block_dv=padded_dim(problem.dv),
        elem_bytes=problem.elem_bytes,
        q_permuted=not plan.q_layout.is_identity,
        kv_permuted=not plan.kv_layout.is_identity,
        gathered=gathered,
        hbm_bytes=_hbm_bytes(problem),
        persistent=persistent,
    )


def workload_from_counts(full: Tensor, partial: Tensor, problem: Problem, key: LaunchKey
                         ) -> Workload:
    """A launch over explicit per-Q-tile counts (top-k: tiles chosen at run time)."""
    work = (full + partial).long()
    order = torch.sort(work, descending=True, stable=True).indices
    return Workload(full=full.long()[order], partial=partial.long()[order],
                    copies=problem.batch * problem.heads, key=key,
                    block_d=padded_dim(problem.head_dim), block_dv=padded_dim(problem.dv),
                    elem_bytes=problem.elem_bytes, q_permuted=False, kv_permuted=False,
                    gathered=0, hbm_bytes=_hbm_bytes(problem), runtime_lists=True)


# ---------------------------------------------------------------------------------------------
# The schedule


def _fill(slots: Tensor, x: float, n: int) -> Tensor:
    """Greedy dispatch of ``n`` programs of duration ``x``, each to the earliest-free slot.

    Exact: when the slots are within ``x`` of each other the programs go round-robin (a slot
    that just took one is no longer the earliest); otherwise the finishing level is found by
    bisection on the start time of the n-th program (water filling).
    """
    s = slots.numel()
    lo, hi = float(slots.min()), float(slots.max())
    if hi - lo <= x:
        rounds, rest = divmod(n, s)
        out = slots + rounds * x
        if rest:
            out[torch.topk(out, rest, largest=False).indices] += x
        return out
    if n <= s:
        idx = torch.topk(slots, n, largest=False).indices
        if lo + x >= float(slots[idx].max()):
            out = slots.clone()
            out[idx] += x
            return out

    def starts_until(level: float) -> Tensor:
        return torch.where(slots <= level, torch.floor((level - slots) / x) + 1, 0.0)

    a, b = lo, hi + math.ceil(n / s) * x
    for _ in range(64):
        mid = 0.5 * (a + b)
        if float(starts_until(mid).sum()) >= n:
            b = mid
        else:
            a = mid
    count = starts_until(b)
    excess = int(count.sum()) - n
    if excess > 0:  # ties at the level: drop the latest starts
        last = torch.where(count > 0, slots + (count - 1) * x, float("-inf"))
        count[torch.topk(last, excess).indices] -= 1
    return slots + count * x


def makespan(durations: Tensor, copies: int, slots: int) -> float:
    """Finish time of ``copies`` programs per entry of ``durations`` (in dispatch order) on
    ``slots`` slots, each program to the earliest-free slot."""
    state = torch.zeros(slots, dtype=torch.float64)
    values, counts = torch.unique_consecutive(durations.double(), return_counts=True)
    for x, n in zip(values.tolist(), counts.tolist(), strict=True):
        if x > 0:
            state = _fill(state, x, n * copies)
    return float(state.max())


# ---------------------------------------------------------------------------------------------
# One launch


@dataclass(frozen=True)
class LaunchCost:
    """The predicted time of one launch and where it goes (milliseconds, microseconds)."""

    kernel_ms: float
    compute_ms: float  # makespan of the schedule
    l2_ms: float  # K/V tile traffic through L2
    hbm_ms: float  # q, k, v, o once through HBM
    launch_ms: float
    programs: int
    slots: int
    occupancy: int
    balance: float  # makespan / (total work / slots): wave quantization and imbalance
    efficiency: float
    full_tile_us: float  # per tile, one SM to itself
    partial_tile_us: float
    overhead_us: float  # per item (a program's, or a persistent launch's item's)
    notes: tuple[str, ...] = field(default=())

    @property
    def waves(self) -> float:
        return self.programs / max(self.slots, 1)

    @property
    def bound(self) -> str:
        """What limits the launch: "compute", "L2" or "HBM"."""
        top = max(self.compute_ms, self.l2_ms, self.hbm_ms)
        return "compute" if top == self.compute_ms else ("L2" if top == self.l2_ms else "HBM")


def tile_times(work: Workload, profile: Profile, dtype: str, efficiency: float
               ) -> tuple[float, float, float, float]:
    """(full tile, partial tile, gathered tile, per-program overhead) in seconds on one SM."""
    k = profile.kernel
    per_sm = profile.peak(dtype) / profile.num_sms
    mma = work.tile_flops / (per_sm * efficiency)
    permute = k.permute_ns_per_token * 1e-9
    kv_load = permute * work.key.kv_tokens if work.kv_permuted else 0.0
    if work.runtime_lists:
        kv_load += k.list_tile_us * 1e-6
    full = mma + kv_load
    partial = mma * (1.0 + k.partial_extra) + kv_load
    gathered = mma * (1.0 + k.partial_extra + k.gather_extra) + permute * work.key.kv_tokens
    overhead = k.overhead_us(work.persistent) * 1e-6
    if work.q_permuted:
        overhead += permute * work.key.q_tokens * 2  # q loaded, o stored through the layout
    return full, partial, gathered, overhead


def launch_cost(work: Workload, profile: Profile, dtype: str, balance: float | None = None
                ) -> LaunchCost:
    """Predict one launch. ``balance`` given skips the schedule simulation (used by the fit)."""
    efficiency, note = profile.kernel.efficiency_for(work.key)
    t_full, t_part, t_gather, overhead = tile_times(work, profile, dtype, efficiency)
    plain = work.partial - work.gathered
    per_program = overhead + work.full.double() * t_full + plain.double() * t_part \
        + work.gathered * t_gather
    occupancy = profile.occupancy(work.key.q_tokens, work.key.kv_tokens, work.block_d,
                                  work.block_dv, work.elem_bytes, work.key.warps, work.key.stages)
    # Fewer programs than SMs x occupancy: they spread over the SMs first.
    occupancy = max(1, min(occupancy, math.ceil(work.programs / profile.num_sms)))
    slots = profile.num_sms * occupancy
    ideal = float(per_program.sum()) * work.copies * occupancy / slots
    if balance is None:
        compute = makespan(per_program * occupancy, work.copies, slots) if work.programs else 0.0
        balance = compute / ideal if ideal > 0 else 1.0
    else:
        compute = ideal * balance
    l2 = work.tiles * work.kv_tile_bytes / (profile.l2_gbps * 1e9)
    hbm = work.hbm_bytes / (profile.hbm_gbps * 1e9)
    launch = profile.launch_us * 1e-6
    return LaunchCost(
        kernel_ms=(max(compute, l2, hbm) + launch) * 1e3,
        compute_ms=compute * 1e3, l2_ms=l2 * 1e3, hbm_ms=hbm * 1e3, launch_ms=launch * 1e3,
        programs=work.programs, slots=slots, occupancy=occupancy, balance=balance,
        efficiency=efficiency, full_tile_us=t_full * 1e6, partial_tile_us=t_part * 1e6,
        overhead_us=overhead * 1e6, notes=(note,) if note else (),
    )


def dense_sdpa_ms(problem: Problem, profile: Profile) -> float:
    """Dense ``F.scaled_dot_product_attention`` on the same device: FLOPs / measured rate."""
    return problem.dense_flops / profile.sdpa_rate(problem.dtype, problem.kv_len) * 1e3
