"""Calibration: fit the kernel coefficients of a profile to measurements, or measure this GPU.

Re-fitting is a command, not a code edit:

    spcompile calibrate --from-results benchmarks/data/*-h100-*.json --device h100 --out X.json
    spcompile calibrate                      # on a GPU: measure it, fit, write a profile

Measurements come from the benchmark scripts' result files (``benchmarks/run.py`` and
``benchmarks/tune.py`` write them; rows name a suite row or carry their pattern) or from
``measure.measure_gpu`` (this GPU, in the same format).

The fit: every row's plan is rebuilt and costed by ``model`` exactly as ``simulate`` would. The
per-launch-configuration efficiency enters a row's time as ``a + b / efficiency``, so for given
global coefficients (partial extra, per-program overhead, permute cost) each configuration's
efficiency is a 1-D minimization; the globals are found by coordinate descent over a bounded
box. The loss is the mean squared log error of kernel time (a 10% miss counts the same at 0.5 ms
and at 50 ms). Wave quantization and imbalance (the schedule simulation) are refreshed between
rounds, so the fit and ``simulate`` agree exactly.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import math
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..codegen.fwd import LaunchConfig
from ..plan.tiles import TilePlan, build_plan
from ..spec.patterns import Pattern, TopK, pattern_from_dict
from .hardware import KernelCoefficients, LaunchKey, Profile, dtype_name, load_profile
from .model import Problem, Workload, gluon_persistent, launch_cost, workload_from_plan

__all__ = [
    "FitResult",
    "Measurement",
    "TopKMeasurement",
    "fit",
    "fit_topk",
    "load_results",
    "load_topk_results",
    "predict_ms",
]

#: Problem of the benchmark suite rows when a results file does not record it
#: (benchmarks/suite.py: "bf16, batch 1, 24 heads, head dim 128 unless a row says otherwise").
SUITE_PROBLEM = {"batch": 1, "heads": 24, "head_dim": 128, "dtype": "bf16"}

#: Bounds of the global coefficients (the fit's box): partial extra in full tiles, per-program
#: overhead in microseconds, permuted-load cost in ns per token, gathered-tile extra in full
#: tiles.
BOUNDS = {"partial_extra": (0.0, 2.0), "q_tile_overhead_us": (0.0, 30.0),
          "item_overhead_us": (0.0, 30.0), "permute_ns_per_token": (0.0, 10.0),
          "gather_extra": (0.0, 4.0)}
#: A launch's tile efficiency is a fraction of the datasheet's peak: never above it.
EFFICIENCY_RANGE = (0.01, 1.0)
#: Rows measured faster than this many host times of one call are not fitted: do_bench then
#: times the CPU building launches (on the H100, 302 us per attn_fwd call; Blocked(128) and
#: Blocked(256) both measured 0.25 ms).
HOST_BOUND = 1.25


@dataclass(frozen=True)
class Measurement:
    """One timed launch of our forward kernel (and SDPA at the same size when known);
    ``specialized``: of the warp-specialized Hopper kernel (``codegen.sm90``), ``persistent``
    launched one program per SM over ``plan.assign``'s lists."""

    id: str
    pattern: Pattern
    problem: Problem
    q_tile: tuple[int, ...]
    kv_tile: tuple[int, ...]
    warps: int
    stages: int
    ms: float
    sdpa_ms: float | None = None
    source: str = ""
    specialized: bool = False
    persistent: bool = False

    @property
    def key(self) -> LaunchKey:
        return self.workload().key

    @property
    def label(self) -> str:
        tiles = "x".join(map(str, self.q_tile)) + "/" + "x".join(map(str, self.kv_tile))
        return f"{self.id} {tiles} w{self.warps}s{self.stages}" + " ws" * self.specialized

    def plan(self) -> TilePlan:
        return build_plan(self.pattern, self.problem.q_len, self.problem.kv_len, self.q_tile,
                          self.kv_tile)

    def workload(self) -> Workload:
        return workload_from_plan(self.plan(), self.problem, self.warps, self.stages,
                                  self.specialized, self.persistent)

    @property
    def measured_speedup(self) -> float | None:
        return None if self.sdpa_ms is None else self.sdpa_ms / self.ms


