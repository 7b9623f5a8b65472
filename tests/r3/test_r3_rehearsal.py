"""CPU rehearsal of a training rank (r3.engines.megatron.rehearsal): LiveBytes counts what is allocated
and skips only the compute of heavy ops; a reduced rank (full engine code, small width, 2k tokens)
shows the pre-fix attention and logprob paths' activation peak and the fixed paths' bounded one, below
the memory plan; the cached paper rehearsal fits 80 GB where the pre-fix paths did not."""

from __future__ import annotations

import pytest
import torch

from r3.engines.megatron import rehearsal
from r3.engines.megatron.memory import GB, ModelShape, plan_memory

MiB = 2**20


def test_live_bytes_counts_allocations_frees_and_fakes_heavy_ops():
    with rehearsal.LiveBytes(bytes_below=MiB, flops_below=1e6) as lb:
        a = torch.ones(256, 256)  # 256 KiB, computed
        with lb.in_phase("work"):
            b = a @ a  # 33.5 MFLOP: allocated, not computed (zeros)
            c = torch.ones(1024, 1024)  # 4 MiB: above bytes_below, allocated only (not filled)
            c.add_(1)  # in place on a large tensor: skipped
            v = c.view(-1)  # a view: no new storage
            del c
        assert lb.peaks["work"] == 2 * 256 * 256 * 4 + 4 * MiB
        del v
    assert lb.live == 2 * 256 * 256 * 4  # a, b
    assert torch.equal(b, torch.zeros(256, 256)) and a[0, 0] == 1
    assert lb.skipped == 3 and b.shape == (256, 256)  # the matmul, the large fill, the large add_


SMALL = rehearsal.RankShape(layers=1, local_experts=4, top_k=2, hidden=256, moe_ffn=64, heads=8, kv_heads=2,
                            head_dim=32, vocab=32000)  # fmt: skip
SEQ = 2304  # the [heads, S, S] bf16 scores (85 MB) are above LiveBytes.bytes_below: listed in "large"


@pytest.mark.megatron
def test_reduced_rank_prefix_paths_blow_up_and_fixed_paths_stay_under_the_plan():
    pytest.importorskip("megatron.core")
    new = rehearsal.rehearse_step(SMALL, seq_len=SEQ)
    old = rehearsal.rehearse_step(SMALL, seq_len=SEQ, attention="local", legacy=True)
    assert new["built"] == pytest.approx(old["built"], abs=64) == pytest.approx(10 * new["params"], rel=1e-3)
    act_new = max(new["phases"][p] for p in rehearsal.STEP_PHASES) - new["built"]
    act_old = max(old["phases"][p] for p in rehearsal.STEP_PHASES) - old["built"]
    scores = 8 * SEQ * SEQ * 2  # one bf16 [heads, S, S] score tensor: 67 MB
    logits = SEQ * 32000 * 2
    assert act_old > 2 * act_new and act_old > act_new + 3 * scores + 3 * logits  # fp32 scores, softmax, logits
    # the fixed paths compute no [heads, S, S] scores (baddbmm, softmax: megatron's local attention)
    score_ops = {"aten.baddbmm.default", "aten._softmax.default"}
    assert not [op for ph, op, n in new["large"] if op in score_ops]
    assert {op for ph, op, n in old["large"] if n >= scores} >= score_ops
    shape = ModelShape(vocab=32000, hidden=256, layers=1, heads=8, kv_heads=2, head_dim=32, ffn=1024, moe_ffn=64,
                       experts=4, top_k=2, moe_layers=1)  # fmt: skip
    plan = plan_memory(shape, world=1, micro_batch=1, seq_len=SEQ, recompute=True)
    assert act_new <= plan.activations  # the plan is an upper bound of what the engine allocates
    legacy_plan = plan_memory(shape, world=1, micro_batch=1, seq_len=SEQ, recompute=True, attention="local",
                              logits_chunk=0)  # fmt: skip
    assert act_old > plan.activations and legacy_plan.activations > plan.activations


def test_depth_scaling_is_linear_in_layers():
    a = {"layers": 1, "built": 10, "phases": {"forward": 20, "logprobs": 30, "backward": 40}}
    b = {"layers": 2, "built": 12, "phases": {"forward": 24, "logprobs": 33, "backward": 46}}
    out = rehearsal.scale_to_depth(a, b, 48)
    assert out["forward"] == 10 + 47 * 2 and out["logprobs"] == 20 + 47 * 1 and out["backward"] == 30 + 47 * 4


def test_call_message_bytes_from_shapes():
    c = rehearsal.call_message_bytes(1024, 9216, 48, 8)
    assert c["expert_ids"] == 1024 * 9215 * 48 * 8  # uint8, as r3.trace.pad_traces builds it for 128 experts
    assert c["input_ids"] == c["attention_mask"] == 1024 * 9216 * 8 and c["loss_mask"] == 1024 * 9215 * 4
    assert c["wire_peak"] == c["expert_ids"] < 4 * 2**30  # the largest part passes through the GPU alone
    assert rehearsal.call_message_bytes(1024, 9216, 48, 8, trace_bytes=8)["expert_ids"] == 8 * c["expert_ids"]


def test_cached_paper_rehearsal_fits_80gb_and_the_prefix_paths_did_not():
    cache = rehearsal.load_cache()
    assert cache is not None, "run python -m benchmarks.rehearse_paper --write-cache"
    assert cache["layout"] == {"model": "Qwen3-30B-A3B", "world": 16, "ep": 8, "tp": 1, "pp": 1, "micro_batch": 1,
                               "seq_len": 9216, "recompute": True, "precision": "bf16", "attention": "sdpa",
                               "legacy": False}  # fmt: skip
    assert cache["step_peak"] < 80 * GB < cache["legacy"]["step_peak"]
    assert cache["calibration"] == pytest.approx(1.0, abs=1e-3)  # built state = the plan's 10 B / param at DP 1
    assert cache["step_peak"] <= cache["plan_total"]
