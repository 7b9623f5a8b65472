"""Slurm resources per cell kind: one table, overridable by `python -m slurm.submit` flags.

A cluster job for one RL cell holds two kinds of nodes (DESIGN.md, cluster mode):
- training nodes, one task per GPU, running megatron-core (ranks from the Slurm environment);
- rollout nodes running SGLang servers with routing capture (`--enable-return-routed-experts`),
  `servers_per_node` servers of `server_tp` GPUs each, started by the job (slurm.servers).
Slurm jobs are homogeneous, so every node gets `gpus_per_node` tasks; on rollout nodes the task
with local rank 0 owns the servers and the others wait (slurm.topology).

The paper does not publish its cluster layout; the `paper` rows are our choice for
Qwen3-30B-A3B (bf16 weights ~61 GB; fp32 Adam state ~360 GB spread over 16 x 80 GB GPUs) and are
marked "not published". The `tiny` rows run the embedded zoo on CPUs.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

from experiments.grid import Preset  # the presets are the grid's

CellKind = Literal["rl", "static"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Resources:
    """What one cell's job asks Slurm for."""

    train_nodes: int
    """Nodes running the training engine (megatron-core), one task per GPU (or one task on CPU)."""
    rollout_nodes: int = 0
    """Nodes running SGLang servers; 0 when the rollout engine runs in-process (`hf`)."""
    gpus_per_node: int = 0
    """GPUs per node (0: a CPU job)."""
    cpus_per_task: int = 2
    """CPU cores per task."""
    mem_gb: int | None = None
    """Memory per node in GB (None: the partition's default)."""
    time_min: int = 60
    """Wall-clock limit of one job in minutes; longer runs requeue themselves from a checkpoint."""
    servers_per_node: int = 0
    """SGLang servers per rollout node."""
    server_tp: int = 1
    """Tensor-parallel size of each SGLang server (GPUs per server)."""
    gpu_mem_gb: int = 80
    """Memory of one GPU in GB (the memory plan, r3.engines.megatron.memory, must fit in it)."""
    cpu_tasks_per_node: int = 1
    """Tasks per node of a CPU job (gpus_per_node = 0): several gloo training ranks per node
    (experiments.distributed); GPU jobs always run one task per GPU."""

    def __post_init__(self) -> None:
        errors = []
        if self.train_nodes < 1:
            errors.append(f"train_nodes must be >= 1, got {self.train_nodes}")
        if self.rollout_nodes < 0:
            errors.append(f"rollout_nodes must be >= 0, got {self.rollout_nodes}")
        if self.rollout_nodes and self.servers_per_node * self.server_tp > self.gpus_per_node:
            errors.append(
                f"{self.servers_per_node} servers x tp {self.server_tp} need "
                f"{self.servers_per_node * self.server_tp} GPUs per rollout node, but gpus_per_node is "
                f"{self.gpus_per_node}; lower --servers-per-node/--server-tp or raise --gpus-per-node"
            )
        if self.rollout_nodes and self.servers_per_node < 1:
            errors.append(f"rollout nodes need servers_per_node >= 1, got {self.servers_per_node}")
        if self.cpu_tasks_per_node < 1:
            errors.append(f"cpu_tasks_per_node must be >= 1, got {self.cpu_tasks_per_node}")
        if self.time_min < 1:
            errors.append(f"time_min must be >= 1, got {self.time_min}")
        if errors:
            raise ValueError("invalid Resources: " + "; ".join(errors))

    @property
    def nodes(self) -> int:
        return self.train_nodes + self.rollout_nodes

    @property
    def tasks_per_node(self) -> int:
        """One task per GPU (megatron's one process per device); cpu_tasks_per_node on a CPU job."""
        return self.gpus_per_node if self.gpus_per_node > 0 else self.cpu_tasks_per_node

    def replace(self, **changes) -> "Resources":
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


# The table. Keys: (preset, cell kind).
RESOURCES: dict[tuple[Preset, CellKind], Resources] = {
    # Not published: 2 training nodes (EP 8 x DP 2 for the 128 experts) + 2 rollout nodes with
    # two TP-4 SGLang servers each. 180 global steps do not fit one job: requeue resumes.
    ("paper", "rl"): Resources(
        train_nodes=2, rollout_nodes=2, gpus_per_node=8, cpus_per_task=12, mem_gb=0,
        time_min=24 * 60, servers_per_node=2, server_tp=4,
    ),
    # Static mismatch (not published): one rollout node with two TP-4 SGLang servers, the MoE model
    # (Qwen3-30B-A3B, ~61 GB bf16) on GPUs 0-3 and the dense control (Qwen3-8B, ~16 GB) on 4-7
    # (slurm.job.static_server_models); one training node recomputes with megatron (bf16, EP 8).
    ("paper", "static"): Resources(
        train_nodes=1, rollout_nodes=1, gpus_per_node=8, cpus_per_task=12, mem_gb=0,
        time_min=4 * 60, servers_per_node=2, server_tp=4,
    ),
    # The embedded zoo: in-process bf16/fp8 rollout and fp32 training on CPU cores.
    ("tiny", "rl"): Resources(train_nodes=1, cpus_per_task=2, mem_gb=8, time_min=120),
    ("tiny", "static"): Resources(train_nodes=1, cpus_per_task=2, mem_gb=8, time_min=60),
}  # fmt: skip
# mem_gb=0 asks Slurm for all the memory of each node (sbatch --mem=0).


PROMPT_TOKENS = 1024
"""Prompt length assumed by the memory plan (sequence = prompt + max_new_tokens): a RunConfig
does not bound prompts; math prompts in the paper's pools are far shorter."""


def resources_for(preset: Preset, kind: CellKind) -> Resources:
    try:
        return RESOURCES[(preset, kind)]
    except KeyError:
        raise ValueError(
            f"no resources for preset {preset!r}, cell kind {kind!r}; known: {sorted(RESOURCES)}"
        ) from None


_TIME = re.compile(r"^(?:(?P<d>\d+)-)?(?P<a>\d+)(?::(?P<b>\d+))?(?::(?P<c>\d+))?$")


def parse_time_min(text: str) -> int:
    """Slurm time formats -> minutes: `90`, `MM:SS`, `HH:MM:SS`, `D-HH`, `D-HH:MM`, `D-HH:MM:SS`.

    Seconds round up (Slurm's own rule), so `0:30` is 1 minute.
    """
    m = _TIME.match(text.strip())
    if not m:
        raise ValueError(f"--time {text!r} is not a Slurm time (e.g. 90, 2:00:00, 1-12:00:00)")
    d, a, b, c = (int(x) if x is not None else None for x in m.group("d", "a", "b", "c"))
    if d is not None:  # D-HH[:MM[:SS]]
        secs = d * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:  # HH:MM:SS
        secs = a * 3600 + b * 60 + c
    elif b is not None:  # MM:SS
        secs = a * 60 + b
    else:  # minutes
        secs = a * 60
    if secs <= 0:
        raise ValueError(f"--time {text!r} must be positive")
    return -(-secs // 60)
