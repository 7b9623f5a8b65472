"""The collapse study's table, results record and figures, from run directories only.

Runs (plots.runs.Run) are grouped into *conditions*: configs equal in everything but the
seed, the name and the arm (replay, TIS). In a condition, the runs of one method (GRPO,
GRPO+TIS, GRPO+R3, ...) are that cell's seeds. Per run:
  start = the evaluation average at step 0 (the SFT model); late = the mean over the last quarter
          of the evaluation points after step 0 (r3.collapse.late_score); change = late - start,
          the decision metric (never the best point: the maximum of many noisy points is biased up);
  collapse step = r3.collapse with the run's own rule (plots.runs.Run.collapse_step);
  mismatch = the run's mean over global steps of `mismatch/k3_kl` (per token),
          `mismatch/k3_kl_per_response`, `mismatch/extreme_frac@tau` and `abs_log_ratio_max`.
Per cell: mean +/- standard error over seeds (s.e. = sample std / sqrt(n); blank for one seed).
Arms are compared *paired*: per seed, an arm's change minus GRPO's change in the same condition
(the arms of one seed share prompts, sampling seeds and evaluation problems), mean +/- s.e. over
seeds; the minimal detectable effect is MDE_Z x that s.e. (two-sided 5%, power 80%).
The dose of a condition is the mismatch of its *native* arm (GRPO without R3 and TIS; any arm
without R3 when that one is missing), averaged over seeds: what it has when nothing removes it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, PercentFormatter

from plots.runs import Run, method_order
from plots.style import FULL_WIDTH_IN, METHOD_COLORS, new_figure, no_data
from plots.table_format import Table, fmt_sci
from r3.collapse import late_score

SEED_FIELDS = ("name", "seed", "rollout_urls")
ARM_FIELDS = ("replay", "tis", "algorithm")
NOISE_FIELDS = ("rollout_router_noise", "rollout_logit_noise")
SOURCE_FIELDS = ("rollout_engine", "rollout_precision", "rollout_fp8_scope", *NOISE_FIELDS)
"""Config fields that make the mismatch source; the other differing fields make a `family`."""
MARKERS = ("o", "s", "^", "D", "v", "P")
PAPER_K3 = 1.535e-3
"""The paper's per-token k3 KL, Qwen3-30B-A3B, SGLang vs Megatron (PAPER.md; experiments.doses.PAPER)."""
PAPER_F2 = 2.54e-4
"""The paper's F(2), same setting."""
TAUS = (2, 5, 10)
MDE_Z = 2.8
"""Minimal detectable effect in standard errors: 1.96 (two-sided 5%) + 0.84 (power 80%)."""
DODGE_DECADES = 0.012
"""Horizontal offset between methods at one dose (in decades of KL), so equal points stay visible."""


# --- per run ------------------------------------------------------------------------------------
def run_change(run: Run) -> tuple[float, float, float]:
    """(start, late, late - start) of one run, as fractions; nan where the run has no such point."""
    if not len(run.evals) or int(run.evals.index[0]) != 0:
        return math.nan, math.nan, math.nan
    steps, avgs = [int(x) for x in run.evals.index], [float(v) for v in run.evals["avg"]]
    late = late_score(steps, avgs)
    if late is None:
        return avgs[0], math.nan, math.nan
    return avgs[0], late[0], late[0] - avgs[0]


def _finite_steps(run: Run, column: str) -> np.ndarray:
    """A per-step metric's finite values in step order (empty when the run has no such column)."""
    if column not in run.metrics.columns:
        return np.zeros(0)
    vals = np.asarray(run.metrics[column], dtype=float)
    return vals[np.isfinite(vals)]


def run_metric_mean(run: Run, column: str) -> float:
    vals = _finite_steps(run, column)
    return float(vals.mean()) if len(vals) else math.nan


def run_metric_percentile(run: Run, column: str, q: float) -> float:
    """The q-th percentile (0-100) of a per-step metric over the run's steps; nan when absent."""
    vals = _finite_steps(run, column)
    return float(np.percentile(vals, q)) if len(vals) else math.nan