def predict_ms(m: Measurement, profile: Profile) -> float:
    """The model's kernel time for a measurement's launch, as ``simulate`` computes it."""
    return launch_cost(m.workload(), profile, m.problem.dtype).kernel_ms


# ---------------------------------------------------------------------------------------------
# Reading result files


def load_suite(path: str | Path) -> dict[str, tuple[Pattern, int]]:
    """``{row id: (pattern, seq_len)}`` from a suite module (benchmarks/suite.py's ``suite()``)."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location("_spcompile_suite", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"{path}: not a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    if not hasattr(module, "suite"):
        raise ValueError(f"{path}: expected a function suite() returning rows with .id, "
                         ".pattern and .seq_len")
    rows = list(module.suite()) + list(getattr(module, "held_out", list)())
    return {row.id: (row.pattern, row.seq_len) for row in rows}


def _rows(tree: Any, path: Path) -> list[dict[str, Any]]:
    if isinstance(tree, list):
        return tree
    if isinstance(tree, dict):
        for key in ("results", "measurements"):
            if isinstance(tree.get(key), list):
                return tree[key]
    raise ValueError(f"{path}: expected a list of rows, or an object with 'results' or "
                     "'measurements'")


def _first(row: dict[str, Any], *names: str) -> Any:
    for name in names:
        if row.get(name) is not None:
            return row[name]
    return None


def _tile(value: Any) -> tuple[int, ...]:
    """A tile as results files record it: 64, [8, 16], or text such as "(8, 16)" / "64"."""
    if isinstance(value, int):
        return (value,)
    if isinstance(value, str):
        return tuple(int(v) for v in re.findall(r"\d+", value))
    return tuple(int(v) for v in value)


def load_results(
    paths: Iterable[str | Path], suite: str | Path | None = None,
    launch: tuple[int, int] | str | None = None, device: str | Profile = "h100",
) -> tuple[list[Measurement], list[str]]:
    """Measurements from result files, and why each skipped row was skipped.

    A row gives its pattern as a spec tree (``pattern``) or names a suite row (``id``, looked
    up in ``suite``). Tiles come from ``q_tile``/``kv_tile`` (or ``q``/``kv``), time from
    ``ours_ms`` or ``ms``, SDPA time from ``sdpa_ms`` or ``ms * speedup``. Rows without
    ``warps``/``stages`` take ``launch``: a (warps, stages) pair (the first suite run,
    2026-11-23-h100-fwd-first.json, used 8 warps, 2 stages) or ``"default"``, what
    ``benchmarks/run.py`` launches (``codegen.fwd.default_config`` for the row's tiles); else
    they are skipped. ``FILE@8x2`` / ``FILE@default`` sets ``launch`` for one file. A row whose
    recorded tile bound differs from
    today's plan was measured on a different plan and is skipped: fitting it would fit a kernel
    that no longer runs. Rows of the Gluon kernel count only where they ran the launch it
    takes by default on ``device`` (whose L2 decides it: ``_other_gluon_launch``).
    """
    known = load_suite(suite) if suite is not None else {}
    gpu = load_profile(device)
    out: list[Measurement] = []
    skipped: list[str] = []
    for raw in paths:
        path, file_launch = _split_launch(str(raw), launch)
        env_problem = {}
        tree = json.loads(path.read_text())
        if isinstance(tree, dict):
            env_problem = tree.get("problem", {}) or {}
        for i, row in enumerate(_rows(tree, path)):
            where = f"{path.name}[{i}] {row.get('id', '?')}"
            if "error" in row:
                skipped.append(f"{where}: the run failed ({str(row['error'])[:60]})")
                continue
            other = _other_kernel(row)
            if other:
                skipped.append(f"{where}: measured {other}, not the kernel that runs by default")
                continue
            if isinstance(known.get(str(row.get("id")), (None,))[0], TopK):
                skipped.append(f"{where}: a TopK row (run-time lists: fit_topk fits it)")
                continue
            try:
                m = _measurement(row, known, env_problem, file_launch, path.name)
            except (KeyError, ValueError, TypeError) as e:
                skipped.append(f"{where}: {e}")
                continue
            recorded = row.get("tile_bound")
            if recorded is not None:
                now = m.plan().tile_bound
                if abs(now - float(recorded)) > 1e-6 * max(1.0, now):
                    skipped.append(f"{where}: measured on a different plan (tile bound "
                                   f"{float(recorded):.2f} then, {now:.2f} now)")
                    continue
            other = _other_gluon_launch(row, m, gpu) if m.specialized else ""
            if other:  # the Triton kernel timed beside it still counts
                skipped.append(f"{where}: measured {other}, not the launch that runs by default")
            else:
                persistent = m.specialized and _ran_persistent(row)
                out.append(dataclasses.replace(m, persistent=persistent))
            if m.specialized and row.get("triton_ms") is not None:
                # benchmarks/run.py times the Triton kernel on the same inputs, same rounds, on
                # its own default plan (1-D: 64-token KV tiles where the Gluon kernel's hold
                # 128); rows before session 9 recorded no tiles for it: the same default.
                p = m.problem
                own = build_plan(m.pattern, p.q_len, p.kv_len, head_dim=p.head_dim)
                base = _measurement({**row, "kernel": "triton", "ours_ms": row["triton_ms"],
                                     "q_tile": row.get("triton_q_tile", own.q_tile),
                                     "kv_tile": row.get("triton_kv_tile", own.kv_tile)},
                                    known, env_problem, "default", path.name)
                out.append(base)
    return out, skipped


#: What the forward runs by default, per flag a results row may record (the defaults of
#: ``codegen.fwd.LaunchConfig``); the model costs this kernel only. ``lazy_rescale`` was an
#: experiment (commit c4439bb, measured slower and removed): the kernel runs without it.
DEFAULT_KERNEL = {f.name: f.default for f in dataclasses.fields(LaunchConfig)
                  if f.name in ("persistent", "box_loops", "head_major")} | {"lazy_rescale": False}


def _other_kernel(row: dict[str, Any]) -> str:
    """Which non-default kernel variant a row measured ("" for the default one). Rows of
    ``benchmarks/tune.py --persistent`` / ``--loops`` record the flags (a row without one ran
    before it existed: its default); earlier files of the same scripts name them in
    ``variant`` only: "persistent-N", or "{list|box}-{rank|head}". (Rows of the Gluon kernel:
    ``_other_gluon_launch``.)"""
    if row.get("kernel") == "sm90":
        return ""
    flags = {k: row[k] for k in DEFAULT_KERNEL if k in row}
    variant = str(row.get("variant", ""))
    if not flags and variant:
        parts = variant.split("-")
        flags["persistent"] = parts[0] == "persistent"
        if parts[0] in ("list", "box") and len(parts) > 1:
            flags["box_loops"] = parts[0] == "box"
            flags["head_major"] = parts[1] == "head"
    return ", ".join(f"{k}={v}" for k, v in flags.items() if v != DEFAULT_KERNEL[k])


def _other_gluon_launch(row: dict[str, Any], m: Measurement, gpu: Profile) -> str:
    """Whether a Gluon kernel's row ran another launch than its default on ``gpu`` ("" if
    not): ``sm90.persistent_for``, with its L2, decides between one program per
    item and one per SM over ``plan.assign.assign_items``' lists. run.py's rows record the
    launch (``sm90_persistent``), tune.py's name it ("-p", "-ps"); both record the assignment
    since session 11. Older rows ran a program per item (before session 10) or, persistent, a
    fixed stride (session 10)."""
    persistent = _ran_persistent(row)
    if persistent != gluon_persistent(m.problem, gpu):
        return f"the Gluon kernel {'persistent' if persistent else 'one program per item'}"
    if persistent and row.get("assignment") != "balanced":
        return "the Gluon kernel persistent over a fixed stride"
    return ""


def _ran_persistent(row: dict[str, Any]) -> bool:
    """Whether a Gluon kernel's row ran persistent: run.py records it, tune.py's variant
    names it ("-p", "-ps")."""
    return bool(row.get("sm90_persistent",
                        str(row.get("variant", "")).endswith(("-p", "-ps"))))


def _split_launch(text: str, launch: tuple[int, int] | str | None
                  ) -> tuple[Path, tuple[int, int] | str | None]:
    """``FILE@8x2`` / ``FILE@default``: a launch for one file's rows that lack one."""
    name, at, spec = text.rpartition("@")
    if not at or Path(text).exists():
        return Path(text), launch
    if spec == "default":
        return Path(name), spec
    try:
        warps, stages = (int(x) for x in spec.lower().split("x"))
    except ValueError:
        raise ValueError(f"{text}: expected FILE@WARPSxSTAGES or FILE@default") from None
    return Path(name), (warps, stages)


