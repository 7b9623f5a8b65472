"""Worker launched by tests/distributed under `torch.distributed.run` (1 or 2 gloo ranks).

    python -m torch.distributed.run --nproc-per-node N tests/distributed/dist_worker.py \
        --model DIR --out OUT_DIR --layouts ep2:2:1:allgather,tp2:1:2:allgather

Builds the megatron train engine from the tiny Qwen3-MoE in DIR with the given expert-parallel
size (DP = world size / TP / PP), and on one fixed global batch of B = 5 sequences (uneven over
two DP ranks, so the padding path runs) computes: logits; logprobs with native routing, recorded
routing, and a forced routing trace (REPLAY); one train_step with a fixed loss; the weights after
it (rollout_state_dict, experts gathered over EP); once with fp32 parameters and AdamW, once
with bf16 parameters, megatron's DDP (fp32 main grads) and distributed optimizer, two engines in
one process. Each rank also checks that the routing it was
given to replay is exactly the rows of its own DP slice, in megatron's seq-major order. Rank 0
writes everything to --out.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from r3.engines.base import TrainBatch
from r3.engines.megatron import parallel
from r3.engines.megatron.model import gpt_logits
from r3.engines.megatron.replay import to_megatron_layout
from r3.engines.megatron.train import MegatronTrainEngine
from r3.replay import ReplayMode
from r3.trace import RoutingSpec

B, S = 5, 9


def global_batch(spec: RoutingSpec) -> tuple[TrainBatch, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 64, (B, S), generator=g)
    am = torch.ones(B, S, dtype=torch.long)
    am[1, 6:] = 0  # one right-padded row
    ids[1, 6:] = 0
    loss_mask = am[:, 1:].float()
    loss_mask[:, :3] = 0  # the "prompt"
    forced = torch.stack(
        [torch.randperm(spec.num_experts, generator=g)[: spec.top_k] for _ in range(B * (S - 1) * spec.num_layers)]
    ).view(B, S - 1, spec.num_layers, spec.top_k)
    adv = torch.linspace(-1.0, 1.0, B)
    return TrainBatch(input_ids_BS=ids, attention_mask_BS=am, loss_mask_BT=loss_mask, expert_ids_BTLK=forced), adv


def run(model: str, ep: int, tp: int, micro_batch: int, precision: str, dispatcher: str | None = None) -> dict:
    eng = MegatronTrainEngine(
        model,
        lr=1e-3,
        micro_batch=micro_batch,
        expert_parallel=ep,
        tensor_parallel=tp,
        precision=precision,
        token_dispatcher=dispatcher,
    )
    batch, adv = global_batch(eng.spec)
    out: dict = {"layout": eng.layout.describe(), "world": dist.get_world_size()}

    local, start, real = eng._local(batch)
    with torch.no_grad():
        logits = gpt_logits(eng.model.eval(), local.input_ids_BS)[:, :S]  # without SP padding positions
    out["logits"] = parallel.gather_rows(logits, real, B, eng.dp_size)
    out["logp_off"] = eng.compute_logprobs(batch, routing=ReplayMode.OFF).logp_BT
    out["recorded"] = eng.compute_logprobs(batch, routing=ReplayMode.RECORD).expert_ids_BTLK

    # each rank must be handed exactly its own rows to replay (per layer, seq-major)
    given: list[list[torch.Tensor]] = []
    for layer, inst in enumerate(eng.replay._instances):
        orig = inst.set_target_indices

        def spy(ids_NK, _orig=orig, _layer=layer):
            given.append([_layer, ids_NK.clone()])
            return _orig(ids_NK)

        inst.set_target_indices = spy
    out["logp_replay"] = eng.compute_logprobs(batch, routing=ReplayMode.REPLAY).logp_BT
    own = []  # this rank's rows: its DP slice, and under sequence parallelism its sequence slice
    for rows in eng._row_slices(local.input_ids_BS.shape[0]):
        layers = to_megatron_layout(local.expert_ids_BTLK[rows], seq_len=local.input_ids_BS.shape[1], spec=eng.spec)
        n = layers[0].shape[0] // eng.tp_size
        own += [x[eng.tp_rank * n : (eng.tp_rank + 1) * n] for x in layers]
    ok = len(given) == len(own) and all(torch.equal(g[1], o) for g, o in zip(given, own))
    flags = [None] * dist.get_world_size()
    dist.all_gather_object(
        flags,
        {"rank": dist.get_rank(), "rows": (start, start + real), "own_rows_replayed": ok, "layers_set": len(given)},
    )
    out["per_rank"] = flags

    n_tok = batch.loss_mask_BT.sum()

    def loss_fn(logp_BT, entropy_BT, rows):
        m = batch.loss_mask_BT[rows]
        loss = -(adv[rows, None] * logp_BT * m).sum() / n_tok
        return loss, {
            # normalised by the whole batch (LossFn): the engine sums metrics over micro-batches and ranks
            "test/logp_mean": (logp_BT * m).sum() / n_tok,
            "test/entropy_mean": (entropy_BT * m).sum() / n_tok,
        }

    metrics = eng.train_step(batch, loss_fn, routing=ReplayMode.REPLAY)
    out["metrics"] = {k: float(v) for k, v in metrics.items()}
    out["weights"] = eng.rollout_state_dict()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True, help="a directory: <name>.pt per layout")
    ap.add_argument(
        "--layouts",
        required=True,
        help="comma-separated name:ep:tp:dispatcher, run one after the other in this process",
    )
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--precisions", default="fp32,bf16")
    args = ap.parse_args()
    from megatron.core import parallel_state

    for layout in args.layouts.split(","):
        name, ep, tp, dispatcher = layout.split(":")
        out = {
            prec: run(args.model, int(ep), int(tp), args.micro_batch, prec, dispatcher)
            for prec in args.precisions.split(",")
        }
        if dist.get_rank() == 0:
            torch.save(out, f"{args.out}/{name}.pt")
        dist.barrier()
        parallel_state.destroy_model_parallel()  # the next layout builds its own groups
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