def run_drift(run: Run, column: str) -> float:
    """Mean of a per-step metric over the last quarter of the run's steps divided by its mean over
    the first quarter: above 1 when the metric drifts up during training (nan with < 4 steps)."""
    vals = _finite_steps(run, column)
    q = len(vals) // 4
    if q < 1 or vals[:q].mean() <= 0:
        return math.nan
    return float(vals[-q:].mean() / vals[:q].mean())


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error (sample std / sqrt(n)) of the finite values; se is nan for n < 2."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if not len(v):
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else math.nan


def source_label(cfg) -> str:
    """The mismatch source in words: the note of the dose of a calibrated ladder
    (experiments.doses.ladder) whose RunConfig fields the run has, else its engine, precision and noise."""
    from experiments.doses import NOISE_STDS, ladder

    d = cfg.to_dict()
    for dose in (dose for size in NOISE_STDS for dose in ladder(size).values()):
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
    def start(self) -> tuple[float, float]:
        return mean_se([100 * run_change(r)[0] for r in self.runs])

    @property
    def late(self) -> tuple[float, float]:
        return mean_se([100 * run_change(r)[1] for r in self.runs])

    @property
    def change(self) -> tuple[float, float]:
        """Late score minus step 0, in points: mean +/- s.e. over seeds."""
        return mean_se([100 * run_change(r)[2] for r in self.runs])

    def paired(self, ref: StudyCell) -> tuple[float, float, int]:
        """This arm's change minus `ref`'s, per seed both ran (in points): mean, s.e., seeds."""
        mine = {r.config.seed: run_change(r)[2] for r in self.runs}
        theirs = {r.config.seed: run_change(r)[2] for r in ref.runs}
        diffs = [100 * (mine[k] - theirs[k]) for k in sorted(set(mine) & set(theirs))]
        m, se = mean_se(diffs)
        return m, se, sum(math.isfinite(d) for d in diffs)

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
    def k3_response(self) -> tuple[float, float]:
        return mean_se([run_metric_mean(r, "mismatch/k3_kl_per_response") for r in self.runs])

    @property
    def f2(self) -> tuple[float, float]:
        return self.f(2)

    def f(self, tau: float) -> tuple[float, float]:
        return mean_se([run_metric_mean(r, f"mismatch/extreme_frac@{tau:g}") for r in self.runs])

    @property
    def max_log_ratio(self) -> tuple[float, float]:
        """Mean over steps of the step's max |log(pi_train / pi_infer)|."""
        return mean_se([run_metric_mean(r, "mismatch/abs_log_ratio_max") for r in self.runs])

    def grad_norm(self, q: float) -> tuple[float, float]:
        """The q-th percentile over steps of the gradient norm (`actor/grad_norm`), mean over seeds."""
        return mean_se([run_metric_percentile(r, "actor/grad_norm", q) for r in self.runs])

    @property
    def k3_drift(self) -> tuple[float, float]:
        """Per-token k3 KL over the last quarter of steps / over the first quarter (r3 drift: > 1 when
        the mismatch grows as the policy trains), mean over seeds."""
        return mean_se([run_drift(r, "mismatch/k3_kl") for r in self.runs])

    @property
    def steps(self) -> int:
        """The cell's planned global steps (its seeds share them)."""
        return int(self.runs[0].config.global_steps)

    @property
    def routing_tokens(self) -> tuple[float, float]:
        """Share of tokens whose routing differs in at least one layer (measured without replay)."""
        return mean_se([run_metric_mean(r, "routing/token_disagreement") for r in self.runs])

    @property
    def status(self) -> str:
        st = {r.status for r in self.runs}
        return "running" if "running" in st else "failed" if "failed" in st else "complete"


