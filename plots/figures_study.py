"""The collapse study's table and dose-response figure, from run directories only.

Runs (plots.runs.Run) are grouped into *conditions*: configs equal in everything but the
seed, the name and the arm (replay, TIS). In a condition, the runs of one method (GRPO,
GRPO+TIS, GRPO+R3, ...) are that cell's seeds. Per run:
  best  = the highest evaluation average and its step (step 0, the SFT model, counts; earliest
          on ties); final = the last evaluation average;
  collapse step = r3.collapse with the run's own rule (plots.runs.Run.collapse_step);
  mismatch = the run's mean over global steps of `mismatch/k3_kl` (train engine's old logprobs
          vs the rollout engine's, before the update) and of `mismatch/extreme_frac@2`.
Per cell: mean +/- standard error over seeds (s.e. = sample std / sqrt(n); blank for one seed).
The dose of a condition is the mean k3 KL of its *native* arm (GRPO without R3 and TIS; any arm
without R3 when that one is missing), averaged over seeds: the mismatch the condition has when
nothing removes it. R3 cells are plotted at their condition's dose.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from plots.runs import Run, method_order
from plots.style import FULL_WIDTH_IN, METHOD_COLORS, new_figure, no_data
from plots.table_format import Table, fmt_sci

SEED_FIELDS = ("name", "seed", "rollout_urls")
ARM_FIELDS = ("replay", "tis")
NOISE_FIELDS = ("rollout_router_noise", "rollout_logit_noise")
SOURCE_FIELDS = ("rollout_engine", "rollout_precision", "rollout_fp8_scope", *NOISE_FIELDS)
"""Config fields that make the mismatch source; the other differing fields make a `family`."""
MARKERS = ("o", "s", "^", "D", "v", "P")
DODGE_DECADES = 0.012
"""Horizontal offset between methods at one dose (in decades of KL), so equal points stay visible."""


# --- per run ------------------------------------------------------------------------------------
def run_best(run: Run) -> tuple[float, int | None]:
    """(best evaluation average, its step); (nan, None) before the first evaluation."""
    if not len(run.evals):
        return math.nan, None
    avg = run.evals["avg"]
    step = int(avg.idxmax())  # first maximum: earliest on ties
    return float(avg.loc[step]), step


def run_final(run: Run) -> float:
    return float(run.evals["avg"].iloc[-1]) if len(run.evals) else math.nan


def run_metric_mean(run: Run, column: str) -> float:
    if column not in run.metrics.columns:
        return math.nan
    vals = np.asarray(run.metrics[column], dtype=float)
    vals = vals[np.isfinite(vals)]
    return float(vals.mean()) if len(vals) else math.nan


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error (sample std / sqrt(n)) of the finite values; se is nan for n < 2."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if not len(v):
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else math.nan


def source_label(cfg) -> str:
    """The mismatch source in words: the note of the dose of experiments.doses.DOSES whose RunConfig
    fields the run has, else its engine, precision and noise."""
    from experiments.doses import DOSES

    d = cfg.to_dict()
    for dose in DOSES.values():
        if all(d.get(k) == v for k, v in dose.run_fields().items()):
            return f"{dose.name}: {dose.note}"
    scope = f" ({cfg.rollout_fp8_scope})" if cfg.rollout_precision == "fp8" else ""
    noise = "".join(f", {k.removeprefix('rollout_')} {d[k]}" for k in NOISE_FIELDS if d.get(k))
    return f"{cfg.rollout_engine} {cfg.rollout_precision}{scope} rollout{noise}"


# --- cells and conditions -----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class StudyCell:
    """One method in one condition, over its seeds."""

    condition: int
    """Index of the condition (conditions are sorted by dose)."""
    source: str
    family: str
    """The condition's non-mismatch fields that differ between conditions ('' when none differ)."""
    method: str
    runs: tuple[Run, ...]

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def best(self) -> tuple[float, float]:
        return mean_se([100 * run_best(r)[0] for r in self.runs])

    @property
    def best_steps(self) -> list[int | None]:
        return [run_best(r)[1] for r in self.runs]

    @property
    def final(self) -> tuple[float, float]:
        return mean_se([100 * run_final(r) for r in self.runs])

    @property
    def collapse_steps(self) -> list[int | None]:
        return [r.collapse_step for r in self.runs]

    @property
    def collapse_rate(self) -> float:
        return sum(s is not None for s in self.collapse_steps) / self.n

    @property
    def steps_to_collapse(self) -> tuple[float, float]:
        """Mean +/- s.e. of the collapse step, a run that did not collapse counting as its last
        step (right-censored: a lower bound when any seed did not collapse)."""
        return mean_se([float(s if s is not None else r.last_step) for s, r in zip(self.collapse_steps, self.runs)])

    @property
    def k3(self) -> tuple[float, float]:
        return mean_se([run_metric_mean(r, "mismatch/k3_kl") for r in self.runs])

    @property
    def f2(self) -> tuple[float, float]:
        return mean_se([run_metric_mean(r, "mismatch/extreme_frac@2") for r in self.runs])

    @property
    def routing_tokens(self) -> tuple[float, float]:
        """Share of tokens whose routing differs in at least one layer (measured without replay)."""
        return mean_se([run_metric_mean(r, "routing/token_disagreement") for r in self.runs])

    @property
    def status(self) -> str:
        st = {r.status for r in self.runs}
        return "running" if "running" in st else "failed" if "failed" in st else "complete"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Condition:
    source: str
    family: str
    dose: tuple[float, float]
    """Mean k3 KL of the native arm (mean, s.e. over seeds)."""
    cells: tuple[StudyCell, ...]

    @property
    def label(self) -> str:
        return self.source + (f" [{self.family}]" if self.family else "")


