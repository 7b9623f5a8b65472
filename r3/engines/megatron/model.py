"""A megatron-core GPTModel equivalent to a transformers Qwen3-MoE (or dense Qwen3) model.

- `transformer_config_from_hf(hf_config, ...)`: the megatron `TransformerConfig` of the same
  architecture: RMSNorm, q/k RMSNorm per head (`qk_layernorm`), RoPE (theta from the config),
  SwiGLU experts, softmax router, no shared expert, no auxiliary loss (the paper trains RL
  without the balancing loss), untied or tied embeddings as in the config.
- `build_gpt_model(hf_config, ...)`: the GPTModel (megatron's local, TE-free layer spec), its core
  attention swapped for `SDPADotProductAttention` (torch's fused scaled_dot_product_attention: no
  [heads, S, S] score tensor; `attention="local"` keeps megatron's DotProductAttention).
- `hf_to_megatron(hf_sd, hf_config)` / `megatron_to_hf(mg_sd, hf_config)`: weight conversion
  both directions (transformers 5.x in-memory names: fused `experts.gate_up_proj [E, 2I, H]`).
- `gpt_logits(model, input_ids_BS)`: logits [B, S, V] for right-padded batches.

Router equivalence (transformers Qwen3MoeTopKRouter vs megatron topk_routing_with_score_function):
norm_topk_prob=True: softmax over E, top-k, renormalise == top-k on logits, softmax over the k
logits (megatron `moe_router_pre_softmax=False`; same selection, since softmax is monotone, and
the same weights, since renormalised softmax over a subset is the softmax of that subset).
norm_topk_prob=False: softmax over E then top-k, no renormalisation (`moe_router_pre_softmax=True`).

Megatron names are those of the local spec (SequentialMLP experts `local_experts.{e}`), the only
spec that builds without Transformer Engine. The TE spec's names (fused layer norms, grouped
experts) are not converted here: cluster runs need that mapping added (untested here).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from r3.engines.megatron.compat import cpu_device_scope


def _head_dim(hf_config) -> int:
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


def _is_moe(hf_config) -> bool:
    return bool(getattr(hf_config, "num_experts", 0)) and hf_config.model_type == "qwen3_moe"


def moe_layer_pattern(hf_config) -> list[int]:
    """1 where decoder layer i has a sparse MoE block, 0 for a dense MLP (transformers'
    Qwen3MoeDecoderLayer rule: not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0)."""
    if not _is_moe(hf_config):
        return [0] * hf_config.num_hidden_layers
    only = set(hf_config.mlp_only_layers or [])
    step = hf_config.decoder_sparse_step
    return [int(i not in only and (i + 1) % step == 0) for i in range(hf_config.num_hidden_layers)]


def _check_supported(hf_config) -> None:
    errors = []
    if hf_config.model_type not in ("qwen3_moe", "qwen3"):
        errors.append(f"model_type {hf_config.model_type!r} (supported: 'qwen3_moe', 'qwen3')")
    if hf_config.hidden_act != "silu":
        errors.append(f"hidden_act {hf_config.hidden_act!r} (SwiGLU needs 'silu')")
    if getattr(hf_config, "attention_bias", False):
        errors.append("attention_bias=True (Qwen3 has no attention bias; o_proj bias has no megatron slot here)")
    if getattr(hf_config, "attention_dropout", 0.0):
        errors.append(f"attention_dropout={hf_config.attention_dropout} (the CPU RNG shim requires 0)")
    if getattr(hf_config, "use_sliding_window", False):
        errors.append("use_sliding_window=True")
    rope = getattr(hf_config, "rope_parameters", None) or {"rope_type": "default"}
    if rope.get("rope_type", "default") != "default":
        errors.append(f"rope_type {rope.get('rope_type')!r} (only plain RoPE is mapped)")
    if errors:
        raise ValueError("cannot build a megatron GPTModel for this config: " + "; ".join(errors))


def _rope_theta(hf_config) -> float:
    rope = getattr(hf_config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))


def transformer_config_from_hf(
    hf_config,
    *,
    routing_replay: bool = True,
    recompute: bool = False,
    router_fusion: bool = False,
    token_dispatcher: str | None = None,
    router_dtype: str | None = None,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    precision: str = "fp32",
):
    """megatron TransformerConfig for a Qwen3-MoE / Qwen3 transformers config, fp32.

    routing_replay: build a RouterReplay per MoE layer (`moe_enable_routing_replay`); with no
        action set it routes natively, so it is on by default.
    recompute: full activation recompute of every layer (megatron `recompute_granularity=
        "full"`, uniform, 1 layer per chunk); the router then runs again inside backward.
    router_fusion: megatron's fused top-k kernel (needs TE). It bypasses RouterReplay (the
        fused path returns before the replay hook in topk_routing_with_score_function), so it
        is refused together with replay.
    token_dispatcher: "allgather" (default without CUDA) or "alltoall" (default with CUDA; on CPU
        through compat.install_cpu_alltoall_dispatcher).
    router_dtype: megatron `moe_router_dtype` (None: the input dtype, as transformers does).
    tp, pp, ep: tensor / pipeline / expert model-parallel sizes (must equal megatron's parallel
        state, r3.engines.megatron.parallel.init_parallel).
    precision: "fp32" (parameters and activations fp32) or "bf16" (bf16 parameters and activations,
        megatron `bf16=True`; the router computes in fp32 unless router_dtype says otherwise;
        gradients are summed per token by the caller: `calculate_per_token_loss`, so megatron's DDP
        does not divide them by the DP size, see r3.engines.megatron.train).
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    _check_supported(hf_config)
    if router_fusion and routing_replay:
        raise ValueError(
            "moe_router_fusion=True bypasses megatron's RouterReplay (the fused top-k kernel "
            "never calls the replay hook), so replayed routing would be silently ignored; "
            "set router_fusion=False when routing replay is on (DESIGN.md invariant 3)"
        )
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    if router_dtype is None and precision == "bf16":
        router_dtype = "fp32"  # routing scores in fp32, as megatron's bf16 recipes do
    if token_dispatcher is None:
        token_dispatcher = "alltoall" if torch.cuda.is_available() else "allgather"
    if token_dispatcher == "alltoall" and not torch.cuda.is_available():
        from r3.engines.megatron.compat import install_cpu_alltoall_dispatcher

        install_cpu_alltoall_dispatcher()
    kw = dict(
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        num_attention_heads=hf_config.num_attention_heads,
        num_query_groups=hf_config.num_key_value_heads,
        kv_channels=_head_dim(hf_config),
        ffn_hidden_size=hf_config.intermediate_size,
        normalization="RMSNorm",
        layernorm_epsilon=hf_config.rms_norm_eps,
        qk_layernorm=True,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=torch.bfloat16 if precision == "bf16" else torch.float32,
        bf16=precision == "bf16",
        calculate_per_token_loss=precision == "bf16",
        use_cpu_initialization=not torch.cuda.is_available(),
        # Weights are loaded from the transformers model right after construction.
        perform_initialization=False,
        # Fused kernels need CUDA/TE/Apex; the unfused torch paths are the reference maths.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        **_pipeline_kw(hf_config.num_hidden_layers, pp, precision),
        expert_model_parallel_size=ep,
        # experts are never TP-sharded (EP splits them); TP > 1 runs with sequence parallelism,
        # which megatron requires for MoE training with TP (the router then sees the TP rank's
        # sequence slice: r3.engines.megatron.replay)
        expert_tensor_parallel_size=1,
        sequence_parallel=tp > 1,
    )
    if _is_moe(hf_config):
        kw.update(
            num_moe_experts=hf_config.num_experts,
            moe_router_topk=hf_config.num_experts_per_tok,
            moe_ffn_hidden_size=hf_config.moe_intermediate_size,
            moe_layer_freq=moe_layer_pattern(hf_config),
            moe_router_score_function="softmax",
            moe_router_pre_softmax=not hf_config.norm_topk_prob,
            moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0,
            moe_token_dispatcher_type=token_dispatcher,
            moe_grouped_gemm=False,
            moe_enable_routing_replay=routing_replay,
            moe_router_fusion=router_fusion,
            moe_router_dtype=router_dtype,
        )
    if recompute:
        kw.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    return TransformerConfig(**kw)