def short_label(c: Condition) -> str:
    """A condition's name for crowded places (panel titles, legends): the dose's name and family."""
    return c.source.split(":")[0] + (f" [{c.family}]" if c.family else "")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Condition:
    source: str
    family: str
    dose: tuple[float, float]
    """Mean k3 KL per token of the native arm (mean, s.e. over seeds)."""
    cells: tuple[StudyCell, ...]
    dose_response: tuple[float, float] = (math.nan, math.nan)
    """Mean k3 KL per response of the native arm (mean, s.e. over seeds)."""

    @property
    def reference(self) -> StudyCell | None:
        """The cell arms are paired against: GRPO (no TIS, no R3), else None."""
        return next((c for c in self.cells if c.method == "GRPO"), None)

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
        native = _native_runs(rs)
        dose = mean_se([run_metric_mean(r, "mismatch/k3_kl") for r in native])
        dose_resp = mean_se([run_metric_mean(r, "mismatch/k3_kl_per_response") for r in native])
        by_method: dict[str, list[Run]] = defaultdict(list)
        for r in rs:
            by_method[r.method].append(r)
        out.append((source_label(cfg), family, dose, by_method, dose_resp))
    out.sort(key=lambda c: (c[1], not math.isfinite(c[2][0]), c[2][0] if math.isfinite(c[2][0]) else 0.0, c[0]))
    result = []
    for i, (source, family, dose, by_method, dose_resp) in enumerate(out):
        cells = tuple(
            StudyCell(condition=i, source=source, family=family, method=m,
                      runs=tuple(sorted(by_method[m], key=lambda r: (r.config.seed, r.name))))
            for m in sorted(by_method, key=method_order)
        )  # fmt: skip
        result.append(Condition(source=source, family=family, dose=dose, cells=cells, dose_response=dose_resp))
    return result


# --- the table ----------------------------------------------------------------------------------
def pm_text(ms: tuple[float, float], spec: str = ".1f") -> str:
    """`mean ± s.e.` (no ± with one seed; n/a without a value)."""
    m, se = ms
    if not math.isfinite(m):
        return "n/a"
    return format(m, spec) + (f" ± {format(se, spec)}" if math.isfinite(se) else "")


def _steps_text(steps: Sequence[int | None]) -> str:
    return "/".join("-" if s is None else str(s) for s in steps)


def _paired_text(c: StudyCell, ref: StudyCell | None) -> str:
    if ref is None or c is ref:
        return "reference" if c is ref else "n/a"
    m, se, n = c.paired(ref)
    if not math.isfinite(m):
        return "n/a"
    return f"{m:+.1f}" + (f" ± {se:.1f} (MDE {MDE_Z * se:.1f}, {n} seeds)" if math.isfinite(se) else f" ({n} seed)")