def _measurement(row: dict[str, Any], known: dict[str, tuple[Pattern, int]],
                 env_problem: dict[str, Any], launch: tuple[int, int] | str | None,
                 source: str) -> Measurement:
    rid = str(row.get("id", ""))
    if row.get("pattern") is not None:
        pattern = pattern_from_dict(row["pattern"])
        seq_len = _first(row, "q_len", "tokens", "seq_len")
    elif rid in known:
        pattern, seq_len = known[rid]
    else:
        raise KeyError(f"row {rid!r} has no pattern and is not in the suite (pass --suite)")
    if seq_len is None:
        raise KeyError("no sequence length (q_len / tokens)")
    problem_values = {**SUITE_PROBLEM, **env_problem,
                      **{k: row[k] for k in SUITE_PROBLEM if k in row}}
    heads = int(problem_values["heads"])
    warps, stages = row.get("warps"), row.get("stages")
    q_tile, kv_tile = _tile(_first(row, "q_tile", "q")), _tile(_first(row, "kv_tile", "kv"))
    q_len = int(seq_len)
    specialized = row.get("kernel") == "sm90"
    if specialized:
        from ..codegen import sm90

        plan = build_plan(pattern, q_len, q_len, q_tile, kv_tile)
        warps = sm90.WARPS  # a recorded ring depth (tune.py --sm90) else the launch's
        stages = stages or sm90.launch_stages(plan, int(problem_values["head_dim"]))
    if warps is None or stages is None:
        if launch is None:
            raise KeyError("no warps/stages recorded (pass --launch WxS or --launch default)")
        if launch == "default":
            from ..codegen.fwd import default_config

            config = default_config(build_plan(pattern, q_len, q_len, q_tile, kv_tile))
            warps, stages = config.num_warps, config.num_stages
        else:
            warps, stages = launch
    ms = _first(row, "ours_ms", "ms")
    if ms is None:
        raise KeyError("no kernel time (ours_ms / ms)")
    sdpa = row.get("sdpa_ms")
    if sdpa is None and row.get("speedup") is not None:
        sdpa = float(ms) * float(row["speedup"])
    kv_len = int(_first(row, "kv_len") or q_len)
    problem = Problem(int(problem_values["batch"]), heads,
                      int(row.get("kv_heads", heads)), q_len, kv_len,
                      int(problem_values["head_dim"]), dtype_name(problem_values["dtype"]))
    return Measurement(
        id=rid, pattern=pattern, problem=problem,
        q_tile=q_tile, kv_tile=kv_tile, warps=int(warps), stages=int(stages), ms=float(ms),
        sdpa_ms=None if sdpa is None else float(sdpa), source=source, specialized=specialized,
    )


