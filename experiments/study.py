"""The collapse study: does the training-inference mismatch destabilise MoE RL at CPU
scale, and does R3 prevent it? A separate entry point from `make demo`.

    python -m experiments.study collapse --out runs/study                 # the planned sweep (plan `full`)
    python -m experiments.study collapse --out runs/study --pilot         # plan `pilot`: find the regime first
    python -m experiments.study collapse --out runs/study --plan learn    # other plans: experiments.study_grid
    python -m experiments.study collapse --out runs/study --list          # cells and their state, no run
    debugging only: --cells GLOB (a subset), --steps N (override global steps), --zoo-dir DIR, --jobs N
    python -m experiments.study calibrate                                 # the doses' static mismatch vs the paper's
    python -m experiments.study calibrate --doses fp32 router-1x --router-noise 0.5 --out runs/study/calibration.json
    python -m experiments.study undosed --out runs/study --plan study    # final policies without the dose
    python -m experiments.study served --out runs/study --plan strong --samples 8   # ... with and without, 8 samples

`calibrate` (experiments.doses): per mismatch dose (rollout precision, FP8 scope, router-logit noise,
output-logit noise), the static k3 KL per token and per response, F(2) and the routing pairs / tokens
that differ, native and with R3, on held-out problems of the zoo's SFT model, beside the paper's
1.5e-3 / 10% / 94%; the doses' RunConfig fields are `experiments.doses.Dose.run_fields`.

Inputs: the plan's cells (experiments.study_grid: arms x mismatch doses x seeds, as RunConfigs)
and the embedded zoo of the plan's size (built once, here, when missing: about 10 minutes for
`tiny`, 20 for `study`, on 2 cores). Outputs under --out:
  <cell>/                        one run directory per cell (docs/run_format.md)
  plots/tables/study_collapse.{md,tex,csv}     per dose and arm: late - step 0, paired vs GRPO, mismatch
  plots/tables/study_results.json              the same, machine-readable (docs/study/results.json)
  plots/figures/study_*.{png,pdf}              dose-response, dynamics, F(tau), routing per layer
  undosed.json, undosed/<cell>/  `undosed`: final policies evaluated without their dose
  served.json, served/<cell>/    `served`: final policies with --samples per problem, dosed and undosed,
                                 paired per seed against GRPO (does an arm's policy resist the dose?)
Resumable and cached: complete cells (manifest.json) are skipped without starting a process,
incomplete ones resume from their last checkpoint (experiments.run.run_cell); cells run as --jobs
one-thread processes (experiments.demo.run_cells: one progress bar with ETA over all remaining
steps; Ctrl-C stops every cell and says how to resume).

Decision metric (plots.figures_study): the late score (mean of the last quarter of evaluation
points, r3.collapse.late_score) minus step 0, paired per seed between arms. Collapse (r3.collapse,
the project's rule; the paper publishes none) is kept as a second outcome.

Departures from the paper: scale (the `study` zoo: 8 MoE layers, 6.7M parameters, synthetic
arithmetic with worked chains, 50 steps), and the mismatch is emulated on the rollout side (seeded
router- or output-logit noise calibrated to the paper's per-token k3 KL, or bf16 / FP8 numerics)
against an fp32 trainer, not SGLang vs Megatron kernels; docs/study.md says what has run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from experiments import study_grid
from r3 import rundir


def _steps_done(run_dir: Path) -> int:
    return rundir.last_step(run_dir) or 0


def measured_step_seconds(out: Path, cfgs: dict) -> float | None:
    """Median `time/step` over the steps already run in this study's directories (None: none)."""
    times = [r["time/step"] for n in cfgs for r in rundir.read_jsonl(out / n / rundir.METRICS) if "time/step" in r]
    return statistics.median(times) if times else None


def _fmt_hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def state_rows(cfgs: dict, out: Path) -> list[tuple[str, str, str]]:
    """(cell, state, steps) per cell: complete / partial / failed / not started."""
    rows = []
    for name, c in cfgs.items():
        d = out / name
        man = rundir.read_manifest(d)
        if man is not None:
            collapse = man.get("collapse_step")
            state = "complete" + ("" if collapse is None else f" (collapsed at {collapse})")
        elif rundir.read_failed(d) is not None:
            state = "failed"
        else:
            state = "partial" if _steps_done(d) else "not started"
        rows.append((name, state, f"{_steps_done(d)}/{c.global_steps}"))
    return rows