def study_table(runs: list[Run]) -> Table:
    """Per condition and method, mean +/- standard error over seeds: the held-out score at step 0 and
    late, the late change, the change paired against GRPO's, collapses, and the measured mismatch."""
    header = [
        "method", "seeds", "steps", "step 0", "late", "late - step 0", "minus GRPO (paired)", "collapsed",
        "k3 KL / token", "k3 KL / response", "F(2)", "F(10)", "max |log r|", "tokens with a routing difference",
    ]  # fmt: skip
    csv_header = [
        "condition", "source", "family", "dose_k3_native", "dose_k3_native_se", "dose_k3_response_native",
        "method", "status", "seeds", "runs", "steps", "start_mean", "start_se", "late_mean", "late_se",
        "change_mean", "change_se", "paired_vs_grpo_mean", "paired_vs_grpo_se", "paired_seeds", "collapse_steps",
        "collapse_rate", "k3_mean", "k3_se", "k3_response_mean", "k3_response_se", "f2_mean", "f5_mean",
        "f10_mean", "max_log_ratio_mean", "routing_token_mean", "grad_norm_p50", "grad_norm_p90",
        "grad_norm_max", "k3_drift",
    ]  # fmt: skip
    rows: list[list[str]] = []
    kinds: list = []
    csv_rows: list[list[object]] = []
    for cond in conditions(runs):
        ref = cond.reference
        rows.append([f"{cond.label}: native k3 KL {fmt_sci(cond.dose[0])} / token, "
                     f"{fmt_sci(cond.dose_response[0])} / response"])  # fmt: skip
        kinds.append("group")
        for c in cond.cells:
            label = c.method + ("" if c.status == "complete" else f" ({c.status})")
            rows.append([
                label, str(c.n), str(c.steps), pm_text(c.start), pm_text(c.late), pm_text(c.change),
                _paired_text(c, ref),
                f"{sum(s is not None for s in c.collapse_steps)}/{c.n} ({_steps_text(c.collapse_steps)})",
                fmt_sci(c.k3[0]), fmt_sci(c.k3_response[0]), fmt_sci(c.f(2)[0]), fmt_sci(c.f(10)[0]),
                f"{c.max_log_ratio[0]:.2f}" if math.isfinite(c.max_log_ratio[0]) else "n/a",
                "n/a" if not math.isfinite(c.routing_tokens[0]) else f"{100 * c.routing_tokens[0]:.1f}%",
            ])  # fmt: skip
            kinds.append("ours")
            pm, pse, pn = c.paired(ref) if ref is not None and c is not ref else (math.nan, math.nan, 0)
            csv_rows.append([
                cond.label, cond.source, cond.family, cond.dose[0], cond.dose[1], cond.dose_response[0], c.method,
                c.status, c.n, ";".join(r.name for r in c.runs), c.steps, *c.start, *c.late, *c.change, pm, pse,
                pn, _steps_text(c.collapse_steps), c.collapse_rate, *c.k3, *c.k3_response, c.f(2)[0], c.f(5)[0],
                c.f(10)[0], c.max_log_ratio[0], c.routing_tokens[0], c.grad_norm(50)[0], c.grad_norm(90)[0],
                c.grad_norm(100)[0], c.k3_drift[0],
            ])  # fmt: skip
    notes = [
        "Scores: held-out accuracy in % (eval average). late = mean of the last quarter of the evaluation "
        "points after step 0 (r3.collapse.late_score); late - step 0 is the decision metric; mean ± standard "
        "error over seeds (no ± with one seed).",
        f"minus GRPO (paired): per seed, this arm's late - step 0 minus GRPO's in the same condition, mean ± "
        f"s.e. over seeds; MDE = {MDE_Z} s.e., the smallest true difference these seeds detect 80% of the "
        "time at 5% (two-sided).",
        "Collapsed: seeds that collapsed by r3.collapse (the average stays below collapse_frac x its running "
        "best for collapse_patience consecutive points and never recovers), their steps in parentheses.",
        "Mismatch: means over global steps of the trainer's old logprobs vs the rollout engine's (k3 KL per "
        "token and summed per response, F(tau) = share of tokens with max(r, 1/r) > tau, the step's max "
        "|log r|); a condition's dose is its native (GRPO) arm's. Routing: share of tokens whose top-k "
        "differs in at least one MoE layer (measured without replay, so R3 rows show what replay removed).",
    ]
    if any(k == "ours" and "(" in r[0] for r, k in zip(rows, kinds)):
        notes.append("(running)/(failed): no manifest.json yet; numbers cover the steps written so far.")
    return Table(
        name="study_collapse",
        title="Collapse study: GRPO arms, mismatch dose x method x seeds",
        header=header,
        rows=rows,
        kinds=kinds,
        notes=notes,
        csv_header=csv_header,
        csv_rows=csv_rows,
    )


def _undosed_points(c: StudyCell, undosed: Mapping[str, Any]) -> dict[int, tuple[float, float]]:
    """Per seed: (served, undosed) final score of the cell in points, from experiments.undosed's file."""
    out = {}
    for r in c.runs:
        u = undosed.get(r.name)
        if u and u.get("served") is not None:
            out[int(r.config.seed)] = (100 * u["served"], 100 * u["undosed"])
    return out


def undosed_fields(c: StudyCell, ref: StudyCell | None, undosed: Mapping[str, Any] | None) -> dict:
    """The final policy served with its dose vs evaluated without it (experiments.undosed): means and
    s.e. over seeds, and the undosed score paired against GRPO's per seed. Empty without the file."""
    if not undosed:
        return {}
    mine = _undosed_points(c, undosed)
    if not mine:
        return {}
    served, und = mean_se([v[0] for v in mine.values()]), mean_se([v[1] for v in mine.values()])
    rec = {"final_served": served[0], "final_served_se": served[1], "final_undosed": und[0],
           "final_undosed_se": und[1], "undosed_seeds": sorted(mine)}  # fmt: skip
    theirs = _undosed_points(ref, undosed) if ref is not None and ref is not c else {}
    diffs = [mine[s][1] - theirs[s][1] for s in sorted(set(mine) & set(theirs))]
    if diffs:
        m, se = mean_se(diffs)
        rec |= {"final_undosed_minus_grpo": m, "final_undosed_minus_grpo_se": se}
    return rec