def _pipeline_kw(num_layers: int, pp: int, precision: str) -> dict:
    """megatron's pipeline settings for PP stages (nothing with PP = 1): the stage split of
    r3.engines.megatron.parallel.stage_layer_counts and the dtype of the activations sent between
    stages. Every micro-batch has one shape (the engine pads the last one): megatron refuses
    `variable_seq_lengths` with the allgather token dispatcher."""
    if pp == 1:
        return {}
    from r3.engines.megatron.parallel import stage_layer_counts

    counts = stage_layer_counts(num_layers, pp)
    kw = dict(pipeline_dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    if counts[0] != counts[-1]:
        kw["num_layers_in_first_pipeline_stage"] = counts[0]
    return kw


ATTENTION_KINDS = ("sdpa", "local")
"""Core attention of the built model: "sdpa" (SDPADotProductAttention, the default) or "local"
(megatron's DotProductAttention, which materialises the [b * heads, S, S] scores)."""


def _sdpa_attention_class():
    """SDPADotProductAttention, defined on first use so that importing this module needs no megatron.

    megatron-core 0.16.1's local DotProductAttention (megatron/core/transformer/dot_product_attention.py
    :172-212) computes the raw scores with baddbmm into a [b * np, sq, sk] buffer (5.4 GB in bf16 for 32
    heads at S = 9216), softmaxes them in fp32 (attention_softmax_in_fp32, another 10.9 GB temporary)
    and keeps the probabilities for backward; the TE spec's flash attention is not available without
    Transformer Engine, and the local spec provider has no other core attention (models/backends.py:113).
    This subclass keeps DotProductAttention's constructor (head counts per TP rank, softmax scale) and
    replaces forward with torch.nn.functional.scaled_dot_product_attention (causal, GQA): on CUDA the
    flash / memory-efficient kernels, on CPU the flash-attention-for-CPU kernel; neither stores the
    scores (its backward recomputes them blockwise from the saved logsumexp)."""
    global _SDPA_CLASS
    if _SDPA_CLASS is not None:
        return _SDPA_CLASS
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class SDPADotProductAttention(DotProductAttention):
        def __init__(self, config, layer_number, attn_mask_type, attention_type, **kw):
            super().__init__(config, layer_number, attn_mask_type, attention_type, **kw)
            from megatron.core.transformer.enums import AttnMaskType

            unsupported = []
            if attn_mask_type != AttnMaskType.causal:
                unsupported.append(f"attn_mask_type {attn_mask_type} (only causal)")
            if self.softmax_offset is not None or config.softmax_type != "vanilla":
                unsupported.append(f"softmax_type {config.softmax_type!r}")
            if self.scale_mask_softmax.window_size is not None:
                unsupported.append(f"window_size {self.scale_mask_softmax.window_size}")
            if config.attention_dropout:
                unsupported.append(f"attention_dropout {config.attention_dropout}")
            if unsupported:
                raise ValueError(
                    "SDPADotProductAttention covers causal softmax attention without dropout; this config has "
                    + "; ".join(unsupported)
                    + ": build with attention='local'"
                )

        def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None):  # fmt: skip
            """query [sq, b, np, hn], key/value [sk, b, ng, hn] -> context [sq, b, np * hn], as
            DotProductAttention.forward. attention_mask: the causal mask gpt_logits passes (the engine
            right-pads, so causal masking is all a real position needs) or None; is_causal replaces it."""
            if packed_seq_params is not None or attention_bias is not None:
                raise ValueError("SDPADotProductAttention takes no packed_seq_params or attention_bias")
            sq, b, n, d = query.shape
            if key.shape[0] != sq or (attention_mask is not None and tuple(attention_mask.shape[-2:]) != (sq, sq)):
                raise ValueError(
                    f"causal self-attention expects sq == sk and an [.., sq, sq] mask, got query {tuple(query.shape)}, "
                    f"key {tuple(key.shape)}, mask {None if attention_mask is None else tuple(attention_mask.shape)}"
                )
            ctx = F.scaled_dot_product_attention(
                query.permute(1, 2, 0, 3),  # [b, np, sq, hn]
                key.permute(1, 2, 0, 3),  # [b, ng, sk, hn]: enable_gqa repeats the groups without copies
                value.permute(1, 2, 0, 3),
                is_causal=True,
                scale=self.softmax_scale,
                enable_gqa=n != key.shape[2],
            )
            return ctx.permute(2, 0, 1, 3).reshape(sq, b, n * d)

    _SDPA_CLASS = SDPADotProductAttention
    return _SDPA_CLASS


