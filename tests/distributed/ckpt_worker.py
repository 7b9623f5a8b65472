"""Worker of test_distributed_checkpoint.py under `torch.distributed.run` (4 gloo ranks: EP = 2 x
expert-DP 2, dense DP 4; bf16 with the distributed optimizer, or fp32).

    python -m torch.distributed.run --nproc-per-node 4 tests/distributed/ckpt_worker.py --model DIR --out OUT
        [--precision bf16]

One train step, a checkpoint, a second step (the reference); then a fresh engine loads the checkpoint
and takes the second step again. Each rank writes OUT/rank<r>.pt: the names of the weights in its
checkpoint file, whether its rollout_state_dict held the model, the weights after both second steps.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from r3.engines.base import TrainBatch
from r3.engines.megatron.train import MegatronTrainEngine
from r3.replay import ReplayMode

S = 9


def _batch(seed: int) -> TrainBatch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (8, S), generator=g)
    am = torch.ones(8, S, dtype=torch.long)
    return TrainBatch(input_ids_BS=ids, attention_mask_BS=am, loss_mask_BT=am[:, 1:].float())


def _loss(logp_BT, entropy_BT, rows):
    return -logp_BT.sum() / (8 * (S - 1)), {}


def _weights(eng) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().clone() for k, v in eng.model.state_dict().items() if isinstance(v, torch.Tensor)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--precision", default="fp32")
    args = ap.parse_args()
    kw = dict(lr=1e-3, micro_batch=2, expert_parallel=2, precision=args.precision, seed=0)
    eng = MegatronTrainEngine(args.model, **kw)
    eng.train_step(_batch(0), _loss, routing=ReplayMode.OFF)
    ckpt = f"{args.out}/ckpt"
    eng.save(ckpt)
    dist.barrier()
    rank = dist.get_rank()
    saved = sorted(torch.load(eng.checkpoint_file(ckpt), weights_only=True)["model"])
    sd = eng.rollout_state_dict()
    eng.train_step(_batch(1), _loss, routing=ReplayMode.OFF)
    ref = _weights(eng)
    del eng
    again = MegatronTrainEngine(args.model, **kw)
    again.load(ckpt)
    again.train_step(_batch(1), _loss, routing=ReplayMode.OFF)
    out = {"saved": saved, "synced": sorted(sd), "ref": ref, "resumed": _weights(again), "steps": again.steps}
    torch.save(out, f"{args.out}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
