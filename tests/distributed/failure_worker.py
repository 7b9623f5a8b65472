"""Worker of test_distributed_failures.py: one failure of experiments.distributed's driver/follower
protocol on 2 ranks started as srun starts tasks (tests/distributed/dist_helpers.spawn_ranks).

    python tests/distributed/failure_worker.py SCENARIO RUN_DIR    (RANK/WORLD_SIZE/... set)

Scenarios (rank 0 drives, rank 1 follows a stand-in engine whose calls run a collective, as
megatron's EP gathers and DP all-reduces do):
- recv_fails:    rank 1 cannot unpickle a call's arguments (a module only rank 0 has);
- driver_exit:   rank 0 raises SystemExit inside a call (submitit's requeue on preemption), before
                 joining the collective rank 1 waits in;
- follower_dies: rank 1's process ends (os._exit) inside a call, while rank 0 waits in its collective;
- follower_hangs: rank 1 stops answering inside a call (as a dead peer looks to NCCL, which, unlike
                 gloo, does not see its connection close), while rank 0 waits in its collective;
- driver_dies:   rank 0's process ends between calls, while rank 1 waits for the next one.
Every rank prints `rank R: returned` or `rank R: raised ...` as its last line.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from experiments import distributed


def _only_on_rank_0():
    if dist.get_rank() != 0:
        raise ModuleNotFoundError("No module named 'only_on_rank_0'")
    return "arguments"


class Poison:
    """Unpickles on rank 0 only (as an object of a module that only rank 0 can import)."""

    def __reduce__(self):
        return (_only_on_rank_0, ())


class Engine:
    is_moe = True
    device = torch.device("cpu")

    def __init__(self, scenario: str) -> None:
        self.scenario = scenario

    def compute_logprobs(self, batch, *args, **kwargs):
        if self.scenario == "follower_dies" and dist.get_rank() == 1:
            os._exit(7)
        if self.scenario == "follower_hangs" and dist.get_rank() == 1:
            time.sleep(3600)
        dist.all_reduce(batch)  # on the default group, like the engine's own collectives
        return batch

    def train_step(self, batch, loss_fn, **kwargs):
        if self.scenario == "driver_exit" and dist.get_rank() == 0:
            raise SystemExit(-1)  # submitit's JobEnvironment._exit after `scontrol requeue`
        dist.all_reduce(batch)
        return {"loss": float(batch.sum())}

    def rollout_state_dict(self):
        return {}

    def save(self, path):
        pass

    def load(self, path):
        pass


def body(driver, scenario: str):
    driver.compute_logprobs(torch.ones(3))  # one call that works
    if scenario == "recv_fails":
        driver.compute_logprobs(torch.ones(3), Poison())
    elif scenario == "driver_exit":
        driver.train_step(torch.ones(3), None)
    elif scenario in ("follower_dies", "follower_hangs"):
        driver.compute_logprobs(torch.ones(3))
    elif scenario == "driver_dies":
        time.sleep(1.0)  # the follower is waiting for the next call
        os._exit(9)
    return "done"


def main() -> None:
    scenario, run_dir = sys.argv[1], Path(sys.argv[2])
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    distributed._init_process_group()
    rank = dist.get_rank()
    try:
        distributed.drive(run_dir, Engine(scenario), lambda d: body(d, scenario))
    except BaseException as e:
        print(f"rank {rank}: raised {type(e).__name__}: {e}", flush=True)
        raise
    finally:
        distributed._shutdown()
    print(f"rank {rank}: returned", flush=True)


if __name__ == "__main__":
    main()
