"""Test double of `experiments.run.run_cell` (test-only): a deterministic, resumable toy run.

It follows docs/run_format.md where the Slurm layer looks (config.json, metrics.jsonl one line per
step, checkpoints/step_N/COMPLETE, manifest.json written last) and resumes like the real loop:
from the newest complete checkpoint, truncating metrics.jsonl beyond it (a torn last line too).
Each step draws from a seeded RNG whose state is checkpointed, so an interrupted and resumed run
ends with exactly the metrics of an uninterrupted one. Steps sleep STEP_S so a test can signal
the job mid-run.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

STEP_S = 0.3


def _last_checkpoint(run_dir: Path) -> tuple[int, dict] | None:
    done = []
    for d in (run_dir / "checkpoints").glob("step_*"):
        if (d / "COMPLETE").exists():
            done.append((int(d.name.split("_")[1]), d))
    if not done:
        return None
    step, d = max(done)
    return step, json.loads((d / "state.json").read_text())


def run_cell(cfg, run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = run_dir / "config.json"
    if cfg_path.exists() and json.loads(cfg_path.read_text()) != json.loads(json.dumps(cfg.to_dict())):
        raise ValueError(f"{cfg_path} holds another config")
    cfg.save(cfg_path)
    ckpt = _last_checkpoint(run_dir)
    start, value = 0, 0.0
    rng = random.Random(cfg.seed * 1000 + len(cfg.name))
    if ckpt is not None:
        start, st = ckpt
        value = st["value"]
        rng.setstate((st["rng"][0], tuple(st["rng"][1]), st["rng"][2]))
    metrics = run_dir / "metrics.jsonl"
    kept = []
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                break  # a line torn by the kill
            if row["step"] <= start:
                kept.append(line)
    metrics.write_text("".join(k + "\n" for k in kept))
    with metrics.open("a") as f:
        for step in range(start + 1, cfg.global_steps + 1):
            time.sleep(STEP_S)
            x = rng.random()
            value += x * cfg.lr
            f.write(json.dumps({"step": step, "time": time.time(), "toy/x": x, "toy/value": value}) + "\n")
            f.flush()
            if step % cfg.checkpoint_every == 0 or step == cfg.global_steps:
                d = run_dir / "checkpoints" / f"step_{step}"
                shutil.rmtree(d, ignore_errors=True)
                d.mkdir(parents=True)
                (d / "state.json").write_text(json.dumps({"value": value, "rng": rng.getstate()}))
                (d / "COMPLETE").write_text("")
    manifest = {
        "name": cfg.name,
        "status": "complete",
        "steps": cfg.global_steps,
        "best_step": cfg.global_steps,
        "best_score": value,
        "collapse_step": None,
        "finished": time.time(),
        "versions": {},
    }
    (run_dir / "manifest.json").write_text(json.dumps(manifest) + "\n")
    return manifest
