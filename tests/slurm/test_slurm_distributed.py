"""The multi-rank path under a real one-node Slurm (conftest.py here): one RL cell
submitted through `python -m slurm.submit` as ONE job of 2 CPU tasks (srun starts both; each reads
its rank from Slurm through submitit and slurm.topology). Rank 0 drives, rank 1 follows; megatron
runs EP = 2 x DP = 2 over gloo. The run directory has one metrics line per step and one checkpoint
shard per rank, and its metrics equal the same cell run in one process (the micro zoo solves
nothing, so advantages are 0 and the policy does not move: the forward numbers must agree)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import grid
from r3 import rundir as state

pytestmark = [pytest.mark.distributed, pytest.mark.slurm, pytest.mark.megatron]
REPO = Path(__file__).resolve().parents[2]
CELL = "sft-single-grpo-r3"
OVER = {
    "prompts_per_step": 2,
    "group_size": 2,
    "max_new_tokens": 12,
    "dynamic_sampling": False,
    "eval_max_problems": 2,
    "eval_every": 3,
    "checkpoint_every": 2,
    "global_steps": 3,
    "train_engine": "megatron",
    "train_expert_parallel": 2,
}


def test_two_slurm_tasks_train_one_cell(slurm_cluster, micro_zoo, tmp_path):
    pytest.importorskip("megatron.core")
    runs = tmp_path / "runs"
    over = {**OVER, "model_path": str(micro_zoo / "sft")}
    cmd = [
        sys.executable,
        "-m",
        "slurm.submit",
        "--preset",
        "tiny",
        "--cells",
        CELL,
        "--precisions",
        "fp8",
        "--no-static",
        "--no-array",
        "--runs",
        str(runs),
        "--cpus-per-task",
        "1",
        "--mem-gb",
        "4",
        "--cpu-tasks-per-node",
        "2",
        "--wait",
        "--wait-timeout",
        "300",
        *[x for k, v in over.items() for x in ("--override", f"{k}={json.dumps(v)}")],
    ]
    p = subprocess.run(cmd, env=slurm_cluster.env, capture_output=True, text=True, cwd=REPO, timeout=400)
    run_dir = runs / CELL
    assert p.returncode == 0, p.stdout + p.stderr + slurm_cluster.logs()
    assert state.run_status(run_dir).state == state.RunState.COMPLETE
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]  # one driver: one line per step
    shards = sorted(p.name for p in (run_dir / "checkpoints" / "step_3" / "train").iterdir())
    assert shards == ["megatron_train_engine.rank00000-of-00002.pt", "megatron_train_engine.rank00001-of-00002.pt"]
    logs = {p.name: p.read_text() for p in (run_dir / "slurm").glob("*_log.out")}
    assert any("task 1 -> train" in t for t in logs.values()) and any("task 0 -> train" in t for t in logs.values())

    from experiments.run import run_cell  # the same cell in this process (EP = 1)

    cfg = grid.cells("tiny", precisions=["fp8"], pattern=CELL, **{**over, "train_expert_parallel": 1})[CELL]
    run_cell(cfg, tmp_path / "ref", progress=False)
    want = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    for g, w in zip(rows, want):
        for k in (
            "rollout/reward_mean",
            "rollout/response_len_mean",
            "mismatch/k3_kl",
            "actor/entropy",
            "routing/pair_disagreement",
        ):
            assert g[k] == pytest.approx(w[k], rel=1e-5, abs=1e-7), (g["step"], k)


def _wait(cond, timeout: float, what: str, cluster):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.3)
    raise AssertionError(
        f"timed out waiting for {what}; squeue: "
        f"{cluster.run(['squeue', '-h', '-o', '%i %T %r'], check=False)!r}\n{cluster.logs()}"
    )


@pytest.mark.slow
def test_two_task_job_preempted_requeues_and_resumes_without_gap(slurm_cluster, micro_zoo, tmp_path):
    """Preemption of a 2-task job (SIGTERM + SIGUSR2 to every task, as submitit's own _interrupt):
    rank 0 requeues, both tasks restart, every rank loads its own checkpoint shard, and the final
    metrics have each step once; the steps written before the signal are reproduced."""
    pytest.importorskip("megatron.core")
    runs = tmp_path / "runs"
    steps = 6
    over = {**OVER, "global_steps": steps, "eval_every": 10, "model_path": str(micro_zoo / "sft")}
    cmd = [
        sys.executable,
        "-m",
        "slurm.submit",
        "--preset",
        "tiny",
        "--cells",
        CELL,
        "--precisions",
        "fp8",
        "--no-static",
        "--no-array",
        "--runs",
        str(runs),
        "--cpus-per-task",
        "1",
        "--mem-gb",
        "4",
        "--cpu-tasks-per-node",
        "2",
        *[x for k, v in over.items() for x in ("--override", f"{k}={json.dumps(v)}")],
    ]
    p = subprocess.run(cmd, env=slurm_cluster.env, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    run_dir = runs / CELL
    job_id = json.loads((run_dir / state.JOB_JSON).read_text())["job_id"]
    metrics = run_dir / "metrics.jsonl"
    _wait(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, 240, "step 3", slurm_cluster)
    before = [json.loads(x) for x in metrics.read_text().splitlines()]
    slurm_cluster.run(["scancel", "--signal", "TERM", job_id])
    slurm_cluster.run(["scancel", "--signal", "USR2", job_id])
    assert len(metrics.read_text().splitlines()) < steps, "the run ended before the signal: lengthen it"
    _wait(
        lambda: not slurm_cluster.run(["squeue", "-h", "-j", job_id], check=False).strip(),
        300,
        "the requeued job to finish",
        slurm_cluster,
    )
    out = slurm_cluster.run(["scontrol", "show", "job", job_id], check=False)
    assert "Restarts=1" in out, out
    assert state.run_status(run_dir).state == state.RunState.COMPLETE, sorted(p.name for p in run_dir.iterdir())
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))  # no gap, no repeat
    for b, r in zip(before, rows):  # steps redone after the resume equal the first attempt's
        for k, v in b.items():
            if not k.startswith("time"):
                assert r[k] == pytest.approx(v, rel=1e-5, abs=1e-7), (b["step"], k)
    log = "".join(p.read_text() for p in (run_dir / "slurm").glob("*_log.out"))
    assert "checkpoint requested" in log and "Requeued job" in log
    assert "resumed from checkpoint step" in (run_dir / "log.txt").read_text()
    shards = sorted(p.name for p in (run_dir / "checkpoints" / f"step_{steps}" / "train").iterdir())
    assert len(shards) == 2
