"""Worker of test_distributed_fewrows.py under `torch.distributed.run` (1 or 2 gloo ranks, DP = world).

    python -m torch.distributed.run --nproc-per-node 2 tests/distributed/fewrows_worker.py --model DIR --out OUT

Mini-batches of 1 and 3 rows on DP = 2 (the 1-row post-sync probe; a dynamic-sampling step that
kept fewer rows than there are ranks, or an odd count): logprobs under native, recorded and
forced routing, and one train_step, on a fresh engine per batch size. Rank 0 writes
OUT/world<N>.pt; the test compares 2 ranks with 1.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from r3.engines.base import TrainBatch
from r3.engines.megatron.train import MegatronTrainEngine
from r3.replay import ReplayMode

S = 9


def batch_of(n: int, spec) -> TrainBatch:
    g = torch.Generator().manual_seed(n)
    ids = torch.randint(3, 64, (n, S), generator=g)
    am = torch.ones(n, S, dtype=torch.long)
    mask = am[:, 1:].float()
    mask[:, :3] = 0
    forced = torch.stack(
        [torch.randperm(spec.num_experts, generator=g)[: spec.top_k] for _ in range(n * (S - 1) * spec.num_layers)]
    ).view(n, S - 1, spec.num_layers, spec.top_k)
    return TrainBatch(
        input_ids_BS=ids, attention_mask_BS=am, loss_mask_BT=mask, expert_ids_BTLK=forced, temperature=0.7
    )


def run(model: str, n: int) -> dict:
    eng = MegatronTrainEngine(model, lr=1e-3, micro_batch=1)
    batch = batch_of(n, eng.spec)
    out = {"dp": eng.dp_size}
    for mode in (ReplayMode.OFF, ReplayMode.RECORD, ReplayMode.REPLAY):
        res = eng.compute_logprobs(batch, routing=mode, with_entropy=True)
        out[f"logp_{mode.name}"] = res.logp_BT
        out[f"entropy_{mode.name}"] = res.entropy_BT
        if mode is ReplayMode.RECORD:
            out["recorded"] = res.expert_ids_BTLK
    adv = torch.linspace(-1.0, 1.0, n) if n > 1 else torch.ones(1)
    n_tok = batch.loss_mask_BT.sum()

    def loss_fn(logp_BT, entropy_BT, rows):
        m = batch.loss_mask_BT[rows]
        return -(adv[rows, None] * logp_BT * m).sum() / n_tok, {"test/logp_mean": (logp_BT * m).sum() / n_tok}

    out["metrics"] = {k: float(v) for k, v in eng.train_step(batch, loss_fn, routing=ReplayMode.REPLAY).items()}
    out["weights"] = eng.rollout_state_dict()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from megatron.core import parallel_state

    res = {}
    for n in (1, 3):
        res[n] = run(args.model, n)
        parallel_state.destroy_model_parallel()
    if dist.get_rank() == 0:
        torch.save(res, f"{args.out}/world{dist.get_world_size()}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
