"""Tiny transformers models for the r3 tests (built from config with a fixed seed; no downloads)."""

from __future__ import annotations

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

VOCAB = 64


def tiny_moe(
    seed: int = 0,
    *,
    experts_implementation: str = "eager",
    norm_topk_prob: bool = True,
    num_layers: int = 2,
    router_std: float | None = None,
) -> Qwen3MoeForCausalLM:
    """2 layers, hidden 32, 8 experts, top-2, fp32."""
    torch.manual_seed(seed)
    config = Qwen3MoeConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=32,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=norm_topk_prob,
        max_position_embeddings=256,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        attn_implementation="sdpa",
    )
    model = Qwen3MoeForCausalLM(config)
    model.set_experts_implementation(experts_implementation)
    if router_std is not None:
        with torch.no_grad():
            for layer in model.model.layers:
                layer.mlp.gate.weight.normal_(0.0, router_std)
    return model.eval()


def tiny_dense(seed: int = 0) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    return Qwen3ForCausalLM(config).eval()
