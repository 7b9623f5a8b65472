"""Worker of tests/distributed/test_distributed_cp.py, launched under `torch.distributed.run`.

    python -m torch.distributed.run --nproc-per-node 2 tests/distributed/cp_worker.py --out FILE

megatron's parallel state with context_parallel_size = world size (gloo): each CP rank slices a
tensor of token positions with megatron's get_batch_on_this_cp_rank (CP size and rank from
parallel_state, no stand-in) and compares it with r3.engines.megatron.token_order's index for its
rank; then every rank "records" its router rows of a routing trace (padded batch and packed
layout), the rows are all-gathered over megatron's CP group, and restore_full_order must give the
full rows back. No model is built: megatron's local attention refuses CP > 1
(dot_product_attention.py:57). Rank 0 writes the per-rank results to --out.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from r3.engines.megatron import token_order
from r3.engines.megatron.replay import to_megatron_layout
from r3.engines.megatron.token_order import PackedLayout
from r3.trace import RoutingSpec

B, S = 3, 16
LENGTHS = (5, 3, 8)
SPEC = RoutingSpec(num_layers=2, top_k=2, num_experts=8)


def _routing(n: int, T: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)  # the same trace on every rank
    L, K, E = SPEC.num_layers, SPEC.top_k, SPEC.num_experts
    return torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(n * T * L)]).view(n, T, L, K)


def _restored(full_NK: torch.Tensor, index: torch.Tensor, group) -> bool:
    """This rank's rows, all-gathered over the CP group with every rank's index: the full rows again?"""
    cp = dist.get_world_size(group)
    rows = [torch.empty_like(full_NK[index]) for _ in range(cp)]
    dist.all_gather(rows, full_NK[index].contiguous(), group=group)
    indices = [torch.empty_like(index) for _ in range(cp)]
    dist.all_gather(indices, index.contiguous(), group=group)
    return torch.equal(token_order.restore_full_order(rows, indices), full_NK)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dist.init_process_group(backend="gloo")
    from megatron.core import parallel_state
    from megatron.core.utils import get_batch_on_this_cp_rank

    parallel_state.initialize_model_parallel(context_parallel_size=dist.get_world_size())
    cp, rank = parallel_state.get_context_parallel_world_size(), parallel_state.get_context_parallel_rank()
    group = parallel_state.get_context_parallel_group()

    seq_major_row_BS = torch.arange(S)[None, :] * B + torch.arange(B)[:, None]  # (b, s) -> row s * B + b
    local_BS = get_batch_on_this_cp_rank({"tokens": seq_major_row_BS.clone()})["tokens"]
    index = token_order.bshd_index(B, S, cp, rank)
    out = {"cp": cp, "rank": rank, "bshd_equal": torch.equal(index, local_BS.t().reshape(-1))}
    full = to_megatron_layout(_routing(B, S - 1), seq_len=S, spec=SPEC)[1]
    out["bshd_restored"] = _restored(full, index, group)

    layout = PackedLayout(lengths=LENGTHS, multiple=2 * cp)
    packed = layout.pack_routing(_routing(len(LENGTHS), max(LENGTHS) - 1), SPEC)[0]
    out["thd_restored"] = _restored(packed, token_order.thd_index(layout, cp, rank), group)
    results = [None] * dist.get_world_size()
    dist.all_gather_object(results, out)
    if dist.get_rank() == 0:
        torch.save(results, args.out)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
