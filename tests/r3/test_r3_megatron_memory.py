"""Memory planner (r3.engines.megatron.memory) on Qwen3-30B-A3B's published config numbers."""

from __future__ import annotations

import pytest
import torch

from r3.engines.megatron.memory import GB, QWEN3_30B_A3B, ModelShape, plan_memory

PUBLISHED = dict(  # Qwen/Qwen3-30B-A3B config.json on the hub
    model_type="qwen3_moe",
    vocab_size=151936,
    hidden_size=2048,
    intermediate_size=6144,
    moe_intermediate_size=768,
    num_hidden_layers=48,
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=128,
    num_experts=128,
    num_experts_per_tok=8,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    tie_word_embeddings=False,
)


def test_parameter_counts_match_the_published_30p5b_total_3p3b_active():
    m = ModelShape.from_config_dict(PUBLISHED)
    assert m == QWEN3_30B_A3B
    assert m.total_params() == 30_532_122_624  # "30.5B in total"
    assert 3.3e9 <= m.active_params() < 3.4e9  # "3.3B activated" (3,353,032,704)
    assert m.expert_params() == 48 * 128 * 3 * 2048 * 768


def test_parameter_count_equals_transformers_model_on_meta_device():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(**{k: v for k, v in PUBLISHED.items() if k != "model_type"})
    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(cfg)
    assert sum(p.numel() for p in model.parameters()) == QWEN3_30B_A3B.total_params()


def test_paper_layout_fits_80gb_and_hand_computed_terms():
    p = plan_memory(QWEN3_30B_A3B, world=16, ep=8, micro_batch=1, seq_len=9216, recompute=True)
    dense, expert = 1_541_093_376, 28_991_029_248 // 8
    assert (p.dense_local, p.expert_local) == (dense, expert)
    assert p.weights == 2 * (dense + expert)  # bf16
    assert p.grads == 4 * (dense + expert)  # fp32 main grads
    assert p.optimizer == pytest.approx(12 * (dense / 16 + expert / 2))  # sharded over DP 16 / expert-DP 2
    assert 60 * GB < p.total < 80 * GB
    p.check(gpu_gb=80)


@pytest.mark.parametrize("kw", [dict(ep=1), dict(ep=8, recompute=False), dict(ep=8, micro_batch=8)])
def test_layouts_that_cannot_fit_are_refused_with_numbers(kw):
    args = dict(world=16, micro_batch=1, seq_len=9216, recompute=True) | kw
    p = plan_memory(QWEN3_30B_A3B, **args)
    assert p.total > 80 * GB
    with pytest.raises(ValueError, match=r"does not fit: \d+\.\d GB per GPU needed, 80 GB available"):
        p.check(gpu_gb=80)


def test_fp32_as_the_engine_runs_today_does_not_fit_the_paper_layout():
    p = plan_memory(QWEN3_30B_A3B, world=16, ep=8, micro_batch=1, seq_len=9216, recompute=True, precision="fp32")
    assert p.total > 80 * GB


def test_invalid_layouts_refused():
    with pytest.raises(ValueError, match="not divisible"):
        plan_memory(QWEN3_30B_A3B, world=12, ep=8, micro_batch=1, seq_len=10, recompute=True)
    with pytest.raises(ValueError, match="128 experts cannot be split over EP = 3"):
        plan_memory(QWEN3_30B_A3B, world=3, ep=3, micro_batch=1, seq_len=10, recompute=True)


def test_tensor_parallel_splits_dense_weights_and_activations_not_experts():
    one = plan_memory(QWEN3_30B_A3B, world=16, ep=8, micro_batch=1, seq_len=9216, recompute=False)
    two = plan_memory(QWEN3_30B_A3B, world=16, tp=2, ep=8, micro_batch=1, seq_len=9216, recompute=False)
    assert two.dense_local == one.dense_local // 2 and two.expert_local == one.expert_local  # expert TP = 1
    assert two.logits == one.logits  # gathered over TP: not split
    assert two.activations - two.logits == pytest.approx((one.activations - one.logits) / 2)


def test_logits_term_hand_computed_and_the_prefix_paths_do_not_fit():
    V, S, h = QWEN3_30B_A3B.vocab, 9216, QWEN3_30B_A3B.hidden
    p = plan_memory(QWEN3_30B_A3B, world=16, ep=8, micro_batch=1, seq_len=S, recompute=True)
    # bf16 logits + their gradient + the output layer's weight gradient; 1,024-token fp32 chunks (12 B)
    assert p.logits == S * V * 2 + max(1024 * V * 12, S * V * 2 + V * h * 2)
    assert p.attention_scores == 0
    old = plan_memory(QWEN3_30B_A3B, world=16, ep=8, micro_batch=1, seq_len=S, recompute=True, attention="local",
                      logits_chunk=0)  # fmt: skip
    assert old.attention_scores == 14 * 32 * S * S  # baddbmm buffer + result, fp32 upcast + softmax, bf16 probs
    assert old.logits == S * V * 2 + S * V * 16
    assert p.total < 80 * GB < old.total


def test_forward_only_plan_of_the_static_job():
    p = plan_memory(QWEN3_30B_A3B, world=8, ep=8, micro_batch=1, seq_len=9216, recompute=False, step=False)
    dense, expert = 1_541_093_376, 28_991_029_248 // 8
    assert p.optimizer == pytest.approx(4 * (dense / 8 + expert / 1))  # the fp32 master shard, no Adam state
    assert p.logits == 9216 * QWEN3_30B_A3B.vocab * 2 + 1024 * QWEN3_30B_A3B.vocab * 12
    assert p.total < 80 * GB