def _condition_key(run: Run) -> tuple:
    d = run.config.to_dict()
    return tuple(sorted((k, repr(v)) for k, v in d.items() if k not in SEED_FIELDS + ARM_FIELDS))


def _native_runs(runs: list[Run]) -> list[Run]:
    plain = [r for r in runs if not r.config.replay and not r.config.tis]
    return plain or [r for r in runs if not r.config.replay]


def conditions(runs: list[Run]) -> list[Condition]:
    """Group runs into conditions (sorted by dose, unknown doses last) and cells (paper row order)."""
    groups: dict[tuple, list[Run]] = defaultdict(list)
    for r in runs:
        groups[_condition_key(r)].append(r)
    keys = list(groups)
    dicts = [dict(k) for k in keys]
    differing = [f for f in dicts[0] if f not in SOURCE_FIELDS and len({d.get(f) for d in dicts}) > 1] if dicts else []
    out = []
    for key, d in zip(keys, dicts):
        rs = groups[key]
        cfg = rs[0].config
        family = ", ".join(f"{f}={getattr(cfg, f)}" for f in differing)
        dose = mean_se([run_metric_mean(r, "mismatch/k3_kl") for r in _native_runs(rs)])
        by_method: dict[str, list[Run]] = defaultdict(list)
        for r in rs:
            by_method[r.method].append(r)
        out.append((source_label(cfg), family, dose, by_method))
    out.sort(key=lambda c: (c[1], not math.isfinite(c[2][0]), c[2][0] if math.isfinite(c[2][0]) else 0.0, c[0]))
    result = []
    for i, (source, family, dose, by_method) in enumerate(out):
        cells = tuple(
            StudyCell(condition=i, source=source, family=family, method=m,
                      runs=tuple(sorted(by_method[m], key=lambda r: (r.config.seed, r.name))))
            for m in sorted(by_method, key=method_order)
        )  # fmt: skip
        result.append(Condition(source=source, family=family, dose=dose, cells=cells))
    return result


# --- the table ----------------------------------------------------------------------------------
def _pm(ms: tuple[float, float], spec: str = ".1f") -> str:
    m, se = ms
    if not math.isfinite(m):
        return "n/a"
    return format(m, spec) + (f" ± {format(se, spec)}" if math.isfinite(se) else "")


def _steps_text(steps: Sequence[int | None]) -> str:
    return "/".join("-" if s is None else str(s) for s in steps)