# ---------------------------------------------------------------------------------------------
# The fit


#: The global coefficients, in profile units, and how each converts to seconds in ``_Row``.
GLOBALS = ("partial_extra", "q_tile_overhead_us", "item_overhead_us", "permute_ns_per_token",
           "gather_extra")
_SECONDS = {"partial_extra": 1.0, "q_tile_overhead_us": 1e-6, "item_overhead_us": 1e-6,
            "permute_ns_per_token": 1e-9, "gather_extra": 1.0}


@dataclass
class _Row:
    """What the loss needs of one measurement, with the work split by coefficient."""

    m: Measurement
    work: Workload
    weight: float
    mma: float  # seconds per tile on one SM at efficiency 1
    ranks: int
    full: int
    plain: int  # partial tiles from the lists
    gathered: int  # gathered tiles summed over ranks
    scale: float  # copies * occupancy / slots: per-program seconds -> makespan seconds
    floor_s: float  # memory floor
    launch_s: float
    balance: float = 1.0

    def predict_s(self, eff: float, g: dict[str, float]) -> float:
        """Kernel seconds, the same arithmetic as ``model.tile_times`` / ``launch_cost``."""
        w = self.work
        pi = g["partial_extra"]
        cq = g["item_overhead_us" if w.persistent else "q_tile_overhead_us"] * 1e-6
        lam, gamma = g["permute_ns_per_token"] * 1e-9, g["gather_extra"]
        mma = self.mma / eff
        kv_perm = lam * w.key.kv_tokens if w.kv_permuted else 0.0
        per_rank_overhead = cq + (2 * lam * w.key.q_tokens if w.q_permuted else 0.0)
        total = (self.ranks * per_rank_overhead + self.full * (mma + kv_perm)
                 + self.plain * (mma * (1 + pi) + kv_perm)
                 + self.gathered * (mma * (1 + pi + gamma) + lam * w.key.kv_tokens))
        return max(total * self.scale * self.balance, self.floor_s) + self.launch_s


