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
SERVED_FILE = "served.json"
"""`served --samples K`'s records, {"cells": {"<cell>@k<K>": {"step", "seed", "samples", "served",
"undosed"}}}, beside undosed.json."""


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


def _score_final(run_dir: Path, cfg, engine, samples_path: Path, n_samples: int, grader_pool) -> float:
    """Held-out average of `engine` (the cell's final policy) with the cell's evaluation settings and
    sampling seed (cfg.seed + step, as eval.hook.evaluate_step), `n_samples` per problem."""
    from transformers import AutoTokenizer

    from eval.run import evaluate
    from experiments.run import resolve_model_dir

    step = int(cfg.global_steps)
    summary = evaluate(
        engine,
        AutoTokenizer.from_pretrained(resolve_model_dir(cfg)),
        cfg.eval_benchmarks,
        samples_path=samples_path,
        n_samples=n_samples,
        temperature=cfg.eval_temperature,
        max_new_tokens=cfg.max_new_tokens,
        template="arith",
        max_problems=cfg.eval_max_problems,
        seed=cfg.seed + step,  # eval.hook.evaluate_step's seed: the served evaluation's sample stream
        batch_size=cfg.eval_batch_size,
        grader_pool=grader_pool,
        progress=False,
    )
    return float(summary["avg"])


def _final_engine(run_dir: Path, cfg, *, dosed: bool):
    """The final checkpoint in the cell's own rollout engine, dose included (experiments.step's
    engine_configs with the checkpoint as model), or in an fp32 transformers engine without it."""
    from experiments import task
    from r3.engines.hf.rollout import HFRolloutEngine

    task.register_benchmark(difficulty=cfg.task_difficulty)
    ckpt = final_checkpoint(run_dir, int(cfg.global_steps))
    if not dosed:
        return HFRolloutEngine(ckpt, precision="fp32", seed=cfg.seed)
    from experiments.step import engine_configs
    from r3.engines import registry

    return registry.build_rollout_engine(engine_configs(cfg, ckpt, run_dir)[0])


def evaluate_cell(run_dir: Path, *, grader_pool=None) -> dict:
    """Evaluate one complete cell's final checkpoint without its dose; return its undosed.json record."""
    from experiments.config import RunConfig

    cfg = rundir.read_config(run_dir, RunConfig).config
    step = int(cfg.global_steps)
    path = run_dir.parent / "undosed" / run_dir.name / f"step_{step}.jsonl"
    score = _score_final(run_dir, cfg, _final_engine(run_dir, cfg, dosed=False), path, cfg.eval_samples, grader_pool)
    return {"step": step, "served": served_score(run_dir, step), "undosed": score, "seed": cfg.seed}


def resample_cell(run_dir: Path, n_samples: int, *, grader_pool=None) -> dict:
    """One complete cell's final checkpoint scored with `n_samples` per problem twice, through its own
    dosed engine and through an fp32 engine without the dose, on one sampling seed: the served score
    with its evaluation noise reduced, and how much the dose costs this policy (served - undosed)."""
    from experiments.config import RunConfig

    cfg = rundir.read_config(run_dir, RunConfig).config
    step = int(cfg.global_steps)
    rec = {"step": step, "seed": cfg.seed, "samples": n_samples}
    for key, dosed in (("served", True), ("undosed", False)):
        path = run_dir.parent / "served" / run_dir.name / f"step_{step}-{key}-k{n_samples}.jsonl"
        rec[key] = _score_final(run_dir, cfg, _final_engine(run_dir, cfg, dosed=dosed), path, n_samples, grader_pool)
    return rec


def run(out: Path, names: list[str], *, samples: int | None = None) -> dict:
    """Evaluate every complete dosed cell among `names` without its dose (cached in undosed.json);
    with `samples`, `resample_cell` each instead (cached in served.json per sample count). Returns the
    file's dict."""
    from tqdm import tqdm

    from eval import grader

    path = out / (FILE if samples is None else SERVED_FILE)
    record = json.loads(path.read_text()) if path.exists() else {"cells": {}}
    todo = []
    for name in names:
        d = out / name
        cfg = rundir.read_config_dict(d)
        key = name if samples is None else f"{name}@k{samples}"
        if cfg is None or not rundir.is_complete(d) or not is_dosed(cfg) or key in record["cells"]:
            continue
        todo.append(d)
    if todo:
        with grader.make_pool(workers=2) as pool:
            for d in tqdm(todo, desc="undosed evaluations" if samples is None else "served + undosed", unit="cell"):
                if samples is None:
                    key, rec = d.name, evaluate_cell(d, grader_pool=pool)
                else:
                    key, rec = f"{d.name}@k{samples}", resample_cell(d, samples, grader_pool=pool)
                # each cell kept as soon as it is evaluated, merged into the file as it is now, so that
                # two commands on one --out (two plans at once) keep each other's records
                record = rundir.read_json(path) or {"cells": {}}
                record["cells"][key] = rec
                rundir.write_json_atomic(path, record)
    return record
