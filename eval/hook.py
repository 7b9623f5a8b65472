"""The RL loop's evaluation point: the same code as `python -m eval.run`, written into a run dir.

`evaluate_step(...)` writes the per-sample records to run_dir/eval/step_<N>.jsonl and appends one
line to run_dir/eval.jsonl in the format of docs/run_format.md:
    {"step", "time", "scores", "pass", "avg", "n_samples", "template", ...counts}
A step that already has a line in eval.jsonl (a resumed run) is not evaluated again: its line is
returned, so eval.jsonl never holds a step twice. A step whose per-sample file is partial (the run
was killed mid-evaluation) resumes from the samples already graded.

Template: None picks `qwen-math-boxed` when the tokenizer has a chat template and `plain` (the
problem and a newline: the embedded task's format) otherwise; the chosen name is recorded.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eval import grader
from eval.run import evaluate
from r3 import rundir
from r3.engines.base import RolloutEngine


def default_template(tokenizer: Any) -> str:
    return "qwen-math-boxed" if getattr(tokenizer, "chat_template", None) else "plain"


def evaluate_step(
    engine: RolloutEngine,
    tokenizer: Any,
    benchmarks: Sequence[str],
    *,
    step: int,
    run_dir: Path,
    n_samples: int,
    temperature: float,
    max_new_tokens: int,
    max_problems: int = 0,
    seed: int,
    top_p: float = 1.0,
    template: str | None = None,
    batch_size: int = 64,
    grader_pool: grader.WorkerPool | None = None,
    grader_workers: int = 2,
    progress: bool = True,
) -> dict:
    """Evaluate the engine's current weights at global step `step`; return the eval.jsonl line."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    run_dir = Path(run_dir)
    eval_jsonl = run_dir / rundir.EVAL
    existing = [r for r in rundir.read_jsonl(eval_jsonl) if r.get("step") == step]
    if existing:
        return existing[0]
    template = template or default_template(tokenizer)
    summary = evaluate(
        engine,
        tokenizer,
        benchmarks,
        samples_path=run_dir / rundir.EVAL_SAMPLES_DIR / f"step_{step}.jsonl",
        n_samples=n_samples,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        template=template,
        max_problems=max_problems,
        seed=seed + step,
        batch_size=batch_size,
        grader_workers=grader_workers,
        grader_pool=grader_pool,
        progress=progress,
    )
    line = {"step": step, "time": time.time(), **summary, "temperature": temperature, "max_new_tokens": max_new_tokens}
    rundir.append_jsonl(eval_jsonl, line)
    return line
