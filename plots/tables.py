"""Build the paper's tables from grouped runs: main results per setting, static mismatch.

Main results (PAPER.md "Reported numbers"): per method, the score on each benchmark at the
best evaluation point, the average, the best step and the collapse step. Best = the
evaluation point with the highest average (seed mean when several seeds; earliest on ties;
step 0, the starting checkpoint, counts as a point). Collapse = r3.collapse per run.
The paper's published row is printed under a reproduced row of the same layout and method;
the difference only where the benchmark is the same one (the `paper` preset).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import experiments.task  # noqa: F401  (declares the embedded task's evaluation set and its title)
from eval import benchmarks
from eval.benchmarks import PAPER_BENCHMARKS
from plots import paper_numbers
from plots.groups import Cell
from plots.runs import Setting
from plots.table_format import Table, fmt_num, fmt_sci


def bench_title(name: str) -> str:
    """Column title of a benchmark (declared with it: eval.benchmarks.EVAL_SETS / register)."""
    return benchmarks.title(name)


def ordered_benchmarks(names: set[str]) -> list[str]:
    """The paper's column order (eval.benchmarks.EVAL_SETS), then any other benchmark by name."""
    return [b for b in PAPER_BENCHMARKS if b in names] + sorted(names - set(PAPER_BENCHMARKS))


def _collapse_text(steps: list[int | None]) -> str:
    return "/".join("-" if s is None else str(s) for s in steps)


def cell_result(cell: Cell, benchmarks: list[str]) -> dict[str, Any]:
    """Best point of a cell: {best_step, avg, scores{bench: percent}, collapse[list]}.

    Only steps every seed has reached count, so a seed mean is never over a subset of seeds.
    """
    avg = cell.curve("evals", "avg")
    full = avg[avg["n"] == len(cell.runs)]
    result: dict[str, Any] = {"best_step": None, "avg": math.nan, "scores": {}, "collapse": cell.collapse_steps}
    if not len(full):
        return result
    best_step = int(full["mean"].idxmax())  # idxmax returns the first maximum: earliest on ties
    result["best_step"] = best_step
    result["avg"] = 100 * float(full.loc[best_step, "mean"])
    for b in benchmarks:
        c = cell.curve("evals", f"score/{b}")
        result["scores"][b] = 100 * float(c.loc[best_step, "mean"]) if best_step in c.index else math.nan
    return result


