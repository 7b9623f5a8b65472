"""Context parallelism's token order on a real megatron CP group (2 gloo ranks, no model: megatron's
local attention refuses CP > 1 without Transformer Engine). Each rank's replay index
(r3.engines.megatron.token_order) equals megatron's get_batch_on_this_cp_rank on that rank, with the
CP size and rank from megatron's parallel state; rows recorded per rank and all-gathered over
megatron's CP group restore the full order (padded and packed layouts). The one-process tests of
every layout are tests/r3/test_r3_megatron_token_order.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dist_helpers import torchrun

WORKER = Path(__file__).with_name("cp_worker.py")


@pytest.mark.distributed
@pytest.mark.megatron
def test_cp_ranks_see_megatrons_split_and_restore_the_full_order(tmp_path):
    pytest.importorskip("megatron.core")
    torchrun(2, WORKER, "--out", str(tmp_path / "cp.pt"), timeout=120)
    results = torch.load(tmp_path / "cp.pt", weights_only=False)
    assert [(r["cp"], r["rank"]) for r in results] == [(2, 0), (2, 1)]
    for r in results:
        assert r["bshd_equal"] and r["bshd_restored"] and r["thd_restored"], r
