"""Fixtures of the multi-rank tests (helpers to launch ranks: dist_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_moe_dir(tmp_path_factory) -> Path:
    """A tiny Qwen3-MoE (hidden 32, 8 experts, top-2) of 3 layers whose middle layer is dense
    (`mlp_only_layers=[1]`: no router, no routing rows), saved in transformers format."""
    pytest.importorskip("megatron.core")
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        max_position_embeddings=256,
        decoder_sparse_step=1,
        mlp_only_layers=[1],
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    model = Qwen3MoeForCausalLM(config)
    with torch.no_grad():  # spread router logits so that top-2 choices are well separated
        for i in (0, 2):
            model.model.layers[i].mlp.gate.weight.normal_(0.0, 0.5)
    d = tmp_path_factory.mktemp("tiny_moe")
    model.save_pretrained(d)
    return d
