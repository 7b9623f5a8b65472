"""Who does what in a multi-node cell job: ranks, master address/port, rollout servers.

Input: submitit's JobEnvironment (global_rank, local_rank, num_tasks, num_nodes, node, hostnames,
job_id), read once into `TaskInfo` so everything below is a pure function that tests can feed.
Output: a `Plan` for this task: its role (`train` or `rollout`), the torch.distributed variables
for training tasks (MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE), and the
SGLang server URLs every task can compute without talking to the others.

Layout: the first `train_nodes` nodes of the job's node list train (one task per GPU, ranks in
node order); the remaining `rollout_nodes` nodes serve: on each, the task with local rank 0 starts
`servers_per_node` SGLang servers on ports `server_port + i`, using GPUs `i*tp .. i*tp+tp-1`.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Literal

from slurm.resources import Resources

Role = Literal["train", "rollout"]

# torch.distributed rendezvous port range. Derived from the job id so that two jobs sharing a
# node do not collide and every rank computes the same value without communication.
PORT_BASE, PORT_SPAN = 20000, 20000
SERVER_PORT = 30000
"""First SGLang port on a rollout node (SGLang's own default is 30000)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class TaskInfo:
    """The part of submitit's JobEnvironment a plan depends on."""

    job_id: str
    global_rank: int
    local_rank: int
    num_tasks: int
    num_nodes: int
    node: int
    hostnames: tuple[str, ...]

    @classmethod
    def from_job_environment(cls, env) -> "TaskInfo":
        """env: a submitit.JobEnvironment (slurm or local)."""
        return cls(
            job_id=str(env.job_id), global_rank=env.global_rank, local_rank=env.local_rank,
            num_tasks=env.num_tasks, num_nodes=env.num_nodes, node=env.node,
            hostnames=tuple(env.hostnames),
        )  # fmt: skip

    @classmethod
    def single(cls, job_id: str = "local") -> "TaskInfo":
        """One task on this machine (no submitit job around us)."""
        import socket

        return cls(job_id=job_id, global_rank=0, local_rank=0, num_tasks=1, num_nodes=1, node=0,
                   hostnames=(socket.gethostname(),))  # fmt: skip


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    role: Role
    dist_env: dict[str, str]
    """torch.distributed variables for training tasks (empty for rollout tasks)."""
    is_driver: bool
    """Training rank 0: writes the run directory, health-checks the servers, owns the run."""
    owns_servers: bool
    """Local rank 0 on a rollout node: starts and stops this node's SGLang servers."""
    server_urls: tuple[str, ...]
    """Every SGLang server of the job (same on every task)."""
    server_host: str | None = None
    """This node's hostname when it owns servers."""


def master_port(job_id: str) -> int:
    """A deterministic port in [PORT_BASE, PORT_BASE + PORT_SPAN) from the Slurm job id."""
    digits = "".join(ch for ch in job_id if ch.isdigit())
    key = int(digits) if digits else zlib.crc32(job_id.encode())
    return PORT_BASE + key % PORT_SPAN


def plan(task: TaskInfo, res: Resources) -> Plan:
    """This task's role and environment. Raises if the job does not match `res`."""
    expected_tasks = res.nodes * res.tasks_per_node
    if task.num_nodes != res.nodes or task.num_tasks != expected_tasks or len(task.hostnames) != res.nodes:
        raise RuntimeError(
            f"job layout does not match its resources: Slurm gave {task.num_nodes} nodes "
            f"({len(task.hostnames)} hostnames) and {task.num_tasks} tasks, expected {res.nodes} nodes "
            f"({res.train_nodes} train + {res.rollout_nodes} rollout) x {res.tasks_per_node} tasks; "
            "likely cause: sbatch flags edited by hand or a partition that changed --ntasks-per-node"
        )
    per_node = res.tasks_per_node
    train_hosts = task.hostnames[: res.train_nodes]
    rollout_hosts = task.hostnames[res.train_nodes :]
    urls = tuple(f"http://{h}:{SERVER_PORT + i}" for h in rollout_hosts for i in range(res.servers_per_node))
    if task.node < res.train_nodes:
        rank = task.node * per_node + task.local_rank
        env = {
            "MASTER_ADDR": train_hosts[0],
            "MASTER_PORT": str(master_port(task.job_id)),
            "RANK": str(rank),
            "WORLD_SIZE": str(res.train_nodes * per_node),
            "LOCAL_RANK": str(task.local_rank),
            "LOCAL_WORLD_SIZE": str(per_node),
            "NODE_RANK": str(task.node),
        }
        return Plan(role="train", dist_env=env, is_driver=rank == 0, owns_servers=False, server_urls=urls)
    return Plan(
        role="rollout", dist_env={}, is_driver=False, owns_servers=task.local_rank == 0,
        server_urls=urls, server_host=task.hostnames[task.node],
    )  # fmt: skip
