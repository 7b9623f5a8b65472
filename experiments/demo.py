"""The embedded end-to-end reproduction (`make demo`): zoo, static mismatch, mini grid, summary.

    python -m experiments.demo --out runs/demo [--zoo-dir runs/zoo] [--jobs 2] [--steps N]
                               [--cells 'sft-single-*'] [--precision fp8]

Inputs: none (everything is generated from seeds). Outputs under --out:
  static/<bf16|fp8>/static.json   static mismatch: MoE native, MoE + R3, dense (experiments.static_mismatch)
  <cell>/                         one run directory per grid cell (docs/run_format.md)
  figures/, tables/               from plots.all.make_all when the plots package is importable
  summary.json, summary.md        experiments.summary
and the zoo in --zoo-dir (reused when complete).

The mini grid (DEMO_CELLS, tiny preset of experiments.grid) runs in the FP8-rollout regime:
single-mini-step GRPO, GRPO+TIS, GRPO+R3, GRPO+TIS+R3 and multi-mini-step GSPO, GSPO+R3 on the
SFT model, with the tiny preset's learning rates (3e-5 single-mini-step, 1e-5 multi-mini-step: the
LR sweep in docs/embedded.md). The two static measurements and the cells run as `--jobs` local
processes with one torch thread each, static first (on 2 cores two 1-thread processes are faster
than one 2-thread process for a model this small, and no core waits for the other's stage).
Every stage is resumable: a rerun skips complete cells and measurements and resumes incomplete
cells.

Departures from the paper: scale (tiny model, synthetic arithmetic, 60 global steps instead of
180), the FP8 inference engine as the mismatch source (not SGLang vs Megatron), one seed.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from r3 import rundir

DEMO_CELLS = (
    "sft-single-grpo",
    "sft-single-grpo-tis",
    "sft-single-grpo-r3",
    "sft-single-grpo-tis-r3",
    "sft-multi-gspo",
    "sft-multi-gspo-r3",
)


def _worker_init() -> None:
    import torch
    import transformers

    torch.set_num_threads(1)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _run_one(cfg_dict: dict, run_dir: str) -> dict:
    from experiments.config import RunConfig
    from experiments.run import run_cell

    return run_cell(RunConfig.from_dict(cfg_dict), Path(run_dir), progress=False)


def _run_static(out: str, precision: str, zoo_dir: str, n_prompts: int | None) -> dict:
    from experiments import static_mismatch

    kw = {"n_prompts": n_prompts} if n_prompts else {}
    marker = _static_progress_file(Path(out), precision)

    def on_phase(fraction: float) -> None:  # read by the parent's progress bar (`_static_done`)
        marker.parent.mkdir(parents=True, exist_ok=True)
        rundir.write_text_atomic(marker, f"{fraction}\n")

    on_phase(0.0)  # a measurement interrupted earlier starts over

    return static_mismatch.run_static(
        Path(out), precision, zoo_dir=Path(zoo_dir), progress=False, on_phase=on_phase, **kw
    )


def _static_progress_file(out: Path, precision: str) -> Path:
    return out / rundir.STATIC_DIR / precision / "progress"


def _static_done(out: Path, precision: str) -> float:
    """Share of a static measurement done, as its worker last wrote it (0 before its first phase)."""
    try:
        return min(1.0, float(_static_progress_file(out, precision).read_text()))
    except (OSError, ValueError):
        return 0.0


STATIC_WORK = 45
"""A static measurement's share of the progress bar, in grid steps: it took about as long as 45
steps of one cell (79-81 s per precision, 1.6-1.9 s per grid step: a clean-clone `make demo` on
the 2-core machine), so the bar's ETA holds from the first cell steps on."""


def _steps_done(run_dir: Path) -> int:
    return rundir.last_step(run_dir) or 0


