"""Rank/role derivation for multi-node cell jobs (slurm.topology), fed by submitit's real
JobEnvironment parsing of Slurm's environment variables."""

from __future__ import annotations

import pytest
import submitit

from slurm.resources import Resources
from slurm.topology import PORT_BASE, PORT_SPAN, SERVER_PORT, TaskInfo, master_port, plan

PAPER = Resources(train_nodes=2, rollout_nodes=2, gpus_per_node=8, servers_per_node=2, server_tp=4)
HOSTS = ("gpu1", "gpu2", "gpu3", "gpu4")


def _task(node: int, local_rank: int, res: Resources = PAPER, job_id: str = "4242") -> TaskInfo:
    per = res.tasks_per_node
    return TaskInfo(
        job_id=job_id,
        global_rank=node * per + local_rank,
        local_rank=local_rank,
        num_tasks=res.nodes * per,
        num_nodes=res.nodes,
        node=node,
        hostnames=HOSTS[: res.nodes],
    )


def test_training_ranks_cover_the_training_nodes_in_order():
    envs = [plan(_task(n, r), PAPER).dist_env for n in (0, 1) for r in range(8)]
    assert [int(e["RANK"]) for e in envs] == list(range(16))
    assert {e["WORLD_SIZE"] for e in envs} == {"16"} and {e["MASTER_ADDR"] for e in envs} == {"gpu1"}
    assert {e["LOCAL_WORLD_SIZE"] for e in envs} == {"8"}
    assert [e["LOCAL_RANK"] for e in envs[8:]] == [str(r) for r in range(8)]
    assert len({e["MASTER_PORT"] for e in envs}) == 1
    drivers = [plan(_task(n, r), PAPER).is_driver for n in (0, 1) for r in range(8)]
    assert drivers == [True] + [False] * 15


def test_rollout_nodes_own_servers_on_local_rank_zero():
    p0 = plan(_task(2, 0), PAPER)
    p1 = plan(_task(3, 5), PAPER)
    assert p0.role == p1.role == "rollout" and p0.dist_env == {}
    assert p0.owns_servers and not p1.owns_servers and p0.server_host == "gpu3"
    urls = (
        f"http://gpu3:{SERVER_PORT}",
        f"http://gpu3:{SERVER_PORT + 1}",
        f"http://gpu4:{SERVER_PORT}",
        f"http://gpu4:{SERVER_PORT + 1}",
    )
    assert p0.server_urls == urls and plan(_task(0, 0), PAPER).server_urls == urls


def test_layout_mismatch_is_refused_with_numbers():
    t = _task(0, 0)
    bad = TaskInfo(**{**t.__dict__, "num_tasks": 8})
    with pytest.raises(RuntimeError, match=r"8 tasks, expected 4 nodes .*2 train \+ 2 rollout.* x 8 tasks"):
        plan(bad, PAPER)


def test_master_port_is_deterministic_and_in_range():
    assert master_port("4242") == master_port("4242") == PORT_BASE + 4242 % PORT_SPAN
    assert master_port("17_3") != master_port("17_4")
    assert PORT_BASE <= master_port("local") < PORT_BASE + PORT_SPAN


def test_submitit_job_environment_from_slurm_variables(monkeypatch):
    """What a task on node 2 of a 4-node job sees (variables as Slurm sets them)."""
    env = {
        "SUBMITIT_EXECUTOR": "slurm",
        "SLURM_JOB_ID": "777",
        "SLURM_NTASKS": "32",
        "SLURM_JOB_NUM_NODES": "4",
        "SLURM_NODEID": "2",
        "SLURM_PROCID": "17",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_NODELIST": "gpu[1-4]",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    task = TaskInfo.from_job_environment(submitit.JobEnvironment())
    assert task == TaskInfo(
        job_id="777", global_rank=17, local_rank=1, num_tasks=32, num_nodes=4, node=2, hostnames=HOSTS
    )
    p = plan(task, PAPER)
    assert p.role == "rollout" and not p.owns_servers and p.server_host == "gpu3"
    monkeypatch.setenv("SLURM_NODEID", "1")
    monkeypatch.setenv("SLURM_PROCID", "9")
    p = plan(TaskInfo.from_job_environment(submitit.JobEnvironment()), PAPER)
    assert (
        p.dist_env["RANK"] == "9"
        and p.dist_env["MASTER_ADDR"] == "gpu1"
        and p.dist_env["MASTER_PORT"] == str(master_port("777"))
    )


def test_cpu_job_is_one_training_task():
    res = Resources(train_nodes=1)
    p = plan(TaskInfo.single("5"), res)
    assert p.role == "train" and p.is_driver and p.server_urls == ()
    assert p.dist_env["WORLD_SIZE"] == "1" and p.dist_env["RANK"] == "0"
