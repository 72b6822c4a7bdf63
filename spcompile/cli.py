"""The ``spcompile`` command line.

Each subcommand is two small functions, one that declares its arguments and one that runs it,
registered in ``COMMANDS``; adding a command means adding one entry. A user mistake (a bad spec,
a missing optional package) prints a message and returns a non-zero code, never a traceback.
Output uses rich (colors, tables) on a terminal and plain text otherwise, so that it pipes and
tests read it as it is.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from .argtypes import has_matplotlib, positive_int, rules_and_site, sizes
from .sim import cli_commands as sim_commands
from .spec.errors import SpecError
from .spec.loading import load_spec
from .spec.patterns import Pattern, TopK
from .spec.preview import MaskSummary, render_blocks, summarize
from .spec.rules import Rule, SiteKey
from .spec.schema import spec_schema
from .spec.templates import to_tree

__all__ = ["COMMANDS", "Command", "Output", "build_parser", "main"]


class Output:
    """stdout/stderr through rich on a terminal, plain ``print`` otherwise."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(file=sys.stdout, highlight=False)
        self.errors = Console(file=sys.stderr, highlight=False)
        self.rich = self.console.is_terminal

    def line(self, text: str = "", style: str | None = None) -> None:
        if self.rich:
            self.console.print(text, style=style, markup=False)
        else:
            print(text, file=sys.stdout)

    def error(self, text: str) -> None:
        if self.errors.is_terminal:
            self.errors.print(f"error: {text}", style="red", markup=False)
        else:
            print(f"error: {text}", file=sys.stderr)

    def table(self, title: str, rows: Sequence[tuple[str, str]]) -> None:
        if self.rich:
            from rich.table import Table

            table = Table(title=title, show_header=False, title_justify="left")
            table.add_column(style="bold")
            table.add_column()
            for key, value in rows:
                table.add_row(key, value)
            self.console.print(table)
            return
        print(title, file=sys.stdout)
        width = max(len(k) for k, _ in rows)
        for key, value in rows:
            print(f"  {key:<{width}}  {value}", file=sys.stdout)


@dataclass(frozen=True)
class Command:
    """One subcommand: its help line, its arguments, and what it does (returns the exit code)."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, Output], int]


# --------------------------------------------------------------------------------------------
# validate


def _validate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("specs", nargs="+", metavar="SPEC", help="spec files (.yaml/.toml/.json)")


def _validate(args: argparse.Namespace, out: Output) -> int:
    failed = 0
    for path in args.specs:
        try:
            spec = load_spec(path)
        except SpecError as e:
            failed += 1
            for problem in e.problems:
                out.line(problem.format(e.source), style="red")
            continue
        out.line(f"{path}: OK ({len(spec.rules)} rule{'s' * (len(spec.rules) != 1)})",
                 style="green")
        for rule, earlier in spec.unreachable_rules():
            out.line(f"{path}: warning: {rule.label} can never match: {earlier.label} before "
                     "it matches every site", style="yellow")
    return 1 if failed else 0


# --------------------------------------------------------------------------------------------
# explain


_shape = sizes("16x48x80", 3)
_positive = positive_int


def _explain_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", metavar="SPEC", help="spec file")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--seq-len", type=_positive, metavar="N", help="sequence length")
    size.add_argument("--shape", type=_shape, metavar="TxHxW",
                      help="token grid, e.g. 16x48x80 (seq_len is the product)")
    parser.add_argument("--kv-len", type=_positive, metavar="N",
                        help="key length (default: the sequence length)")
    parser.add_argument("--heads", type=_positive, metavar="H", help="number of heads")
    parser.add_argument("--head-dim", type=_positive, metavar="D", help="head dimension")
    parser.add_argument("--rule", metavar="NAME", help="explain only this rule")
    parser.add_argument("--png", metavar="FILE", help="also draw the masks into FILE")


def _explain(args: argparse.Namespace, out: Output) -> int:
    if args.png and not has_matplotlib():
        out.error("--png needs matplotlib: pip install matplotlib")
        return 2
    try:
        rules, site = rules_and_site(args)
    except KeyError as e:
        out.error(e.args[0])
        return 2
    shown = [rule for rule in rules if _explain_rule(rule, site, out) is not None]
    if args.png and shown:
        _write_png(args.png, [(rule.label, _high_res(rule, site)) for rule in shown])
        out.line(f"wrote {args.png}")
    return 0


def _explain_rule(rule: Rule, site: SiteKey, out: Output) -> MaskSummary | None:
    """Print one rule's figures and picture; the summary, or None when it has no picture."""
    q, kv = int(site.seq_len), int(site.kv_len)  # type: ignore[arg-type]
    rows = [("match", _flow(rule.match.to_tree()))]
    why = rule.match.size_mismatch(site)
    if why:
        rows.append(("note", f"a site of this size would not match: {why}"))
    try:
        pattern = rule.resolve(site.symbols())
    except SpecError as e:
        rows.append(("not applicable", "; ".join(p.message for p in e.problems)))
        out.table(rule.label, rows)
        return None
    rows += [("pattern", _flow(to_tree(pattern))), ("size", _size(site))]
    try:
        summary = summarize(pattern, q, kv, num_heads=site.num_heads)
    except (ValueError, NotImplementedError) as e:
        rows.append(("not applicable" if isinstance(e, ValueError) else "density", str(e)))
        rows += _topk_bound(pattern, kv)
        out.table(rule.label, rows)
        return None
    how = "exact" if summary.exact else f"estimated from {summary.rows_used} sampled query rows"
    rows += [
        ("density", f"{summary.density:.2%} ({how})"),
        ("keys/query", f"min {summary.min_keys}  mean {summary.mean_keys:.1f}  "
                       f"max {summary.max_keys}"),
        ("FLOP bound", f"{summary.flop_bound:.2f}x (S^2 / allowed pairs)"),
    ]
    out.table(rule.label, rows)
    for text in render_blocks(summary.cells):
        out.line("  |" + text + "|")
    out.line()
    return summary