def results_table(setting: Setting, cells: list[Cell]) -> Table:
    """The main results table of one setting, in the paper's layout."""
    benchmarks = ordered_benchmarks({b for c in cells for r in c.runs for b in r.benchmarks})
    paper = paper_numbers.main_table_for(setting.model, setting.mini_steps)
    header = ["method", *(bench_title(b) for b in benchmarks), "avg", "best step", "collapse step"]
    csv_header = [
        "setting",
        "kind",
        "method",
        "label",
        "status",
        "seeds",
        "runs",
        *(f"score_{b}" for b in benchmarks),
        "avg",
        "best_step",
        "collapse_step",
        "missing_eval_steps",
    ]
    rows, kinds, csv_rows = [], [], []
    notes = [
        "Scores in % (avg@k) at the best evaluation point; best = highest average over evaluation "
        "points (seed mean; earliest on ties; step 0 counts); average over "
        + ", ".join(bench_title(b) for b in benchmarks)
        + ".",
        "Collapse step by r3.collapse (average below frac x running best for patience points, "
        "never recovering); '-' = no collapse; several seeds are joined by '/'.",
    ]
    diffable = setting.preset == "paper"
    for cell in cells:
        res = cell_result(cell, benchmarks)
        rows.append(
            [
                cell.display,
                *(fmt_num(res["scores"].get(b)) for b in benchmarks),
                fmt_num(res["avg"]),
                "n/a" if res["best_step"] is None else str(res["best_step"]),
                _collapse_text(res["collapse"]),
            ]
        )
        kinds.append("ours")
        missing = cell.missing_eval_steps
        csv_rows.append(
            [
                setting.slug,
                "ours",
                cell.method,
                cell.label,
                cell.status,
                len(cell.runs),
                ";".join(r.name for r in cell.runs),
                *(res["scores"].get(b) for b in benchmarks),
                res["avg"],
                res["best_step"],
                _collapse_text(res["collapse"]) if len(cell.runs) > 1 else res["collapse"][0],
                ";".join(f"{k}:{','.join(map(str, v))}" for k, v in missing.items()),
            ]
        )
        for run_name, steps in missing.items():
            notes.append(f"{cell.label}: run {run_name} has no evaluation at step(s) {steps}.")
        if paper is None or cell.method not in paper.rows:
            continue
        pub = paper.rows[cell.method]
        pub_scores = {b: pub.scores.get(b) for b in benchmarks}
        rows.append(
            [
                "paper (published)",
                *(fmt_num(pub_scores[b]) if pub_scores[b] is not None else "" for b in benchmarks),
                fmt_num(pub.avg),
                "",
                "-" if pub.collapse is None else str(pub.collapse),
            ]
        )
        kinds.append("paper")
        csv_rows.append(
            [
                setting.slug,
                "paper",
                cell.method,
                cell.label,
                "published",
                "",
                "",
                *(pub_scores[b] for b in benchmarks),
                pub.avg,
                None,
                pub.collapse,
                "",
            ]
        )
        if diffable:
            diff = {b: res["scores"][b] - pub_scores[b] for b in benchmarks if pub_scores[b] is not None}
            # The paper's average is over its four columns; ours is over the run's benchmarks, so
            # the average is compared only when the run evaluated at least those four.
            avg_diff = res["avg"] - pub.avg if set(pub.scores) and set(pub.scores) <= set(benchmarks) else None
            rows.append(
                [
                    "difference (ours - paper)",
                    *(fmt_num(diff.get(b), "+.2f") if b in diff else "" for b in benchmarks),
                    fmt_num(avg_diff, "+.2f") if avg_diff is not None else "",
                    "",
                    "",
                ]
            )
            kinds.append("diff")
            csv_rows.append(
                [
                    setting.slug,
                    "diff",
                    cell.method,
                    cell.label,
                    "",
                    "",
                    "",
                    *(diff.get(b) for b in benchmarks),
                    avg_diff,
                    None,
                    None,
                    "",
                ]
            )
    if paper is not None and any(k == "paper" for k in kinds):
        note = (
            f"'paper (published)' rows: the paper's {paper.title} table (PAPER.md; Qwen3-30B-A3B, 180 global steps, "
            f"lr {paper.lr:g}; its MATH500 column is the level-5 subset)."
        )
        if not diffable:
            note += (
                f" No difference is computed: these runs are the {setting.preset} preset on other benchmarks "
                f"({', '.join(benchmarks)}), so only the qualitative pattern (who collapses) compares."
            )
        notes.append(note)
    if any(c.status != "complete" for c in cells):
        notes.append("(running)/(failed): no manifest.json yet; numbers cover the steps written so far.")
    return Table(
        name=f"results__{setting.slug}",
        title=f"Results: {setting.title}",
        header=header,
        rows=rows,
        kinds=kinds,
        notes=notes,
        csv_header=csv_header,
        csv_rows=csv_rows,
    )


def _paper_key(model: str, known) -> str | None:
    """The paper's model name contained in a recorded model name or path (case-insensitive)."""
    return next((k for k in known if k.lower() in model.lower()), None)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


