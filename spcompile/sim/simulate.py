"""``simulate``: predict what a pattern costs on a GPU before anything runs.

Static patterns are costed on exactly the tile plan the kernel will run (``plan.build_plan``
with the kernel's default tiles and ``codegen.fwd.default_config``); PerHead patterns as the
launches ``sparse_attention`` makes, one per run of heads sharing a pattern; TopK as the
forward kernel over the expected number of selected blocks plus the pooled-score estimation.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from ..codegen.fwd import LaunchConfig, default_config
from ..plan.tiles import TilePlan, allowed_pairs, build_plan, grid_of
from ..spec.patterns import Dense, Pattern, PerHead, TopK
from .hardware import LaunchKey, Profile, dtype_name, load_profile
from .model import (
    LaunchCost,
    Problem,
    Workload,
    dense_sdpa_ms,
    gluon_persistent,
    launch_cost,
    workload_from_counts,
    workload_from_plan,
)
from .report import SimReport
from .verdict import AxisVerdict, verdicts

__all__ = ["resolve_device", "simulate"]

TileArg = int | tuple[int, ...] | None


def resolve_device(device: str | Profile) -> tuple[Profile, list[str]]:
    """A profile and notes. ``"current"`` maps the visible GPU to a profile by name."""
    if isinstance(device, Profile):
        return device, []
    if str(device).lower() not in ("current", "auto"):
        return load_profile(str(device)), []
    if not torch.cuda.is_available():
        raise ValueError("device='current' needs a visible CUDA GPU; name a profile instead "
                         "(e.g. device='h100')")
    from .hardware import builtin_profiles, user_profile_dir

    name = torch.cuda.get_device_name()
    candidates = [p.stem for p in user_profile_dir().glob("*.json")] + builtin_profiles()
    for candidate in candidates:
        profile = load_profile(candidate)
        if any(a.lower() in name.lower() for a in profile.aliases):
            return profile, []
    return load_profile("h100"), [f"no profile matches this GPU ({name}): used h100; run "
                                  "`spcompile calibrate` to measure this one"]


def simulate(
    pattern: Pattern,
    q_len: int | None = None,
    kv_len: int | None = None,
    *,
    batch: int = 1,
    heads: int = 24,
    kv_heads: int | None = None,
    head_dim: int = 128,
    dtype: torch.dtype | str = "bf16",
    device: str | Profile = "h100",
    q_tile: TileArg = None,
    kv_tile: TileArg = None,
    launch: tuple[int, int] | None = None,
) -> SimReport:
    """Predict the forward kernel's time and speedup over dense SDPA for one attention call.

    Parameters
    ----------
    pattern: any spcompile pattern (PerHead and TopK included).
    q_len, kv_len: sequence lengths; ``q_len`` defaults to a neighborhood's grid volume,
        ``kv_len`` to ``q_len``.
    batch, heads, kv_heads, head_dim, dtype: the call's shapes (q is
        [batch, heads, q_len, head_dim]; ``kv_heads`` defaults to ``heads``; GQA when fewer).
        ``heads`` defaults to 24 (the benchmark suite's FLUX/HunyuanVideo-sized models).
    device: a profile name (``h100``, ``h200``, ``b200``, ``a100``, ``l40s``), a calibrated
        profile's name or path, a :class:`Profile`, or ``"current"`` for the visible GPU.

    Other Parameters
    ----------------
    q_tile, kv_tile: tile shapes (an int for 1-D, one entry per grid axis for N-d); default:
        what the kernel would choose (``plan.choose.default_tiles``).
    launch: (warps, stages); default: ``codegen.fwd.default_config`` for the tiles.
    """
    profile, notes = resolve_device(device)
    if q_len is None:
        grid = grid_of(pattern) if not isinstance(pattern, (PerHead, TopK)) else None
        if grid is None:
            raise ValueError(f"simulate: q_len is needed for a {type(pattern).__name__} pattern "
                             "(only a neighborhood's grid fixes it)")
        q_len = math.prod(grid[0])
    kv_len = q_len if kv_len is None else kv_len
    kv_heads = heads if kv_heads is None else kv_heads
    for name, value in (("q_len", q_len), ("kv_len", kv_len), ("batch", batch),
                        ("heads", heads), ("kv_heads", kv_heads), ("head_dim", head_dim)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"simulate: expected {name} to be an integer >= 1, got {value!r}")
    if heads % kv_heads:
        raise ValueError(f"simulate: heads ({heads}) must be a multiple of kv_heads "
                         f"({kv_heads})")
    problem = Problem(batch, heads, kv_heads, q_len, kv_len, head_dim, dtype_name(dtype))
    notes += _profile_notes(profile, problem)
    if isinstance(pattern, PerHead):
        report = _per_head(pattern, problem, profile, q_tile, kv_tile, launch)
    elif isinstance(pattern, TopK):
        report = _topk(pattern, problem, profile)
    elif isinstance(pattern, Dense):
        report = _dense_site(pattern, problem, profile)
    else:
        report = _static(pattern, problem, profile, q_tile, kv_tile, launch)
    report.notes = notes + report.notes
    return report


def _profile_notes(profile: Profile, problem: Problem) -> list[str]:
    notes = []
    if not profile.calibrated:
        notes.append(f"{profile.name} is uncalibrated: datasheet rates with the kernel "
                     f"efficiencies of {profile.kernel_from or 'another GPU'}; a guide, not a "
                     "measurement (run `spcompile calibrate` on that GPU)")
    fitted = profile.kernel.fit
    if fitted.get("head_dim") and fitted["head_dim"] != problem.head_dim:
        notes.append(f"efficiencies were fitted at head_dim {fitted['head_dim']}, not "
                     f"{problem.head_dim}")
    if fitted.get("dtype") and fitted["dtype"] != problem.dtype:
        notes.append(f"efficiencies were fitted in {fitted['dtype']}, not {problem.dtype}")
    return notes


def _base(pattern: Pattern, problem: Problem, profile: Profile, cost: LaunchCost | None,
          sdpa_ms: float, **values) -> SimReport:
    """A report with the problem, device and (when given) the launch's figures filled in."""
    fields = dict(
        pattern=pattern.to_dict(), device=profile.name,
        device_description=profile.description, calibrated=profile.calibrated,
        batch=problem.batch, heads=problem.heads, kv_heads=problem.kv_heads,
        q_len=problem.q_len, kv_len=problem.kv_len, head_dim=problem.head_dim,
        dtype=problem.dtype, sdpa_ms=sdpa_ms,
        sdpa_tflops=problem.dense_flops / (sdpa_ms * 1e-3) / 1e12,
    )
    notes = list(values.pop("notes", []))
    if cost is not None:
        notes = list(cost.notes) + notes
        host_ms = profile.kernel.host_us * 1e-3
        if cost.kernel_ms < host_ms:
            notes.append(f"host-bound: the kernel ({cost.kernel_ms:.3f} ms) is shorter than the "
                         f"host time of one launch ({host_ms:.3f} ms); it runs at kernel speed "
                         "only while the CPU runs ahead (CUDA graphs, queued work)")
        fields.update(
            kernel_ms=cost.kernel_ms, compute_ms=cost.compute_ms, l2_ms=cost.l2_ms,
            hbm_ms=cost.hbm_ms, launch_ms=cost.launch_ms, programs=cost.programs,
            occupancy=cost.occupancy, slots=cost.slots, balance=cost.balance,
            efficiency=cost.efficiency, full_tile_us=cost.full_tile_us,
            partial_tile_us=cost.partial_tile_us, overhead_us=cost.overhead_us,
        )
    fields.update(values)
    fields["notes"] = notes
    predicted = fields.get("predicted_ms", fields["kernel_ms"] + fields.get("estimation_ms", 0))
    fields["predicted_ms"] = predicted
    fields["predicted_speedup"] = sdpa_ms / predicted
    return SimReport(**fields)


def _launch(plan_like, launch: tuple[int, int] | None) -> LaunchConfig:
    return LaunchConfig(*launch) if launch is not None else default_config(plan_like)


def _torch_dtype(problem: Problem) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(problem.dtype, torch.float32)


def _workload(plan: TilePlan, problem: Problem, profile: Profile,
              launch: tuple[int, int] | None) -> Workload:
    """The launch a call of this plan makes: on a GPU with warpgroup MMA, the warp-specialized
    kernel where ``codegen.sm90.in_scope`` takes the call (as ``codegen.launch.forward``
    decides at run time); else the Triton kernel at ``launch`` or its default config."""
    if launch is None and profile.wgmma:
        from ..codegen import sm90

        if sm90.in_scope(plan, _torch_dtype(problem), problem.head_dim, problem.dv):
            return workload_from_plan(plan, problem, sm90.WARPS,
                                      sm90.launch_stages(plan, problem.head_dim), True,
                                      gluon_persistent(problem, profile))
    config = _launch(plan, launch)
    return workload_from_plan(plan, problem, config.num_warps, config.num_stages)


def _static(pattern: Pattern, problem: Problem, profile: Profile, q_tile: TileArg,
            kv_tile: TileArg, launch: tuple[int, int] | None) -> SimReport:
    def build(specialized: bool) -> TilePlan:
        return build_plan(pattern, problem.q_len, problem.kv_len, q_tile, kv_tile,
                          head_dim=problem.head_dim, specialized=specialized)

    if launch is None and profile.wgmma:  # as codegen.launch.forward_plan on the GPU
        from ..codegen.sm90 import forward_plan

        plan = forward_plan(build, _torch_dtype(problem), problem.head_dim, problem.dv)
    else:
        plan = build(False)
    work = _workload(plan, problem, profile, launch)
    cost = launch_cost(work, profile, problem.dtype)
    pairs = allowed_pairs(pattern, problem.q_len, problem.kv_len)
    if plan.permuted:
        moved = 2 * (problem.batch * (problem.heads * problem.q_len
                                      + 2 * problem.kv_heads * problem.kv_len)
                     * problem.head_dim * problem.elem_bytes)
        per_token = profile.kernel.permute_ns_per_token
        cost_text = (f"{per_token:.2f} ns per token loaded, in every tile's time" if per_token
                     else "inside the permuted launch's own efficiency")
        permutation = (f"fused into the kernel's loads and stores: 0 extra bytes (a separate "
                       f"permute of q, k, v and o would move {moved / 1e6:.0f} MB through HBM); "
                       f"its cost is {cost_text}")
    else:
        permutation = "none: tiles are runs of the flat sequence"
    notes = [_gluon_launch(problem, profile)] if work.key.specialized else []
    return _base(
        pattern, problem, profile, cost, dense_sdpa_ms(problem, profile), notes=notes,
        q_tile=plan.q_tile, kv_tile=plan.kv_tile, launch=str(work.key),
        flop_bound=problem.q_len * problem.kv_len / pairs if pairs else math.inf,
        tile_bound=plan.tile_bound, block_sparse=plan.num_partial == 0,
        axes=verdicts(pattern, plan), num_q_tiles=plan.num_q_tiles,
        num_kv_tiles=plan.num_kv_tiles, num_full=plan.num_full, num_partial=plan.num_partial,
        permutation_bytes=0, permutation=permutation, plan=plan,
    )


def _gluon_launch(problem: Problem, profile: Profile) -> str:
    """How the warp-specialized forward launches (``codegen.sm90.persistent_for``), said."""
    from ..codegen import sm90

    if gluon_persistent(problem, profile):
        return (f"launch: persistent, {profile.num_sms} programs, each running a list of items "
                "(Q tiles of one head) balanced by their KV tiles (plan.assign): the schedule "
                "above, ahead of time")
    kv = sm90.kv_head_bytes(problem.kv_len, problem.head_dim, problem.elem_bytes)
    return (f"launch: one program per item: one head's K and V ({kv / 2**20:.0f} MiB) outgrow "
            f"the {profile.l2_mb:.0f} MiB L2, where persistent programs over fixed lists ran "
            "slower on the H100 (codegen.sm90.persistent_for)")


def _dense_site(pattern: Pattern, problem: Problem, profile: Profile) -> SimReport:
    sdpa = dense_sdpa_ms(problem, profile)
    return _base(pattern, problem, profile, None, sdpa, kernel_ms=sdpa, flop_bound=1.0,
                 tile_bound=1.0, block_sparse=True,
                 axes=[AxisVerdict(None, True, "dense: every pair is allowed")],
                 notes=["dense: the site is left to F.scaled_dot_product_attention"])


# ---------------------------------------------------------------------------------------------
# PerHead: one launch per run of heads that share a pattern (attention._per_head)


def _per_head(pattern: PerHead, problem: Problem, profile: Profile, q_tile: TileArg,
              kv_tile: TileArg, launch: tuple[int, int] | None) -> SimReport:
    group = problem.heads // problem.kv_heads
    subs: list[SimReport] = []
    for start, stop, member in pattern.runs(problem.heads):
        n = stop - start
        kv = n // group if start % group == 0 and stop % group == 0 else n
        sub_problem = Problem(problem.batch, n, kv, problem.q_len, problem.kv_len,
                              problem.head_dim, problem.dtype)
        if isinstance(member, TopK):
            sub = _topk(member, sub_problem, profile)
        elif isinstance(member, Dense):  # SDPA's launch (attention._per_head)
            sub = _dense_site(member, sub_problem, profile)
        else:
            sub = _static(member, sub_problem, profile, q_tile, kv_tile, launch)
        sub.label = f"heads {start}-{stop - 1}"
        subs.append(sub)
    s2 = problem.q_len * problem.kv_len
    pairs = sum(g.heads * s2 / g.flop_bound for g in subs)
    visited = sum(g.heads * g.tile_bound ** -1 for g in subs)
    kernel = sum(g.predicted_ms for g in subs)
    return _base(
        pattern, problem, profile, None, dense_sdpa_ms(problem, profile),
        kernel_ms=kernel, predicted_ms=kernel,
        flop_bound=problem.heads * s2 / pairs if pairs else math.inf,
        tile_bound=problem.heads / visited if visited else math.inf,
        block_sparse=all(g.block_sparse for g in subs), groups=subs,
        compute_ms=sum(g.compute_ms for g in subs), l2_ms=sum(g.l2_ms for g in subs),
        hbm_ms=sum(g.hbm_ms for g in subs), launch_ms=sum(g.launch_ms for g in subs),
        notes=[f"{len(subs)} launches, one per run of heads sharing a pattern; tile bound "
               "weighted by heads"],
    )


# ---------------------------------------------------------------------------------------------
# TopK: expected selected blocks, plus the estimation pass


def _topk_counts(p: TopK, n: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Per query block: (full, partial) selected key blocks, and the assumption made."""
    r = torch.arange(n)
    eligible = r + 1 if p.causal else torch.full_like(r, n)
    local_lo = (r - p.local + 1).clamp_min(0)
    local = (r - local_lo + 1).clamp_min(0) if p.local else torch.zeros_like(r)
    sink = torch.clamp(torch.full_like(r, p.sink), max=eligible)
    overlap = (torch.minimum(torch.full_like(r, p.sink), r + 1) - local_lo).clamp_min(0)
    overlap = overlap if p.local else torch.zeros_like(r)
    forced = sink + local - overlap
    if p.k is not None:
        visited = torch.minimum(eligible, forced + p.k)
        how = (f"{p.sink} sink + {p.local} local + k={p.k} blocks per query block, capped by "
               "the eligible blocks")
    else:
        want = torch.ceil(eligible.double() * float(p.coverage)).long()
        visited = torch.minimum(eligible, torch.maximum(forced, want))
        how = (f"coverage {p.coverage}: assumed to need coverage x eligible blocks (uniform "
               "scores, the worst case; peaked scores need fewer)")
    partial = (visited > 0).long() if (p.causal and p.block > 1) else torch.zeros_like(r)
    return visited - partial, partial, how


def _topk_estimation_ms(p: TopK, problem: Problem, profile: Profile) -> tuple[float, str]:
    """The estimation's passes (``plan.topk.estimation_passes``, the same ops the run makes):
    each costs its bytes at HBM bandwidth or its fp32 FLOPs at the fp32 matmul rate, plus
    launches; the ranking kernel also scans its rows ``k`` times (``rank_steps``), at the
    profile's ``rank_gsteps``."""
    from ..plan.topk import LAUNCHES_PER_PASS, estimation_passes, rank_steps

    passes = estimation_passes(p, problem.batch, problem.heads, problem.kv_heads,
                               problem.q_len, problem.head_dim, problem.elem_bytes)
    fp32 = profile.matmul_rate("fp32")
    hbm = profile.hbm_gbps * 1e9
    ms = sum(max(flops / fp32, moved / hbm) for _, moved, flops in passes) * 1e3
    ms += len(passes) * LAUNCHES_PER_PASS * profile.launch_us * 1e-3
    steps = rank_steps(p, problem.batch, problem.heads, problem.kv_heads, problem.q_len)
    if steps and profile.kernel.rank_gsteps > 0:
        ms += steps / (profile.kernel.rank_gsteps * 1e9) * 1e3
    moved = sum(m for _, m, _ in passes)
    flops = sum(f for _, _, f in passes)
    text = (f"{ms:.3f} ms: {len(passes)} passes ({', '.join(w for w, _, _ in passes)}) moving "
            f"{moved / 1e6:.0f} MB, {flops / 1e9:.1f} GFLOP of fp32 block scores")
    return ms, text


def _topk_key(p: TopK, warps_stages: tuple[int, int] | None = None) -> LaunchKey:
    """The launch of TopK's kernel: tiles are its blocks; warps and stages as given, else what
    ``codegen.fwd.default_config`` launches for such tiles."""
    if warps_stages is None:
        tile = SimpleNamespace(tile_size=p.block, ndim=1)
        config = default_config(SimpleNamespace(q_layout=tile, kv_layout=tile))
        warps_stages = config.num_warps, config.num_stages
    return LaunchKey(p.block, p.block, *warps_stages)


def _topk_kernel(p: TopK, problem: Problem, profile: Profile, key: LaunchKey
                 ) -> tuple[LaunchCost, torch.Tensor, torch.Tensor, str]:
    """The kernel's cost over the expected selection, with the per-block (full, partial) tile
    counts and the assumption behind them (the calibration fits through this too)."""
    full, partial, how = _topk_counts(p, -(-problem.kv_len // p.block))
    cost = launch_cost(workload_from_counts(full, partial, problem, key), profile, problem.dtype)
    return cost, full, partial, how


def _topk(p: TopK, problem: Problem, profile: Profile) -> SimReport:
    p.check_lengths(problem.q_len, problem.kv_len)
    n = -(-problem.kv_len // p.block)
    key = _topk_key(p)
    cost, full, partial, how = _topk_kernel(p, problem, profile, key)
    est_ms, est_text = _topk_estimation_ms(p, problem, profile)
    visited = int((full + partial).sum())
    pairs = (visited * p.block * p.block
             - int(partial.sum()) * p.block * (p.block - 1) // 2)
    pairs = min(pairs, problem.q_len * problem.kv_len)
    notes = [f"expected tiles: {how}",
             "top-k kernel: modeled as the forward kernel over the selected blocks (q tile = kv "
             "tile = block), as NSA/MInference-style kernels run"]
    if p.block < 16 or p.block & (p.block - 1):
        notes.append(f"block {p.block} is not a power of two >= 16: our kernels need such tiles")
    return _base(
        p, problem, profile, cost, dense_sdpa_ms(problem, profile),
        q_tile=(p.block,), kv_tile=(p.block,), launch=str(key),
        flop_bound=problem.q_len * problem.kv_len / pairs, tile_bound=n * n / visited,
        block_sparse=int(partial.sum()) == 0,
        axes=[AxisVerdict(None, int(partial.sum()) == 0,
                          "causal: the diagonal block of every query block is masked"
                          if p.causal else "selection is in whole blocks of q and k tiles")],
        num_q_tiles=n, num_kv_tiles=n, num_full=int(full.sum()),
        num_partial=int(partial.sum()), estimation_ms=est_ms, estimation=est_text,
        notes=notes,
    )
