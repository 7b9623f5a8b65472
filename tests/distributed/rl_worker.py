"""Worker of tests/distributed/test_distributed_rl.py: one RL cell through experiments.distributed.

    python -m torch.distributed.run --nproc-per-node N tests/distributed/rl_worker.py CONFIG.json RUN_DIR

Rank 0 drives (rollout, grading, files), the others follow its train engine. The reward is the
deterministic parity reward of tests/experiments (the micro model solves nothing).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch.distributed as dist

from experiments import distributed
from experiments.config import RunConfig


def parity_reward(texts, golds):
    return [float(len(t) % 2 == 0) for t in texts]


def main() -> None:
    cfg = RunConfig.load(Path(sys.argv[1]))
    distributed.run_cell(cfg, Path(sys.argv[2]), progress=False, reward_fn=parity_reward)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
