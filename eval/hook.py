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

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eval import grader
from eval.run import evaluate
from r3.engines.base import RolloutEngine


def default_template(tokenizer: Any) -> str:
    return "qwen-math-boxed" if getattr(tokenizer, "chat_template", None) else "plain"


def _existing_line(path: Path, step: int) -> dict | None:
    if not path.exists():
        return None
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line; dropped before appending below
        if rec.get("step") == step:
            return rec
    return None


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
    eval_jsonl = run_dir / "eval.jsonl"
    existing = _existing_line(eval_jsonl, step)
    if existing is not None:
        return existing
    template = template or default_template(tokenizer)
    summary = evaluate(
        engine, tokenizer, benchmarks, samples_path=run_dir / "eval" / f"step_{step}.jsonl",
        n_samples=n_samples, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
        template=template, max_problems=max_problems, seed=seed + step, batch_size=batch_size,
        grader_workers=grader_workers, grader_pool=grader_pool, progress=progress,
    )
    line = {"step": step, "time": time.time(), **summary, "temperature": temperature,
            "max_new_tokens": max_new_tokens}
    text = eval_jsonl.read_text(encoding="utf-8") if eval_jsonl.exists() else ""
    if text and not text.endswith("\n"):  # a line torn by a kill mid-write: drop it
        eval_jsonl.write_text(text[: text.rfind("\n") + 1], encoding="utf-8")
    with eval_jsonl.open("a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")
    return line