def _row(m: Measurement, profile: Profile, weight: float) -> _Row:
    work = m.workload()
    cost = launch_cost(work, profile, m.problem.dtype)
    per_sm = profile.peak(m.problem.dtype) / profile.num_sms
    plain = work.partial - work.gathered
    return _Row(
        m=m, work=work, weight=weight, mma=work.tile_flops / per_sm, ranks=work.full.numel(),
        full=int(work.full.sum()), plain=int(plain.sum()),
        gathered=work.gathered * work.full.numel(),
        scale=work.copies * cost.occupancy / cost.slots,
        floor_s=max(cost.l2_ms, cost.hbm_ms) * 1e-3, launch_s=cost.launch_ms * 1e-3,
    )


def _active(rows: Sequence[_Row]) -> list[str]:
    """The global coefficients the rows can tell anything about (the rest keep the base's).

    ``permute_ns_per_token`` is never fitted: every permuted launch has an efficiency of its
    own (the "-nd" keys), which absorbs a per-token load cost, so the fit could only trade one
    against the other (fitted to session 5's N-d sweeps it drove the N-d efficiency to the
    1.0 cap and the permute cost to 7.3 ns per token). The kernel loads permuted tiles as
    boxes through descriptors; the base profile's value (0 for the H100) stands.
    """
    out = ["q_tile_overhead_us"]
    if any(r.work.persistent for r in rows):
        out.append("item_overhead_us")
    if any(r.plain or r.gathered for r in rows):
        out.append("partial_extra")
    if any(r.gathered for r in rows):
        out.append("gather_extra")
    return [name for name in GLOBALS if name in out]


def _golden(f: Callable[[float], float], lo: float, hi: float, iters: int = 48) -> float:
    """Minimum of a unimodal-ish ``f`` on [lo, hi] by golden-section search."""
    g = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iters):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return (a + b) / 2