def plan_message(plan_name: str, cfgs: dict, out: Path, jobs: int) -> str:
    """What will run and roughly how long (from measured step times)."""
    p = study_grid.plan(plan_name)
    todo = {n: c for n, c in cfgs.items() if not rundir.is_complete(out / n)}
    steps_left = sum(max(c.global_steps - _steps_done(out / n), 0) for n, c in todo.items())
    sec = measured_step_seconds(out, cfgs) or study_grid.STEP_SECONDS.get(p.zoo_size)
    eval_s = study_grid.EVAL_SECONDS.get(p.zoo_size, 0.0)
    evals_left = sum(
        max(c.global_steps - _steps_done(out / n), 0) // c.eval_every + (_steps_done(out / n) == 0)
        for n, c in todo.items()
    )
    msg = (
        f"[study] plan {plan_name!r}: {len(cfgs)} cells ({len(cfgs) - len(todo)} complete, skipped; "
        f"{len(todo)} to run), {steps_left} global steps left, zoo {p.zoo_size!r}"
    )
    if todo and sec:
        wall = (steps_left * sec + evals_left * eval_s) / max(1, min(jobs, len(todo)))
        msg += (
            f"; at {sec:.1f} s/step and {eval_s:.1f} s/evaluation per cell, {min(jobs, len(todo))} cells in "
            f"parallel: about {_fmt_hours(wall)} ("
            + ("less when cells collapse and stop; " if any(c.stop_on_collapse for c in todo.values()) else "")
            + "more on a loaded machine)"
        )
    return msg


def collapse(args: argparse.Namespace) -> int:
    plan_name = "pilot" if args.pilot else args.plan
    p = study_grid.plan(plan_name)
    overrides = {"global_steps": args.steps} if args.steps else {}
    cfgs = study_grid.cells(plan_name, zoo_dir=args.zoo_dir, pattern=args.cells, **overrides)
    if not cfgs:
        raise SystemExit(f"--cells {args.cells!r} matches no cell of plan {plan_name!r}; see --list")
    out = args.out.resolve()
    if args.list:
        width = max(len(n) for n in cfgs)
        for name, state, steps in state_rows(cfgs, out):
            print(f"{name.ljust(width)}  {steps:>9}  {state}")
        print(plan_message(plan_name, cfgs, out, args.jobs))
        return 0

    import torch
    import transformers

    from experiments import zoo
    from experiments.demo import run_cells

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(1)
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    zoo_dir = Path(next(iter(cfgs.values())).zoo_dir)
    # Built here, once, before any worker starts (workers would otherwise race to build it).
    if not zoo.is_complete(zoo_dir, zoo.SIZES[p.zoo_size]):
        print(f"[study] building the {p.zoo_size!r} zoo in {zoo_dir} (once; reused later)", flush=True)
    zoo.build_zoo(zoo_dir, size=p.zoo_size)
    print(plan_message(plan_name, cfgs, out, args.jobs), flush=True)
    todo = {n: c for n, c in cfgs.items() if not rundir.is_complete(out / n)}
    failed = ""
    if todo:
        try:
            run_cells(todo, out, jobs=args.jobs)
        except RuntimeError as e:  # some cells failed; the others are complete: still tabulate them
            failed = str(e)
    if not args.no_plots:
        from plots.all import make_all

        make_all(out, out / "plots", study=True, progress=False)
        table = out / "plots" / "tables" / "study_collapse.md"
        print(table.read_text())
        print(
            f"[study] figures and tables under {out / 'plots'} (dose-response: "
            f"{out / 'plots' / 'figures' / 'study_dose_response.png'})"
        )
    print(f"[study] done in {(time.time() - t0) / 60:.1f} min", flush=True)
    if failed:
        print(f"[study] {failed}", file=sys.stderr)
        return 1
    return 0


def undosed(args: argparse.Namespace) -> int:
    """experiments.undosed over the plan's cells in --out; prints served vs undosed per cell."""
    import torch
    import transformers

    from experiments import undosed as und

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(1)
    out = args.out.resolve()
    names = list(study_grid.cells(args.plan, zoo_dir=args.zoo_dir))
    record = und.run(out, names)
    rows = [(n, r) for n, r in record["cells"].items() if n in names]
    if not rows:
        print(f"[study] no complete dosed cell of plan {args.plan!r} in {out}; run `collapse --plan {args.plan}` first")
        return 1
    width = max(len(n) for n, _ in rows)
    print(f"{'cell'.ljust(width)}  step  served  undosed")
    for n, r in rows:
        served = "n/a" if r["served"] is None else f"{100 * r['served']:.1f}"
        print(f"{n.ljust(width)}  {r['step']:>4}  {served:>6}  {100 * r['undosed']:>7.1f}")
    print(f"[study] {out / und.FILE}")
    return 0


