"""Worker of test_distributed_driver.py: experiments.distributed's driver/follower protocol with a
stand-in engine (no megatron). Rank 0 drives; the others follow. Writes rank 0's observations."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from experiments.distributed import DriverEngine, follow


class Engine:
    """Records every call with a digest of its tensor argument; load() fails on rank 1."""

    is_moe = True
    device = torch.device("cpu")

    def __init__(self):
        self.calls = []

    def compute_logprobs(self, batch, *, routing=None, with_entropy=False):
        self.calls.append(["compute_logprobs", float(batch.sum()), str(routing), with_entropy])
        return batch * 2

    def train_step(self, batch, loss_fn, *, routing=None):
        loss, _ = loss_fn(batch, None, slice(0, 2))
        self.calls.append(["train_step", float(loss)])
        return {"loss": loss}

    def rollout_state_dict(self):
        self.calls.append(["rollout_state_dict"])
        return {"w": torch.ones(2)}

    def save(self, path):
        self.calls.append(["save", path])

    def load(self, path):
        self.calls.append(["load", path])
        if dist.get_rank() == 1:
            raise FileNotFoundError(f"no shard for rank 1 in {path}")


def main() -> None:
    dist.init_process_group("gloo")
    eng = Engine()
    if dist.get_rank() != 0:
        follow(eng)
        calls = [None] * dist.get_world_size()
        dist.all_gather_object(calls, eng.calls)
        dist.destroy_process_group()  # a process leaving gloo without it may abort at exit
        return
    driver = DriverEngine(eng)
    weight = torch.tensor([3.0, 4.0])
    out = {"logp": driver.compute_logprobs(torch.arange(4.0), routing="REPLAY", with_entropy=True).tolist()}
    out["metrics"] = float(driver.train_step(torch.ones(2), lambda x, e, rows: ((x * weight).sum(), {}))["loss"])
    driver.save("/ckpt/step_1")
    try:
        driver.load("/ckpt/step_1")
    except RuntimeError as e:
        out["load_error"] = str(e)
    driver.rollout_state_dict()
    driver.close()
    calls = [None] * dist.get_world_size()
    dist.all_gather_object(calls, eng.calls)
    out["calls"] = calls
    with open(sys.argv[1], "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
