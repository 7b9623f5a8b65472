"""Checkpoint names -> vLLM parameters, for reading back what a vLLM engine holds (light: torch).

vLLM 0.30.0 stores Qwen3-MoE weights fused (read in the installed source,
vllm/model_executor/models/qwen3_moe.py `hf_to_vllm_mapper` and
vllm/model_executor/layers/fused_moe/routed_experts.py `_load_w13` / `_load_w2`), with one rank
(tensor and expert parallel size 1):
- `self_attn.{q,k,v}_proj.weight` -> rows of `self_attn.qkv_proj.weight` [q; k; v], q first
  (num_attention_heads * head_dim rows), then k and v (num_key_value_heads * head_dim rows each);
- a dense layer's `mlp.{gate,up}_proj.weight` -> rows [gate; up] of `mlp.gate_up_proj.weight`;
- `mlp.experts.{e}.gate_proj.weight` [I, H] -> `mlp.experts.w13_weight`[e, :I] (shard w1),
  `up_proj` -> w13_weight[e, I:] (w3), `down_proj` [H, I] -> `mlp.experts.w2_weight`[e]; the
  installed build names them `mlp.experts.routed_experts.w13_weight` (the worker resolves either);
- every other name (embed_tokens, lm_head, o_proj, q/k norms, router `mlp.gate`, layer norms) is the
  same. A vocab padded to a multiple of 64 adds rows after the real ones: indices stay valid.
The request is a list of {"param", "index"} (one per checkpoint tensor of the plan, index = one list
per dimension of the vLLM parameter); the worker (r3.engines.vllm.worker.R3WorkerExtension
.r3_read_weights) answers the values in the same order, as base64 of float32 (exact for fp32 and
bf16; JSON floats would lose NaN, which the server's JSON encoder refuses).
"""

from __future__ import annotations

import base64
import json

import numpy as np
import torch

from r3.engines.weight_check import EXPERT, ReadbackPlan


def vllm_location(name: str, index: tuple[torch.Tensor, ...], hf_config) -> tuple[str, tuple[torch.Tensor, ...]]:
    """(vLLM parameter name, index into it) of the checkpoint tensor `name` at `index`."""
    m = EXPERT.match(name)
    if m:
        rows, cols = index
        e = torch.full_like(rows, int(m["e"]))
        if m["proj"] == "down_proj":
            return f"{m['layer']}w2_weight", (e, rows, cols)
        offset = 0 if m["proj"] == "gate_proj" else int(hf_config.moe_intermediate_size)
        return f"{m['layer']}w13_weight", (e, rows + offset, cols)
    heads, kv = int(hf_config.num_attention_heads), int(hf_config.num_key_value_heads)
    head_dim = getattr(hf_config, "head_dim", None) or int(hf_config.hidden_size) // heads
    for proj, offset in (("q_proj", 0), ("k_proj", heads * head_dim), ("v_proj", (heads + kv) * head_dim)):
        suffix = f".self_attn.{proj}."
        if suffix in name:
            return name.replace(suffix, ".self_attn.qkv_proj."), (index[0] + offset, *index[1:])
    for proj, offset in (("gate_proj", 0), ("up_proj", int(getattr(hf_config, "intermediate_size", 0)))):
        suffix = f".mlp.{proj}."
        if suffix in name:
            return name.replace(suffix, ".mlp.gate_up_proj."), (index[0] + offset, *index[1:])
    return name, index


def read_request(plan: ReadbackPlan, hf_config) -> str:
    """The JSON argument of `r3_read_weights`: one {"param", "index"} entry per plan tensor, in plan order."""
    entries = []
    for name in plan.positions:
        param, idx = vllm_location(name, plan.index(name), hf_config)
        entries.append({"param": param, "index": [i.tolist() for i in idx]})
    return json.dumps({"entries": entries})


def decode_values(plan: ReadbackPlan, reply: dict, *, where: str) -> tuple[object, dict[str, torch.Tensor]]:
    """(reported weight version, checkpoint name -> float32 values) from one worker's reply."""
    from r3.engines.sync_check import SyncCheckError

    if not isinstance(reply, dict) or reply.get("error"):
        raise SyncCheckError(
            f"{where} could not read back its weights: "
            f"{reply.get('error') if isinstance(reply, dict) else str(reply)[:300]}"
        )
    values = reply.get("values")
    if not isinstance(values, list) or len(values) != len(plan.positions):
        n = len(values) if isinstance(values, list) else None
        raise SyncCheckError(f"{where} returned {n} read-back tensors, expected {len(plan.positions)}")
    out = {}
    for name, b64 in zip(plan.positions, values):
        out[name] = torch.from_numpy(np.frombuffer(base64.b64decode(b64), dtype="<f4").copy())
    return reply.get("version"), out
