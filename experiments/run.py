"""The RL loop: one grid cell -> one run directory (docs/run_format.md).

    python -m experiments.run --config CONFIG.json --run-dir runs/demo/<cell>
    python -m experiments.run --cell sft-single-grpo-r3 --preset tiny --runs runs/demo

Inputs: a RunConfig (experiments.config); the starting model (RunConfig.model_path, or the
embedded zoo's model of kind `model`, built when missing); training prompts (the synthetic task,
or a data_prep table). Outputs in the run directory: config.json, metrics.jsonl (one line per
global step), eval.jsonl + eval/step_<N>.jsonl (step 0 and every eval_every steps),
checkpoints/step_<N>/, log.txt, and manifest.json written last.

Per global step (PAPER.md "The method", "Setup"):
  1. rollout: prompts_per_step prompts x group_size samples from the rollout engine (bf16 or an
     FP8 inference engine), routing captured for MoE models; rewards from the eval grader
     (worker processes); dynamic sampling drops all-right / all-wrong groups (experiments.rollout);
  2-3. the algorithm step, `r3.algorithm.policy_update`: old logprobs (replaying the rollout
     routing when R3 is on), mismatch metrics (k3 KL, F(2)), routing disagreement, GRPO
     advantages, TIS, and `mini_steps` optimizer steps with the GRPO or GSPO loss;
  4. weight sync train -> rollout engine; metrics line; eval every `eval_every`; checkpoint.

Resume: a run directory holding checkpoints restarts from the newest complete one; lines of
metrics.jsonl / eval.jsonl after it are dropped first, so the files never hold a gap or a repeat.
Sampling is seeded per (seed, step, round), so a resumed run reproduces an uninterrupted one.

Departures from the paper: scale (tiny model, 60 steps, synthetic task); the mismatch in the
embedded mode comes from bf16 or FP8-weight rollout numerics against an fp32 trainer, not from
SGLang vs Megatron kernels.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from experiments import checkpoint, rollout
from experiments.config import RunConfig
from experiments.step import Loop, build_loop, global_step
from experiments.tracking import MetricsSink
from r3 import rundir
from r3.collapse import collapse_step


# --- engines -----------------------------------------------------------------------------------
def resolve_model_dir(cfg: RunConfig) -> Path:
    """RunConfig.model_path, or the embedded zoo's model of kind cfg.model (building the zoo)."""
    if cfg.model_path:
        p = Path(cfg.model_path)
        if not (p / "config.json").exists():
            raise FileNotFoundError(f"model_path {p} holds no config.json (a transformers checkpoint directory)")
        return p
    from experiments import zoo

    zoo_dir = Path(cfg.zoo_dir or zoo.default_zoo_dir())
    if zoo.load_manifest(zoo_dir) is None:
        zoo.build_zoo(zoo_dir, size=cfg.zoo_size or "tiny")
    zoo.check_size(zoo_dir, cfg.zoo_size)
    return zoo.model_dir(cfg.model, zoo_dir)


def _versions() -> dict[str, str]:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


# --- the run ---------------------------------------------------------------------------------------
def run_cell(
    cfg: RunConfig,
    run_dir: Path,
    *,
    progress: bool = True,
    reward_fn: rollout.RewardFn | None = None,
    train_engine=None,
) -> dict:
    """Run (or resume, or skip when complete) one cell in `run_dir`; returns the manifest.
    Set-up (experiments.step.build_loop), resume, then global steps (experiments.step.global_step)
    with evaluation and checkpoints on their schedules; files through r3.rundir.

    reward_fn: replaces the grader-based reward (a test seam; evaluation always uses the grader).
    train_engine: an engine already built from engine_configs (the rank-0 driver of a multi-rank
        run passes its engine proxy, experiments.distributed); None builds it here.
    """
    from eval import grader

    run_dir = Path(run_dir)
    if (manifest := rundir.read_manifest(run_dir)) is not None:
        return manifest
    run_dir.mkdir(parents=True, exist_ok=True)
    rundir.write_or_check_config(run_dir, cfg)
    pool = grader.make_pool(workers=2)
    with (run_dir / rundir.LOG).open("a") as log_f, MetricsSink(run_dir, cfg) as sink, pool:

        def log(msg: str) -> None:
            log_f.write(f"[{time.strftime('%H:%M:%S')}] {msg}\n")
            log_f.flush()

        def grader_reward(texts, golds):
            return [float(c) for c in grader.grade_many(list(zip(texts, golds)), pool=pool)]

        model_dir = resolve_model_dir(cfg)
        loop = build_loop(
            cfg, model_dir, run_dir, reward_fn=reward_fn or grader_reward, train_engine=train_engine, log=log
        )
        log(f"start {cfg.name}: model {model_dir}, rollout {cfg.rollout_engine}/{cfg.rollout_precision}, "
            f"train {cfg.train_engine}, replay={cfg.replay}")  # fmt: skip
        start = _resume(loop, run_dir)
        if start == 0:
            _evaluate(loop, run_dir, 0, pool)
        bar = tqdm(range(start + 1, cfg.global_steps + 1), desc=cfg.name, unit="step", disable=not progress,
                   initial=start, total=cfg.global_steps)  # fmt: skip
        for step in bar:
            rec = global_step(loop, step)
            sink.log(rec)
            bar.set_postfix(reward=f"{rec['rollout/reward_mean']:.2f}", kl=f"{rec.get('mismatch/k3_kl', math.nan):.1e}")
            if step % cfg.eval_every == 0 or step == cfg.global_steps:
                _evaluate(loop, run_dir, step, pool)
            collapsed = _collapse(cfg, run_dir) if cfg.stop_on_collapse else None
            if step % cfg.checkpoint_every == 0 or step == cfg.global_steps or collapsed is not None:
                _save(loop, run_dir, step)
            if collapsed is not None:
                log(f"collapsed at step {collapsed}; stopping (stop_on_collapse)")
                break
    return _write_manifest(cfg, run_dir)