def served_points(rec: Mapping[str, Any]) -> dict[str, float]:
    """One served.json record in points: served, undosed and the dose's cost (served - undosed)."""
    return {
        "served": 100 * rec["served"],
        "undosed": 100 * rec["undosed"],
        "cost": 100 * (rec["served"] - rec["undosed"]),
    }


def _resampled_points(c: StudyCell, served: Mapping[str, Any]) -> tuple[int, dict[int, dict[str, float]]]:
    """Per seed, from experiments.undosed's served.json (`study served`): the final policy's score with
    the most samples per problem the file has for this cell, served, undosed and their difference."""
    best: dict[int, tuple[int, dict]] = {}
    for r in c.runs:
        for key, rec in served.items():
            name, _, k = key.rpartition("@k")
            if name == r.name and int(k) > best.get(int(r.config.seed), (0, {}))[0]:
                best[int(r.config.seed)] = (int(k), rec)
    points = {seed: served_points(rec) for seed, (_, rec) in best.items()}
    return min((k for k, _ in best.values()), default=0), points


def resampled_fields(c: StudyCell, ref: StudyCell | None, served: Mapping[str, Any] | None) -> dict:
    """`resampled_{served,undosed,cost}`: the final policy re-scored with more samples per problem
    (experiments.undosed.resample_cell), mean and s.e. over seeds, and each paired against GRPO's per
    seed (`..._minus_grpo`). Empty without the file."""
    k, mine = _resampled_points(c, served or {})
    if not mine:
        return {}
    rec: dict[str, Any] = {"resampled_samples": k, "resampled_seeds": sorted(mine)}
    theirs = _resampled_points(ref, served or {})[1] if ref is not None and ref is not c else {}
    common = sorted(set(mine) & set(theirs))
    for key in ("served", "undosed", "cost"):
        rec[f"resampled_{key}"], rec[f"resampled_{key}_se"] = mean_se([v[key] for v in mine.values()])
        if common:
            m, se = mean_se([mine[s][key] - theirs[s][key] for s in common])
            rec |= {f"resampled_{key}_minus_grpo": m, f"resampled_{key}_minus_grpo_se": se}
    return rec