@dataclass
class FitResult:
    """Fitted coefficients, and how well they explain the rows they came from."""

    coefficients: KernelCoefficients
    fitted: list[tuple[Measurement, float]]  # (measurement, predicted ms)
    held_out: list[Measurement]
    skipped: list[str]

    @property
    def rms_log_error(self) -> float:
        errs = [math.log(p / m.ms) ** 2 for m, p in self.fitted]
        return math.sqrt(sum(errs) / len(errs)) if errs else 0.0


def fit(
    measurements: Sequence[Measurement], base: Profile, hold_out: Iterable[str] = (),
    sources: Sequence[str] = (), skipped: Sequence[str] = (),
) -> FitResult:
    """Fit ``base``'s kernel coefficients to ``measurements`` (rows whose id is in
    ``hold_out`` are left out, for checking). Hardware figures of ``base`` are kept.

    Each source file weighs the same in the loss, however many rows it has, so that an
    80-configuration sweep of an older kernel does not drown a 12-row run of the current one.
    """
    held = set(hold_out)
    skipped = list(skipped)
    limit = HOST_BOUND * base.kernel.host_us * 1e-3
    used = []
    for m in measurements:
        if m.id in held:
            continue
        if m.ms < limit:
            skipped.append(f"{m.source} {m.label}: {m.ms:.3f} ms is within {HOST_BOUND}x the "
                           f"host time of one call ({base.kernel.host_us:.0f} us): the CPU, not "
                           "the kernel, may have set the pace")
            continue
        used.append(m)
    if not used:
        raise ValueError("fit: no measurements left after holding out " + ", ".join(held))
    per_file = {src: sum(m.source == src for m in used) for src in {m.source for m in used}}
    start = dataclasses.replace(base.kernel, efficiency={str(m.key): 0.4 for m in used})
    profile = dataclasses.replace(base, kernel=start, calibrated=True, kernel_from=None)
    rows = [_row(m, profile, 1.0 / per_file[m.source]) for m in used]
    total_weight = sum(r.weight for r in rows)
    by_key: dict[str, list[_Row]] = {}
    for r in rows:
        by_key.setdefault(str(r.m.key), []).append(r)
    active = _active(rows)

    def config_loss(group: list[_Row], log_eff: float, g: dict[str, float]) -> float:
        eff = math.exp(log_eff)
        return sum(r.weight * math.log(r.predict_s(eff, g) / (r.m.ms * 1e-3)) ** 2
                   for r in group)

    def best_effs(g: dict[str, float]) -> tuple[float, dict[str, float]]:
        total, effs = 0.0, {}
        lo, hi = (math.log(x) for x in EFFICIENCY_RANGE)
        for key, group in by_key.items():
            x = _golden(lambda le, group=group: config_loss(group, le, g), lo, hi)
            effs[key] = math.exp(x)
            total += config_loss(group, x, g)
        return total / total_weight, effs

    def loss(g: dict[str, float]) -> float:
        return best_effs(g)[0]

    current = {name: getattr(base.kernel, name) for name in GLOBALS}
    seeds = {"partial_extra": (0.0, 0.25, 0.5), "q_tile_overhead_us": (0.0, 2.0, 6.0),
             "item_overhead_us": (0.0, 1.0, 3.0), "permute_ns_per_token": (0.0, 1.0, 3.0),
             "gather_extra": (0.0, 0.5, 1.0)}
    grid = [dict(current, **dict(zip(active, values, strict=True)))
            for values in itertools.product(*(seeds[name] for name in active))]
    current = min(grid, key=loss)
    for _ in range(3):  # rounds: coordinates, then the schedule simulation again
        for _ in range(3):
            for name in active:
                lo, hi = BOUNDS[name]

                def along(x: float, name: str = name, at: dict = current) -> float:
                    return loss(dict(at, **{name: x}))

                x = _golden(along, lo, hi, iters=32)
                if along(x) < loss(current) - 1e-12:
                    current = dict(current, **{name: x})
        _, effs = best_effs(current)
        profile = dataclasses.replace(profile, kernel=_coefficients(start, current, effs))
        for r in rows:
            r.balance = launch_cost(r.work, profile, r.m.problem.dtype).balance
    _, effs = best_effs(current)
    coefficients = _coefficients(start, current, effs)
    coefficients = dataclasses.replace(coefficients, **_sdpa_rates(used, base))
    profile = dataclasses.replace(profile, kernel=coefficients)
    fitted = [(m, predict_ms(m, profile)) for m in used]
    result = FitResult(coefficients, fitted, [m for m in measurements if m.id in held],
                       skipped)
    problems = {(m.problem.head_dim, m.problem.dtype) for m in used}
    info: dict[str, Any] = {
        "files": list(sources),
        "rows": len(used),
        "held_out": sorted(held),
        "fitted": active,
        "rms_log_error": round(result.rms_log_error, 4),
        "skipped": skipped,
        "date": time.strftime("%Y-%m-%d"),
    }
    if len(problems) == 1:
        info["head_dim"], info["dtype"] = next(iter(problems))
    result.coefficients = dataclasses.replace(coefficients, fit=info)
    return result