def _resume(loop: Loop, run_dir: Path) -> int:
    """Restore the newest complete checkpoint (weights, optimizer, stream position; the rollout engine
    synced to it) and drop what was logged after it, so the files hold no gap and no repeat. Returns
    the step to continue from (0: a fresh run)."""
    state = checkpoint.load_latest(run_dir, loop.train_engine, log=loop.log)
    start = 0 if state is None else state["step"]
    if state is not None:
        loop.stream.position = state["stream_position"]
        loop.rollout_engine.sync_weights(loop.train_engine.rollout_state_dict())
        loop.log(f"resumed from checkpoint step {start}")
    for name in (rundir.METRICS, rundir.EVAL):
        rundir.truncate_jsonl(run_dir / name, start)
    for p in (run_dir / rundir.EVAL_SAMPLES_DIR).glob("step_*.jsonl"):
        if int(p.stem.split("_")[1]) > start:
            p.unlink()
    return start


def _evaluate(loop: Loop, run_dir: Path, step: int, pool) -> None:
    from eval.hook import evaluate_step

    cfg = loop.cfg
    evaluate_step(
        loop.rollout_engine,
        loop.tokenizer,
        cfg.eval_benchmarks,
        step=step,
        run_dir=run_dir,
        n_samples=cfg.eval_samples,
        temperature=cfg.eval_temperature,
        max_new_tokens=cfg.max_new_tokens,
        max_problems=cfg.eval_max_problems,
        seed=cfg.seed,
        template=loop.template.name,
        batch_size=cfg.eval_batch_size,
        grader_pool=pool,
        progress=False,
    )


def _save(loop: Loop, run_dir: Path, step: int) -> None:
    state = {"stream_position": loop.stream.position}
    checkpoint.save(run_dir, step, loop.train_engine, state, keep=loop.cfg.keep_checkpoints)


def _collapse(cfg: RunConfig, run_dir: Path) -> int | None:
    ev = rundir.read_jsonl(run_dir / rundir.EVAL)
    return collapse_step(
        [e["step"] for e in ev], [e["avg"] for e in ev], frac=cfg.collapse_frac, patience=cfg.collapse_patience
    )


def _write_manifest(cfg: RunConfig, run_dir: Path) -> dict:
    ev = rundir.read_jsonl(run_dir / rundir.EVAL)
    metrics = rundir.read_jsonl(run_dir / rundir.METRICS)
    best = max(ev, key=lambda e: (e["avg"], -e["step"])) if ev else None
    manifest = {
        "name": cfg.name,
        "status": "complete",
        "steps": metrics[-1]["step"] if metrics else 0,
        "best_step": best["step"] if best else None,
        "best_score": best["avg"] if best else None,
        "initial_score": ev[0]["avg"] if ev else None,
        "final_score": ev[-1]["avg"] if ev else None,
        "collapse_step": _collapse(cfg, run_dir),
        "finished": time.time(),
        "versions": _versions(),
    }
    rundir.write_manifest(run_dir, manifest)  # written last, atomically
    return manifest


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Run one RL grid cell (resumable).")
    ap.add_argument("--config", type=Path, help="a RunConfig JSON (config.json of a run directory)")
    ap.add_argument("--cell", help="a cell name of experiments.grid (with --preset)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--runs", type=Path, default=Path("runs/demo"), help="runs root (with --cell)")
    ap.add_argument("--run-dir", type=Path, help="run directory (default: <runs>/<cell name>)")
    args = ap.parse_args(argv)
    if args.config:
        cfg = RunConfig.load(args.config)
    elif args.cell:
        from experiments import grid

        cells = grid.cells(args.preset)
        if args.cell not in cells:
            raise SystemExit(f"unknown cell {args.cell!r} in preset {args.preset!r}; known: {sorted(cells)}")
        cfg = cells[args.cell]
    else:
        raise SystemExit("give --config or --cell")
    print(json.dumps(run_cell(cfg, args.run_dir or args.runs / cfg.name), indent=2))


if __name__ == "__main__":
    main()