_SDPA_CLASS = None


def _swap_core_attention(spec, attention: str):
    """The decoder block spec with each layer's core attention set to `attention` (ATTENTION_KINDS)."""
    if attention not in ATTENTION_KINDS:
        raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {attention!r}")
    if attention == "local":
        return spec
    import dataclasses

    from megatron.core.transformer.dot_product_attention import DotProductAttention

    cls = _sdpa_attention_class()

    def swap(layer):  # copies at every level: megatron's spec objects may be shared between layers
        attn = layer.submodules.self_attention
        if attn.submodules.core_attention is not DotProductAttention:
            raise ValueError(f"expected the local spec's DotProductAttention, found {attn.submodules.core_attention}")
        attn = dataclasses.replace(attn, submodules=dataclasses.replace(attn.submodules, core_attention=cls))
        return dataclasses.replace(layer, submodules=dataclasses.replace(layer.submodules, self_attention=attn))

    return dataclasses.replace(spec, layer_specs=[swap(layer) for layer in spec.layer_specs])


def build_gpt_model(hf_config, *, attention: str = "sdpa", **config_kw):
    """An (uninitialised) megatron GPTModel of the same architecture; see
    transformer_config_from_hf for config_kw, ATTENTION_KINDS for `attention`. Starts the process
    model if needed (r3.engines.megatron.parallel.init_parallel: from the environment, else one
    process)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.models.gpt.gpt_model import GPTModel

    from r3.engines.megatron.parallel import init_parallel

    layout = init_parallel(tp=config_kw.get("tp", 1), pp=config_kw.get("pp", 1), ep=config_kw.get("ep", 1))
    layout.check_experts(getattr(hf_config, "num_experts", 0) if _is_moe(hf_config) else 0)
    if layout.tp > 1:
        from r3.engines.megatron.compat import allow_sequence_parallel_torch_norm

        if hf_config.num_key_value_heads % layout.tp or hf_config.vocab_size % layout.tp:
            raise ValueError(
                f"TP = {layout.tp} must divide num_key_value_heads ({hf_config.num_key_value_heads}) "
                f"and vocab_size ({hf_config.vocab_size})"
            )
        allow_sequence_parallel_torch_norm()
    if layout.pp > 1 and hf_config.tie_word_embeddings:
        raise ValueError(
            f"tie_word_embeddings=True with PP = {layout.pp}: the tied output layer would live on the last "
            f"stage as a copy of the first stage's embedding, kept in sync by megatron's embedding "
            f"group, which this engine does not wire; use pipeline_parallel=1 for tied models"
        )
    from megatron.core import parallel_state

    config = transformer_config_from_hf(hf_config, **config_kw)
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm")
    spec = _swap_core_attention(spec, attention)
    with cpu_device_scope():
        return GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=hf_config.vocab_size,
            max_sequence_length=hf_config.max_position_embeddings,
            position_embedding_type="rope",
            rotary_base=_rope_theta(hf_config),
            share_embeddings_and_output_weights=bool(hf_config.tie_word_embeddings),
            # the first stage embeds the tokens, the last one holds the final norm and output layer
            pre_process=parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage(),
        )


# ----------------------------------------------------------------------------------------------
# weight conversion


def _qkv_pack(q_QH, k_GH, v_GH, n_heads: int, n_groups: int, d: int) -> torch.Tensor:
    """megatron linear_qkv layout: per query group g, [q heads of g | k_g | v_g] (rows)."""
    h = q_QH.shape[-1]
    q = q_QH.reshape(n_groups, n_heads // n_groups * d, h)
    k = k_GH.reshape(n_groups, d, h)
    v = v_GH.reshape(n_groups, d, h)
    return torch.cat([q, k, v], dim=1).reshape(-1, h)


def _qkv_unpack(qkv, n_heads: int, n_groups: int, d: int):
    h = qkv.shape[-1]
    per = n_heads // n_groups * d
    x = qkv.reshape(n_groups, per + 2 * d, h)
    q, k, v = x.split([per, d, d], dim=1)
    return q.reshape(-1, h), k.reshape(-1, h), v.reshape(-1, h)


_VOCAB_OR_QKV = ("embedding.word_embeddings.weight", "output_layer.weight", "self_attention.linear_qkv.weight")
_ROW_PARALLEL = ("self_attention.linear_proj.weight",)


def _is_dense_mlp(key: str, name: str) -> bool:
    return key.endswith(f"mlp.{name}.weight") and ".experts." not in key


def tp_shard(key: str, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This TP rank's part of a full (local-spec) megatron tensor. Column-parallel: vocab rows of
    the embedding and output layer, QKV rows (group-major packing: whole query groups per rank), the
    dense MLP's fc1 as [gate_r; up_r]; row-parallel: columns of attention's proj and the dense MLP's
    fc2; everything else (norms, routers, experts: expert TP = 1) is replicated."""
    if tp_size == 1:
        return full
    if key.endswith(_VOCAB_OR_QKV):
        return full.chunk(tp_size, dim=0)[tp_rank]
    if key.endswith(_ROW_PARALLEL) or _is_dense_mlp(key, "linear_fc2"):
        return full.chunk(tp_size, dim=1)[tp_rank]
    if _is_dense_mlp(key, "linear_fc1"):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, dim=0)[tp_rank], up.chunk(tp_size, dim=0)[tp_rank]])
    return full


