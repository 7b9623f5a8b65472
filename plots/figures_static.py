"""Figures from the static mismatch measurements (runs/<root>/static/<precision>/static.json).

One panel per rollout precision in each figure: the extreme-token curve F(tau) (PAPER.md:
F(tau) = mean_t 1[max(r_t, 1/r_t) > tau], the paper's CDF-style figure, log y), routing
disagreement per MoE layer (native vs R3), and the histogram of log(pi_train / pi_infer).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from plots.style import ARM_COLORS, ARM_LABELS, FULL_WIDTH_IN, new_figure, no_data


def _panels(static: dict[str, dict[str, Any]], title: str, height: float = 2.7):
    precisions = sorted(static)
    n = len(precisions)
    fig = new_figure(min(FULL_WIDTH_IN, 0.5 + 3.3 * n), height)
    axes = np.atleast_1d(fig.subplots(1, n, squeeze=False).ravel())
    fig.suptitle(title)
    return fig, list(zip(precisions, axes))


def f_tau_figure(static: dict[str, dict[str, Any]]) -> Figure:
    """F(tau) over tau for MoE native, MoE + R3 and dense, log y (zeros cannot be drawn: noted)."""
    fig, panels = _panels(static, "Extreme-token distribution F(τ) = fraction of tokens with max(r, 1/r) > τ")
    for precision, ax in panels:
        ax.set_title(f"{precision} rollout")
        drawn = False
        all_tau: list[float] = []
        last_positive: list[float] = []  # largest tau with F > 0, per arm
        for arm in ("moe", "moe_r3", "dense"):
            curve = static[precision][arm].get("F_curve")
            if not curve:
                continue
            tau, f = np.asarray(curve["tau"], float), np.asarray(curve["F"], float)
            label = ARM_LABELS[arm]
            zero = f <= 0
            if zero.all():
                label += " (F = 0 for all τ)"
            elif zero.any():
                label += f" (F = 0 from τ = {tau[np.argmax(zero)]:.3g})"
            # A zero F would sit at -inf on the log axis: draw only the positive part.
            ax.plot(tau[~zero], f[~zero], color=ARM_COLORS[arm], label=label, marker=".", markersize=3)
            drawn |= bool((~zero).any())
            all_tau += tau.tolist()
            if (~zero).any():
                last_positive.append(float(tau[~zero].max()))
        if all_tau:
            # Log x: thresholds span 1 to ~100 and the curves' action is near tau = 1..10. The axis
            # ends a factor 2 past the largest tau where any curve is still positive (at least 10).
            lo, hi = min(all_tau), max(all_tau)
            right = min(hi, max(10.0, 2.0 * max(last_positive, default=lo)))
            ax.set_xscale("log")
            ax.set_xlim(lo / 1.05, right * 1.05)
        if drawn:
            ax.set_yscale("log")
        elif all_tau:
            ax.set_yticks([])
            ax.text(
                0.5,
                0.3,
                f"F(τ) = 0 at every τ ≥ {min(all_tau):.3g}:\nno token's ratio exceeds the thresholds",
                transform=ax.transAxes,
                ha="center",
                va="center",
                color="0.3",
            )
        else:
            no_data(ax, "F(τ) curve")
        ax.set_xlabel("threshold τ on max(r, 1/r), r = π_train / π_infer (log)")
        ax.set_ylabel("F(τ) [fraction of tokens]")
        ax.legend(loc="best")
    return fig


def routing_figure(static: dict[str, dict[str, Any]]) -> Figure:
    """Per-layer fraction of (token, layer) pairs whose top-k sets differ, native vs R3."""
    fig, panels = _panels(static, "Routing disagreement per MoE layer (training vs inference engine)")
    for precision, ax in panels:
        ax.set_title(f"{precision} rollout")
        width = 0.4
        drawn = False
        for j, arm in enumerate(("moe", "moe_r3")):
            per_layer = static[precision][arm].get("per_layer_disagreement")
            if not per_layer:
                continue
            y = 100 * np.asarray(per_layer, float)
            x = np.arange(len(y)) + (j - 0.5) * width
            label = ARM_LABELS[arm]
            if not y.any():
                label += " (0 in every layer)"
            ax.bar(x, y, width=width, color=ARM_COLORS[arm], label=label)
            ax.set_xticks(np.arange(len(y)))
            drawn = True
        if not drawn:
            no_data(ax, "per-layer routing")
        else:
            if not static[precision].get("moe_r3", {}).get("per_layer_disagreement"):
                # the R3 arm forces the rollout's experts: nothing to measure (static_mismatch.py)
                ax.bar([], [], color=ARM_COLORS["moe_r3"], label=ARM_LABELS["moe_r3"] + ": rollout routing forced")
            ax.legend(loc="best")
        ax.set_xlabel("MoE layer")
        ax.set_ylabel("pairs with a different top-k set [%]")
    return fig


def ratio_hist_figure(static: dict[str, dict[str, Any]]) -> Figure:
    """Histogram of log(pi_train / pi_infer) over tokens, native vs R3 (dense for reference)."""
    fig, panels = _panels(static, "Token probability ratio, training vs inference engine")
    for precision, ax in panels:
        ax.set_title(f"{precision} rollout")
        drawn = False
        lowest = math.inf
        for arm in ("moe", "moe_r3", "dense"):
            hist = static[precision][arm].get("log_ratio_hist")
            if not hist:
                continue
            edges, counts = np.asarray(hist["edges"], float), np.asarray(hist["counts"], float)
            if len(edges) != len(counts) + 1:
                raise ValueError(
                    f"static {precision}/{arm}.log_ratio_hist: {len(edges)} edges for {len(counts)} counts; "
                    f"expected counts + 1 edges (numpy.histogram convention)"
                )
            frac = counts / max(counts.sum(), 1.0)
            if (frac > 0).any():
                lowest = min(lowest, frac[frac > 0].min())
            ax.stairs(
                frac,
                edges,
                color=ARM_COLORS[arm],
                label=ARM_LABELS[arm],
                linestyle=":" if arm == "dense" else "-",
                linewidth=1.3,
            )
            drawn = True
        if not drawn:
            no_data(ax, "ratio histogram")
            continue
        ax.set_yscale("log")
        if math.isfinite(lowest):
            ax.set_ylim(bottom=lowest / 2)
        for x in (-math.log(2), math.log(2)):  # the extreme-token threshold tau = 2
            ax.axvline(x, color="0.4", linestyle="--", linewidth=0.8)
        ax.plot([], [], color="0.4", linestyle="--", linewidth=0.8, label="|log r| = log 2 (F(2))")
        ax.set_xlabel("log r, r = π_train(y_t) / π_infer(y_t)")
        ax.set_ylabel("fraction of tokens per bin (log scale)")
    handles, labels = max((ax.get_legend_handles_labels() for _, ax in panels), key=lambda hl: len(hl[0]))
    if handles:  # same arms in every panel: one legend below, clear of the histogram's peak
        fig.legend(handles, labels, loc="outside lower center", ncols=len(handles), frameon=False)
    return fig
