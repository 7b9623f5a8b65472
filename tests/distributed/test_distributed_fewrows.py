"""Mini-batches with fewer rows than data-parallel ranks (1 row on DP = 2) and odd counts (3 rows):
every rank joins the collectives (a rank without rows runs a padding row with no loss), and the
results equal one rank's. The 1-row case is the post-sync probe that scores through the trainer
(r3.engines.sync_check.train_engine_reference) at every sync and resume; before, dp_slice refused it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dist_helpers import torchrun

pytestmark = [pytest.mark.distributed, pytest.mark.megatron, pytest.mark.slow]
WORKER = Path(__file__).with_name("fewrows_worker.py")


@pytest.fixture(scope="module")
def runs(tiny_moe_dir, tmp_path_factory) -> dict[int, dict]:
    out = tmp_path_factory.mktemp("fewrows")
    for nproc in (1, 2):
        torchrun(nproc, WORKER, "--model", str(tiny_moe_dir), "--out", str(out), timeout=300)
    return {n: torch.load(out / f"world{n}.pt", weights_only=False) for n in (1, 2)}


@pytest.mark.parametrize("rows", [1, 3])
def test_fewer_rows_than_ranks_equal_one_rank(runs, rows):
    ref, got = runs[1][rows], runs[2][rows]
    assert (ref["dp"], got["dp"]) == (1, 2)
    for mode in ("OFF", "RECORD", "REPLAY"):
        assert got[f"logp_{mode}"].shape == (rows, 8)
        torch.testing.assert_close(got[f"logp_{mode}"], ref[f"logp_{mode}"], rtol=0, atol=1e-5)
        torch.testing.assert_close(got[f"entropy_{mode}"], ref[f"entropy_{mode}"], rtol=0, atol=1e-5)
    assert torch.equal(got["recorded"], ref["recorded"])
    assert (got["logp_REPLAY"] - got["logp_OFF"]).abs().max() > 1e-3  # the forced routing was obeyed
    for k, v in ref["metrics"].items():
        assert got["metrics"][k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
    assert ref["metrics"]["actor/grad_norm"] > 0
    worst = max((got["weights"][k] - ref["weights"][k]).abs().max().item() for k in ref["weights"])
    assert worst < 1e-5, worst