def is_tp_sharded(key: str) -> bool:
    """Whether tp_shard splits this tensor (else it is replicated on every TP rank)."""
    return (
        key.endswith(_VOCAB_OR_QKV + _ROW_PARALLEL)
        or _is_dense_mlp(key, "linear_fc1")
        or _is_dense_mlp(key, "linear_fc2")
    )


def tp_unshard(key: str, parts: list[torch.Tensor]) -> torch.Tensor:
    """The inverse of tp_shard: the full tensor from every TP rank's part (rank order)."""
    if len(parts) == 1:
        return parts[0]
    if key.endswith(_VOCAB_OR_QKV):
        return torch.cat(parts, dim=0)
    if key.endswith(_ROW_PARALLEL) or _is_dense_mlp(key, "linear_fc2"):
        return torch.cat(parts, dim=1)
    if _is_dense_mlp(key, "linear_fc1"):
        halves = [p.chunk(2, dim=0) for p in parts]
        return torch.cat([torch.cat([g for g, _ in halves]), torch.cat([u for _, u in halves])])
    return parts[0]


def hf_to_megatron(
    hf_sd: Mapping[str, torch.Tensor],
    hf_config,
    *,
    ep_rank: int = 0,
    ep_size: int = 1,
    tp_rank: int = 0,
    tp_size: int = 1,
    layers: range | None = None,
    pre_process: bool = True,
    post_process: bool = True,
) -> dict[str, torch.Tensor]:
    """transformers Qwen3(-MoE) state dict -> megatron GPTModel (local spec) state dict. With expert
    parallelism (ep_size > 1) only this EP rank's experts, global ids [ep_rank * E/EP, (ep_rank+1) *
    E/EP), under their local index `local_experts.{e - ep_rank * E/EP}` (megatron's SequentialMLP).
    A pipeline stage (r3.engines.megatron.parallel) converts only its decoder layers `layers` (global
    indices, default all), named by their index within the stage (`decoder.layers.{i - layers.start}`,
    as megatron's TransformerBlock names them), the embedding only on the first stage (pre_process)
    and the final norm and output layer only on the last (post_process); other tensors are not read."""
    nh, ng, d = hf_config.num_attention_heads, hf_config.num_key_value_heads, _head_dim(hf_config)
    pattern = moe_layer_pattern(hf_config)
    layers = range(len(pattern)) if layers is None else layers
    out = {"embedding.word_embeddings.weight": hf_sd["model.embed_tokens.weight"]} if pre_process else {}
    for i in layers:
        moe = pattern[i]
        a, m = f"model.layers.{i}.", f"decoder.layers.{i - layers.start}."
        out[m + "input_layernorm.weight"] = hf_sd[a + "input_layernorm.weight"]
        out[m + "self_attention.linear_qkv.weight"] = _qkv_pack(
            hf_sd[a + "self_attn.q_proj.weight"],
            hf_sd[a + "self_attn.k_proj.weight"],
            hf_sd[a + "self_attn.v_proj.weight"],
            nh,
            ng,
            d,
        )
        out[m + "self_attention.linear_proj.weight"] = hf_sd[a + "self_attn.o_proj.weight"]
        out[m + "self_attention.q_layernorm.weight"] = hf_sd[a + "self_attn.q_norm.weight"]
        out[m + "self_attention.k_layernorm.weight"] = hf_sd[a + "self_attn.k_norm.weight"]
        out[m + "pre_mlp_layernorm.weight"] = hf_sd[a + "post_attention_layernorm.weight"]
        if moe:
            out[m + "mlp.router.weight"] = hf_sd[a + "mlp.gate.weight"]
            gate_up_EFH, down_EHI = hf_sd[a + "mlp.experts.gate_up_proj"], hf_sd[a + "mlp.experts.down_proj"]
            n_local = gate_up_EFH.shape[0] // ep_size
            for e in range(n_local):
                # transformers: gate, up = linear(x, gate_up_proj[e]).chunk(2); megatron GLU:
                # act(chunk 0) * chunk 1 of linear_fc1 -> identical row layout [gate; up].
                g = ep_rank * n_local + e
                out[m + f"mlp.experts.local_experts.{e}.linear_fc1.weight"] = gate_up_EFH[g]
                out[m + f"mlp.experts.local_experts.{e}.linear_fc2.weight"] = down_EHI[g]
        else:
            out[m + "mlp.linear_fc1.weight"] = torch.cat(
                [hf_sd[a + "mlp.gate_proj.weight"], hf_sd[a + "mlp.up_proj.weight"]], dim=0
            )
            out[m + "mlp.linear_fc2.weight"] = hf_sd[a + "mlp.down_proj.weight"]
    if post_process:
        out["decoder.final_layernorm.weight"] = hf_sd["model.norm.weight"]
        if not hf_config.tie_word_embeddings:
            out["output_layer.weight"] = hf_sd["lm_head.weight"]
    return {k: tp_shard(k, v, tp_rank, tp_size) for k, v in out.items()}


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def stage_layers(model) -> range:
    """The global decoder-layer indices this model (one pipeline stage) holds: megatron numbers its
    layers globally (`TransformerLayer.layer_number` = 1 + index within the stage + the stage's
    get_transformer_layer_offset) while its state dict names them by index within the stage."""
    block = getattr(model, "decoder", None) or model.module.decoder  # a GPTModel, or megatron's DDP around one
    numbers = [layer.layer_number for layer in block.layers]
    first = numbers[0] - 1 if numbers else 0
    if numbers != list(range(first + 1, first + 1 + len(numbers))):
        raise ValueError(f"the stage's decoder layers are not one contiguous block: layer numbers {numbers}")
    return range(first, first + len(numbers))