def served(args: argparse.Namespace) -> int:
    """experiments.undosed.resample_cell over the plan's cells: each final policy with --samples per
    problem, through its dosed engine and without the dose; then, per dose, each arm paired per seed
    against GRPO on the served score, the undosed score and the dose's cost (served - undosed)."""
    import torch
    import transformers

    from experiments import undosed as und

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(1)
    out = args.out.resolve()
    cfgs = study_grid.cells(args.plan, zoo_dir=args.zoo_dir, pattern=args.cells)
    record = und.run(out, list(cfgs), samples=args.samples)
    rows = {n: record["cells"][f"{n}@k{args.samples}"] for n in cfgs if f"{n}@k{args.samples}" in record["cells"]}
    if not rows:
        print(f"[study] no complete dosed cell of plan {args.plan!r} in {out}; run `collapse --plan {args.plan}` first")
        return 1
    print(served_table(cfgs, rows, args.samples))
    print(f"[study] {out / und.SERVED_FILE}")
    return 0


def served_table(cfgs: dict, rows: dict[str, dict], samples: int) -> str:
    """Markdown: per condition and arm, mean served / undosed / cost over seeds, and each arm minus
    GRPO paired per seed (mean +/- s.e.), in points."""
    from collections import defaultdict

    from plots.figures_study import mean_se, pm_text, served_points

    by_cond: dict[str, dict[str, dict[int, dict]]] = defaultdict(lambda: defaultdict(dict))
    for name, rec in rows.items():
        arm = study_grid.arm_of(cfgs[name])
        cond = name.removesuffix(f"-s{rec['seed']}").removesuffix(f"-{arm}")
        by_cond[cond][arm][rec["seed"]] = served_points(rec)
    lines = [
        f"final policies, {samples} samples per problem; cost = served - undosed; paired: per seed, minus GRPO",
        "| condition | arm | seeds | served | undosed | cost | served paired | undosed paired | cost paired |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for cond, arms in by_cond.items():
        ref = arms.get("grpo", {})
        for arm, seeds in arms.items():
            cells = [pm_text(mean_se([v[k] for v in seeds.values()])) for k in ("served", "undosed", "cost")]
            common = sorted(set(seeds) & set(ref)) if arm != "grpo" else []
            paired = [pm_text(mean_se([seeds[s][k] - ref[s][k] for s in common])) if common else "" for k in
                      ("served", "undosed", "cost")]  # fmt: skip
            lines.append(f"| {cond} | {arm} | {len(seeds)} | " + " | ".join(cells + paired) + " |")
    return "\n".join(lines)


def calibrate(args: argparse.Namespace) -> int:
    """The calibration table of the selected doses (experiments.doses) on the zoo's SFT model."""
    import torch
    import transformers

    from experiments import doses, zoo

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    zoo_dir = Path(args.zoo_dir or zoo.default_zoo_dir()).resolve()
    manifest = zoo.load_manifest(zoo_dir)
    if manifest is None:
        if args.zoo_dir is not None:
            raise SystemExit(
                f"--zoo-dir {zoo_dir}: no complete zoo there (expected zoo.json and sft/, dense/, base/); build it "
                "with python -m experiments.zoo --out DIR, or leave --zoo-dir out for the shipped tiny zoo"
            )
        manifest = zoo.build_zoo(zoo_dir)  # the shipped tiny zoo, copied in seconds
    named = doses.ladder(manifest["config"]["size"])
    unknown = sorted(set(args.doses or ()) - set(named))
    if unknown:
        raise SystemExit(f"--doses: unknown {unknown}; known on this zoo: {list(named)}")
    selected = [named[n] for n in args.doses] if args.doses is not None else []
    selected += [doses.Dose(name=f"router{x:g}", router_noise=x, note="ad hoc") for x in args.router_noise]
    selected += [doses.Dose(name=f"logit{x:g}", logit_noise=x, note="ad hoc") for x in args.logit_noise]
    if args.doses is None and not selected:
        selected = [d for d in named.values() if d.engine == "hf"]  # vLLM's doses: --doses vllmbf16
    settings = {
        "zoo_dir": str(zoo_dir),
        "zoo_size": manifest["config"]["size"],
        "n_prompts": args.n_prompts,
        "group_size": args.group_size,
        "max_new_tokens": args.max_new_tokens,
        "seed": args.seed,
        "temperature": 1.0,
    }
    print(
        f"[calibrate] {len(selected)} doses on {settings['zoo_size']!r} zoo {zoo_dir} (SFT model): "
        f"{args.n_prompts} held-out problems x {args.group_size} samples, at most {args.max_new_tokens} tokens",
        flush=True,
    )
    print(doses.HEADER + "\n" + doses.paper_row(), flush=True)
    t0 = time.time()
    rows = doses.measure_doses(
        zoo.model_dir("sft", zoo_dir),
        selected,
        n_prompts=args.n_prompts,
        group_size=args.group_size,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        difficulty=manifest["config"]["difficulty"],
        log=lambda line: print(line, flush=True),
    )
    if args.out is not None:
        doses.write(args.out, rows, settings)
        print(f"[calibrate] written to {args.out}")
    print(f"[calibrate] done in {(time.time() - t0) / 60:.1f} min", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.study", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="study", required=True)
    c = sub.add_parser("collapse", help="the collapse study: arms x mismatch levels x seeds")
    c.add_argument("--out", type=Path, default=Path("runs/study"))
    c.add_argument(
        "--plan",
        default="full",
        choices=sorted(study_grid.PLANS),
        help="which plan of experiments.study_grid (default: full)",
    )
    c.add_argument("--pilot", action="store_true", help="the pilot plan (same as --plan pilot)")
    c.add_argument("--jobs", type=int, default=2, help="cells run in parallel (one torch thread each)")
    c.add_argument("--zoo-dir", type=Path, default=None, help="default: runs/zoo (tiny) or runs/zoo-<size>")
    c.add_argument("--cells", default=None, help="debugging: comma-separated globs of cell names")
    c.add_argument("--steps", type=int, default=None, help="debugging: override global steps of every cell")
    c.add_argument("--list", action="store_true", help="print every cell with its state and the cost; run nothing")
    c.add_argument("--no-plots", action="store_true", help="skip the figures and tables")
    k = sub.add_parser("calibrate", help="static mismatch of each dose beside the paper's (experiments.doses)")
    k.add_argument(
        "--doses", nargs="*", default=None, help="named doses of the zoo's ladder (experiments.doses.ladder)"
    )
    k.add_argument("--router-noise", type=float, nargs="*", default=[], help="ad-hoc router-noise stds (fp32 rollout)")
    k.add_argument("--logit-noise", type=float, nargs="*", default=[], help="ad-hoc logit-noise stds (fp32 rollout)")
    k.add_argument("--zoo-dir", type=Path, default=None, help="default: runs/zoo (the shipped tiny zoo)")
    k.add_argument("--n-prompts", type=int, default=128, help="held-out problems per dose")
    k.add_argument("--group-size", type=int, default=8, help="samples per problem")
    k.add_argument("--max-new-tokens", type=int, default=48, help="the study zoo's cells use 256")
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--threads", type=int, default=1, help="torch threads")
    k.add_argument("--out", type=Path, default=None, help="also write the records as JSON here")
    u = sub.add_parser("undosed", help="each complete dosed cell's final policy evaluated without its dose")
    u.add_argument("--out", type=Path, default=Path("runs/study"))
    u.add_argument("--plan", default="study", choices=sorted(study_grid.PLANS))
    u.add_argument("--zoo-dir", type=Path, default=None, help="default: runs/zoo (tiny) or runs/zoo-<size>")
    v = sub.add_parser("served", help="each final policy re-scored with more samples, with and without its dose")
    v.add_argument("--out", type=Path, default=Path("runs/study"))
    v.add_argument("--plan", default="study", choices=sorted(study_grid.PLANS))
    v.add_argument("--cells", default=None, help="comma-separated globs on cell names")
    v.add_argument("--samples", type=int, default=8, help="samples per held-out problem")
    v.add_argument("--zoo-dir", type=Path, default=None, help="default: runs/zoo (tiny) or runs/zoo-<size>")
    args = ap.parse_args(argv)
    return {"calibrate": calibrate, "undosed": undosed, "collapse": collapse, "served": served}[args.study](args)


if __name__ == "__main__":
    sys.exit(main())