def study_table(runs: list[Run]) -> Table:
    """The paper's layout (best score (step), final score, collapse step) per condition and method,
    mean +/- standard error over seeds, with the measured mismatch beside it."""
    header = [
        "method",
        "seeds",
        "best score (step)",
        "final score",
        "collapse step",
        "collapsed",
        "steps to collapse",
        "mean k3 KL",
        "mean F(2)",
        "tokens with a routing difference",
    ]
    csv_header = [
        "condition",
        "source",
        "family",
        "dose_k3_native",
        "dose_k3_native_se",
        "method",
        "status",
        "seeds",
        "runs",
        "best_mean",
        "best_se",
        "best_steps",
        "final_mean",
        "final_se",
        "collapse_steps",
        "collapse_rate",
        "steps_to_collapse_mean",
        "steps_to_collapse_se",
        "k3_mean",
        "k3_se",
        "f2_mean",
        "f2_se",
        "routing_token_mean",
    ]
    rows: list[list[str]] = []
    kinds: list = []
    csv_rows: list[list[object]] = []
    for cond in conditions(runs):
        rows.append([f"{cond.label}: native k3 KL {fmt_sci(cond.dose[0])}"])
        kinds.append("group")
        for c in cond.cells:
            label = c.method + ("" if c.status == "complete" else f" ({c.status})")
            rows.append([
                label, str(c.n), f"{_pm(c.best)} ({_steps_text(c.best_steps)})", _pm(c.final),
                _steps_text(c.collapse_steps), f"{sum(s is not None for s in c.collapse_steps)}/{c.n}",
                _pm(c.steps_to_collapse), fmt_sci(c.k3[0]), fmt_sci(c.f2[0]),
                "n/a" if not math.isfinite(c.routing_tokens[0]) else f"{100 * c.routing_tokens[0]:.1f}%",
            ])  # fmt: skip
            kinds.append("ours")
            csv_rows.append([
                cond.label, cond.source, cond.family, cond.dose[0], cond.dose[1], c.method, c.status, c.n,
                ";".join(r.name for r in c.runs), *c.best, _steps_text(c.best_steps), *c.final,
                _steps_text(c.collapse_steps), c.collapse_rate, *c.steps_to_collapse, *c.k3, *c.f2,
                c.routing_tokens[0],
            ])  # fmt: skip
    notes = [
        "Scores: held-out accuracy in % (eval average); best = highest evaluation point of each seed "
        "(step 0 counts; steps per seed in parentheses), final = last evaluation point; mean ± standard "
        "error over seeds (no ± with one seed).",
        "Collapse step by r3.collapse: the first evaluation step from which the average stays below "
        "collapse_frac (0.5) x its running best for collapse_patience (2) consecutive points and never "
        "recovers; '-' = no collapse; seeds joined by '/'. Steps to collapse: a seed that did not collapse "
        "counts as its last step (a lower bound).",
        "Mismatch: mean over global steps of mismatch/k3_kl and mismatch/extreme_frac@2 (F(2)) between the "
        "trainer's old logprobs and the rollout engine's; a condition's dose is its native (GRPO) arm's k3 KL. "
        "Routing: share of tokens whose top-k differs in at least one MoE layer between the engines (measured "
        "without replay, so R3 rows show what replay removed).",
    ]
    if any(k == "ours" and "(" in r[0] for r, k in zip(rows, kinds)):
        notes.append("(running)/(failed): no manifest.json yet; numbers cover the steps written so far.")
    return Table(
        name="study_collapse",
        title="Collapse study: single-mini-step GRPO, mismatch x method x seeds",
        header=header,
        rows=rows,
        kinds=kinds,
        notes=notes,
        csv_header=csv_header,
        csv_rows=csv_rows,
    )