def _coefficients(start: KernelCoefficients, g: dict[str, float], effs: dict[str, float]
                  ) -> KernelCoefficients:
    return dataclasses.replace(
        start, efficiency={k: round(v, 4) for k, v in effs.items()},
        **{name: None if g[name] is None else round(g[name], 4) for name in GLOBALS})


def _sdpa_rates(rows: Sequence[Measurement], base: Profile) -> dict[str, Any]:
    """Median measured SDPA TFLOP/s per dtype, overall and per key length."""
    by_len: dict[str, dict[int, list[float]]] = {}
    for m in rows:
        if m.sdpa_ms is None:
            continue
        rate = m.problem.dense_flops / (m.sdpa_ms * 1e-3) / 1e12
        by_len.setdefault(m.problem.dtype, {}).setdefault(m.problem.kv_len, []).append(rate)
    if not by_len:
        return {}
    typical = {d: round(statistics.median([r for v in t.values() for r in v]), 1)
               for d, t in by_len.items()}
    table = {d: {str(n): round(statistics.median(v), 1) for n, v in sorted(t.items())}
             for d, t in by_len.items()}
    merged = {d: {**base.kernel.sdpa_tflops_by_kv_len.get(d, {}), **table.get(d, {})}
              for d in {*base.kernel.sdpa_tflops_by_kv_len, *table}}
    return {"sdpa_tflops": {**base.kernel.sdpa_tflops, **typical},
            "sdpa_tflops_by_kv_len": merged}


# ---------------------------------------------------------------------------------------------
# TopK: the run-time list kernels and the estimation


@dataclass(frozen=True)
class TopKMeasurement:
    """One TopK launch over a fixed selection (``kernel_ms``, estimation excluded) and, when
    recorded, the estimation with its lists (``dynamic_ms``)."""

    id: str
    pattern: TopK
    problem: Problem
    warps: int
    stages: int
    kernel_ms: float
    dynamic_ms: float | None
    source: str

    def predict(self, profile: Profile) -> tuple[float, float]:
        """(kernel ms, estimation + lists ms) as ``simulate`` computes them."""
        from .simulate import _topk_estimation_ms, _topk_kernel, _topk_key

        key = _topk_key(self.pattern, (self.warps, self.stages))
        kernel = _topk_kernel(self.pattern, self.problem, profile, key)[0].kernel_ms
        return kernel, _topk_estimation_ms(self.pattern, self.problem, profile)[0]


