"""The one owner of the run-directory format (docs/run_format.md): paths, readers, writers,
markers, and the one vocabulary of a run's state.

Every stage that touches a run directory goes through this module: the run loop writes with it,
evaluation appends with it, plots, the summary and the Slurm submitter read with it. It sits in
the library (it imports nothing of the packages above), so eval/, plots/, slurm/ and experiments/
all import it downwards. Reading is tolerant in the ways a live or older run directory needs:
- a JSONL line torn by a kill mid-write is skipped (only the last line can be torn);
- a config.json written by an older version of the harness loads: keys the config class no longer
  has are dropped (and reported in `ConfigRead.unknown`), fields it gained take their defaults.
Writing keeps invariant 4 of DESIGN.md: files are appended while running; the manifest is
written last, atomically, and marks completion.

Markers the job wrapper (slurm.job, the local executor) writes beside the run loop's own files:
    slurm/job.json   written at submission: job id, executor, submitit folder, time
    RUNNING          JSON {host, pid, job_id, started}; its mtime is a heartbeat (every 30 s);
                     removed when the job body returns or raises
    FAILED           JSON {error, traceback, job_id, time, log}: the body raised; removed on resubmit
States (`RunState`), in the order they are decided (`run_status`):
    complete / collapsed   manifest.json exists (collapsed when its collapse_step is not null)
    failed                 FAILED exists (or a manifest says "failed")
    running                RUNNING exists and its heartbeat is fresh
    incomplete             some progress (config.json, metrics or checkpoints) but nothing running:
                           a preempted job waiting in the queue, or a killed one (resubmit resumes)
    queued                 submitted (slurm/job.json) and not started
    not started            nothing
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import socket
import threading
import time
import traceback as tb_mod
from pathlib import Path
from typing import Any, Protocol, TypeVar

from r3.collapse import collapse_step

CONFIG = "config.json"
METRICS = "metrics.jsonl"
EVAL = "eval.jsonl"
EVAL_SAMPLES_DIR = "eval"
CHECKPOINTS = "checkpoints"
LOG = "log.txt"
MANIFEST = "manifest.json"
FAILED = "FAILED"
"""Marker: JSON {error, traceback, job_id, time, log}; the body raised (removed on resubmit)."""
RUNNING = "RUNNING"
"""Marker: JSON heartbeat of a live job (RunningMarker)."""
STATIC = "static.json"
"""A static-mismatch job's result (experiments.static_mismatch), written last."""
STATIC_DIR = "static"
"""Static measurements of a runs root: <runs>/static/<engine-precision>/static.json."""
STATIC_PARTS: tuple[tuple[str, str], ...] = (
    ("moe", "MoE native"),
    ("moe_r3", "MoE + R3"),
    ("dense", "dense reference"),
)
"""The measurements of a static.json (key, label): MoE native, MoE + R3, dense reference."""
JOB_JSON = "slurm/job.json"
"""Written at submission (job id, executor, submitit folder, time)."""


# --- JSON / JSONL --------------------------------------------------------------------------------
def read_jsonl(path: Path, *, complete: bool = False) -> list[dict[str, Any]]:
    """The records of a JSONL run file (missing file: none).

    The last line of a live or killed run may be torn mid-write: it is skipped, unless
    `complete` (the run's manifest exists, so nothing can be mid-write). Any other line that is
    not JSON is corruption and raises with the path and line number."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1 and not complete:
                break  # torn by a kill mid-append; a resume truncates it away
            raise ValueError(
                f"{path}: line {i + 1} is not JSON ({e}); expected one JSON object per line "
                "(docs/run_format.md). Likely cause: a truncated write in a finished run; fix or delete that line."
            ) from None
    return out


def drop_torn_tail(path: Path) -> None:
    """Cut a last line that a kill left without its newline, so the next append starts clean."""
    path = Path(path)
    if path.exists() and path.stat().st_size:
        with path.open("rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                text = path.read_bytes()
                f.seek(0)
                f.truncate(text.rfind(b"\n") + 1)


def append_jsonl(path: Path, rec: dict[str, Any]) -> None:
    """Append one record as one line (a kill can tear at most this line), after dropping a torn
    last line left by an earlier kill."""
    drop_torn_tail(path)
    with Path(path).open("a") as f:
        f.write(json.dumps(rec) + "\n")


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep the whole lines with step <= last_step (resume: no gap, no repeat)."""
    path = Path(path)
    if path.exists():
        keep = [r for r in read_jsonl(path) if r.get("step", 0) <= last_step]
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in keep))


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file's object, or None when it is missing or torn."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):  # missing, unreadable, or torn (JSONDecodeError is a ValueError)
        return None


