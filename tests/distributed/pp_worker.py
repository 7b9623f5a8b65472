"""Worker of tests/distributed/test_distributed_pp.py, launched under `torch.distributed.run`.

    python -m torch.distributed.run --nproc-per-node W tests/distributed/pp_worker.py \
        --model DIR --out FILE --pp N

Builds the megatron train engine from the tiny Qwen3-MoE in DIR (3 decoder layers: MoE, dense, MoE)
with pipeline_parallel = N and data parallelism W / N (N = 2: stage 0 holds layers 0-1 = MoE +
dense, stage 1 layer 2 = MoE, so stage 1's router is trace layer 1 while its only local router is
index 0), and on the fixed global batch of dist_worker.py (B = 5, S = 9, micro-batches of 2; each
DP replica's rows, under PP padded to a multiple of 2: 6 rows with DP = 1, 3 -> 4 with DP = 2)
computes: logprobs with native, recorded and forced (REPLAY) routing; entropy;
the routing each rank was handed to replay; one train_step under REPLAY (with and without activation
recompute, and with bf16 parameters, megatron's DDP and distributed optimizer); the weights after
it; a checkpoint round trip; and the error paths (a trace with the wrong layer count, stages that
claim the wrong trace layers). Rank 0 writes everything to --out.
"""

from __future__ import annotations

import argparse
import faulthandler

import torch
import torch.distributed as dist
from dist_worker import global_batch

from r3.engines.base import TrainBatch
from r3.engines.megatron.replay import to_megatron_layout
from r3.engines.megatron.train import MegatronTrainEngine
from r3.replay import ReplayMode


def _loss_fn(batch: TrainBatch, adv: torch.Tensor):
    n_tok = batch.loss_mask_BT.sum()

    def loss_fn(logp_BT, entropy_BT, rows):
        m = batch.loss_mask_BT[rows]
        loss = -(adv[rows, None] * logp_BT * m).sum() / n_tok
        return loss, {
            # normalised by the whole batch (LossFn): the engine sums metrics over micro-batches and ranks
            "test/logp_mean": (logp_BT * m).sum() / n_tok,
            "test/entropy_mean": (entropy_BT * m).sum() / n_tok,
        }

    return loss_fn


