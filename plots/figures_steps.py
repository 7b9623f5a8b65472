"""Figures over global steps, one set per setting: mismatch KL, training dynamics, eval scores.

Inputs are the cells of one setting (plots.groups); every line is a seed mean with a min/max
band, dashed when the run is still going (a ">" marks where it has got to). Metric keys are
the ones docs/run_format.md defines for metrics.jsonl / eval.jsonl.
"""

from __future__ import annotations

import math

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from plots.groups import Cell
from plots.runs import Setting
from plots.style import FULL_WIDTH_IN, cell_color, cell_linestyle, new_figure, no_data, plot_band
from plots.tables import bench_title, ordered_benchmarks


def _shared_legend(fig: Figure, axes: list[Axes], extra: list[Line2D] = ()) -> None:
    handles, labels = {}, {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles[lab], labels[lab] = h, lab
    hs = list(handles.values()) + list(extra)
    if hs:
        fig.legend(handles=hs, loc="outside lower center", ncols=min(4, len(hs)), frameon=False)


def _mark_collapses(ax: Axes, cells: list[Cell]) -> bool:
    """Dotted vertical line at each run's collapse step, in its method's colour."""
    marked = False
    for i, cell in enumerate(cells):
        for step in cell.collapse_steps:
            if step is not None:
                ax.axvline(step, color=cell_color(cell, i), linestyle=":", linewidth=1.2)
                marked = True
    return marked


def _collapse_handle() -> Line2D:
    return Line2D([], [], color="0.3", linestyle=":", linewidth=1.2, label="collapse step (method colour)")


def kl_figure(setting: Setting, cells: list[Cell]) -> Figure:
    """Training-inference k3 KL over global steps, one line per method; without / with R3."""
    fig = new_figure(FULL_WIDTH_IN, 2.9)
    axes = fig.subplots(1, 2, sharex=True, sharey=True)
    fig.suptitle(f"Training-inference mismatch during RL: {setting.title}")
    for ax, replay in zip(axes, (False, True)):
        ax.set_title("with R3 (routing replayed)" if replay else "without R3 (native routing)")
        ax.set_xlabel("global step")
        drawn = False
        for i, cell in enumerate(cells):
            if cell.runs[0].config.replay != replay:
                continue
            curve = cell.curve("metrics", "mismatch/k3_kl")
            curve = curve[curve["mean"] > 0]  # log axis: k3 KL is >= 0, exact zeros cannot be drawn
            plot_band(ax, curve, color=cell_color(cell, i), linestyle=cell_linestyle(cell), label=cell.display)
            drawn |= bool(len(curve))
        if not drawn:
            no_data(ax, "k3 KL " + ("with" if replay else "without") + " R3")
        else:
            ax.set_yscale("log")
    axes[0].set_ylabel("k3 KL(train || rollout) per token [nats]")
    _shared_legend(fig, list(axes))
    return fig


_DYNAMICS = (
    ("rollout/response_len_mean", "response length [tokens]", "linear", 1.0),
    ("actor/grad_norm", "grad norm before clip", "log", 1.0),
    ("actor/entropy", "entropy [nats / token]", "linear", 1.0),
)


def dynamics_figure(setting: Setting, cells: list[Cell]) -> Figure:
    """Four panels: response length, gradient norm, entropy, eval average; collapses marked."""
    fig = new_figure(FULL_WIDTH_IN, 5.2)
    axes = fig.subplots(2, 2, sharex=True).ravel()
    fig.suptitle(f"Training dynamics: {setting.title}")
    any_collapse = False
    for ax, (key, ylabel, scale, mult) in zip(axes, _DYNAMICS):
        drawn = False
        for i, cell in enumerate(cells):
            curve = cell.curve("metrics", key)
            if scale == "log":
                curve = curve[curve["mean"] > 0]
            plot_band(
                ax, curve, color=cell_color(cell, i), linestyle=cell_linestyle(cell), label=cell.display, scale=mult
            )
            drawn |= bool(len(curve))
        if drawn and scale == "log":
            ax.set_yscale("log")
        if not drawn:
            no_data(ax, key)
        ax.set_ylabel(ylabel + (" (log scale)" if scale == "log" else ""))
        any_collapse |= _mark_collapses(ax, cells)
    ax = axes[3]
    drawn = False
    for i, cell in enumerate(cells):
        curve = cell.curve("evals", "avg")
        plot_band(
            ax,
            curve,
            color=cell_color(cell, i),
            linestyle=cell_linestyle(cell),
            label=cell.display,
            scale=100,
            marker="o",
        )
        drawn |= bool(len(curve))
        for step in cell.collapse_steps:
            if step is not None and step in curve.index:
                ax.plot(
                    [step],
                    [100 * curve.loc[step, "mean"]],
                    marker="X",
                    color=cell_color(cell, i),
                    markersize=7,
                    markeredgecolor="k",
                    markeredgewidth=0.5,
                    linestyle="none",
                )
    if not drawn:
        no_data(ax, "evaluation")
    ax.set_ylabel("eval score, average [%]")
    _mark_collapses(ax, cells)
    for ax in axes[2:]:
        ax.set_xlabel("global step")
    _shared_legend(fig, list(axes), [_collapse_handle()] if any_collapse else [])
    return fig


def eval_figure(setting: Setting, cells: list[Cell]) -> Figure:
    """Evaluation score per benchmark over global steps, one panel per benchmark."""
    benchmarks = ordered_benchmarks({b for c in cells for r in c.runs for b in r.benchmarks})
    n = max(1, len(benchmarks))
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig = new_figure(FULL_WIDTH_IN if n > 1 else FULL_WIDTH_IN * 0.6, 2.3 * nrows + 0.8)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    sep = ": " if n > 1 else "\n"  # one narrow panel: the title goes on two lines
    fig.suptitle(f"Evaluation score per benchmark{sep}{setting.title}")
    for ax in axes[n:]:
        ax.set_visible(False)
    if not benchmarks:
        no_data(axes[0], "evaluation")
    for ax, b in zip(axes, benchmarks):
        ax.set_title(bench_title(b))
        for i, cell in enumerate(cells):
            plot_band(
                ax,
                cell.curve("evals", f"score/{b}"),
                color=cell_color(cell, i),
                linestyle=cell_linestyle(cell),
                label=cell.display,
                scale=100,
                marker="o",
            )
        ax.set_xlabel("global step")
        ax.set_ylabel("score (avg@k) [%]")
    _shared_legend(fig, list(axes[:n]))
    return fig