def write_text_atomic(path: Path, text: str) -> None:
    """Write via a per-process temporary file and rename: readers see the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


# --- config --------------------------------------------------------------------------------------
class ConfigClass(Protocol):
    """A frozen config dataclass with dict conversion (experiments.config.RunConfig)."""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any: ...

    def to_dict(self) -> dict[str, Any]: ...


C = TypeVar("C")


@dataclasses.dataclass(frozen=True)
class ConfigRead:
    config: Any
    unknown: tuple[str, ...]
    """Keys of the file that this version's config class does not have (dropped)."""


def read_config(run_dir: Path, config_cls: type[C]) -> ConfigRead:
    """The run's config as `config_cls` (a dataclass with from_dict), tolerant of configs written by
    older versions (see module docstring). Raises FileNotFoundError without a config.json,
    ValueError when its values are invalid now."""
    path = Path(run_dir) / CONFIG
    d = json.loads(path.read_text())
    renamed = getattr(config_cls, "RENAMED", {})  # keys an older version wrote under another name
    d = {renamed.get(k, k): v for k, v in d.items()}
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = tuple(sorted(set(d) - known))
    try:
        cfg = config_cls.from_dict({k: v for k, v in d.items() if k in known})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a valid {config_cls.__name__} for this version of the harness ({e})") from None
    return ConfigRead(cfg, unknown)


def read_config_dict(run_dir: Path) -> dict[str, Any] | None:
    """config.json as a plain dict (None when missing or torn): for status displays."""
    return read_json(Path(run_dir) / CONFIG)


def write_or_check_config(run_dir: Path, cfg: ConfigClass) -> None:
    """Write config.json at the start of a run; on resume, refuse a different config."""
    path = Path(run_dir) / CONFIG
    if not path.exists():
        write_text_atomic(path, json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
        return
    old = read_config(run_dir, type(cfg)).config.to_dict()  # through the class: JSON lists become tuples again
    new = cfg.to_dict()
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
        raise ValueError(
            f"{run_dir} holds a run of a different config (fields differ: {diff}); "
            "use another run directory or delete it"
        )


# --- markers and state ---------------------------------------------------------------------------
def read_manifest(run_dir: Path) -> dict[str, Any] | None:
    """The manifest (the run is complete) or None."""
    return read_json(Path(run_dir) / MANIFEST)


def is_complete(run_dir: Path) -> bool:
    return (Path(run_dir) / MANIFEST).exists()


def write_manifest(run_dir: Path, manifest: dict[str, Any]) -> None:
    """Written last, atomically: from here on the run directory is complete."""
    write_json_atomic(Path(run_dir) / MANIFEST, manifest)


def write_failed(run_dir: Path, error: BaseException | str, *, job_id: str = "", log: str = "") -> None:
    """The FAILED marker: what raised, where, and the log to read."""
    tb = "".join(tb_mod.format_exception(error)) if isinstance(error, BaseException) else ""
    write_json_atomic(
        Path(run_dir) / FAILED,
        {
            "error": f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error),
            "traceback": tb,
            "job_id": job_id,
            "time": time.time(),
            "log": log,
        },
    )


def read_failed(run_dir: Path) -> dict[str, Any] | None:
    """The FAILED marker's content ({"error": "?"} when the marker is torn), or None."""
    path = Path(run_dir) / FAILED
    if not path.exists():
        return None
    return read_json(path) or {"error": "?"}


def clear_failed(run_dir: Path) -> None:
    (Path(run_dir) / FAILED).unlink(missing_ok=True)


def last_step(run_dir: Path) -> int | None:
    """The last global step in metrics.jsonl, or None before the first."""
    rows = read_jsonl(Path(run_dir) / METRICS)
    return int(rows[-1]["step"]) if rows else None