def _all(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def forward_and_errors(model: str, pp: int, ep: int = 1) -> dict:
    eng = MegatronTrainEngine(model, lr=1e-3, micro_batch=2, pipeline_parallel=pp, expert_parallel=ep)
    batch, _ = global_batch(eng.spec)
    out: dict = {"layout": eng.layout.describe(), "stage_moe_layers": eng.stage_moe_layers}
    out["logp_off"] = eng.compute_logprobs(batch, routing=ReplayMode.OFF).logp_BT
    rec = eng.compute_logprobs(batch, routing=ReplayMode.RECORD)
    out["recorded"], out["logp_record"] = rec.expert_ids_BTLK, rec.logp_BT

    # each stage must be handed exactly the rows of ITS trace layers (global MoE index), per micro-batch
    given: list[tuple[int, torch.Tensor]] = []
    for local, inst in enumerate(eng.replay._instances):
        orig = inst.set_target_indices

        def spy(ids_NK, _orig=orig, _layer=eng.replay.layers[local]):
            given.append((_layer, ids_NK.clone()))
            return _orig(ids_NK)

        inst.set_target_indices = spy
    res = eng.compute_logprobs(batch, routing=ReplayMode.REPLAY, with_entropy=True)
    out["logp_replay"], out["entropy_replay"] = res.logp_BT, res.entropy_BT
    own = []
    ids = eng._local(batch)[0].expert_ids_BTLK  # this DP rank's rows (padded to ceil(B / DP))
    if pp > 1:  # the pipeline schedule pads the rows to a multiple of the micro-batch with copies of row 0
        ids = torch.cat([ids, ids[:1].expand(-ids.shape[0] % 2, *ids.shape[1:])])
    for rows in eng._row_slices(ids.shape[0]):
        layers = to_megatron_layout(ids[rows], seq_len=batch.input_ids_BS.shape[1], spec=eng.spec)
        own += [(g, layers[g]) for g in eng.replay.layers]
    ok = len(given) == len(own) and all(a[0] == b[0] and torch.equal(a[1], b[1]) for a, b in zip(given, own))
    out["per_rank"] = _all({"rank": dist.get_rank(), "layers": [g for g, _ in given], "own_rows_replayed": ok})
    for inst in eng.replay._instances:
        del inst.set_target_indices  # the spy off again

    # the trace's layers in the other order: what a stage replaying the other stage's rows computes
    swapped = TrainBatch(**{**batch.__dict__, "expert_ids_BTLK": batch.expert_ids_BTLK.flip(2)})
    out["logp_replay_swapped"] = eng.compute_logprobs(swapped, routing=ReplayMode.REPLAY).logp_BT

    # error paths, on every rank: a trace holding one layer (e.g. one stage's rows only)
    one_layer = TrainBatch(**{**batch.__dict__, "expert_ids_BTLK": batch.expert_ids_BTLK[:, :, :1]})
    try:
        eng.compute_logprobs(one_layer, routing=ReplayMode.REPLAY)
        err = None
    except ValueError as e:
        err = str(e)
    out["one_layer_error"] = _all(err)
    if pp > 1:  # a stage that ignored its layer offset would claim trace layer 0 again
        saved = eng.replay.layers
        eng.replay.layers = [0]
        try:
            eng.replay.check_pipeline_layers()
            err = None
        except RuntimeError as e:
            err = str(e)
        eng.replay.layers = saved
        out["offset_ignored_error"] = _all(err)
    # the engine is still usable after the refused traces (sessions were closed)
    out["logp_replay_again"] = eng.compute_logprobs(batch, routing=ReplayMode.REPLAY).logp_BT
    return out


def train(model: str, pp: int, recompute: bool, ckpt: str | None, precision: str = "fp32", ep: int = 1) -> dict:
    eng = MegatronTrainEngine(
        model,
        lr=1e-3,
        micro_batch=2,
        pipeline_parallel=pp,
        expert_parallel=ep,
        recompute=recompute,
        precision=precision,
    )
    batch, adv = global_batch(eng.spec)
    metrics = eng.train_step(batch, _loss_fn(batch, adv), routing=ReplayMode.REPLAY)
    out = {"metrics": {k: float(v) for k, v in metrics.items()}, "weights": eng.rollout_state_dict()}
    out["weights_on_ranks"] = _all(len(out["weights"]))
    if ckpt is not None:  # checkpoint round trip: save, step again, load -> the saved weights
        eng.save(ckpt)
        dist.barrier()
        eng.train_step(batch, _loss_fn(batch, adv), routing=ReplayMode.REPLAY)
        eng.load(ckpt)
        after = eng.rollout_state_dict()
        out["ckpt_roundtrip"] = all(torch.equal(after[k], out["weights"][k]) for k in after) and len(after) == len(
            out["weights"]
        )
        out["metrics_after_load"] = {
            k: float(v) for k, v in eng.train_step(batch, _loss_fn(batch, adv), routing=ReplayMode.REPLAY).items()
        }
    return out


def main() -> None:
    # a stage that fails alone leaves the others waiting in a receive: print where everyone is and exit
    faulthandler.dump_traceback_later(150, exit=True)
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--pp", type=int, required=True)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--ckpt", required=True)
    args = ap.parse_args()
    out = forward_and_errors(args.model, args.pp, args.ep)
    out["train"] = train(args.model, args.pp, False, args.ckpt, ep=args.ep)
    out["train_recompute"] = train(args.model, args.pp, True, None, ep=args.ep)
    out["train_bf16"] = train(args.model, args.pp, False, None, precision="bf16", ep=args.ep)  # DDP + dist. optimizer
    if dist.get_rank() == 0:
        torch.save(out, args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
