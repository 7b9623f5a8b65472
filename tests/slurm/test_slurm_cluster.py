"""End to end on a real one-node Slurm cluster (fixture in conftest.py): submission through
`python -m slurm.submit`, a job array of two cells, and preemption -> requeue -> resume.

The job body is tests/slurm/toyrun.py (a deterministic, resumable stand-in for
experiments.run.run_cell with the same signature and run-directory files)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments import grid
from slurm import state
from tests.slurm import toyrun

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parents[2]
BODY = "tests.slurm.toyrun:run_cell"


def _submit(cluster, runs: Path, cells: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "slurm.submit", "--preset", "tiny", "--cells", cells, "--precisions", "fp8",
           "--no-static", "--runs", str(runs), "--body", BODY, "--cpus-per-task", "1", "--mem-gb", "1", *extra]
    return subprocess.run(cmd, env=cluster.env, capture_output=True, text=True, cwd=REPO, timeout=240)


def _metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time"} for r in rows]


def _assert_complete(run_dir: Path, steps: int) -> None:
    assert state.run_status(run_dir).state == state.RunState.COMPLETE, sorted(p.name for p in run_dir.iterdir())
    assert [r["step"] for r in _metrics(run_dir)] == list(range(1, steps + 1))  # no gap, no repeat
    assert json.loads((run_dir / "config.json").read_text())["global_steps"] == steps
    assert (run_dir / "checkpoints" / f"step_{steps}" / "COMPLETE").exists()
    assert not (run_dir / state.RUNNING).exists() and not (run_dir / state.FAILED).exists()
    logs = list((run_dir / "slurm").glob("*_log.out"))
    assert logs and "Job completed successfully" in logs[-1].read_text()


def test_two_cells_complete_as_a_job_array(slurm_cluster, tmp_path):
    runs = tmp_path / "runs"
    p = _submit(slurm_cluster, runs, "sft-single-grpo,sft-single-grpo-r3", "--override", "global_steps=6",
                "--wait", "--wait-timeout", "180")
    assert p.returncode == 0, p.stdout + p.stderr + slurm_cluster.logs()
    for cell in ("sft-single-grpo", "sft-single-grpo-r3"):
        _assert_complete(runs / cell, 6)
        job = json.loads((runs / cell / state.JOB_JSON).read_text())
        assert "_" in job["job_id"]  # one array task per cell
    # Complete cells are skipped on resubmission.
    again = _submit(slurm_cluster, runs, "sft-single-grpo,sft-single-grpo-r3", "--override", "global_steps=6")
    assert again.returncode == 0 and again.stdout.count("skip") == 2 and "nothing to submit" in again.stdout


def _wait(cond, timeout: float, what: str, cluster):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.2)
    jobs = cluster.run(["squeue", "-h", "-o", "%i %T %r"], check=False)
    raise AssertionError(f"timed out waiting for {what}; squeue: {jobs!r}\n{cluster.logs()}")


def test_preempted_job_requeues_and_ends_with_uninterrupted_metrics(slurm_cluster, tmp_path):
    runs, cell, steps = tmp_path / "runs", "sft-single-grpo-tis", 30
    p = _submit(slurm_cluster, runs, cell, "--override", f"global_steps={steps}", "--no-array")
    assert p.returncode == 0, p.stdout + p.stderr
    run_dir = runs / cell
    job_id = json.loads((run_dir / state.JOB_JSON).read_text())["job_id"]
    metrics = run_dir / "metrics.jsonl"
    # Mid-run (past the step-5 checkpoint, before the step-10 one): preempt the way submitit's own
    # SlurmJob._interrupt does: SIGTERM, then the preemption signal SIGUSR2, to the job's steps.
    _wait(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 7, 60, "step 7", slurm_cluster)
    slurm_cluster.run(["scancel", "--signal", "TERM", job_id])
    slurm_cluster.run(["scancel", "--signal", "USR2", job_id])

    # The requeued job waits cred_expire + 1 s (10 + 1 in the local cluster), then runs again.
    def _restarts() -> int:
        out = slurm_cluster.run(["scontrol", "show", "job", job_id], check=False)
        return int(out.split("Restarts=")[1].split()[0]) if "Restarts=" in out else 0

    _wait(lambda: not slurm_cluster.run(["squeue", "-h", "-j", job_id], check=False).strip(), 120,
          "the requeued job to finish", slurm_cluster)
    assert _restarts() == 1
    log = "".join(p.read_text() for p in (run_dir / "slurm").glob("*_log.out"))
    assert "checkpoint requested" in log and "Requeued job" in log
    _assert_complete(run_dir, steps)

    # The same cell, uninterrupted, in-process.
    cfg = grid.cells("tiny", precisions=["fp8"], global_steps=steps)[cell]
    ref_dir = tmp_path / "ref"
    toyrun.run_cell(cfg, ref_dir)
    assert _metrics(run_dir) == _metrics(ref_dir)