def study_results(
    runs: list[Run], *, undosed: Mapping[str, Any] | None = None, served: Mapping[str, Any] | None = None
) -> dict:
    """The machine-readable record (docs/study/results.json): per condition (dose) and arm, the seeds,
    late - step 0 mean and s.e. (points), the paired difference to GRPO, collapses, per-token and
    per-response k3 KL; with `undosed` (experiments.undosed's undosed.json) also the final policy's
    score served with the dose and evaluated without it; with `served` (served.json) the same re-scored
    with more samples per problem."""
    und_cells = (undosed or {}).get("cells", {})
    served_cells = (served or {}).get("cells", {})
    out = []
    for cond in conditions(runs):
        ref = cond.reference
        for c in cond.cells:
            pm, pse, pn = c.paired(ref) if ref is not None and c is not ref else (math.nan, math.nan, 0)
            out.append({
                "condition": cond.label, "dose_k3_per_token": cond.dose[0], "dose_k3_per_response":
                cond.dose_response[0], "method": c.method, "status": c.status,
                "seeds": sorted(int(r.config.seed) for r in c.runs), "steps": c.steps,
                "start": c.start[0], "late": c.late[0], "change": c.change[0], "change_se": c.change[1],
                "minus_grpo": pm, "minus_grpo_se": pse, "minus_grpo_seeds": pn,
                "collapses": sum(s is not None for s in c.collapse_steps), "collapse_steps": c.collapse_steps,
                "k3_per_token": c.k3[0], "k3_per_response": c.k3_response[0],
                "f2": c.f(2)[0], "f5": c.f(5)[0], "f10": c.f(10)[0], "max_abs_log_ratio": c.max_log_ratio[0],
                "grad_norm_p50": c.grad_norm(50)[0], "grad_norm_p90": c.grad_norm(90)[0],
                "grad_norm_max": c.grad_norm(100)[0], "k3_drift": c.k3_drift[0],
                "per_seed": {str(int(r.config.seed)): dict(zip(("start", "late", "change"),
                             (100 * x if math.isfinite(x) else None for x in run_change(r)))) for r in c.runs},
                **undosed_fields(c, ref, und_cells),
                **resampled_fields(c, ref, served_cells),
            })  # fmt: skip
    clean = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()} for r in out]
    return {"units": {"scores": "held-out accuracy, points (%)", "k3": "nats"}, "paper_k3_per_token": PAPER_K3,
            "mde_z": MDE_Z,
            "definitions": {
                "change": "late score (mean of the last quarter of evaluation points) minus step 0",
                "minus_grpo": "per seed, change minus GRPO's change in the same condition; mean and s.e.",
                "per_seed": "per seed: start, late and change, so that later cells can be paired against "
                "these without the run directories",
                "grad_norm_pXX": "percentile over global steps of actor/grad_norm, mean over seeds",
                "k3_drift": "k3 KL per token, mean over the last quarter of steps / first quarter",
                "final_served / final_undosed": "held-out score of the final checkpoint through the cell's "
                "dosed rollout engine / through an fp32 engine without the dose, same sampling seed "
                "(experiments.undosed)",
                "resampled_*": "the final checkpoint re-scored with resampled_samples samples per problem, "
                "served (dosed engine), undosed (fp32 engine) and cost = served - undosed; *_minus_grpo "
                "paired per seed (experiments.study served)",
            },
            "cells": clean}  # fmt: skip


# --- the dose-response figure -------------------------------------------------------------------
CONTROL_K3 = 1e-7
"""A condition whose native per-token k3 KL is at most this is a no-mismatch control (fp32 rollout:
about 1e-10); it is drawn as a horizontal band, not at a dose."""


def _log_axis(ax) -> None:
    """Ticks at 1, 2, 5 per decade; over more than LABEL_ALL_BELOW (a factor) only the decades are
    labelled, since 1e-2, 2e-2, 5e-2 collide on a panel that spans two decades or more."""
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))

    def label(v: float, _pos) -> str:
        lo, hi = ax.get_xlim()
        decade = abs(math.log10(v) - round(math.log10(v))) < 1e-6
        return fmt_sci(v, digits=2) if decade or hi / lo <= LABEL_ALL_BELOW else ""  # 1 digit repeats

    ax.xaxis.set_major_formatter(FuncFormatter(label))
    ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels collide over less than a decade


LABEL_ALL_BELOW = 20.0


