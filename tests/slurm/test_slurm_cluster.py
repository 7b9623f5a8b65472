"""End to end on a real one-node Slurm cluster (fixture in conftest.py): submission through
`python -m slurm.submit`, a job array of two cells, and preemption -> requeue -> resume.

Job bodies: the real `experiments.run.run_cell` on the micro zoo (a 2-layer model built once
per module, ~1 min), and tests/slurm/toyrun.py, a deterministic resumable stand-in with the same
signature and run-directory files whose steps take a fixed time (so a signal lands mid-run)."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments import grid
from r3 import rundir as state

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # the jobs import the toy body as tests.slurm.toyrun from the repo root
    sys.path.insert(0, str(REPO))
toyrun = importlib.import_module("tests.slurm.toyrun")
TOY = "tests.slurm.toyrun:run_cell"
REAL = "experiments.run:run_cell"
# The real loop at its smallest: 2 prompts x 2 samples, 16 new tokens, no dynamic sampling (the
# micro zoo solves nothing, so every group would be dropped), eval on 2 problems.
SMALL = {
    "prompts_per_step": 2,
    "group_size": 2,
    "max_new_tokens": 16,
    "dynamic_sampling": False,
    "eval_max_problems": 2,
    "checkpoint_every": 2,
    "eval_every": 4,
}


# `micro_zoo` (tests/conftest.py) is shared with tests/experiments: built once per session.


def _overrides(d: dict) -> list[str]:
    return [x for k, v in d.items() for x in ("--override", f"{k}={json.dumps(v)}")]


def _submit(cluster, runs: Path, cells: str, *extra: str, body: str = TOY) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "slurm.submit",
        "--preset",
        "tiny",
        "--cells",
        cells,
        "--precisions",
        "fp8",
        "--no-static",
        "--runs",
        str(runs),
        "--body",
        body,
        "--cpus-per-task",
        "1",
        "--mem-gb",
        "2",
        *extra,
    ]
    return subprocess.run(cmd, env=cluster.env, capture_output=True, text=True, cwd=REPO, timeout=300)


def _metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time" and not k.startswith("time/")} for r in rows]


def _assert_complete(run_dir: Path, steps: int) -> None:
    assert state.run_status(run_dir).state == state.RunState.COMPLETE, sorted(p.name for p in run_dir.iterdir())
    assert [r["step"] for r in _metrics(run_dir)] == list(range(1, steps + 1))  # no gap, no repeat
    assert json.loads((run_dir / "config.json").read_text())["global_steps"] == steps
    assert any((run_dir / "checkpoints").glob("step_*/COMPLETE"))
    assert not (run_dir / state.RUNNING).exists() and not (run_dir / state.FAILED).exists()
    logs = list((run_dir / "slurm").glob("*_log.out"))
    assert logs and "Job completed successfully" in logs[-1].read_text()


@pytest.mark.slow
def test_two_real_cells_complete_as_a_job_array(slurm_cluster, micro_zoo, tmp_path):
    runs, cells = tmp_path / "runs", "sft-single-grpo,sft-single-grpo-r3"
    extra = _overrides({**SMALL, "global_steps": 2, "model_path": str(micro_zoo / "sft")})
    p = _submit(slurm_cluster, runs, cells, *extra, "--wait", "--wait-timeout", "240", body=REAL)
    assert p.returncode == 0, p.stdout + p.stderr + slurm_cluster.logs()
    for cell in cells.split(","):
        _assert_complete(runs / cell, 2)
        job = json.loads((runs / cell / state.JOB_JSON).read_text())
        assert "_" in job["job_id"]  # one array task per cell
        evals = [json.loads(x)["step"] for x in (runs / cell / "eval.jsonl").read_text().splitlines()]
        assert evals[0] == 0 and evals == sorted(set(evals))
        assert (runs / cell / "log.txt").exists()
    assert json.loads((runs / "sft-single-grpo-r3" / "config.json").read_text())["replay"] is True
    # Complete cells are skipped on resubmission.
    again = _submit(slurm_cluster, runs, cells, *extra, body=REAL)
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


@pytest.mark.parametrize("body", ["toy", pytest.param("real", marks=pytest.mark.slow)])
def test_preempted_job_requeues_and_ends_with_uninterrupted_metrics(slurm_cluster, tmp_path, request, body):
    runs, cell = tmp_path / "runs", "sft-single-grpo-tis"
    if body == "toy":
        steps, signal_at, over = 30, 7, {"global_steps": 30}  # 0.3 s steps, checkpoints every 5
    else:
        zoo_dir = request.getfixturevalue("micro_zoo")
        steps, signal_at = 8, 3  # checkpoints every 2 steps
        over = {**SMALL, "global_steps": steps, "model_path": str(zoo_dir / "sft")}
    p = _submit(slurm_cluster, runs, cell, *_overrides(over), "--no-array", body=TOY if body == "toy" else REAL)
    assert p.returncode == 0, p.stdout + p.stderr
    run_dir = runs / cell
    job_id = json.loads((run_dir / state.JOB_JSON).read_text())["job_id"]
    metrics = run_dir / "metrics.jsonl"
    # Mid-run (after a checkpoint, before the end): preempt the way submitit's own
    # SlurmJob._interrupt does: SIGTERM, then the preemption signal SIGUSR2, to the job's steps.
    _wait(
        lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= signal_at,
        120,
        f"step {signal_at}",
        slurm_cluster,
    )
    slurm_cluster.run(["scancel", "--signal", "TERM", job_id])
    slurm_cluster.run(["scancel", "--signal", "USR2", job_id])
    assert len(metrics.read_text().splitlines()) < steps, "the run ended before the signal: lengthen it"

    # The requeued job waits cred_expire + 1 s (10 + 1 in the local cluster), then runs again.
    def _restarts() -> int:
        out = slurm_cluster.run(["scontrol", "show", "job", job_id], check=False)
        return int(out.split("Restarts=")[1].split()[0]) if "Restarts=" in out else 0

    _wait(
        lambda: not slurm_cluster.run(["squeue", "-h", "-j", job_id], check=False).strip(),
        120,
        "the requeued job to finish",
        slurm_cluster,
    )
    assert _restarts() == 1
    log = "".join(p.read_text() for p in (run_dir / "slurm").glob("*_log.out"))
    assert "checkpoint requested" in log and "Requeued job" in log
    _assert_complete(run_dir, steps)

    # The same cell, uninterrupted, in-process.
    cfg = grid.cells("tiny", precisions=["fp8"], pattern=cell, **over)[cell]
    ref_dir = tmp_path / "ref"
    if body == "toy":
        toyrun.STEP_S, step_s = 0.0, toyrun.STEP_S  # same numbers, no waiting
        try:
            toyrun.run_cell(cfg, ref_dir)
        finally:
            toyrun.STEP_S = step_s
        assert _metrics(run_dir) == _metrics(ref_dir)
    else:
        from experiments.run import run_cell

        run_cell(cfg, ref_dir, progress=False)
        got, want = _metrics(run_dir), _metrics(ref_dir)
        assert [r["step"] for r in got] == [r["step"] for r in want]
        for g, w in zip(got, want):
            assert g.keys() == w.keys() and g == pytest.approx(w, rel=1e-5, abs=1e-7), g["step"]