def to_global_layer_names(mg_sd: Mapping[str, torch.Tensor], offset: int) -> dict[str, torch.Tensor]:
    """A pipeline stage's state dict with its layers renamed from stage-local `decoder.layers.{i}` to
    global `decoder.layers.{i + offset}` (offset: the stage's first global layer, stage_layers)."""
    if offset == 0:
        return dict(mg_sd)
    return {_LAYER.sub(lambda m: f"decoder.layers.{int(m.group(1)) + offset}.", k): v for k, v in mg_sd.items()}


def megatron_to_hf(mg_sd: Mapping[str, torch.Tensor], hf_config, *, consume: bool = False) -> dict[str, torch.Tensor]:
    """megatron GPTModel (local spec) state dict -> transformers Qwen3(-MoE) state dict
    (`_extra_state` entries are dropped). Tensors are detached copies' views: clone before
    mutating. consume: empty `mg_sd` (a dict) while converting, so each layer's per-expert tensors are
    freed as they are stacked (a whole gathered model is not held twice: the weight sync)."""
    nh, ng, d = hf_config.num_attention_heads, hf_config.num_key_value_heads, _head_dim(hf_config)
    sd = {k: v.detach() for k, v in mg_sd.items() if not k.endswith("_extra_state")}
    if consume:
        mg_sd.clear()  # type: ignore[attr-defined]
    out = {"model.embed_tokens.weight": sd["embedding.word_embeddings.weight"]}
    expert_re = re.compile(r"mlp\.experts\.local_experts\.(\d+)\.linear_fc1\.weight$")
    for i, moe in enumerate(moe_layer_pattern(hf_config)):
        a, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        out[a + "input_layernorm.weight"] = sd[m + "input_layernorm.weight"]
        q, k, v = _qkv_unpack(sd[m + "self_attention.linear_qkv.weight"], nh, ng, d)
        out[a + "self_attn.q_proj.weight"], out[a + "self_attn.k_proj.weight"] = q, k
        out[a + "self_attn.v_proj.weight"] = v
        out[a + "self_attn.o_proj.weight"] = sd[m + "self_attention.linear_proj.weight"]
        out[a + "self_attn.q_norm.weight"] = sd[m + "self_attention.q_layernorm.weight"]
        out[a + "self_attn.k_norm.weight"] = sd[m + "self_attention.k_layernorm.weight"]
        out[a + "post_attention_layernorm.weight"] = sd[m + "pre_mlp_layernorm.weight"]
        if moe:
            n_exp = sum(1 for key in sd if key.startswith(m) and expert_re.search(key))
            if n_exp != hf_config.num_experts:
                raise ValueError(
                    f"layer {i}: found {n_exp} local experts in the megatron state dict, expected "
                    f"{hf_config.num_experts}; likely cause: expert parallelism (EP > 1) shards "
                    f"experts across ranks: gather them before converting"
                )
            out[a + "mlp.gate.weight"] = sd[m + "mlp.router.weight"]
            ex = m + "mlp.experts.local_experts."
            get = sd.pop if consume else sd.__getitem__
            out[a + "mlp.experts.gate_up_proj"] = torch.stack([get(f"{ex}{e}.linear_fc1.weight") for e in range(n_exp)])
            out[a + "mlp.experts.down_proj"] = torch.stack([get(f"{ex}{e}.linear_fc2.weight") for e in range(n_exp)])
        else:
            gate, up = sd[m + "mlp.linear_fc1.weight"].chunk(2, dim=0)
            out[a + "mlp.gate_proj.weight"], out[a + "mlp.up_proj.weight"] = gate, up
            out[a + "mlp.down_proj.weight"] = sd[m + "mlp.linear_fc2.weight"]
    out["model.norm.weight"] = sd["decoder.final_layernorm.weight"]
    out["lm_head.weight"] = sd[
        "embedding.word_embeddings.weight" if hf_config.tie_word_embeddings else "output_layer.weight"
    ]
    return out