def dose_response_figure(runs: list[Run]) -> Figure:
    """Late change (late - step 0) against the native arm's per-token and per-response k3 KL, and the
    collapse rate against per-token k3 KL; one line per method (colour) and family (marker), error
    bars the standard errors over seeds, the paper's per-token k3 KL marked, a no-mismatch control as
    a grey band (its mean +/- s.e.). One row of panels per global-step count, so that no panel mixes
    run lengths. Methods at one dose are dodged by DODGE_DECADES so that equal values stay visible."""
    conds = conditions(runs)
    step_counts = sorted({cell.steps for c in conds for cell in c.cells}) or [0]
    fig = new_figure(FULL_WIDTH_IN, 2.6 * len(step_counts) + 0.3)
    grid = np.atleast_2d(fig.subplots(len(step_counts), 3, squeeze=False))
    panels = (
        ("late - step 0", "dose", "held-out points", lambda c: c.change),
        ("late - step 0", "dose_response", "held-out points", lambda c: c.change),
        ("collapse rate", "dose", "fraction of seeds", lambda c: (c.collapse_rate, math.nan)),
    )
    families = sorted({c.family for c in conds})
    methods = sorted({cell.method for c in conds for cell in c.cells}, key=method_order)
    for row, steps in zip(grid, step_counts):
        for ax, (title, dose_attr, ylabel, stat) in zip(row, panels):
            ax.set_title(f"{title} ({steps} steps)" if steps else title)
            ax.set_xlabel("native arm's mean " + ("k3 KL per token" if dose_attr == "dose" else "k3 KL per response"))
            ax.set_ylabel(ylabel)
            dosed = [c for c in conds if getattr(c, dose_attr)[0] > 0 and c.dose[0] > CONTROL_K3
                     and any(cell.steps == steps for cell in c.cells)]  # fmt: skip
            if not dosed:
                no_data(ax, "mismatch/k3_kl" if dose_attr == "dose" else "mismatch/k3_kl_per_response")
                continue
            _log_axis(ax)
            controls = [(c.reference, c.family) for c in conds if c.dose[0] <= CONTROL_K3 and c.reference is not None]
            for ref, family in controls if title != "collapse rate" else []:  # no-mismatch controls: a band
                if ref.steps == steps:
                    m, se = stat(ref)
                    if math.isfinite(m):
                        label = "fp32 control (no mismatch)" + (f" [{family}]" if family else "")
                        ax.axhline(m, color="0.5", linestyle=":", linewidth=1, label=label)
                        if math.isfinite(se):
                            ax.axhspan(m - se, m + se, color="0.85", zorder=0)
            if dose_attr == "dose":
                ax.axvline(PAPER_K3, color="0.3", linestyle="--", linewidth=0.8, label="paper's k3 KL / token")
            for fi, fam in enumerate(families):
                for mi, method in enumerate(methods):
                    pts = sorted(
                        (getattr(c, dose_attr)[0], *stat(cell), cell.status)
                        for c in dosed if c.family == fam
                        for cell in c.cells if cell.method == method and cell.steps == steps
                    )  # fmt: skip
                    pts = [p for p in pts if math.isfinite(p[1])]
                    if not pts:
                        continue
                    x = np.array([p[0] for p in pts]) * 10 ** (DODGE_DECADES * (mi - (len(methods) - 1) / 2))
                    err = np.array([p[2] if math.isfinite(p[2]) else 0.0 for p in pts])
                    running = any(p[3] != "complete" for p in pts)
                    ax.errorbar(
                        x, np.array([p[1] for p in pts]), yerr=err if err.any() else None,
                        color=METHOD_COLORS.get(method, f"C{mi}"), marker=MARKERS[fi % len(MARKERS)], markersize=3.5,
                        linestyle="--" if running else "-", capsize=2,
                        label=method + (f" [{fam}]" if fam else "") + (" (running)" if running else ""),
                    )  # fmt: skip
            if title == "collapse rate":
                ax.set_ylim(-0.05, 1.05)
        handles, labels = row[0].get_legend_handles_labels()
        if handles:  # in the collapse panel, whose points sit at 0 or 1, not over the score panels' points
            row[-1].legend(handles, labels, loc="center", fontsize="x-small", frameon=True, framealpha=0.8)
    fig.suptitle("Late change and collapse vs training-inference mismatch, with and without R3 (mean ± s.e.)")
    for ax in fig.axes:  # a dose range under a factor of 4 gets one decade, so log ticks do not repeat
        if ax.get_xscale() == "log":
            lo, hi = ax.get_xlim()
            if lo > 0 and hi / lo < 4:
                mid = math.sqrt(lo * hi)
                ax.set_xlim(mid / 3, mid * 3)
    return fig