def static_table(static: dict[str, dict[str, Any]]) -> Table:
    """Static mismatch per rollout precision: k3 KL and F(2), native / R3, as the paper's appendix."""
    header = [
        "model",
        "F(2) native / R3",
        "k3 KL native / R3",
        "KL native / R3 ratio",
        "routing differs: pairs / tokens (native)",
        "tokens",
    ]
    csv_header = [
        "precision",
        "kind",
        "model",
        "f2_native",
        "f2_r3",
        "kl_native",
        "kl_r3",
        "kl_ratio",
        "routing_pair_disagreement",
        "routing_token_disagreement",
        "tokens",
    ]
    rows, kinds, csv_rows = [], [], []
    any_paper = False
    for precision in sorted(static):
        d = static[precision]
        moe, r3, dense = d["moe"], d["moe_r3"], d["dense"]
        rows.append([f"rollout precision {precision}"])
        kinds.append("group")
        # Optional `model` / `dense_model` (a name or a checkpoint path) name what was measured.
        moe_name = Path(str(d.get("model") or "MoE")).name
        dense_name = Path(str(d.get("dense_model") or "dense (no router)")).name
        pair, tok = moe.get("routing_pair_disagreement"), moe.get("routing_token_disagreement")
        routing = "n/a" if pair is None else f"{100 * pair:.2f}% / " + ("n/a" if tok is None else f"{100 * tok:.2f}%")
        kl_ratio = _ratio(moe["k3_kl"], r3["k3_kl"])
        rows.append(
            [
                moe_name,
                f"{fmt_sci(moe['extreme_frac@2'])} / {fmt_sci(r3['extreme_frac@2'])}",
                f"{fmt_sci(moe['k3_kl'])} / {fmt_sci(r3['k3_kl'])}",
                fmt_num(kl_ratio, ".2f") + "x" if kl_ratio else "n/a",
                routing,
                str(moe.get("tokens", d.get("tokens", "n/a"))),
            ]
        )
        kinds.append("ours")
        csv_rows.append(
            [
                precision,
                "ours",
                moe_name,
                moe["extreme_frac@2"],
                r3["extreme_frac@2"],
                moe["k3_kl"],
                r3["k3_kl"],
                kl_ratio,
                pair,
                tok,
                moe.get("tokens", d.get("tokens")),
            ]
        )
        pub_key = _paper_key(moe_name, paper_numbers.STATIC)
        pub = paper_numbers.STATIC[pub_key] if pub_key else None
        if pub is not None:
            any_paper = True
            rows.append(
                [
                    f"paper (published): {pub_key}",
                    f"{fmt_sci(pub.f2_native)} / {fmt_sci(pub.f2_r3)}",
                    f"{fmt_sci(pub.kl_native)} / {fmt_sci(pub.kl_r3)}",
                    f"{pub.kl_native / pub.kl_r3:.2f}x",
                    "",
                    "",
                ]
            )
            kinds.append("paper")
            csv_rows.append(
                [
                    precision,
                    "paper",
                    pub_key,
                    pub.f2_native,
                    pub.f2_r3,
                    pub.kl_native,
                    pub.kl_r3,
                    pub.kl_native / pub.kl_r3,
                    None,
                    None,
                    None,
                ]
            )
        rows.append(
            [
                dense_name,
                f"{fmt_sci(dense['extreme_frac@2'])} / n/a",
                f"{fmt_sci(dense['k3_kl'])} / n/a",
                "n/a",
                "n/a",
                str(dense.get("tokens", "n/a")),
            ]
        )
        kinds.append("ours")
        csv_rows.append(
            [
                precision,
                "ours",
                dense_name,
                dense["extreme_frac@2"],
                None,
                dense["k3_kl"],
                None,
                None,
                None,
                None,
                dense.get("tokens"),
            ]
        )
        dense_key = _paper_key(dense_name, paper_numbers.STATIC_DENSE_KL)
        pub_dense = paper_numbers.STATIC_DENSE_KL[dense_key] if dense_key else None
        if pub_dense is not None:
            any_paper = True
            rows.append([f"paper (published): {dense_key}", "", f"{fmt_sci(pub_dense)} / n/a", "", "", ""])
            kinds.append("paper")
            csv_rows.append([precision, "paper", dense_key, None, None, pub_dense, None, None, None, None, None])
    notes = [
        "Training vs inference log-probabilities on the same sampled tokens, r = pi_train / pi_infer: "
        "k3 KL = mean(r - 1 - log r); F(2) = fraction of tokens with max(r, 1/r) > 2 (PAPER.md, Metrics).",
        "Routing: fraction of (token, MoE layer) pairs / of tokens whose top-k expert sets differ between "
        "the engines (MoE native).",
    ]
    if any_paper:
        notes.append("'paper (published)' rows: PAPER.md appendix table / main text, beside the same model.")
    return Table(
        name="static_mismatch",
        title="Static training-inference mismatch",
        header=header,
        rows=rows,
        kinds=kinds,
        notes=notes,
        csv_header=csv_header,
        csv_rows=csv_rows,
    )
