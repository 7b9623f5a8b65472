"""megatron-core GPTModel built from a transformers Qwen3-MoE / Qwen3 config: weight conversion
both directions and equal logits in fp32 (tiny models: 2 layers, hidden 32, 4 heads, 2 kv heads,
8 experts, top-2, vocab 64)."""

import pytest
import torch

pytest.importorskip("megatron.core")

from r3_tiny_models import tiny_dense, tiny_moe  # noqa: E402

from r3.engines.megatron.model import (  # noqa: E402
    build_gpt_model,
    gpt_logits,
    hf_to_megatron,
    load_hf_weights,
    megatron_to_hf,
    transformer_config_from_hf,
)

pytestmark = pytest.mark.megatron
LOGIT_TOL = 1e-5  # fp32, different matmul/attention order; measured max |diff| ~1e-7


def _ids(B=3, S=11, seed=0):
    return torch.randint(3, 64, (B, S), generator=torch.Generator().manual_seed(seed))


def _megatron_of(hf):
    model = build_gpt_model(hf.config)
    load_hf_weights(model, hf.state_dict(), hf.config)
    return model.eval()


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_moe_logits_equal_transformers(norm_topk_prob):
    hf = tiny_moe(0, norm_topk_prob=norm_topk_prob, router_std=0.5)
    mg = _megatron_of(hf)
    ids = _ids()
    with torch.no_grad():
        ref, got = hf(ids).logits, gpt_logits(mg, ids)
    assert got.shape == ref.shape
    diff = (ref - got).abs().max().item()
    assert diff < LOGIT_TOL, f"max |logit diff| {diff}"
    assert ref.abs().max() > 0.1  # not trivially zero


def test_dense_control_logits_equal_transformers():
    hf = tiny_dense(0)
    mg = _megatron_of(hf)
    ids = _ids()
    with torch.no_grad():
        diff = (hf(ids).logits - gpt_logits(mg, ids)).abs().max().item()
    assert diff < LOGIT_TOL


def test_conversion_round_trip_is_exact():
    hf = tiny_moe(1, router_std=0.5)
    mg = _megatron_of(hf)
    back = megatron_to_hf(mg.state_dict(), hf.config)
    ref = hf.state_dict()
    assert set(back) == set(ref)
    for k in ref:
        assert torch.equal(back[k], ref[k]), k
    # and the other direction: HF names -> megatron names -> HF names is the identity too
    again = megatron_to_hf(hf_to_megatron(ref, hf.config), hf.config)
    assert all(torch.equal(again[k], ref[k]) for k in ref)


def test_megatron_weights_load_back_into_transformers():
    hf = tiny_moe(2, router_std=0.5)
    mg = _megatron_of(hf)
    with torch.no_grad():  # change megatron's weights, then sync them to a fresh HF model
        for p in mg.parameters():
            p.add_(0.01 * torch.randn_like(p))
    fresh = tiny_moe(3)
    fresh.load_state_dict(megatron_to_hf(mg.state_dict(), fresh.config))
    ids = _ids(seed=1)
    with torch.no_grad():
        assert (fresh(ids).logits - gpt_logits(mg, ids)).abs().max().item() < LOGIT_TOL


def test_tied_embeddings_and_dense_layers_in_moe():
    hf0 = tiny_moe(0)
    cfg = type(hf0.config)(**{**hf0.config.to_dict(), "tie_word_embeddings": True, "mlp_only_layers": [1]})
    from transformers import Qwen3MoeForCausalLM

    torch.manual_seed(0)
    hf = Qwen3MoeForCausalLM(cfg).eval()
    mg = _megatron_of(hf)
    assert "output_layer.weight" not in mg.state_dict()  # shared with the embedding
    ids = _ids()
    with torch.no_grad():
        assert (hf(ids).logits - gpt_logits(mg, ids)).abs().max().item() < LOGIT_TOL


def test_fused_router_with_replay_refused():
    with pytest.raises(ValueError, match="moe_router_fusion=True bypasses megatron's RouterReplay"):
        transformer_config_from_hf(tiny_moe(0).config, routing_replay=True, router_fusion=True)


def test_unsupported_config_refused():
    cfg = tiny_moe(0).config
    bad = type(cfg)(**{**cfg.to_dict(), "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="hidden_act 'gelu'"):
        transformer_config_from_hf(bad)