# --- the state of a run directory ------------------------------------------------------------------
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
"""States whose results are final (the submitter skips them)."""
PARTIAL = (RunState.RUNNING, RunState.INCOMPLETE, RunState.QUEUED, RunState.NOT_STARTED)
"""States whose files hold part of a run (plots show them as partial)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunStatus:
    state: RunState
    last_step: int | None = None
    """Last global step in metrics.jsonl."""
    best_score: float | None = None
    collapse_step: int | None = None
    detail: str = ""
    """The error for failed runs; host/job for running ones."""


def _last_step_or_none(run_dir: Path) -> int | None:
    """last_step for a status display, which never raises on a bad file."""
    try:
        return last_step(run_dir)
    except (ValueError, KeyError, TypeError, OSError):
        return None


def run_status(run_dir: Path, *, now: float | None = None) -> RunStatus:
    """The state of one run directory, from its files alone (see the module docstring)."""
    run_dir = Path(run_dir)
    now = time.time() if now is None else now
    step = _last_step_or_none(run_dir)
    manifest = read_manifest(run_dir)
    if manifest is not None:
        collapse = manifest.get("collapse_step")
        state = RunState.COLLAPSED if collapse is not None else RunState.COMPLETE
        if manifest.get("status", "complete") == "failed":
            state = RunState.FAILED
        return RunStatus(state=state, last_step=manifest.get("steps", step), best_score=manifest.get("best_score"),
                         collapse_step=collapse)  # fmt: skip
    failed = read_failed(run_dir)
    if failed is not None:
        return RunStatus(state=RunState.FAILED, last_step=step, detail=failed.get("error", "?"))
    running = run_dir / RUNNING
    if running.exists():
        try:
            age = now - running.stat().st_mtime
        except OSError:
            age = float("inf")
        if age < STALE_S:
            info = read_json(running) or {}
            return RunStatus(state=RunState.RUNNING, last_step=step, collapse_step=_running_collapse(run_dir),
                             detail=f"{info.get('host', '?')} job {info.get('job_id', '?')}")  # fmt: skip
    progress = step is not None or (run_dir / CONFIG).exists() or (run_dir / CHECKPOINTS).exists()
    if progress:
        return RunStatus(state=RunState.INCOMPLETE, last_step=step, collapse_step=_running_collapse(run_dir))
    if (run_dir / JOB_JSON).exists():
        job = read_json(run_dir / JOB_JSON) or {}
        return RunStatus(state=RunState.QUEUED, detail=f"job {job.get('job_id', '?')}")
    return RunStatus(state=RunState.NOT_STARTED)


def _running_collapse(run_dir: Path) -> int | None:
    """Collapse step of a run in progress, from eval.jsonl and its config's collapse rule."""
    try:
        rows = [(int(r["step"]), float(r["avg"])) for r in read_jsonl(run_dir / EVAL)]
    except (ValueError, KeyError, TypeError):
        return None
    cfg = read_config_dict(run_dir) or {}
    return collapse_step([s for s, _ in rows], [a for _, a in rows],
                         frac=cfg.get("collapse_frac", 0.5), patience=cfg.get("collapse_patience", 2))  # fmt: skip


def static_status(out_dir: Path, *, now: float | None = None) -> RunStatus:
    """State of a static-mismatch job directory (`<runs>/static/<precision>/`): complete when
    static.json exists (written last by experiments.static_mismatch), else as `run_status`."""
    out_dir = Path(out_dir)
    if (out_dir / STATIC).exists():
        return RunStatus(state=RunState.COMPLETE)
    st = run_status(out_dir, now=now)
    return dataclasses.replace(st, last_step=None, collapse_step=None)


def write_job(run_dir: Path, info: dict[str, Any]) -> None:
    """The submission record (JOB_JSON): a new submission also clears an old FAILED marker."""
    clear_failed(run_dir)
    write_json_atomic(Path(run_dir) / JOB_JSON, info)


def read_job(run_dir: Path) -> dict[str, Any] | None:
    return read_json(Path(run_dir) / JOB_JSON)


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

    def __enter__(self) -> RunningMarker:
        info = {"host": socket.gethostname(), "pid": os.getpid(), "job_id": self.job_id, "started": time.time()}
        write_json_atomic(self.path, info)
        self._thread = threading.Thread(target=self._beat, name="run-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.path.unlink(missing_ok=True)