def load_hf_weights(
    model,
    hf_sd: Mapping[str, torch.Tensor],
    hf_config,
    *,
    ep_rank: int = 0,
    ep_size: int = 1,
    tp_rank: int = 0,
    tp_size: int = 1,
) -> None:
    """Copy transformers weights into a megatron GPTModel (this EP rank's experts, this TP rank's
    shards, this pipeline stage's layers); every parameter must be covered."""
    mg_sd = hf_to_megatron(
        hf_sd,
        hf_config,
        ep_rank=ep_rank,
        ep_size=ep_size,
        tp_rank=tp_rank,
        tp_size=tp_size,
        layers=stage_layers(model),
        pre_process=model.pre_process,
        post_process=model.post_process,
    )
    missing, unexpected = model.load_state_dict(mg_sd, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(
            f"weight conversion mismatch: megatron parameters without a transformers source "
            f"{missing[:8]} ({len(missing)}), converted names megatron does not have "
            f"{list(unexpected)[:8]} ({len(unexpected)}); likely cause: a layer spec other than "
            f"megatron's local spec (e.g. Transformer Engine names)"
        )


def gpt_logits(model, input_ids_BS: torch.Tensor) -> torch.Tensor:
    """Logits [B, S, V] of a right-padded batch (float32 on CPU); on a pipeline stage other than
    the last, its output hidden states [S, B, H] (S / TP rows under sequence parallelism), which the
    pipeline schedule sends to the next stage (the input ids are then only read for their shape).

    Right padding needs no padding mask: a real token never attends to a later position. The
    causal mask is passed explicitly (True = masked) because megatron's default one is built on
    "cuda". Inside the model the token rows are seq-major ([S, B]), see megatron_replay.py.
    """
    b, s = input_ids_BS.shape
    dev = input_ids_BS.device
    position_ids_BS = torch.arange(s, device=dev).unsqueeze(0).expand(b, s)
    causal_11SS = torch.ones(s, s, dtype=torch.bool, device=dev).triu(1)[None, None]
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp > 1 and s % tp:
        raise ValueError(
            f"sequence parallelism splits the sequence over TP = {tp} ranks: S = {s} must be a "
            f"multiple of {tp} (right-pad the batch)"
        )
    with cpu_device_scope():
        logits = model(input_ids_BS, position_ids_BS, attention_mask=causal_11SS)
        if not parallel_state.is_pipeline_last_stage():  # hidden states [S(/TP), B, H] for the next stage
            return logits
        if tp > 1:  # vocab-parallel logits [B, S, V / TP] -> [B, S, V] (its backward takes this rank's part)
            from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

            logits = gather_from_tensor_model_parallel_region(logits)
        return logits
