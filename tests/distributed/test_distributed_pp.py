"""megatron train engine with pipeline parallelism (PP = 2, gloo ranks, megatron's 1F1B schedule)
against 1 rank, same global batch (dist_worker.global_batch: B = 5, S = 9; micro-batches of 2), in
three layouts: PP = 2 on 2 ranks, PP = 2 x DP = 2 on 4 ranks (ranks 0, 1: stage 0 of DP replicas
0, 1; ranks 2, 3: stage 1; each replica takes 3 or 2 of the 5 rows, padded to 3, then to 4 for two
micro-batches; 4 processes share the 2 cores here), and the same with EP = 2 (each stage's experts
split over its two DP replicas, tokens exchanged by the allgather dispatcher).

The tiny model has 3 decoder layers: MoE, dense (mlp_only_layers), MoE. PP = 2 splits them 2 + 1
(parallel.stage_layer_counts): stage 0 holds MoE + dense, stage 1 the last MoE layer, which is trace
layer 1 although it is the stage's only (local index 0) router. The forced routing differs per layer,
so a stage that ignored its layer offset would replay the other layer's rows: the logprobs would
then be those of the layer-swapped trace, which differ from the correct ones by ~2e-2.

- forward: logprobs under native, recorded and forced (REPLAY) routing, and entropy, equal 1 rank;
  the recorded routing (concatenated over the stages' trace layers) equals the 1-rank recording;
  each stage was handed exactly the rows of its own trace layers, once per micro-batch;
- train_step under REPLAY (with and without activation recompute; and with bf16 parameters,
  megatron's DDP and distributed optimizer): loss, metrics, grad norm (summed
  over both stages' parameters) and the updated weights (gathered to rank 0) equal 1 rank; a
  checkpoint (one file per rank) round-trips and training continues identically;
- wrong traces: a trace with one layer is refused on every rank before the schedule starts (a stage
  that raised alone would leave the other waiting); stages that claim the same trace layer (an
  ignored offset) are refused by check_pipeline_layers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dist_helpers import torchrun

WORKER = Path(__file__).with_name("pp_worker.py")
TOL = 1e-5  # fp32; measured: logprobs identical, entropy within 9.5e-7, weights within 1.1e-6
REL = 1e-5  # measured: grad norm within 7.3e-8 relative, the other metrics identical
# bf16 (megatron's DDP + distributed optimizer): measured identical weights and metrics; the
# tolerances of test_distributed_megatron.py allow a few bf16 rounding steps
BF16_TOL, BF16_REL = 0.01, 5e-3


# layout -> (ranks, PP, EP); "one" is the reference
LAYOUTS = {"one": (1, 1, 1), "pp2": (2, 2, 1), "pp2dp2": (4, 2, 1), "pp2ep2": (4, 2, 2)}
PARALLEL = ["pp2", "pp2dp2", "pp2ep2"]
# trace layers each rank's routers were handed, one entry per micro-batch: PP = 2 alone runs the 5 rows
# (padded to 6) as 3 micro-batches; with DP = 2 each replica runs its 3 rows (padded to 4) as 2
HANDED = {"one": [[0, 1] * 3], "pp2": [[0] * 3, [1] * 3], "pp2dp2": [[0] * 2, [0] * 2, [1] * 2, [1] * 2]}
HANDED["pp2ep2"] = HANDED["pp2dp2"]  # EP = 2 splits each stage's experts over its 2 DP replicas
# ranks whose rollout_state_dict holds the whole model: the first stage of each DP replica (rank 0: the driver)
# (with EP the experts are gathered over the expert group to rank 0 only, the driver that syncs them)
WHOLE_MODEL = {"pp2": [True, False], "pp2dp2": [True, True, False, False], "pp2ep2": [True, False, False, False]}


@pytest.fixture(scope="module")
def runs(tiny_moe_dir, tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("pp")
    for name, (nproc, pp, ep) in LAYOUTS.items():  # ~10 s per launch on 2 CPU cores, ~16 s with 4 ranks
        args = ("--model", str(tiny_moe_dir), "--out", str(out / f"{name}.pt"), "--pp", str(pp), "--ep", str(ep))
        torchrun(nproc, WORKER, *args, "--ckpt", str(out / f"ckpt-{name}"), timeout=240)
    return {name: torch.load(out / f"{name}.pt", weights_only=False) for name in LAYOUTS}


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.distributed
@pytest.mark.megatron
@pytest.mark.slow  # the three torchrun launches: ~45 s
@pytest.mark.parametrize("layout", PARALLEL)
def test_stages_own_their_trace_layers(runs, layout):
    one, two = runs["one"], runs[layout]
    nproc, pp, ep = LAYOUTS[layout]
    assert (
        two["layout"]
        == f"world {nproc} = TP 1 x PP {pp} x DP {nproc // pp} (experts: EP {ep} x expert-DP {nproc // pp // ep})"
    )
    assert one["stage_moe_layers"] == [[0, 1]]
    assert two["stage_moe_layers"] == [[0], [1]]  # stage 1's only router is trace layer 1
    # each stage set only its own layer's rows, each DP replica only its own rows, all of them right
    assert [r["layers"] for r in one["per_rank"]] == HANDED["one"]
    assert [r["layers"] for r in two["per_rank"]] == HANDED[layout]
    assert all(r["own_rows_replayed"] for r in two["per_rank"]), two["per_rank"]
    assert one["per_rank"][0]["own_rows_replayed"]


@pytest.mark.distributed
@pytest.mark.megatron
@pytest.mark.slow  # the three torchrun launches: ~45 s
@pytest.mark.parametrize("layout", PARALLEL)
def test_forward_equals_one_rank(runs, layout):
    one, two = runs["one"], runs[layout]
    for key in ("logp_off", "logp_record", "logp_replay", "entropy_replay", "logp_replay_swapped"):
        assert _maxdiff(two[key], one[key]) < TOL, key
    assert torch.equal(two["recorded"], one["recorded"])
    assert two["recorded"].shape == (5, 8, 2, 2)  # both stages' trace layers
    # REPLAY was obeyed, and which layer gets which rows matters: an ignored offset would be seen
    assert _maxdiff(one["logp_replay"], one["logp_off"]) > 1e-3
    assert _maxdiff(one["logp_replay"], one["logp_replay_swapped"]) > 1e-3
    assert _maxdiff(two["logp_replay_again"], one["logp_replay"]) < TOL


@pytest.mark.distributed
@pytest.mark.megatron
@pytest.mark.slow  # the three torchrun launches: ~45 s
@pytest.mark.parametrize("layout", PARALLEL)
@pytest.mark.parametrize("run", ["train", "train_recompute", "train_bf16"])
def test_train_step_equals_one_rank(runs, layout, run):
    one, two = runs["one"][run], runs[layout][run]
    tol, rel = (BF16_TOL, BF16_REL) if run == "train_bf16" else (TOL, REL)
    assert [n > 0 for n in two["weights_on_ranks"]] == WHOLE_MODEL[layout]
    assert set(two["weights"]) == set(one["weights"])
    worst = max(_maxdiff(two["weights"][k], one["weights"][k]) for k in one["weights"])
    assert worst < tol, worst
    assert set(two["metrics"]) == set(one["metrics"])
    for k, v in one["metrics"].items():
        assert abs(two["metrics"][k] - v) <= rel * max(1.0, abs(v)), (k, two["metrics"][k], v)
    assert one["metrics"]["actor/grad_norm"] > 0
    if run == "train":
        assert two["ckpt_roundtrip"] and one["ckpt_roundtrip"]
        for k, v in one["metrics_after_load"].items():
            assert abs(two["metrics_after_load"][k] - v) <= REL * max(1.0, abs(v)), k


@pytest.mark.distributed
@pytest.mark.megatron
@pytest.mark.slow  # the three torchrun launches: ~45 s
@pytest.mark.parametrize("layout", PARALLEL)
def test_wrong_traces_are_refused_on_every_stage(runs, layout):
    errors = runs[layout]["one_layer_error"]
    assert len(errors) == LAYOUTS[layout][0] and all(e is not None for e in errors), errors
    assert all("the trace has 1 layers but the model has 2 MoE layers" in e for e in errors)
    offset = runs[layout]["offset_ignored_error"]
    assert all(e is not None and "own trace layers [[0], [0]]" in e for e in offset), offset


# --- building blocks, one process ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layers", "pp", "counts"),
    [(3, 1, [3]), (3, 2, [2, 1]), (4, 2, [2, 2]), (48, 4, [12] * 4), (5, 3, [3, 1, 1]), (3, 3, [1, 1, 1])],
)
def test_stage_layer_counts(layers, pp, counts):
    from r3.engines.megatron.parallel import stage_layer_counts

    assert stage_layer_counts(layers, pp) == counts


def test_stage_layer_counts_refuses_empty_stages():
    from r3.engines.megatron.parallel import stage_layer_counts

    with pytest.raises(ValueError, match="3 decoder layers cannot fill 4 pipeline stages"):
        stage_layer_counts(3, 4)


def test_moe_layer_index_skips_dense_layers():
    from types import SimpleNamespace

    from r3.engines.megatron.replay import moe_layer_index

    cfg = SimpleNamespace(moe_layer_freq=[1, 0, 1, 1], num_layers=4)
    assert [moe_layer_index(cfg, n) for n in (1, 3, 4)] == [0, 1, 2]  # layer_number is 1-based
    with pytest.raises(ValueError, match="decoder layer 1 is not a MoE layer"):
        moe_layer_index(cfg, 2)
    assert moe_layer_index(SimpleNamespace(moe_layer_freq=2, num_layers=4), 3) == 1  # every 2nd layer


def test_to_global_layer_names():
    from r3.engines.megatron.model import to_global_layer_names

    sd = {"decoder.layers.0.mlp.router.weight": 1, "decoder.layers.1.input_layernorm.weight": 2}
    sd["output_layer.weight"] = 3
    assert to_global_layer_names(sd, 2) == {
        "decoder.layers.2.mlp.router.weight": 1,
        "decoder.layers.3.input_layernorm.weight": 2,
        "output_layer.weight": 3,
    }
