"""The state of one run directory, read from files only (docs/run_format.md).

Markers the Slurm/local job wrapper (slurm.job) writes beside the run loop's own files:
    slurm/job.json   written at submission: job id, executor, submitit folder, time
    RUNNING          JSON {host, pid, job_id, started}; its mtime is a heartbeat (every 30 s);
                     removed when the job body returns or raises
    FAILED           JSON {error, traceback, job_id, time, log}: the body raised; removed on resubmit
The run loop writes manifest.json LAST; a manifest with a collapse step means "collapsed".

States, in the order they are decided:
    complete / collapsed   manifest.json exists (collapsed when its collapse_step is not null)
    failed                 FAILED exists
    running                RUNNING exists and its heartbeat is fresh
    incomplete             some progress (config.json, metrics or checkpoints) but nothing running:
                           a preempted job waiting in the queue, or a killed one (resubmit resumes)
    queued                 submitted (slurm/job.json) and not started
    not started            nothing
"""

from __future__ import annotations

import dataclasses
import enum
import os
import socket
import threading
import time
from pathlib import Path

from experiments import rundir
from experiments.rundir import FAILED, RUNNING, write_json_atomic
from experiments.rundir import read_json as _read_json

JOB_JSON = "slurm/job.json"
__all__ = ["FAILED", "RUNNING", "JOB_JSON", "write_json_atomic", "run_status", "static_status", "RunningMarker"]
HEARTBEAT_S = 30.0
STALE_S = 5 * HEARTBEAT_S
"""A RUNNING marker older than this is a job that died without cleaning up (SIGKILL, node loss)."""


class RunState(str, enum.Enum):
    NOT_STARTED = "not started"
    QUEUED = "queued"
    RUNNING = "running"
    INCOMPLETE = "incomplete"
    COMPLETE = "complete"
    COLLAPSED = "collapsed"
    FAILED = "failed"


DONE = (RunState.COMPLETE, RunState.COLLAPSED)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunStatus:
    state: RunState
    last_step: int | None = None
    """Last global step in metrics.jsonl."""
    best_score: float | None = None
    collapse_step: int | None = None
    detail: str = ""
    """The error for failed runs; host/job for running ones."""


def last_step(run_dir: Path) -> int | None:
    """The last complete line's `step` in metrics.jsonl (a status display never raises on a bad file)."""
    try:
        return rundir.last_step(run_dir)
    except (ValueError, KeyError, TypeError, OSError):
        return None


def run_status(run_dir: Path, *, now: float | None = None) -> RunStatus:
    run_dir = Path(run_dir)
    now = time.time() if now is None else now
    step = last_step(run_dir)
    manifest = rundir.read_manifest(run_dir)
    if manifest is not None:
        collapse = manifest.get("collapse_step")
        state = RunState.COLLAPSED if collapse is not None else RunState.COMPLETE
        if manifest.get("status", "complete") == "failed":
            state = RunState.FAILED
        return RunStatus(state=state, last_step=manifest.get("steps", step), best_score=manifest.get("best_score"),
                         collapse_step=collapse)  # fmt: skip
    failed = rundir.read_failed(run_dir)
    if failed is not None:
        return RunStatus(state=RunState.FAILED, last_step=step, detail=failed.get("error", "?"))
    running = run_dir / RUNNING
    if running.exists():
        try:
            age = now - running.stat().st_mtime
        except OSError:
            age = float("inf")
        if age < STALE_S:
            info = _read_json(running) or {}
            return RunStatus(state=RunState.RUNNING, last_step=step, collapse_step=_running_collapse(run_dir),
                             detail=f"{info.get('host', '?')} job {info.get('job_id', '?')}")  # fmt: skip
    progress = step is not None or (run_dir / "config.json").exists() or (run_dir / "checkpoints").exists()
    if progress:
        return RunStatus(state=RunState.INCOMPLETE, last_step=step, collapse_step=_running_collapse(run_dir))
    if (run_dir / JOB_JSON).exists():
        job = _read_json(run_dir / JOB_JSON) or {}
        return RunStatus(state=RunState.QUEUED, detail=f"job {job.get('job_id', '?')}")
    return RunStatus(state=RunState.NOT_STARTED)


def _running_collapse(run_dir: Path) -> int | None:
    """Collapse step of a run in progress, from eval.jsonl and its config's collapse rule."""
    from experiments.collapse import collapse_step

    try:
        rows = [(int(r["step"]), float(r["avg"])) for r in rundir.read_jsonl(run_dir / rundir.EVAL)]
    except (ValueError, KeyError, TypeError):
        return None
    cfg = _read_json(run_dir / rundir.CONFIG) or {}
    return collapse_step([s for s, _ in rows], [a for _, a in rows],
                         frac=cfg.get("collapse_frac", 0.5), patience=cfg.get("collapse_patience", 2))  # fmt: skip


# --- markers written by the job wrapper -----------------------------------------------------------
class RunningMarker:
    """Context manager: RUNNING exists (heartbeat thread touches it) while the body runs."""

    def __init__(self, run_dir: Path, job_id: str) -> None:
        self.path = Path(run_dir) / RUNNING
        self.job_id = job_id
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def __enter__(self) -> "RunningMarker":
        info = {"host": socket.gethostname(), "pid": os.getpid(), "job_id": self.job_id, "started": time.time()}
        write_json_atomic(self.path, info)
        self._thread = threading.Thread(target=self._beat, name="run-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.path.unlink(missing_ok=True)


def static_status(out_dir: Path, *, now: float | None = None) -> RunStatus:
    """State of a static-mismatch job directory (`<runs>/static/<precision>/`): complete when
    static.json exists (written last by experiments.static_mismatch), else as `run_status`."""
    out_dir = Path(out_dir)
    if (out_dir / "static.json").exists():
        return RunStatus(state=RunState.COMPLETE)
    st = run_status(out_dir, now=now)
    return dataclasses.replace(st, last_step=None, collapse_step=None)
