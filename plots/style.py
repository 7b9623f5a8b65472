"""Shared figure style: paper-size fonts, one colour per method, running runs dashed, PNG + PDF.

Figures use matplotlib's object API (`matplotlib.figure.Figure`), never pyplot, so no global
backend or figure registry is touched; saving renders with the Agg (PNG) and PDF canvases.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import matplotlib
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from plots.groups import Cell

# Paper size: a two-column paper's full width is about 7 in; text at 8 pt stays legible there.
FULL_WIDTH_IN = 7.0
RC = {
    "font.size": 8,
    "axes.titlesize": 8.5,
    "axes.labelsize": 8,
    "legend.fontsize": 7,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "lines.linewidth": 1.3,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.5,
    "pdf.fonttype": 42,
    "savefig.dpi": 200,
}

# Native methods warm (they are the ones that collapse in the paper), R3 methods cool.
METHOD_COLORS = {
    "GRPO": "#d62728",
    "GRPO+TIS": "#ff7f0e",
    "GSPO": "#8c564b",
    "GSPO+TIS": "#e377c2",
    "GRPO+R3": "#1f77b4",
    "GRPO+TIS+R3": "#17becf",
    "GSPO+R3": "#2ca02c",
    "GSPO+TIS+R3": "#9467bd",
}
ARM_COLORS = {"moe": "#d62728", "moe_r3": "#1f77b4", "dense": "#444444"}
ARM_LABELS = {"moe": "MoE native", "moe_r3": "MoE + R3", "dense": "dense (no router)"}
_FALLBACK = ("#7f7f7f", "#bcbd22", "#aec7e8", "#ffbb78", "#98df8a")


def cell_color(cell: Cell, index: int) -> str:
    return METHOD_COLORS.get(cell.method, _FALLBACK[index % len(_FALLBACK)])


def cell_linestyle(cell: Cell) -> str:
    """Solid for complete runs; dashed for running (or failed) ones, as the legend says."""
    return "-" if cell.status == "complete" else "--"


@contextmanager
def paper_style() -> Iterator[None]:
    with matplotlib.rc_context(RC):
        yield


def new_figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def plot_band(
    ax: Axes, curve, *, color: str, linestyle: str, label: str, scale: float = 1.0, marker: str | None = None
) -> None:
    """Seed mean as a line, min/max over seeds as a band (only when several seeds)."""
    if not len(curve):
        return
    x = curve.index.to_numpy()
    ax.plot(
        x,
        scale * curve["mean"].to_numpy(),
        color=color,
        linestyle=linestyle,
        label=label,
        marker=marker,
        markersize=2.5,
    )
    if (curve["n"] > 1).any():
        ax.fill_between(
            x, scale * curve["min"].to_numpy(), scale * curve["max"].to_numpy(), color=color, alpha=0.18, linewidth=0
        )
    if linestyle != "-":  # running: mark where the run has got to
        ax.plot(x[-1:], scale * curve["mean"].to_numpy()[-1:], color=color, marker=">", markersize=4)


def no_data(ax: Axes, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} recorded", transform=ax.transAxes, ha="center", va="center", color="0.4")


def save(fig: Figure, out_dir: Path, stem: str) -> list[Path]:
    """Write <stem>.png and <stem>.pdf; return both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.png", out_dir / f"{stem}.pdf"]
    for p in paths:
        fig.savefig(p)
    return paths
