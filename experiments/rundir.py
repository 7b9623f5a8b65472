"""The one owner of the run-directory format (docs/run_format.md): paths, readers, writers, markers.

Every stage that touches a run directory goes through this module: the run loop writes with it,
evaluation appends with it, plots, the summary and the Slurm state read with it. Reading is
tolerant in the ways a live or older run directory needs:
- a JSONL line torn by a kill mid-write is skipped (only the last line can be torn);
- a config.json written by an older version of the harness loads: keys RunConfig no longer has
  are dropped (and reported in `RunConfigRead.unknown`), fields it gained take their defaults.
Writing keeps invariant 4 of DESIGN.md: files are appended while running; the manifest is
written last, atomically, and marks completion.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import traceback as tb_mod
from pathlib import Path
from typing import Any

from experiments.config import RunConfig

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
"""Marker: JSON heartbeat of a live job (slurm.state.RunningMarker)."""
STATIC = "static.json"


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
@dataclasses.dataclass(frozen=True)
class RunConfigRead:
    config: RunConfig
    unknown: tuple[str, ...]
    """Keys of the file that this version's RunConfig does not have (dropped)."""


def read_config(run_dir: Path) -> RunConfigRead:
    """The run's RunConfig, tolerant of configs written by older versions (see module docstring).
    Raises FileNotFoundError without a config.json, ValueError when its values are invalid now."""
    path = Path(run_dir) / CONFIG
    d = json.loads(path.read_text())
    known = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = tuple(sorted(set(d) - known))
    try:
        cfg = RunConfig.from_dict({k: v for k, v in d.items() if k in known})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a valid RunConfig for this version of the harness ({e})") from None
    return RunConfigRead(cfg, unknown)


def write_or_check_config(run_dir: Path, cfg: RunConfig) -> None:
    """Write config.json at the start of a run; on resume, refuse a different config."""
    path = Path(run_dir) / CONFIG
    if not path.exists():
        write_text_atomic(path, json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
        return
    old = read_config(run_dir).config.to_dict()  # through RunConfig: JSON lists become tuples again
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