def load_topk_results(paths: Iterable[str | Path], suite: str | Path
                      ) -> list[TopKMeasurement]:
    """TopK rows of result files: ``benchmarks/run.py`` rows (``kernel_ms``, ``estimation_ms``,
    ``lists_ms``, at the default launch) and ``tune.py`` TopK rows (``fwd_ms`` per launch);
    rows of another kernel variant (``_other_kernel``) are left out, as ``load_results`` does."""
    from .simulate import _topk_key

    known = load_suite(suite)
    out = []
    for raw in paths:
        path = _split_launch(str(raw), None)[0]
        tree = json.loads(path.read_text())
        for row in _rows(tree, path):
            pattern, seq_len = known.get(str(row.get("id")), (None, 0))
            ms = _first(row, "kernel_ms", "fwd_ms")
            if (not isinstance(pattern, TopK) or ms is None or "error" in row
                    or _other_kernel(row)):
                continue
            warps, stages = row.get("warps"), row.get("stages")
            if warps is None or stages is None:
                key = _topk_key(pattern)
                warps, stages = key.warps, key.stages
            heads = int(row.get("heads", SUITE_PROBLEM["heads"]))
            problem = Problem(int(row.get("batch", SUITE_PROBLEM["batch"])), heads,
                              int(row.get("kv_heads", heads)), seq_len, seq_len,
                              int(row.get("head_dim", SUITE_PROBLEM["head_dim"])),
                              str(SUITE_PROBLEM["dtype"]))
            dynamic = None
            if row.get("estimation_ms") is not None and row.get("lists_ms") is not None:
                dynamic = float(row["estimation_ms"]) + float(row["lists_ms"])
            out.append(TopKMeasurement(str(row["id"]), pattern, problem, int(warps),
                                       int(stages), float(ms), dynamic, path.name))
    return out


def fit_topk(rows: Sequence[TopKMeasurement], base: Profile, hold_out: Iterable[str] = ()
             ) -> tuple[KernelCoefficients, list[str]]:
    """``list_tile_us`` (to the kernel times) and ``rank_gsteps`` (to estimation + lists),
    each a 1-D least squares in log time over the rows not held out; every other coefficient
    of ``base`` is kept. Returns the coefficients and one line per row, held-out ones marked."""
    held = set(hold_out)
    used = [r for r in rows if r.id not in held]
    if not used:
        raise ValueError("fit_topk: no TopK rows left after holding out " + ", ".join(held))

    def with_(**values: float) -> Profile:
        return dataclasses.replace(base, kernel=dataclasses.replace(base.kernel, **values))

    def kernel_loss(extra: float) -> float:
        prof = with_(list_tile_us=extra)
        return sum(math.log(r.predict(prof)[0] / r.kernel_ms) ** 2 for r in used)

    extra = _golden(kernel_loss, 0.0, 10.0, iters=40)
    timed = [r for r in used if r.dynamic_ms is not None]
    rate = base.kernel.rank_gsteps
    if timed:
        def dynamic_loss(log_rate: float) -> float:
            prof = with_(list_tile_us=extra, rank_gsteps=math.exp(log_rate))
            return sum(math.log(r.predict(prof)[1] / r.dynamic_ms) ** 2 for r in timed)

        rate = math.exp(_golden(dynamic_loss, math.log(1.0), math.log(1e5), iters=48))
    coefficients = dataclasses.replace(base.kernel, list_tile_us=round(extra, 4),
                                       rank_gsteps=round(rate, 1))
    prof = dataclasses.replace(base, kernel=coefficients)
    lines = []
    for r in rows:
        kernel, dynamic = r.predict(prof)
        text = (f"{r.id} w{r.warps}s{r.stages} ({r.source}): kernel {kernel:.3f} ms predicted, "
                f"{r.kernel_ms:.3f} measured ({kernel / r.kernel_ms - 1:+.1%})")
        if r.dynamic_ms is not None:
            text += (f"; estimation + lists {dynamic:.3f} predicted, {r.dynamic_ms:.3f} measured "
                     f"({dynamic / r.dynamic_ms - 1:+.1%})")
        lines.append(text + (" [held out]" if r.id in held else ""))
    return coefficients, lines
