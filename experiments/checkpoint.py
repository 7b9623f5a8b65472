"""Resumable checkpoints of a run (docs/run_format.md): checkpoints/step_<N>/ with a COMPLETE marker.

A checkpoint holds the train engine's state (model + optimizer, `TrainEngine.save`), and
`state.json`: the global step, the prompt sampler's position, torch's RNG state (base64) and
the run's collapse bookkeeping. `COMPLETE` is written last; a directory without it, or whose
files fail to load, is partial or corrupt and the previous checkpoint is used instead.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path

import torch

from r3 import rundir

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every checkpoint directory, newest first (complete or not)."""
    root = Path(run_dir) / rundir.CHECKPOINTS
    if not root.exists():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


def _rng_to_text(state: torch.Tensor) -> str:
    buf = io.BytesIO()
    torch.save(state, buf)
    return base64.b64encode(buf.getvalue()).decode()


def _rng_from_text(text: str) -> torch.Tensor:
    return torch.load(io.BytesIO(base64.b64decode(text)), weights_only=True)


def save(run_dir: Path, step: int, engine, state: dict, *, keep: int) -> Path:
    """Write checkpoints/step_<step>/ (engine + state.json, then COMPLETE); prune to `keep` newest."""
    path = Path(run_dir) / rundir.CHECKPOINTS / f"step_{step}"
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    engine.save(str(path / "train"))
    full = {**state, "step": step, "torch_rng": _rng_to_text(torch.get_rng_state())}
    (path / "state.json").write_text(json.dumps(full, indent=1) + "\n")
    (path / MARKER).write_text("ok\n")  # written last
    complete = [p for s, p in checkpoint_dirs(run_dir) if (p / MARKER).exists()]
    for old in complete[max(1, keep) :]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load_latest(run_dir: Path, engine, *, log=print) -> dict | None:
    """Load the newest complete, readable checkpoint into `engine`; return its state (None: none)."""
    for step, path in checkpoint_dirs(run_dir):
        if not (path / MARKER).exists():
            log(f"checkpoint {path.name}: no {MARKER} marker (partial write); trying the previous one")
            continue
        try:
            state = json.loads((path / "state.json").read_text())
            if state.get("step") != step:
                raise ValueError(f"state.json says step {state.get('step')}, directory says {step}")
            engine.load(str(path / "train"))
        except Exception as e:  # corrupt: any failure to read it means it cannot be trusted
            log(f"checkpoint {path.name} is corrupt ({type(e).__name__}: {e}); trying the previous one")
            continue
        torch.set_rng_state(_rng_from_text(state.pop("torch_rng")))
        return state
    return None
