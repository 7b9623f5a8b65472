"""Every figure and table of the reproduction, from run directories only.

    python -m plots.all --runs runs/demo --out runs/demo/plots

Inputs: a runs root (docs/run_format.md): cell directories (config.json, metrics.jsonl,
eval.jsonl, manifest.json) and static/<precision>/static.json. Any subset of the grid works;
cells without manifest.json are read as far as written and marked "(running)" (dashed lines), or
left out with --complete-only.
Outputs under --out:
  figures/<kind>__<setting>.{png,pdf}  per setting: kl (mismatch k3 KL over steps, without /
                                       with R3), dynamics (response length, grad norm, entropy,
                                       eval average; collapses marked), eval (score per benchmark)
  figures/static_{f_tau,routing_per_layer,ratio_hist}.{png,pdf}  one panel per rollout precision
  tables/results__<setting>.{md,tex,csv}  main results in the paper's layout, paper rows beside
  tables/static_mismatch.{md,tex,csv}     k3 KL and F(2), native / R3, per precision
  index.md                                every table and a link to every figure
With --study (experiments.study's runs root) also: tables/study_collapse.{md,tex,csv},
tables/study_results.json, and figures/study_dose_response, study_routing_layers, study_dynamics and
study_f_tau (.png, .pdf) (plots.figures_study); the runs root's undosed.json (experiments.undosed),
when present, adds the final policies' undosed scores to study_results.json, and its served.json
(`study served`) their scores re-scored with more samples, dosed and undosed.
Departures from the paper: best step includes step 0 and, with seeds, is the best of the seed
mean; the paper's numbers are only differenced against `paper`-preset runs (same benchmarks);
the collapse rule is r3.collapse (the paper does not publish one).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from matplotlib.figure import Figure
from tqdm import tqdm

from plots import figures_static, figures_steps, figures_study
from plots.groups import group_cells
from plots.runs import discover
from plots.style import paper_style, save
from plots.table_format import Table, to_markdown, write_table
from plots.tables import results_table, static_table
from r3 import rundir


def make_all(
    runs_dir: Path, out_dir: Path, *, progress: bool = True, study: bool = False, complete_only: bool = False
) -> list[Path]:
    """Write every figure (PNG + PDF) and table (Markdown, LaTeX, CSV); return the paths written.
    study: also the collapse study's table and dose-response figure (plots.figures_study).
    complete_only: leave out runs without a manifest (running, stopped or failed), e.g. for a
    report made while a sweep is still going."""
    root = discover(Path(runs_dir))
    if complete_only:
        root = dataclasses.replace(root, runs=[r for r in root.runs if r.status == "complete"])
    out_dir = Path(out_dir)
    fig_dir, tab_dir = out_dir / "figures", out_dir / "tables"
    settings = group_cells(root.runs)

    figure_jobs: list[tuple[str, Callable[[], Figure]]] = []
    tables: list[Table] = []
    for setting, cells in settings.items():
        figure_jobs += [
            (f"kl__{setting.slug}", lambda s=setting, c=cells: figures_steps.kl_figure(s, c)),
            (f"dynamics__{setting.slug}", lambda s=setting, c=cells: figures_steps.dynamics_figure(s, c)),
            (f"eval__{setting.slug}", lambda s=setting, c=cells: figures_steps.eval_figure(s, c)),
        ]
        tables.append(results_table(setting, cells))
    if root.static:
        figure_jobs += [
            ("static_f_tau", lambda: figures_static.f_tau_figure(root.static)),
            ("static_routing_per_layer", lambda: figures_static.routing_figure(root.static)),
            ("static_ratio_hist", lambda: figures_static.ratio_hist_figure(root.static)),
        ]
        tables.insert(0, static_table(root.static))
    if study and root.runs:
        tables.insert(0, figures_study.study_table(root.runs))
        figure_jobs.insert(0, ("study_dose_response", lambda: figures_study.dose_response_figure(root.runs)))
        figure_jobs.insert(1, ("study_routing_layers", lambda: figures_study.routing_layers_figure(root.runs)))
        figure_jobs.insert(2, ("study_dynamics", lambda: figures_study.dynamics_figure(root.runs)))
        figure_jobs.insert(3, ("study_f_tau", lambda: figures_study.ftau_figure(root.runs)))

    written: list[Path] = []
    if study and root.runs:  # the study's machine-readable record (docs/study/results.json is a copy)
        tab_dir.mkdir(parents=True, exist_ok=True)
        rec = tab_dir / "study_results.json"
        from experiments.undosed import FILE as UNDOSED  # written beside the cells by `study undosed`
        from experiments.undosed import SERVED_FILE  # and by `study served`

        results = figures_study.study_results(
            root.runs,
            undosed=rundir.read_json(Path(runs_dir) / UNDOSED),
            served=rundir.read_json(Path(runs_dir) / SERVED_FILE),
        )
        rundir.write_text_atomic(rec, json.dumps(results, indent=1) + "\n")
        written.append(rec)
    for t in tables:
        written += write_table(t, tab_dir)
    with paper_style():
        for stem, build in tqdm(figure_jobs, desc="figures", unit="fig", disable=not progress):
            written += save(build(), fig_dir, stem)
    written.append(_write_index(out_dir, root.path, tables, [stem for stem, _ in figure_jobs]))
    return written


def _write_index(out_dir: Path, runs_dir: Path, tables: list[Table], figure_stems: list[str]) -> Path:
    parts = [f"# Figures and tables for `{runs_dir}`", "", "Generated by `python -m plots.all`.", ""]
    parts += [to_markdown(t) for t in tables]
    parts.append("## Figures\n")
    parts += [f"- [{stem}](figures/{stem}.png) ([pdf](figures/{stem}.pdf))" for stem in figure_stems]
    path = out_dir / "index.md"
    path.write_text("\n".join(parts) + "\n")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m plots.all", description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=Path, required=True, help="runs root holding cell directories and static/")
    ap.add_argument("--out", type=Path, required=True, help="output directory (figures/, tables/, index.md)")
    ap.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    ap.add_argument(
        "--study",
        action="store_true",
        help="also the collapse study's table and dose-response figure (runs of python -m experiments.study)",
    )
    ap.add_argument("--complete-only", action="store_true", help="only runs with a manifest (finished cells)")
    args = ap.parse_args(argv)
    try:
        paths = make_all(
            args.runs, args.out, progress=not args.no_progress, study=args.study, complete_only=args.complete_only
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"plots.all: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(paths)} files under {args.out} (see {args.out / 'index.md'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
