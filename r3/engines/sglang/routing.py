"""SGLang's routed-experts payload -> routing traces, and the response-size estimate that bounds a
/generate batch (light: numpy + torch)."""

from __future__ import annotations

import base64
from collections.abc import Sequence

import torch

from r3.trace import RoutingSpec, RoutingTrace

LOGPROB_ENTRY_BYTES = 40
"""JSON bytes of one `[logprob, token_id, null]` entry of output_token_logprobs (about 35 written)."""


def response_bytes_estimate(prompt_len: int, max_new_tokens: int, *, routing_layers: int, top_k: int) -> int:
    """Upper estimate of one sample's /generate response JSON: base64 of int32 routing rows for
    every fed token (4/3 x 4 B per id) plus one logprob entry per generated token."""
    fed = prompt_len + max_new_tokens - 1
    return fed * routing_layers * top_k * 4 * 4 // 3 + max_new_tokens * LOGPROB_ENTRY_BYTES


def decode_routed_experts(
    b64: str | bytes,
    *,
    seqlen: int,
    spec: RoutingSpec,
    layer_ids: Sequence[int] | None = None,
    num_rows: int | None = None,
) -> RoutingTrace:
    """SGLang's `meta_info.routed_experts` -> a validated RoutingTrace of the MoE layers, uint8 when
    E <= 256 (int32 otherwise).

    Wire format: base64 of little-endian int32, shape (seqlen - 1, num_rows, top_k) with num_rows =
    num_hidden_layers (a row per decoder layer); layer_ids: which rows are MoE layers (None: every
    row, num_rows = spec.num_layers). A payload with exactly spec.num_layers rows is accepted too."""
    import numpy as np

    raw = base64.b64decode(b64)
    if len(raw) % 4:
        raise ValueError(f"routed_experts has {len(raw)} bytes, not a whole number of int32 values")
    flat = np.frombuffer(raw, dtype="<i4")
    tokens, k = seqlen - 1, spec.top_k
    rows = num_rows if num_rows is not None else spec.num_layers
    if flat.size == tokens * rows * k:
        ids = flat.reshape(tokens, rows, k)
        if layer_ids is not None and rows != spec.num_layers:
            ids = ids[:, list(layer_ids)]
    elif flat.size == tokens * spec.num_layers * k:  # a server that sends MoE rows only
        ids = flat.reshape(tokens, spec.num_layers, k)
    else:
        raise ValueError(
            f"routed_experts element count does not match sample tokens: got={flat.size}, expected="
            f"{tokens * rows * k} (tokens={tokens} = seqlen {seqlen} - 1, rows={rows} decoder layers, topk={k})"
            f" or {tokens * spec.num_layers * k} (MoE layers only: {spec.num_layers})"
        )
    lo, hi = (int(ids.min()), int(ids.max())) if ids.size else (0, 0)
    if lo < 0 or hi >= spec.num_experts:
        raise ValueError(f"expert ids must be in [0, {spec.num_experts}), got min={lo} max={hi}")
    narrow = np.uint8 if spec.num_experts <= 256 else np.int32
    return RoutingTrace(torch.from_numpy(np.array(ids, dtype=narrow)), spec)  # a writable copy
