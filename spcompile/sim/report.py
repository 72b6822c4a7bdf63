"""SimReport: the simulator's answer, as a table (rich or plain), JSON, and a tile-map picture.

Every figure a report shows is a field, so the JSON carries exactly what the table shows and
``SimReport.from_json(report.to_json()) == report``. The tile plan the figures came from rides
along (not serialized) for :meth:`SimReport.plot`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..plan.states import FULL, PARTIAL
from ..plan.tiles import TilePlan
from .verdict import AxisVerdict

__all__ = ["SimReport"]

#: Largest tile map drawn cell for cell; larger ones are averaged down to this many cells a side.
PLOT_CELLS = 512


def _fmt_ms(ms: float) -> str:
    return f"{ms:.3f} ms" if ms < 10 else f"{ms:.2f} ms"


def _tile(t: tuple[int, ...] | None) -> str:
    if t is None:
        return "-"
    return str(t[0]) if len(t) == 1 else "x".join(map(str, t))


@dataclass
class SimReport:
    """What a pattern costs on a device: bounds, tiles, predicted time and speedup, and why.

    Times are milliseconds for the whole call (all batches and heads). ``flop_bound`` is
    S^2 / allowed pairs; ``tile_bound`` is (Q tiles x KV tiles) / visited tiles, each visited
    tile charged in full (NATTEN's tile bound). ``block_sparse`` is True when no visited tile
    needs a mask; ``axes`` say why per axis. ``groups`` holds one report per head group of a
    PerHead pattern (the top-level figures are then over all heads).
    """

    pattern: Any
    device: str
    device_description: str
    calibrated: bool
    batch: int
    heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    dtype: str
    flop_bound: float
    tile_bound: float
    block_sparse: bool
    predicted_ms: float
    kernel_ms: float
    sdpa_ms: float
    predicted_speedup: float
    q_tile: tuple[int, ...] | None = None
    kv_tile: tuple[int, ...] | None = None
    launch: str | None = None
    axes: list[AxisVerdict] = field(default_factory=list)
    num_q_tiles: int | None = None
    num_kv_tiles: int | None = None
    num_full: int | None = None
    num_partial: int | None = None
    compute_ms: float = 0.0
    l2_ms: float = 0.0
    hbm_ms: float = 0.0
    launch_ms: float = 0.0
    estimation_ms: float = 0.0
    programs: int = 0
    occupancy: int = 0
    slots: int = 0
    balance: float = 1.0
    efficiency: float = 0.0
    full_tile_us: float = 0.0
    partial_tile_us: float = 0.0
    overhead_us: float = 0.0
    sdpa_tflops: float = 0.0
    permutation_bytes: int = 0
    permutation: str = ""
    estimation: str | None = None
    label: str = ""
    notes: list[str] = field(default_factory=list)
    groups: list[SimReport] = field(default_factory=list)
    plan: TilePlan | None = field(default=None, repr=False, compare=False)

    # -- derived -------------------------------------------------------------------------
    @property
    def waves(self) -> float:
        return self.programs / self.slots if self.slots else 0.0

    @property
    def bound(self) -> str:
        """What limits the kernel: "compute", "L2" or "HBM"."""
        top = max(self.compute_ms, self.l2_ms, self.hbm_ms)
        return "compute" if top == self.compute_ms else ("L2" if top == self.l2_ms else "HBM")

    @property
    def dense_equivalent_tflops(self) -> float:
        """Dense attention FLOPs over the predicted time: the rate a dense kernel would need."""
        flops = 4.0 * self.batch * self.heads * self.q_len * self.kv_len * self.head_dim
        return flops / (self.predicted_ms * 1e-3) / 1e12 if self.predicted_ms else 0.0

    # -- JSON ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "plan":
                continue
            value = getattr(self, f.name)
            if f.name == "axes":
                value = [a.to_dict() for a in value]
            elif f.name == "groups":
                value = [g.to_dict() for g in value]
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, tree: dict[str, Any]) -> SimReport:
        names = {f.name for f in dataclasses.fields(cls)} - {"plan"}
        unknown = set(tree) - names
        if unknown:
            raise ValueError(f"SimReport.from_dict: unknown keys {sorted(unknown)}")
        values = dict(tree)
        values["axes"] = [AxisVerdict(**a) for a in tree.get("axes", [])]
        values["groups"] = [cls.from_dict(g) for g in tree.get("groups", [])]
        for name in ("q_tile", "kv_tile"):
            if values.get(name) is not None:
                values[name] = tuple(values[name])
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> SimReport:
        return cls.from_dict(json.loads(text))

    # -- text ----------------------------------------------------------------------------
    @property
    def title(self) -> str:
        kind = next(iter(self.pattern)) if isinstance(self.pattern, dict) else str(self.pattern)
        head = f"{self.label}: " if self.label else ""
        return f"{head}{kind} on {self.device}: {self.predicted_speedup:.2f}x predicted"

    def rows(self) -> list[tuple[str, str]]:
        """(label, value) pairs: the table's content, in order."""
        pattern = json.dumps(self.pattern, separators=(", ", ": "))
        rows = [
            ("pattern", pattern),
            ("problem", f"batch {self.batch}, heads {self.heads} (kv {self.kv_heads}), "
                        f"q_len {self.q_len}, kv_len {self.kv_len}, head_dim {self.head_dim}, "
                        f"{self.dtype}"),
            ("device", f"{self.device} ({self.device_description}), "
                       + ("calibrated" if self.calibrated else "UNCALIBRATED")),
            ("FLOP bound", f"{self.flop_bound:.2f}x (S^2 / allowed pairs)"),
            ("tile bound", f"{self.tile_bound:.2f}x (tile pairs / visited tiles, each charged "
                           "in full)"),
        ]
        if self.q_tile is not None:
            rows.append(("tiles", f"q {_tile(self.q_tile)}, kv {_tile(self.kv_tile)}, launch "
                                  f"{self.launch}, {self.occupancy} program(s) per SM"))
        if self.num_full is not None:
            rows.append(("visited", f"{self.num_full + (self.num_partial or 0)} of "
                                    f"{self.num_q_tiles} x {self.num_kv_tiles} per head: "
                                    f"{self.num_full} full, {self.num_partial} partial"))
        verdict = "yes" if self.block_sparse else "no"
        rows.append(("block-sparse", verdict))
        for a in self.axes:
            name = "  sequence" if a.axis is None else f"  axis {a.axis}"
            rows.append((name, ("yes: " if a.block_sparse else "no: ") + a.reason))
        rows.append(("predicted", f"{_fmt_ms(self.predicted_ms)} = kernel "
                                  f"{_fmt_ms(self.kernel_ms)}"
                     + (f" + top-k estimation {_fmt_ms(self.estimation_ms)}"
                        if self.estimation_ms else "")))
        if self.programs:
            rows += [
                ("  kernel", f"{self.bound}-bound: schedule {_fmt_ms(self.compute_ms)}, L2 "
                             f"floor {_fmt_ms(self.l2_ms)}, HBM floor {_fmt_ms(self.hbm_ms)}, "
                             f"launch {self.launch_ms * 1e3:.1f} us"),
                ("  schedule", f"{self.programs} items on {self.slots} slots: "
                               f"{self.waves:.1f} waves, makespan / ideal {self.balance:.3f}"),
                ("  per tile", f"full {self.full_tile_us:.2f} us, partial "
                               f"{self.partial_tile_us:.2f} us, per item "
                               f"{self.overhead_us:.2f} us (one SM, efficiency "
                               f"{self.efficiency:.3f} of peak)"),
            ]
        rows += [
            ("dense SDPA", f"{_fmt_ms(self.sdpa_ms)} ({self.sdpa_tflops:.0f} TFLOP/s)"),
            ("speedup", f"{self.predicted_speedup:.2f}x predicted "
                        f"({self.dense_equivalent_tflops:.0f} dense-equivalent TFLOP/s)"),
        ]
        if self.permutation:
            rows.append(("permutation", self.permutation))
        if self.estimation:
            rows.append(("top-k estimation", self.estimation))
        for g in self.groups:
            rows.append((f"  {g.label}", f"{g.predicted_speedup:.2f}x, {_fmt_ms(g.predicted_ms)}"
                                         f", {json.dumps(g.pattern)}"))
        rows += [("note", n) for n in self.notes]
        return rows

    def render(self) -> str:
        """Plain text: a title line and aligned rows (what pipes and logs get)."""
        rows = self.rows()
        width = max(len(k) for k, _ in rows)
        return "\n".join([self.title] + [f"  {k:<{width}}  {v}" for k, v in rows])

    def __str__(self) -> str:
        return self.render()

    def table(self) -> Any:
        """A ``rich.table.Table`` of :meth:`rows`."""
        from rich.table import Table

        table = Table(title=self.title, show_header=False, title_justify="left")
        table.add_column(style="bold", no_wrap=True)
        table.add_column()
        for key, value in self.rows():
            table.add_row(key, value)
        return table

    def show(self, console: Any = None) -> None:
        """Print: a rich table on a terminal, plain text otherwise."""
        from rich.console import Console

        console = console or Console()
        if console.is_terminal:
            console.print(self.table())
        else:
            console.file.write(self.render() + "\n")

    # -- picture -------------------------------------------------------------------------
    def plot(self, path: str | Path) -> Path:
        """Draw the tile map (KV tiles per Q tile: full, partial, empty) into ``path``.

        Q tiles in plan order, rows; KV tiles, columns. Maps above ``PLOT_CELLS`` a side are
        averaged down, each cell colored by its share of full and partial tiles. Needs
        matplotlib (``pip install 'spcompile[plot]'``).
        """
        try:
            import matplotlib
        except ImportError:
            raise ModuleNotFoundError(
                "SimReport.plot needs matplotlib: pip install matplotlib "
                "(or spcompile[plot])") from None
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch

        panels = [r for r in ([self] if self.plan is not None else self.groups)
                  if r.plan is not None]
        if not panels:
            raise ValueError(f"no tile map to draw: a {next(iter(self.pattern), self.pattern)} "
                             "pattern has no static tile plan (top-k tiles are chosen at run "
                             "time; dense sites run SDPA)")
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 5), squeeze=False)
        for ax, report in zip(axes[0], panels, strict=True):
            assert report.plan is not None
            image, factor = tile_map_image(report.plan.states)
            ax.imshow(image.numpy(), interpolation="nearest", aspect="auto")
            scale = f" (1 cell = {factor}x{factor} tiles)" if factor > 1 else ""
            ax.set_title(f"{report.label or next(iter(report.pattern))}: tile bound "
                         f"{report.tile_bound:.2f}x{scale}", fontsize=9)
            ax.set_xlabel(f"KV tile ({_tile(report.kv_tile)})")
            ax.set_ylabel(f"Q tile ({_tile(report.q_tile)})")
        fig.legend(handles=[Patch(color=_FULL_RGB, label="full"),
                            Patch(color=_PARTIAL_RGB, label="partial (masked)")],
                   loc="lower center", ncol=2)
        fig.tight_layout(rect=(0, 0.06, 1, 1))
        path = Path(path)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


_FULL_RGB = (0.13, 0.29, 0.58)
_PARTIAL_RGB = (0.95, 0.55, 0.10)


def tile_map_image(states: torch.Tensor, cells: int = PLOT_CELLS) -> tuple[torch.Tensor, int]:
    """RGB float image [rows, cols, 3] of a state matrix, averaged down to at most ``cells``."""
    rows, cols = states.shape
    factor = max(1, math.ceil(max(rows, cols) / cells))
    full = (states == FULL).float()[None, None]
    part = (states == PARTIAL).float()[None, None]
    if factor > 1:
        full = F.avg_pool2d(full, factor, ceil_mode=True)
        part = F.avg_pool2d(part, factor, ceil_mode=True)
    full, part = full[0, 0, :, :, None], part[0, 0, :, :, None]
    white = torch.ones(3)
    image = white * (1 - full - part) + torch.tensor(_FULL_RGB) * full \
        + torch.tensor(_PARTIAL_RGB) * part
    return image.clamp(0, 1), factor