def _topk_bound(pattern: Pattern, kv_len: int) -> list[tuple[str, str]]:
    if not isinstance(pattern, TopK) or pattern.k is None:
        return []
    blocks = min(pattern.sink + pattern.local + pattern.k, -(-kv_len // pattern.block))
    keys = min(blocks * pattern.block, kv_len)
    return [("keys/query", f"at most {keys} ({blocks} blocks of {pattern.block})"),
            ("FLOP bound", f"at least {kv_len / keys:.2f}x")]


def _size(site: SiteKey) -> str:
    text = f"q_len={site.seq_len} kv_len={site.kv_len}"
    if site.num_heads:
        text += f" heads={site.num_heads}"
    if site.head_dim:
        text += f" head_dim={site.head_dim}"
    return text


def _flow(tree: Any) -> str:
    """A tree as one line of YAML flow style."""
    return yaml.safe_dump(tree, default_flow_style=True, sort_keys=False,
                          width=math.inf).strip().removesuffix("...").strip()


def _high_res(rule: Rule, site: SiteKey) -> MaskSummary:
    pattern = rule.resolve(site.symbols())
    return summarize(pattern, int(site.seq_len), int(site.kv_len),  # type: ignore[arg-type]
                     num_heads=site.num_heads, rows=512, cols=512)


def _write_png(path: str, pictures: list[tuple[str, MaskSummary]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(pictures), figsize=(4 * len(pictures), 4), squeeze=False)
    for ax, (label, summary) in zip(axes[0], pictures, strict=True):
        ax.imshow(summary.cells, cmap="Greys", vmin=0, vmax=1, interpolation="nearest",
                  extent=(0, summary.kv_len, summary.q_len, 0))
        ax.set_title(f"{label}: {summary.density:.2%}")
        ax.set_xlabel("key")
        ax.set_ylabel("query")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# schema


def _schema_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # no arguments


def _schema(args: argparse.Namespace, out: Output) -> int:
    print(json.dumps(spec_schema(), indent=2), file=sys.stdout)
    return 0


_dims = sizes("2x3x224x224", None)


def _inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="MODULE:FACTORY",
                        help="a callable that returns the model, e.g. mypkg.models:build")
    parser.add_argument("--spec", required=True, help="spec file (YAML, TOML or JSON)")
    parser.add_argument("--input-shape", action="append", required=True, type=_dims,
                        metavar="2x3x224x224", help="one per model input, in order")
    parser.add_argument("--input-dtype", default="float32",
                        choices=("float32", "bfloat16", "float16", "int64"),
                        help="int64 for token ids")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def _inspect(args: argparse.Namespace, out: Output) -> int:
    import torch

    from .passes.inspect import inspect_model, load_factory

    try:
        factory = load_factory(args.target)
    except (ValueError, ImportError) as e:
        out.error(str(e))
        return 2
    report = inspect_model(factory, list(args.input_shape), load_spec(args.spec),
                           getattr(torch, args.input_dtype))
    if args.json:
        print(report.to_json(), file=sys.stdout)
    elif out.rich:
        report.print_rich()
    else:
        out.line(report.render())
    return 0


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # no arguments: the demo picks the GPU when there is one


def _demo(args: argparse.Namespace, out: Output) -> int:
    from .demos.run import run

    return run(out.line)


# --------------------------------------------------------------------------------------------

COMMANDS: tuple[Command, ...] = (
    Command("validate", "check spec files and report every error", _validate_arguments,
            _validate),
    Command("explain", "show each rule's pattern, density and mask at a size",
            _explain_arguments, _explain),
    Command("schema", "print the JSON Schema of spec files (for editors)", _schema_arguments,
            _schema),
    Command("simulate", "predict each rule's kernel time and speedup on a GPU, and why",
            sim_commands.simulate_arguments, sim_commands.simulate),
    Command("calibrate", "measure this GPU (or fit result files) into a simulator profile",
            sim_commands.calibrate_arguments, sim_commands.calibrate),
    Command("inspect", "show which attention sites a model has and what the spec makes of "
            "them, without running it", _inspect_arguments, _inspect),
    Command("demo", "compile a built-in ViT with a neighborhood spec: report, check, predict",
            _demo_arguments, _demo),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spcompile", description="Sparse attention for unmodified PyTorch models.")
    sub = parser.add_subparsers(dest="command_name", metavar="COMMAND")
    for command in COMMANDS:
        child = sub.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(child)
        child.set_defaults(command=command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (argparse exits 2 on bad arguments)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "command", None) is None:
        parser.print_help(sys.stderr)
        return 2
    out = Output()
    try:
        return args.command.run(args, out)
    except SpecError as e:
        for problem in e.problems:
            out.error(problem.format(e.source))
        return 1
    except BrokenPipeError:  # piped into `head`: stop quietly, as other Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
