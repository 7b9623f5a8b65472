"""megatron train engine on 2 gloo ranks (torchrun) against 1 rank, same global batch.

- EP = 2 (allgather dispatcher; DP = 2 for the dense part): logits equal the 1-rank logits
  within 1e-5; logprobs under native, recorded and forced (REPLAY) routing equal; each rank was
  handed exactly its own rows to replay; one train_step gives the same weights and metrics.
- DP = 2 (EP = 1): one train_step gives the same updated weights as one rank.
- EP = 2 with the alltoall token dispatcher (megatron's GPU default; CPU shim in compat.py).
- TP = 2 with sequence parallelism (DP = 1): logits and the train step equal one rank; each TP
  rank replays its own sequence slice of the routing (S = 9 is padded to 10 for the split).
- The same with bf16 parameters, megatron's DDP (fp32 main grads) and distributed optimizer
  (fp32 master + Adam sharded over DP): 2 ranks equal 1 rank within bf16 rounding.
B = 5 sequences: the two DP ranks hold 3 and 2 rows, so the padding path runs too. The model has
3 layers, the middle one dense (mlp_only_layers), so replay maps trace layers to MoE layers only.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dist_helpers import torchrun

pytestmark = [pytest.mark.distributed, pytest.mark.megatron, pytest.mark.slow]  # torchrun launches: ~1-2 min
WORKER = Path(__file__).with_name("dist_worker.py")
LOGIT_TOL = 1e-5  # fp32; measured: logits identical, logprobs within 4.8e-7
WEIGHT_TOL = 1e-5  # one AdamW step of lr 1e-3 moves weights by ~1e-3; measured max |diff| 3e-6 (TP 2)
# bf16: measured logits/logprobs identical, weights within 1.8e-3 (one bf16 rounding step of a weight
# near 0.5), metrics within 7e-5 relative; the tolerances allow a few rounding steps
BF16_LOGIT_TOL, BF16_WEIGHT_TOL, BF16_REL = 0.05, 0.01, 5e-3  # TP 2: logits 3e-3, metrics 1.3e-3


def test_bf16_is_bf16_and_close_to_fp32(runs):
    ref32, ref16 = runs["ref"]["fp32"], runs["ref"]["bf16"]
    assert ref16["weights"]["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert _maxdiff(ref16["logp_replay"], ref32["logp_replay"]) < 0.05
    g32, g16 = ref32["metrics"]["actor/grad_norm"], ref16["metrics"]["actor/grad_norm"]
    assert abs(g16 - g32) < 0.01 * g32


@pytest.fixture(scope="module")
def runs(tiny_moe_dir, tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("dist")
    # one launch per world size; the layouts of a launch run one after the other (megatron's
    # parallel state rebuilt in between), which saves the start-up of a launch per layout
    launches = {
        1: "ref:1:1:allgather",
        2: "ep2:2:1:allgather,dp2:1:1:allgather,tp2:1:2:allgather,ep2_alltoall:2:1:alltoall",
    }
    for nproc, layouts in launches.items():
        torchrun(nproc, WORKER, "--model", str(tiny_moe_dir), "--out", str(out), "--layouts", layouts, timeout=480)
    names = [spec.split(":")[0] for layouts in launches.values() for spec in layouts.split(",")]
    return {name: torch.load(out / f"{name}.pt", weights_only=False) for name in names}


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def prec(request) -> str:
    return request.param


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a.float() - b.float()).abs().max().item()


def test_layouts_are_what_was_asked(runs):
    runs = {k: v["fp32"] for k, v in runs.items()}
    assert runs["ref"]["layout"].startswith("world 1 ")
    assert "EP 2" in runs["ep2"]["layout"] and "DP 2" in runs["ep2"]["layout"]
    assert "EP 1" in runs["dp2"]["layout"] and "DP 2" in runs["dp2"]["layout"]
    assert runs["tp2"]["layout"].startswith("world 2 = TP 2 x PP 1 x DP 1")


@pytest.mark.parametrize("name", ["ep2", "dp2", "tp2", "ep2_alltoall"])
def test_forward_equals_one_rank(runs, name, prec):
    ref, got = runs["ref"][prec], runs[name][prec]
    tol = LOGIT_TOL if prec == "fp32" else BF16_LOGIT_TOL
    assert _maxdiff(got["logits"], ref["logits"]) < tol
    assert ref["logits"].abs().max() > 0.1
    for key in ("logp_off", "logp_replay"):
        assert _maxdiff(got[key], ref[key]) < tol, key
    assert torch.equal(got["recorded"], ref["recorded"])
    # the forced routing changed the logprobs: REPLAY was obeyed, not ignored
    assert _maxdiff(ref["logp_replay"], ref["logp_off"]) > 1e-3


@pytest.mark.parametrize("name", ["ep2", "dp2", "tp2", "ep2_alltoall"])
def test_each_rank_replays_exactly_its_rows(runs, name, prec):
    flags = runs[name][prec]["per_rank"]
    assert all(f["own_rows_replayed"] for f in flags), flags
    if name == "tp2":  # DP = 1: both TP ranks hold all 5 rows, each replays its sequence slice
        assert [f["rows"] for f in flags] == [(0, 5), (0, 5)]
        assert all(f["layers_set"] == 6 for f in flags), flags  # 3 micro-batches x 2 MoE layers
        return
    assert [f["rows"] for f in flags] == [(0, 3), (3, 5)]
    # 2 micro-batches per rank (3 rows, padded to 3 -> slices of 2 + 1), 2 MoE layers each (the
    # dense middle layer has no router and no routing rows)
    assert all(f["layers_set"] == 4 for f in flags), flags


@pytest.mark.parametrize("name", ["ep2", "dp2", "tp2", "ep2_alltoall"])
def test_train_step_equals_one_rank(runs, name, prec):
    ref, got = runs["ref"][prec], runs[name][prec]
    assert set(got["weights"]) == set(ref["weights"])
    worst = max(_maxdiff(got["weights"][k], ref["weights"][k]) for k in ref["weights"])
    assert worst < (WEIGHT_TOL if prec == "fp32" else BF16_WEIGHT_TOL), worst
    assert set(got["metrics"]) == set(ref["metrics"])
    rel = 1e-5 if prec == "fp32" else BF16_REL
    for k, v in ref["metrics"].items():
        assert abs(got["metrics"][k] - v) <= rel * max(1.0, abs(v)), (k, got["metrics"][k], v)
    assert ref["metrics"]["actor/grad_norm"] > 0
