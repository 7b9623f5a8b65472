"""Read run directories (docs/run_format.md) into plain tables; nothing here draws.

A runs root holds cell directories (any child with a `config.json`) and optionally
`static/<precision>/static.json`. A cell is complete when `manifest.json` exists, failed when
the manifest says so or the job wrapper's `FAILED` marker exists (r3.rundir.run_status), and running
otherwise (running or interrupted: both are partial); running cells are
read as far as they go (a half-written last JSONL line is skipped, since the files are
append-only while running). Files that break the contract (a gap in metrics steps, a bad line
in a finished run, a config the RunConfig does not accept) stop with the path and the reason.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from experiments.config import RunConfig
from r3 import rundir
from r3.collapse import collapse_step

RunStatus = Literal["complete", "running", "failed"]
"""How plots show a run: complete (complete or collapsed), failed, or running (partial: any other
state of r3.rundir.RunState, a live run or one waiting to resume)."""
STATIC_ARMS = tuple(key for key, _ in rundir.STATIC_PARTS)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Setting:
    """What groups cells into one table / one set of figures (the paper's table layouts)."""

    preset: str
    model: str
    mini_steps: int
    rollout_precision: str

    @property
    def title(self) -> str:
        steps = "single-mini-step" if self.mini_steps == 1 else f"multi-mini-step ({self.mini_steps})"
        model = {"sft": "SFT model", "base": "Base model", "dense": "dense model"}.get(self.model, self.model)
        return f"{steps}, {model}, {self.rollout_precision} rollout [{self.preset} preset]"

    @property
    def slug(self) -> str:
        return f"{self.preset}-{self.model}-mini{self.mini_steps}-{self.rollout_precision}"


def method_label(cfg: RunConfig) -> str:
    """Paper-style method name: GRPO, GRPO+TIS, GRPO+R3, GRPO+TIS+R3, GSPO+R3, ..."""
    label = cfg.algorithm.upper()
    if cfg.tis:
        label += "+TIS"
    if cfg.replay:
        label += "+R3"
    return label


def method_order(label: str) -> tuple[int, int, str]:
    """Sort key giving the paper's row order: native before TIS before R3, GRPO before GSPO."""
    return (int("+R3" in label), int("+TIS" in label), label)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Run:
    """One cell directory as read from disk."""

    path: Path
    config: RunConfig
    status: RunStatus
    manifest: dict[str, Any] | None
    metrics: pd.DataFrame
    """One row per global step, indexed by `step`; columns are the metrics.jsonl keys."""
    evals: pd.DataFrame
    """One row per evaluation point, indexed by `step`; columns `avg` and `score/<benchmark>`."""

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def method(self) -> str:
        return method_label(self.config)

    @property
    def setting(self) -> Setting:
        c = self.config
        return Setting(preset=c.preset, model=c.model, mini_steps=c.mini_steps, rollout_precision=c.rollout_precision)

    @property
    def benchmarks(self) -> list[str]:
        return [c.removeprefix("score/") for c in self.evals.columns if c.startswith("score/")]

    @property
    def last_step(self) -> int:
        """The last global step with metrics (0 before the first step completes)."""
        steps = [0]
        if len(self.metrics):
            steps.append(int(self.metrics.index.max()))
        if self.manifest and "steps" in self.manifest:
            steps.append(int(self.manifest["steps"]))
        return max(steps)

    @property
    def missing_eval_steps(self) -> list[int]:
        """Evaluation points the contract promises (step 0, then every eval_every up to the
        last step reached) that eval.jsonl does not hold."""
        every = self.config.eval_every
        expected = range(0, self.last_step + 1, every) if every > 0 else [0]
        have = set(int(s) for s in self.evals.index)
        return [s for s in expected if s not in have]

    @property
    def collapse_step(self) -> int | None:
        """r3.collapse.collapse_step on the eval averages, with the run's own rule."""
        if not len(self.evals):
            return None
        return collapse_step(
            [int(s) for s in self.evals.index],
            [float(v) for v in self.evals["avg"]],
            frac=self.config.collapse_frac,
            patience=self.config.collapse_patience,
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunsRoot:
    path: Path
    runs: list[Run]
    static: dict[str, dict[str, Any]]
    """Rollout precision -> the parsed static.json."""


def _metrics_frame(path: Path, rows: list[dict[str, Any]]) -> pd.DataFrame:
    if not rows:
        return pd.DataFrame(index=pd.Index([], name="step", dtype="int64"))
    steps = [r.get("step") for r in rows]
    expected = list(range(1, len(rows) + 1))
    if steps != expected:
        bad = next(i for i, (s, e) in enumerate(zip(steps, expected)) if s != e)
        raise ValueError(
            f"{path}: line {bad + 1} has step {steps[bad]!r}, expected {expected[bad]}: metrics.jsonl must "
            f"hold one line per global step from 1, in order, no gaps or repeats (docs/run_format.md). "
            f"Likely cause: a resume that did not truncate lines beyond its checkpoint."
        )
    return pd.DataFrame(rows).set_index("step")


def _evals_frame(path: Path, rows: list[dict[str, Any]]) -> pd.DataFrame:
    records = []
    for i, r in enumerate(rows):
        scores = r.get("scores")
        if "step" not in r or not isinstance(scores, dict) or not scores:
            raise ValueError(
                f"{path}: line {i + 1} lacks `step` or a non-empty `scores` dict (got keys {sorted(r)}); "
                f"see docs/run_format.md, eval.jsonl."
            )
        rec = {"step": int(r["step"]), **{f"score/{k}": float(v) for k, v in scores.items()}}
        # `avg` is the mean of `scores` over the run's benchmarks (run_format.md); recompute if absent.
        rec["avg"] = float(r["avg"]) if r.get("avg") is not None else sum(scores.values()) / len(scores)
        records.append(rec)
    if not records:
        return pd.DataFrame({"avg": []}, index=pd.Index([], name="step", dtype="int64"))
    df = pd.DataFrame(records)
    dup = df["step"][df["step"].duplicated()].tolist()
    if dup or not df["step"].is_monotonic_increasing:
        raise ValueError(
            f"{path}: evaluation steps must increase strictly, got {df['step'].tolist()} (repeated: {dup}). "
            f"Likely cause: a resume that re-evaluated a step without truncating eval.jsonl."
        )
    return df.set_index("step")


def load_run(path: Path) -> Run:
    """Read one cell directory (must contain config.json)."""
    path = Path(path)
    try:
        config = rundir.read_config(path, RunConfig).config  # tolerant of configs written by older versions
    except (ValueError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path / rundir.CONFIG}: not a RunConfig ({e})") from None
    manifest = rundir.read_manifest(path)
    state = rundir.run_status(path).state
    status: RunStatus = (
        "complete" if state in rundir.DONE else "failed" if state is rundir.RunState.FAILED else "running"
    )
    done = manifest is not None
    metrics = _metrics_frame(path / rundir.METRICS, rundir.read_jsonl(path / rundir.METRICS, complete=done))
    evals = _evals_frame(path / rundir.EVAL, rundir.read_jsonl(path / rundir.EVAL, complete=done))
    return Run(path=path, config=config, status=status, manifest=manifest, metrics=metrics, evals=evals)


def _check_static(path: Path, data: dict[str, Any]) -> None:
    missing = [arm for arm in STATIC_ARMS if not isinstance(data.get(arm), dict)]
    missing += [
        f"{arm}.{key}"
        for arm in STATIC_ARMS
        if isinstance(data.get(arm), dict)
        for key in ("k3_kl", "extreme_frac@2")
        if data[arm].get(key) is None
    ]
    if missing:
        raise ValueError(
            f"{path}: missing {missing}; a static.json holds `moe`, `moe_r3` and `dense`, each with at least "
            f"`k3_kl` and `extreme_frac@2` (docs/run_format.md). Likely cause: an interrupted static "
            f"measurement; rerun experiments.static_mismatch."
        )


def discover(runs_dir: Path) -> RunsRoot:
    """Find every cell directory and static measurement under a runs root."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise FileNotFoundError(f"runs directory {runs_dir} does not exist (or is not a directory)")
    cells = sorted(p for p in runs_dir.iterdir() if p.is_dir() and (p / rundir.CONFIG).exists())
    static: dict[str, dict[str, Any]] = {}
    for f in sorted(runs_dir.glob(f"{rundir.STATIC_DIR}/*/{rundir.STATIC}")):
        data = json.loads(f.read_text())
        _check_static(f, data)
        # keyed by directory: `bf16` (transformers engine) and `vllm-bf16` share a precision
        static[f.parent.name] = data
    if not cells and not static:
        entries = sorted(p.name for p in runs_dir.iterdir())
        raise ValueError(
            f"no runs in {runs_dir}: expected cell directories holding config.json "
            f"(<runs>/<cell>/config.json) or static/<precision>/static.json (docs/run_format.md); "
            f"found {len(entries)} entr{'y' if len(entries) == 1 else 'ies'} {entries[:10]}. "
            f"Pass the runs root (e.g. runs/demo), not a cell or an output directory."
        )
    return RunsRoot(path=runs_dir, runs=[load_run(c) for c in cells], static=static)
