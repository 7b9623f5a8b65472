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
from slurm import state

pytestmark = [pytest.mark.distributed, pytest.mark.slurm, pytest.mark.megatron]
REPO = Path(__file__).resolve().parents[2]
CELL = "sft-single-grpo-r3"
OVER = {"prompts_per_step": 2, "group_size": 2, "max_new_tokens": 12, "dynamic_sampling": False,
        "eval_max_problems": 2, "eval_every": 3, "checkpoint_every": 2, "global_steps": 3,
        "train_engine": "megatron", "train_expert_parallel": 2}


def test_two_slurm_tasks_train_one_cell(slurm_cluster, micro_zoo, tmp_path):
    pytest.importorskip("megatron.core")
    runs = tmp_path / "runs"
    over = {**OVER, "model_path": str(micro_zoo / "sft")}
    cmd = [sys.executable, "-m", "slurm.submit", "--preset", "tiny", "--cells", CELL, "--precisions", "fp8",
           "--no-static", "--no-array", "--runs", str(runs), "--cpus-per-task", "1", "--mem-gb", "4",
           "--cpu-tasks-per-node", "2", "--wait", "--wait-timeout", "300",
           *[x for k, v in over.items() for x in ("--override", f"{k}={json.dumps(v)}")]]
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
        for k in ("rollout/reward_mean", "rollout/response_len_mean", "mismatch/k3_kl", "actor/entropy",
                  "routing/pair_disagreement"):
            assert g[k] == pytest.approx(w[k], rel=1e-5, abs=1e-7), (g["step"], k)
