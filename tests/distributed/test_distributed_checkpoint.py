"""Checkpoints without replicated weights and a weight sync built once, on 4 gloo ranks (EP = 2 x
expert-DP 2; dense weights replicated over DP 4): only the first rank of a data-parallel group writes
the dense weights and only the first rank of an expert-data-parallel group its experts; a fresh engine
on every rank loads them back (from the owners' files) and its next step equals the uninterrupted
run's bit for bit; the experts are gathered for the sync on rank 0 alone (rank 2, the first of the
other EP group, builds nothing)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dist_helpers import torchrun

pytestmark = [pytest.mark.distributed, pytest.mark.megatron, pytest.mark.slow]
WORKER = Path(__file__).with_name("ckpt_worker.py")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_deduplicated_checkpoint_resumes_exactly_and_sync_builds_once(tiny_moe_dir, tmp_path, precision):
    torchrun(4, WORKER, "--model", str(tiny_moe_dir), "--out", str(tmp_path), "--precision", precision, timeout=300)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(4)]
    everything = set(ranks[0]["ref"])
    dense = {k for k in everything if ".local_experts." not in k}
    experts = everything - dense
    assert dense and experts
    # rank 0: DP rank 0 and expert-DP rank 0; rank 1: EP rank 1 of the first replica; ranks 2, 3: replicas
    assert set(ranks[0]["saved"]) == dense | experts and set(ranks[1]["saved"]) == set(ranks[1]["ref"]) - dense
    assert ranks[2]["saved"] == [] and ranks[3]["saved"] == []
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == [f"megatron_train_engine.rank0000{r}-of-00004.pt" for r in range(4)]
    for r in ranks:  # resumed from the deduplicated files: the next step is the same, bit for bit
        assert r["steps"] == 2
        for k, v in r["ref"].items():
            assert torch.equal(r["resumed"][k], v), k
    assert ranks[0]["synced"] and all(r["synced"] == [] for r in ranks[1:])  # rank 2 no longer builds a copy
    assert any(".experts.gate_up_proj" in k for k in ranks[0]["synced"])
