"""What the backend did to each attention site, as a table users read and tests assert on."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

log = logging.getLogger("spcompile")


@dataclass(frozen=True)
class SiteReport:
    """One attention site: where it is, what it became, and why if it stayed dense."""

    module_path: str
    form: str
    shape: str  # "B x H(/H_kv) x Sq x Skv x D"
    rule: str | None = None
    pattern: str | None = None  # the pattern's canonical key when rewritten
    reason: str | None = None  # why the site stayed dense
    density: float | None = None
    predicted_speedup: float | None = None
    # The model's per-key mask (padding) runs with the pattern (AND); density and the
    # prediction are the pattern's own, before padding removes keys.
    key_padding: bool = False

    @property
    def rewritten(self) -> bool:
        return self.pattern is not None


@dataclass
class Report:
    """All sites of one compiled graph, plus the spec's rules that matched nothing."""

    sites: list[SiteReport] = field(default_factory=list)
    unused_rules: list[str] = field(default_factory=list)
    candidates_rejected: list[SiteReport] = field(default_factory=list)

    @property
    def rewritten(self) -> list[SiteReport]:
        return [s for s in self.sites if s.rewritten]

    @property
    def left_dense(self) -> list[SiteReport]:
        return [s for s in self.sites if not s.rewritten] + self.candidates_rejected

    def to_json(self) -> str:
        return json.dumps({"sites": [asdict(s) for s in self.sites],
                           "rejected": [asdict(s) for s in self.candidates_rejected],
                           "unused_rules": self.unused_rules}, indent=1)

    def rows(self) -> list[tuple[str, ...]]:
        out = []
        for s in self.sites + self.candidates_rejected:
            what = s.pattern if s.rewritten else f"dense: {s.reason}"
            if s.rewritten and s.key_padding:
                what = f"{what} AND key padding"
            out.append((s.module_path or "?", s.shape, s.rule or "-", what or "",
                        f"{s.density:.3f}" if s.density is not None else "-",
                        f"{s.predicted_speedup:.2g}x" if s.predicted_speedup else "-"))
        return out

    def render(self) -> str:
        """A plain-text table (rich renders the same rows on a terminal)."""
        header = ("site", "shape", "rule", "pattern / reason", "density", "predicted")
        rows = [header, *self.rows()]
        widths = [min(60, max(len(r[i]) for r in rows)) for i in range(len(header))]
        lines = ["  ".join(c[:w].ljust(w) for c, w in zip(r, widths, strict=True))
                 for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(f"{len(self.rewritten)} of {len(self.sites) + len(self.candidates_rejected)}"
                     f" attention sites rewritten")
        for name in self.unused_rules:
            lines.append(f"rule {name!r} matched no site")
        return "\n".join(lines)

    def print_rich(self) -> None:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="spcompile: attention sites", title_justify="left")
        for col in ("site", "shape", "rule", "pattern / reason", "density", "predicted"):
            table.add_column(col, overflow="fold")
        for row in self.rows():
            table.add_row(*row)
        console = Console()
        console.print(table)
        for name in self.unused_rules:
            console.print(f"rule {name!r} matched no site", style="yellow")


_LAST: list[Report] = []


def set_last_report(report: Report) -> None:
    _LAST[:] = [report]


def last_report() -> Report | None:
    """The report of the most recent graph compiled by the spcompile backend."""
    return _LAST[0] if _LAST else None


def log_report(report: Report, **_: Any) -> None:
    log.info("\n%s", report.render())
