"""The ``simulate`` and ``calibrate`` subcommands (registered in ``spcompile.cli.COMMANDS``).

    spcompile simulate SPEC --seq-len N | --shape 16x48x80 [--heads H --head-dim D --dtype bf16
                       --device h100 --q-tile 128|2x8x8 --kv-tile ... --json --plot FILE]
    spcompile calibrate [--out FILE] [--from-results FILE...]

Each takes ``(args, out)`` like the other commands: ``out`` is ``cli.Output`` (rich on a
terminal, plain text otherwise).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..argtypes import has_matplotlib, positive_int, rules_and_site, sizes

if TYPE_CHECKING:
    from ..cli import Output

__all__ = ["calibrate", "calibrate_arguments", "simulate", "simulate_arguments"]


_sizes = sizes("128 or 2x8x8", 3)


_positive = positive_int


def _launch(text: str) -> tuple[int, int] | str:
    if text == "default":
        return text
    sizes = _sizes(text)
    if len(sizes) != 2:
        raise argparse.ArgumentTypeError(f"expected WARPSxSTAGES like 8x2, got {text!r}")
    return sizes[0], sizes[1]


# --------------------------------------------------------------------------------------------
# simulate


def simulate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", metavar="SPEC", help="spec file")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--seq-len", type=_positive, metavar="N", help="sequence length")
    size.add_argument("--shape", type=_sizes, metavar="TxHxW",
                      help="token grid, e.g. 16x48x80 (seq_len is the product)")
    parser.add_argument("--kv-len", type=_positive, metavar="N",
                        help="key length (default: the sequence length)")
    parser.add_argument("--batch", type=_positive, default=1, metavar="B")
    parser.add_argument("--heads", type=_positive, default=24, metavar="H",
                        help="query heads (default 24)")
    parser.add_argument("--kv-heads", type=_positive, metavar="H", help="key/value heads (GQA)")
    parser.add_argument("--head-dim", type=_positive, default=128, metavar="D")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--device", default="h100",
                        help="profile name (h100, h200, b200, a100, l40s), calibrated profile "
                             "name or .json path, or 'current'")
    parser.add_argument("--q-tile", type=_sizes, metavar="T", help="q tile: 128 or 2x8x8")
    parser.add_argument("--kv-tile", type=_sizes, metavar="T", help="kv tile: 64 or 2x8x8")
    parser.add_argument("--rule", metavar="NAME", help="only this rule")
    parser.add_argument("--recommend", action="store_true",
                        help="also rank tile shapes and, for neighborhoods, strides")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--plot", metavar="FILE", help="draw the tile map(s) into FILE (.png)")


def _tile_arg(sizes: tuple[int, ...] | None) -> int | tuple[int, ...] | None:
    if sizes is None:
        return None
    return sizes[0] if len(sizes) == 1 else sizes


def simulate(args: argparse.Namespace, out: Output) -> int:
    from ..spec.errors import SpecError
    from .optimize import recommend
    from .simulate import simulate as run_simulation

    if args.plot and not has_matplotlib():
        out.error("--plot needs matplotlib: pip install matplotlib")
        return 2
    try:
        rules, site = rules_and_site(args)
    except KeyError as e:
        out.error(e.args[0])
        return 2
    seq_len, kv_len = site.seq_len, site.kv_len
    options = dict(batch=args.batch, heads=args.heads, kv_heads=args.kv_heads,
                   head_dim=args.head_dim, dtype=args.dtype, device=args.device)
    results: list[dict[str, Any]] = []
    plotted: list[tuple[str, Any]] = []
    failed = 0
    for rule in rules:
        entry: dict[str, Any] = {"rule": rule.label}
        try:
            pattern = rule.resolve(site.symbols())
            report = run_simulation(pattern, seq_len, kv_len, q_tile=_tile_arg(args.q_tile),
                                    kv_tile=_tile_arg(args.kv_tile), **options)
        except (SpecError, ValueError, NotImplementedError, TypeError) as e:
            text = "; ".join(p.message for p in e.problems) if isinstance(e, SpecError) \
                else str(e)
            entry["not_applicable"] = text
            results.append(entry)
            if not args.json:
                out.line(f"{rule.label}: not applicable: {text}", style="yellow")
            failed += isinstance(e, ValueError) and "device" in str(e)
            continue
        report.label = rule.label
        entry["report"] = report.to_dict()
        advice = None
        if args.recommend:
            advice = recommend(pattern, seq_len, kv_len, **options)
            entry["recommendation"] = advice.to_dict()
        results.append(entry)
        if report.plan is not None or report.groups:
            plotted.append((rule.label, report))
        if args.json:
            continue
        if out.rich:
            out.console.print(report.table())
        else:
            out.line(report.render())
        if advice is not None:
            out.line(advice.render())
        out.line()
    if args.json:
        print(json.dumps(results, indent=1))
    if args.plot:
        for path, (label, report) in _plot_paths(Path(args.plot), plotted):
            try:
                report.plot(path)
            except ValueError as e:
                out.error(f"{label}: {e}")
                continue
            if not args.json:
                out.line(f"wrote {path}")
    return 1 if failed else 0


def _plot_paths(path: Path, plotted: list[tuple[str, Any]]) -> list[tuple[Path, Any]]:
    """One file per rule: FILE itself for one, FILE-<rule>.png for several."""
    if len(plotted) == 1:
        return [(path, plotted[0])]
    out = []
    for label, report in plotted:
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-") or "rule"
        out.append((path.with_name(f"{path.stem}-{slug}{path.suffix or '.png'}"),
                    (label, report)))
    return out


# --------------------------------------------------------------------------------------------
# calibrate


def calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", metavar="FILE",
                        help="profile to write (default: ~/.cache/spcompile/profiles/NAME.json)")
    parser.add_argument("--name", help="profile name (default: the base profile's name, or the "
                                       "GPU's name)")
    parser.add_argument("--from-results", nargs="+", metavar="FILE",
                        help="fit to these result files instead of measuring this GPU "
                             "(FILE@8x2 or FILE@default: the launch of its rows that lack one)")
    parser.add_argument("--device", default=None,
                        help="base profile whose hardware figures the fit keeps (default h100 "
                             "with --from-results, the matching built-in profile otherwise)")
    parser.add_argument("--hold-out", default="", metavar="IDS",
                        help="comma-separated row ids left out of the fit (to check it)")
    parser.add_argument("--launch", type=_launch, metavar="WxS",
                        help="warps x stages of result rows that do not record them, or "
                             "'default' (what benchmarks/run.py launches)")
    parser.add_argument("--suite", metavar="FILE",
                        help="suite module naming the rows' patterns (default: "
                             "benchmarks/suite.py when present)")


def calibrate(args: argparse.Namespace, out: Output) -> int:
    from .calibrate import fit, fit_topk, load_results, load_topk_results
    from .hardware import load_profile, user_profile_dir

    suite = args.suite or ("benchmarks/suite.py" if Path("benchmarks/suite.py").is_file()
                           else None)
    hold_out = [x for x in args.hold_out.split(",") if x]
    if args.from_results:
        base = load_profile(args.device or "h100")
        files = list(args.from_results)
    else:
        base, files = _measure(args, out)
        if base is None:
            return 2
    measurements, skipped = load_results(files, suite=suite, launch=args.launch, device=base)
    for reason in skipped:
        out.line(f"skipped {reason}", style="yellow")
    if not measurements:
        out.error("no usable measurements")
        return 1
    result = fit(measurements, base, hold_out, sources=files, skipped=skipped)
    name = args.name or base.name
    profile = dataclasses.replace(base, name=name, kernel=result.coefficients, calibrated=True,
                                  kernel_from=None)
    topk_rows = load_topk_results(files, suite) if suite is not None else []
    if topk_rows:  # TopK's run-time lists and estimation, on top of the static fit
        coefficients, lines = fit_topk(topk_rows, profile, hold_out)
        profile = dataclasses.replace(profile, kernel=coefficients)
        result.coefficients = coefficients
        for line in lines:
            out.line(f"topk {line}")
    path = Path(args.out) if args.out else user_profile_dir() / f"{name}.json"
    profile.write(path)
    _show_fit(result, profile, out)
    out.line(f"wrote {path}")
    return 0


def _measure(args: argparse.Namespace, out: Output) -> tuple[Any, list[str]]:
    """Measure this GPU; returns (profile with measured hardware, [results file])."""
    import time

    import torch

    from .hardware import builtin_profiles, load_profile, user_profile_dir
    from .measure import measure_gpu, profile_from_measurements

    if not torch.cuda.is_available():
        out.error("calibrate needs a CUDA GPU here, or --from-results FILE... to fit to "
                  "measurements taken elsewhere")
        return None, []
    gpu = torch.cuda.get_device_name()
    base = load_profile(args.device) if args.device else next(
        (p for p in map(load_profile, builtin_profiles())
         if any(a.lower() in gpu.lower() for a in p.aliases)), None)
    hw, rows = measure_gpu(out.line)
    name = args.name or re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    profile = profile_from_measurements(hw, base, name)
    target = Path(args.out) if args.out else user_profile_dir() / f"{name}.json"
    results = target.with_name(target.stem + ".results.json")
    results.parent.mkdir(parents=True, exist_ok=True)
    env = {"device": gpu, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "hardware": hw}
    results.write_text(json.dumps({"env": env, "measurements": rows}, indent=1))
    out.line(f"wrote {results} (re-fit later with --from-results)")
    return profile, [str(results)]


def _show_fit(result: Any, profile: Any, out: Output) -> None:
    from .calibrate import predict_ms
    from .model import dense_sdpa_ms

    k = result.coefficients
    out.line(f"fitted on {k.fit['rows']} rows (rms log error {k.fit['rms_log_error']:.3f}); "
             f"partial_extra {k.partial_extra}, q_tile_overhead_us {k.q_tile_overhead_us}, "
             f"item_overhead_us {k.item_overhead_us}, "
             f"permute_ns_per_token {k.permute_ns_per_token}")
    out.line("efficiency: " + ", ".join(f"{key} {v:.3f}" for key, v in
                                        sorted(k.efficiency.items())))
    rows = [(m, p, "fit") for m, p in result.fitted]
    rows += [(m, predict_ms(m, profile), "held out") for m in result.held_out]
    out.line(f"{'row':36s} {'set':8s} {'meas ms':>9s} {'pred ms':>9s} {'err':>7s} "
             f"{'meas x':>7s} {'pred x':>7s}")
    for m, pred, kind in rows:
        speed = m.measured_speedup
        pred_speed = dense_sdpa_ms(m.problem, profile) / pred
        out.line(f"{m.label:36s} {kind:8s} {m.ms:9.3f} {pred:9.3f} {pred / m.ms - 1:+7.1%} "
                 f"{(f'{speed:.2f}' if speed else '-'):>7s} {pred_speed:7.2f}")