# --- the dose-response figure -------------------------------------------------------------------
def dose_response_figure(runs: list[Run]) -> Figure:
    """Collapse rate, steps to collapse and best score against the native arm's mean k3 KL, one
    line per method (colour) and family (marker); error bars are standard errors over seeds.
    Methods at one dose are dodged by DODGE_DECADES so that equal values stay visible."""
    conds = conditions(runs)
    fig = new_figure(FULL_WIDTH_IN, 2.9)
    axes = fig.subplots(1, 3)
    panels = (
        ("collapse rate", "fraction of seeds", lambda c: (c.collapse_rate, math.nan)),
        ("steps to collapse", "global step (no collapse: last step)", lambda c: c.steps_to_collapse),
        ("best held-out score", "accuracy (%)", lambda c: c.best),
    )
    families = sorted({c.family for c in conds})
    methods = sorted({cell.method for c in conds for cell in c.cells}, key=method_order)
    xs_all = [c.dose[0] for c in conds if math.isfinite(c.dose[0]) and c.dose[0] > 0]
    for ax, (title, ylabel, stat) in zip(axes, panels):
        ax.set_title(title)
        ax.set_xlabel("native arm's mean k3 KL")
        ax.set_ylabel(ylabel)
        if not xs_all:
            no_data(ax, "mismatch/k3_kl")
            continue
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt_sci(v, digits=1)))
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels collide over less than a decade
        for fi, fam in enumerate(families):
            for mi, method in enumerate(methods):
                pts = [
                    (c.dose[0], *stat(cell), cell.status)
                    for c in conds
                    if c.family == fam
                    for cell in c.cells
                    if cell.method == method and math.isfinite(c.dose[0]) and c.dose[0] > 0
                ]
                pts = [p for p in pts if math.isfinite(p[1])]
                if not pts:
                    continue
                pts.sort()
                x = np.array([p[0] for p in pts]) * 10 ** (DODGE_DECADES * (mi - (len(methods) - 1) / 2))
                y = np.array([p[1] for p in pts])
                err = np.array([p[2] if math.isfinite(p[2]) else 0.0 for p in pts])
                color = METHOD_COLORS.get(method, f"C{mi}")
                running = any(p[3] != "complete" for p in pts)
                label = method + (f" [{fam}]" if fam else "") + (" (running)" if running else "")
                ax.errorbar(
                    x,
                    y,
                    yerr=err if err.any() else None,
                    color=color,
                    marker=MARKERS[fi % len(MARKERS)],
                    markersize=3.5,
                    linestyle="--" if running else "-",
                    capsize=2,
                    label=label,
                )
        if title == "collapse rate":
            ax.set_ylim(-0.05, 1.05)
    handles, labels = axes[-1].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(4, len(labels)), frameon=False)
    fig.suptitle("Collapse vs training-inference mismatch, with and without R3 (mean ± s.e. over seeds)")
    return fig


# --- routing disagreement per MoE layer --------------------------------------------------------
LAYER_COLUMN = re.compile(r"^routing/layer(\d+)_disagreement$")


def layer_disagreement(run: Run) -> list[float]:
    """Per MoE layer l: the run's mean over global steps of `routing/layer{l}_disagreement` (share
    of tokens whose top-k set differs between the trainer's native routing and the rollout's);
    [] for runs logged before the metric existed."""
    cols = sorted(
        ((int(m.group(1)), c) for c in run.metrics.columns if (m := LAYER_COLUMN.match(str(c)))),
        key=lambda x: x[0],
    )
    return [run_metric_mean(run, c) for _, c in cols]


def routing_layers_figure(runs: list[Run]) -> Figure:
    """Routing disagreement per MoE layer of each condition's native arm (mean over steps, then
    mean +/- s.e. over seeds), one line per condition: does disagreement grow with depth (the paper:
    94% of tokens differ in at least one of 48 layers), and how does it scale with the dose?"""
    conds = conditions(runs)
    fig = new_figure(FULL_WIDTH_IN / 2, 2.6)
    ax = fig.subplots()
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("tokens with a different top-k set")
    ax.set_title("Routing disagreement per layer (native arm)")
    drawn = 0
    for i, c in enumerate(conds):
        per_run = [layer_disagreement(r) for cell in c.cells for r in _native_runs(list(cell.runs))]
        per_run = [v for v in per_run if v]
        if not per_run or len({len(v) for v in per_run}) != 1:
            continue
        arr = np.asarray(per_run, dtype=float)
        mean = arr.mean(axis=0)
        err = arr.std(axis=0, ddof=1) / math.sqrt(len(arr)) if len(arr) > 1 else None
        label = f"{c.label} (k3 {fmt_sci(c.dose[0], digits=1)})" if math.isfinite(c.dose[0]) else c.label
        ax.errorbar(np.arange(len(mean)), mean, yerr=err, marker=MARKERS[i % len(MARKERS)], markersize=3.5,
                    capsize=2, label=label)  # fmt: skip
        drawn += 1
    if not drawn:
        no_data(ax, "routing/layer*_disagreement")
    else:
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{100 * v:.0f}%"))
        ax.legend(frameon=False, fontsize="x-small")
    return fig