def dynamics_figure(runs: list[Run]) -> Figure:
    """Per condition (one panel each): the held-out score against the global step, mean over seeds
    per method with a band of +/- s.e., and the native arm's per-step k3 KL on a second axis, to
    show whether the mismatch drifts up before a score drops."""
    conds = conditions(runs)
    n = max(1, len(conds))
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig = new_figure(FULL_WIDTH_IN, 2.4 * rows + 0.3)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).flatten()
    if not conds:
        no_data(axes[0], "eval.jsonl")
    for ax, c in zip(axes, conds):
        dose = "" if c.dose[0] <= CONTROL_K3 else f", k3 {fmt_sci(c.dose[0])} / token"
        ax.set_title(short_label(c) + dose, fontsize="small")
        ax.set_xlabel("global step")
        ax.set_ylabel("held-out accuracy (%)")
        for mi, cell in enumerate(c.cells):
            frames = [100 * r.evals["avg"] for r in cell.runs if len(r.evals)]
            if not frames:
                continue
            common = sorted(set.intersection(*(set(int(i) for i in f.index) for f in frames)))
            arr = np.array([[float(f.loc[s]) for s in common] for f in frames])
            mean = arr.mean(axis=0)
            color = METHOD_COLORS.get(cell.method, f"C{mi}")
            ax.plot(common, mean, color=color, label=cell.method, linewidth=1.2)
            if len(arr) > 1:
                se = arr.std(axis=0, ddof=1) / math.sqrt(len(arr))
                ax.fill_between(common, mean - se, mean + se, color=color, alpha=0.15, linewidth=0)
        native = _native_runs([r for cell in c.cells for r in cell.runs])
        k3 = [r.metrics["mismatch/k3_kl"] for r in native if "mismatch/k3_kl" in r.metrics.columns]
        if k3 and c.dose[0] > CONTROL_K3:
            twin = ax.twinx()
            mean_k3 = sum(k3) / len(k3)
            twin.plot(mean_k3.index, mean_k3.rolling(5, min_periods=1).mean(), color="0.4", linewidth=0.8,
                      linestyle=":", label="native k3 KL / token (5-step mean)")  # fmt: skip
            twin.set_ylabel("k3 KL / token", fontsize="x-small")
            twin.yaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt_sci(v, digits=2)))  # 1 digit repeats
        ax.legend(loc="lower left", fontsize="xx-small", frameon=True, framealpha=0.8)
    for ax in axes[len(conds) :]:
        ax.set_visible(False)
    fig.suptitle("Held-out score per step (mean ± s.e. over seeds) and the native arm's mismatch")
    return fig


def _half_panel(xlabel: str, ylabel: str, title: str, *, height: float = 2.6):
    """A half-width figure with one labelled axes."""
    fig = new_figure(FULL_WIDTH_IN / 2, height)
    ax = fig.subplots()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return fig, ax


def ftau_figure(runs: list[Run]) -> Figure:
    """F(tau), the share of tokens with max(r, 1/r) > tau, at tau = 2, 5, 10, per condition's native
    arm and its R3 arm (means over steps and seeds), beside the paper's F(2)."""
    conds = [c for c in conditions(runs) if c.dose[0] > CONTROL_K3]
    fig, ax = _half_panel("tau", "F(tau)", "Extreme-token share F(tau)", height=2.8)
    drawn, zero = 0, []
    for i, c in enumerate(conds):  # one colour per condition, one line style per method
        for cell in c.cells:
            if cell.method not in ("GRPO", "GRPO+R3"):
                continue
            ys = [cell.f(t)[0] for t in TAUS]
            if not any(math.isfinite(y) and y > 0 for y in ys):
                zero += [f"{short_label(c)} {cell.method}"] if all(y == 0 for y in ys) else []
                continue
            ax.plot(TAUS, [y if y > 0 else np.nan for y in ys], marker=MARKERS[i % len(MARKERS)], markersize=3.5,
                    color=f"C{i}", linestyle="-" if cell.method == "GRPO" else "--",
                    label=f"{short_label(c)} {cell.method}")  # fmt: skip
            drawn += 1
    if not drawn:
        no_data(ax, "mismatch/extreme_frac@tau")
        return fig
    for label in zero:  # a log axis cannot draw them: named in the legend instead
        ax.plot([], [], linestyle="none", label=f"{label}: 0 at every tau")
    ax.plot([2], [PAPER_F2], marker="*", markersize=9, color="k", linestyle="none", label="paper F(2), native")
    ax.set_yscale("log")
    ax.set_xticks(TAUS)
    ax.legend(loc="best", fontsize="xx-small", frameon=True, framealpha=0.8)
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
    title = "Routing disagreement per layer (native arm)"
    fig, ax = _half_panel("MoE layer", "tokens with a different top-k set", title)
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
        ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=None))  # decimals follow the range
        ax.legend(frameon=False, fontsize="x-small")
    return fig
