"""vLLM's routed_experts -> a validated routing trace (light: numpy + torch).

vLLM (`enable_return_routed_experts=True`) returns per completion `routed_experts`: a numpy uint8
array of shape (prompt + completion - 1 - routed_experts_prompt_start, num_layers, top_k), rows in
token order, experts in the engine's top-k order (vllm/outputs.py CompletionOutput.routed_experts;
over HTTP, each /v1/completions choice carries it as base64 of a .npy file). This is DESIGN.md
invariant 1 (one row per fed token), so it maps onto RolloutSample.expert_ids_TLK unchanged and
stays uint8 until replay (r3.trace.place_traces widens it).
"""

from __future__ import annotations

import base64
import io

import numpy as np
import torch

from r3.trace import RoutingSpec, RoutingTrace


def decode_npy_b64(data: str) -> np.ndarray:
    """The array of a base64 .npy string (vLLM's HTTP encoding of routed_experts)."""
    try:
        raw = base64.b64decode(data, validate=True)
        return np.load(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, TypeError, OSError) as e:
        raise ValueError(f"routed_experts is not base64 of a .npy array ({len(data)} chars): {e}") from e


def routing_trace(
    routed_experts: np.ndarray | None,
    *,
    prompt_len: int,
    response_len: int,
    spec: RoutingSpec,
    prompt_start: int = 0,
    where: str = "completion",
) -> torch.Tensor:
    """Validated uint8 expert_ids_TLK [prompt_len + response_len - 1 - prompt_start, L, K].

    Raises ValueError with got/expected numbers on a missing capture, a wrong shape (off-by-one,
    other layer count or top-k), ids outside [0, E), duplicates within a row, or an all-zero layer."""
    if routed_experts is None:
        raise ValueError(
            f"{where}: routed_experts is missing although routing capture was requested; the engine must be "
            "started with enable_return_routed_experts=True (server: --enable-return-routed-experts)"
        )
    arr = np.asarray(routed_experts)
    tokens = prompt_len + response_len - 1 - prompt_start
    if arr.ndim != 3 or arr.shape != (tokens, spec.num_layers, spec.top_k):
        raise ValueError(
            f"{where}: routed_experts element count does not match sample tokens: got={arr.size} (shape "
            f"{tuple(arr.shape)}), expected={tokens * spec.num_layers * spec.top_k} (tokens={tokens} = prompt "
            f"{prompt_len} + response {response_len} - 1 - prompt_start {prompt_start}, num_layers="
            f"{spec.num_layers}, topk={spec.top_k}); likely cause: a model whose MoE layer count / top-k differs "
            "from the trainer's config, or an off-by-one in the prompt/response split"
        )
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{where}: routed_experts must hold integers, got dtype {arr.dtype}")
    if arr.dtype not in (np.uint8, np.int32, np.int64):
        arr = arr.astype(np.int64)
    ids = RoutingTrace(torch.from_numpy(np.ascontiguousarray(arr).copy()), spec, num_tokens=tokens).expert_ids_TLK
    # compact until replay (r3.trace: uint8 when E <= 256); range already checked above
    return ids.to(torch.uint8) if spec.num_experts <= 256 else ids
