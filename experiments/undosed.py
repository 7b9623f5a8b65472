"""Each finished study cell's final policy evaluated without its dose: trained damage vs served noise.

    python -m experiments.study undosed --out runs/study [--plan study]

A study cell's held-out scores (eval.jsonl) are measured through its own rollout engine, dose
included, as the paper evaluates through its inference engine. A dosed cell that ends below the
fp32 control may therefore have learned less (the mismatch damaged training) or learned as much
and be served worse (the dose perturbs every evaluation). This command separates the two: it
evaluates each complete dosed cell's final checkpoint through an fp32 transformers engine with no
dose, with the cell's own evaluation settings and sampling seed (cfg.seed + step, as
eval.hook.evaluate_step), so the served and undosed scores of a cell differ only by the dose.

Outputs under --out: `undosed/<cell>/step_<N>.jsonl` (per-sample records; a killed run resumes from
them) and `undosed.json`: {"cells": {cell: {"step", "served", "undosed", "seed", "condition"}}}, read
by plots.figures_study (the `undosed` columns of tables/study_results.json).
"""

from __future__ import annotations

import json
from pathlib import Path

from r3 import rundir

FILE = "undosed.json"
"""Written beside the cell directories of a study's --out."""


def is_dosed(cfg: dict) -> bool:
    """True when the cell's rollout differs from the fp32 trainer beyond kernels' rounding."""
    return bool(
        cfg.get("rollout_router_noise") or cfg.get("rollout_logit_noise") or cfg.get("rollout_precision") != "fp32"
    )


def served_score(run_dir: Path, step: int) -> float | None:
    """The cell's own held-out average at `step` (eval.jsonl), None if it has no such line."""
    rows = [r for r in rundir.read_jsonl(run_dir / rundir.EVAL) if r.get("step") == step]
    return float(rows[0]["avg"]) if rows else None


def final_checkpoint(run_dir: Path, step: int) -> Path:
    """The trainer's weights saved at `step` (experiments.checkpoint layout), with a clear error."""
    path = run_dir / "checkpoints" / f"step_{step}" / "train"
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"{run_dir.name}: expected the final checkpoint at {path}, found none; cause: the run kept no "
            f"checkpoint of step {step} (keep_checkpoints) or is not complete"
        )
    return path


def evaluate_cell(run_dir: Path, *, grader_pool=None) -> dict:
    """Evaluate one complete cell's final checkpoint without its dose; return its undosed.json record."""
    from transformers import AutoTokenizer

    from eval.run import evaluate
    from experiments import task
    from experiments.config import RunConfig
    from experiments.run import resolve_model_dir
    from r3.engines.hf.rollout import HFRolloutEngine

    cfg = rundir.read_config(run_dir, RunConfig).config
    step = int(cfg.global_steps)
    task.register_benchmark(difficulty=cfg.task_difficulty)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(cfg))
    engine = HFRolloutEngine(final_checkpoint(run_dir, step), precision="fp32", seed=cfg.seed)
    summary = evaluate(
        engine,
        tokenizer,
        cfg.eval_benchmarks,
        samples_path=run_dir.parent / "undosed" / run_dir.name / f"step_{step}.jsonl",
        n_samples=cfg.eval_samples,
        temperature=cfg.eval_temperature,
        max_new_tokens=cfg.max_new_tokens,
        template="arith",
        max_problems=cfg.eval_max_problems,
        seed=cfg.seed + step,  # eval.hook.evaluate_step's seed: the served evaluation's sample stream
        batch_size=cfg.eval_batch_size,
        grader_pool=grader_pool,
        progress=False,
    )
    return {"step": step, "served": served_score(run_dir, step), "undosed": float(summary["avg"]), "seed": cfg.seed}


def run(out: Path, names: list[str]) -> dict:
    """Evaluate every complete dosed cell among `names` (cached in undosed.json); return the file's dict."""
    from tqdm import tqdm

    from eval import grader

    path = out / FILE
    record = json.loads(path.read_text()) if path.exists() else {"cells": {}}
    todo = []
    for name in names:
        d = out / name
        cfg = rundir.read_config_dict(d)
        if cfg is None or not rundir.is_complete(d) or not is_dosed(cfg) or name in record["cells"]:
            continue
        todo.append(d)
    if todo:
        with grader.make_pool(workers=2) as pool:
            for d in tqdm(todo, desc="undosed evaluations", unit="cell"):
                record["cells"][d.name] = evaluate_cell(d, grader_pool=pool)
                rundir.write_json_atomic(path, record)  # each cell kept as soon as it is evaluated
    return record