def run_cells(cfgs: dict, out: Path, *, jobs: int, static: dict[str, tuple] | None = None) -> dict[str, dict]:
    """Run the static measurements `static` (precision -> `_run_static` args after out, precision)
    and then the cells, in `jobs` spawned processes (experiments.local.run_jobs: one progress bar
    over all of it in grid steps; Ctrl-C stops every job within seconds and says how to resume).
    Returns the cells' results and, under "static/<precision>", the static records."""
    from experiments.local import LocalJob, run_jobs

    static = static or {}
    work = [
        LocalJob(
            name=f"static/{p}",
            fn=_run_static,
            args=(str(out), p, *args),
            work=STATIC_WORK,
            done=lambda p=p: STATIC_WORK * _static_done(out, p),
        )
        for p, args in static.items()
    ]
    work += [
        LocalJob(
            name=n,
            fn=_run_one,
            args=(c.to_dict(), str(out / n)),
            work=c.global_steps,
            done=lambda n=n, c=c: min(_steps_done(out / n), c.global_steps),
            run_dir=out / n,
        )
        for n, c in cfgs.items()
    ]
    desc = f"static ({len(static)}) + RL grid ({len(cfgs)} cells)" if static else f"RL grid ({len(cfgs)} cells)"
    hint = f"run the same command again (e.g. `make demo`; every run directory under {out} resumes)"
    return run_jobs(work, parallel=jobs, desc=desc, worker_init=_worker_init, resume_hint=hint)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description="Embedded end-to-end R3 reproduction.")
    ap.add_argument("--out", type=Path, default=Path("runs/demo"))
    ap.add_argument("--zoo-dir", type=Path, default=None, help="default runs/zoo")
    ap.add_argument("--jobs", type=int, default=2, help="cells run in parallel (processes)")
    ap.add_argument("--steps", type=int, default=None, help="override global steps per cell")
    ap.add_argument("--cells", default=",".join(DEMO_CELLS), help="comma-separated globs of tiny-preset cells")
    ap.add_argument("--precision", default="fp8", choices=["fp8", "bf16"], help="rollout precision of the grid")
    ap.add_argument("--zoo-size", default="tiny", choices=["tiny", "micro"])
    ap.add_argument(
        "--static-prompts", type=int, default=None, help="held-out prompts of the static measurement (default: all 512)"
    )
    args = ap.parse_args(argv)

    import torch
    import transformers

    from experiments import grid, summary, zoo

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(1)
    t0 = time.time()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    zoo_dir = (args.zoo_dir or zoo.default_zoo_dir()).resolve()

    print(f"[demo] 1/4 zoo in {zoo_dir}", flush=True)
    zm = zoo.build_zoo(zoo_dir, size=args.zoo_size)
    for k, m in zm["models"].items():
        print(
            f"[demo]   {k}: {m['params']:,} params ({m['active_params']:,} active), held-out acc "
            f"T=1 {m.get('heldout_acc_t1', float('nan')):.3f}, "
            f"greedy {m.get('heldout_acc_greedy', float('nan')):.3f}"
        )

    overrides = {"zoo_dir": str(zoo_dir)}
    if args.steps:
        overrides["global_steps"] = args.steps
    cfgs = grid.cells("tiny", precisions=(args.precision,), pattern=args.cells, **overrides)
    if not cfgs:
        raise SystemExit(
            f"--cells {args.cells!r} matches no tiny-preset cell; see `python -m experiments.grid list --preset tiny`"
        )
    static = {p: (str(zoo_dir), args.static_prompts) for p in ("bf16", "fp8")}
    print(
        f"[demo] 2/4 static mismatch (bf16 engine, FP8 inference engine) and 3/4 RL grid: {', '.join(cfgs)} "
        f"({args.jobs} parallel processes, static first)",
        flush=True,
    )
    results = run_cells(cfgs, out, jobs=args.jobs, static=static)
    for prec in static:
        rec = results[f"static/{prec}"]
        print(
            f"[demo]   static {prec}: k3 KL moe {rec['moe']['k3_kl']:.3g}, moe+R3 {rec['moe_r3']['k3_kl']:.3g}, "
            f"dense {rec['dense']['k3_kl']:.3g}; routing pairs differ {rec['moe']['routing_pair_disagreement']:.4f}"
        )

    print("[demo] 4/4 figures and summary", flush=True)
    try:
        from plots.all import make_all
    except ImportError as e:
        print(f"[demo]   plots package not importable ({e}); no figures")
    else:
        figs = make_all(out, out)  # writes <out>/figures and <out>/tables
        print(f"[demo]   {len(figs)} files in {out / 'figures'} and {out / 'tables'}")
    s = summary.write(out, cells=list(cfgs), grid_precision=args.precision, zoo=zm)
    print((out / "summary.md").read_text())
    print(f"[demo] done in {(time.time() - t0) / 60:.1f} min: {out / 'summary.md'}, {out / 'summary.json'}")
    return s


if __name__ == "__main__":
    main()
