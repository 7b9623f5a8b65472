"""Routing traces: the (tokens, MoE layers, top_k) expert-id tensor, validated at the boundary.

Alignment (DESIGN.md invariant 1): a sequence of n tokens has n - 1 rows, one per fed token
(SGLang's convention: the last token is never fed). Top-k order is the engine's order and is
never sorted (invariant 2): it changes bf16 accumulation in the experts' weighted sum.

Validation follows slime (THUDM) `routed_experts` handling: element-count mismatches are
reported with got/expected numbers, and an all-zero MoE layer (a capture that never ran) is
refused rather than replayed.

Compact storage: uint8 ids when E <= 256, uint16 otherwise, and bit packing at ceil(log2 E)
bits per id as the floor (Qwen3-30B-A3B: 48 layers x top-8 x 7 bits = 336 bytes per token).
"""

from __future__ import annotations

import base64
import dataclasses
import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

Encoding = Literal["uint8", "uint16", "bitpack"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class RoutingSpec:
    """The routing geometry of one model."""

    num_layers: int
    """L: number of MoE layers (dense layers have no routing row)."""
    top_k: int
    """K: experts chosen per token per layer."""
    num_experts: int
    """E: routed experts per layer; ids are in [0, E)."""

    def __post_init__(self) -> None:
        if self.num_layers < 1 or self.top_k < 1 or self.num_experts < self.top_k:
            raise ValueError(
                f"invalid routing spec: num_layers={self.num_layers} (>= 1), top_k={self.top_k} (>= 1), "
                f"num_experts={self.num_experts} (>= top_k)"
            )

    @property
    def bits_per_id(self) -> int:
        return max(1, math.ceil(math.log2(self.num_experts)))

    @classmethod
    def from_hf_config(cls, config) -> "RoutingSpec":
        """From a transformers Qwen3-MoE config: MoE layers are those not in mlp_only_layers whose
        (index + 1) is divisible by decoder_sparse_step (modeling_qwen3_moe.Qwen3MoeDecoderLayer)."""
        step = getattr(config, "decoder_sparse_step", 1)
        only = set(getattr(config, "mlp_only_layers", []) or [])
        moe = [i for i in range(config.num_hidden_layers) if i not in only and (i + 1) % step == 0]
        return cls(num_layers=len(moe), top_k=config.num_experts_per_tok, num_experts=config.num_experts)


class RoutingTrace:
    """expert_ids_TLK of one sequence, validated against the model's RoutingSpec at construction.

    Raises ValueError on: wrong shape, ids outside [0, E), a duplicate expert within one
    (token, layer) row, or an all-zero MoE layer (capture bug; refuse to replay it).
    """

    __slots__ = ("expert_ids_TLK", "spec")

    def __init__(self, expert_ids_TLK: torch.Tensor, spec: RoutingSpec, *, num_tokens: int | None = None):
        ids = torch.as_tensor(expert_ids_TLK)
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"routing ids must be an integer tensor, got {ids.dtype}")
        expected_tokens = ids.shape[0] if (num_tokens is None and ids.ndim == 3) else num_tokens
        if (
            ids.ndim != 3
            or ids.shape[1:] != (spec.num_layers, spec.top_k)
            or (expected_tokens is not None and ids.shape[0] != expected_tokens)
        ):
            t = expected_tokens if expected_tokens is not None else "?"
            exp = t * spec.num_layers * spec.top_k if isinstance(t, int) else "?"
            raise ValueError(
                f"routed_experts element count does not match sample tokens: got={ids.numel()} "
                f"(shape {tuple(ids.shape)}), expected={exp} (tokens={t}, num_layers={spec.num_layers}, "
                f"topk={spec.top_k}); likely cause: off-by-one from the last token (n tokens have n-1 "
                "rows) or a model whose layer count / top-k differs from the trace's"
            )
        validate_expert_ids(ids, spec)
        self.expert_ids_TLK = ids
        self.spec = spec

    @property
    def num_tokens(self) -> int:
        return self.expert_ids_TLK.shape[0]

    def __len__(self) -> int:
        return self.num_tokens

    def __repr__(self) -> str:
        s = self.spec
        return f"RoutingTrace(T={self.num_tokens}, L={s.num_layers}, K={s.top_k}, E={s.num_experts})"


def validate_expert_ids(ids_NLK: torch.Tensor, spec: RoutingSpec, *, check_all_zero: bool = True) -> None:
    """Check an [..., L, K] id tensor: range, duplicates within a row, all-zero layers."""
    if ids_NLK.numel() == 0:
        return
    lo, hi = int(ids_NLK.min()), int(ids_NLK.max())
    if lo < 0 or hi >= spec.num_experts:
        raise ValueError(
            f"expert ids must be in [0, {spec.num_experts}), got min={lo} max={hi}; likely cause: the trace "
            "comes from a model with more experts, or padding filled with -1"
        )
    flat_NLK = ids_NLK.reshape(-1, spec.num_layers, spec.top_k)
    if spec.top_k > 1:
        srt = flat_NLK.sort(dim=-1).values
        dup = (srt[..., 1:] == srt[..., :-1]).any(dim=-1)
        if dup.any():
            n, l = (int(v) for v in dup.nonzero()[0])
            raise ValueError(
                f"duplicate expert within one routing row: token {n}, layer {l}, ids "
                f"{flat_NLK[n, l].tolist()}; a token cannot route twice to one expert (padding rows must "
                "use distinct dummy experts 0..K-1, see pad_traces)"
            )
    if check_all_zero and flat_NLK.shape[0] * spec.top_k > 1:  # one id of 0 is legitimate
        zero_L = (flat_NLK == 0).all(dim=-1).all(dim=0)
        if zero_L.any():
            raise ValueError(
                f"MoE layer(s) {zero_L.nonzero().flatten().tolist()} have all-zero routing over "
                f"{flat_NLK.shape[0]} tokens: the capture did not run for them; refusing to replay"
            )


# --- compact storage --------------------------------------------------------------------------


def default_encoding(num_experts: int) -> Encoding:
    """uint8 when ids fit a byte (E <= 256), uint16 otherwise."""
    return "uint8" if num_experts <= 256 else "uint16"


def encoded_nbytes(num_tokens: int, spec: RoutingSpec, encoding: Encoding) -> int:
    n = num_tokens * spec.num_layers * spec.top_k
    if encoding == "uint8":
        return n
    if encoding == "uint16":
        return 2 * n
    if encoding == "bitpack":
        return math.ceil(n * spec.bits_per_id / 8)
    raise ValueError(f"unknown encoding {encoding!r}; expected uint8, uint16 or bitpack")


def encode(trace: RoutingTrace, encoding: Encoding) -> bytes:
    """Serialise the ids in row-major [T, L, K] order (top-k order preserved); no header."""
    ids = trace.expert_ids_TLK.reshape(-1).to(torch.int64).numpy()
    spec = trace.spec
    if encoding == "uint8":
        if spec.num_experts > 256:
            raise ValueError(f"uint8 holds ids < 256, but num_experts={spec.num_experts}; use uint16 or bitpack")
        return ids.astype(np.uint8).tobytes()
    if encoding == "uint16":
        if spec.num_experts > 65536:
            raise ValueError(f"uint16 holds ids < 65536, but num_experts={spec.num_experts}; use bitpack")
        return ids.astype("<u2").tobytes()
    if encoding == "bitpack":
        b = spec.bits_per_id
        bits_NB = ((ids[:, None] >> np.arange(b, dtype=np.int64)) & 1).astype(np.uint8)  # LSB first
        return np.packbits(bits_NB.reshape(-1), bitorder="little").tobytes()
    raise ValueError(f"unknown encoding {encoding!r}; expected uint8, uint16 or bitpack")


def decode(data: bytes, *, encoding: Encoding, num_tokens: int, spec: RoutingSpec) -> RoutingTrace:
    """Inverse of `encode`; the byte length is checked against (num_tokens, spec)."""
    expected = encoded_nbytes(num_tokens, spec, encoding)
    if len(data) != expected:
        raise ValueError(
            f"encoded routing has {len(data)} bytes, expected {expected} (tokens={num_tokens}, "
            f"num_layers={spec.num_layers}, topk={spec.top_k}, encoding={encoding}, "
            f"bits/id={spec.bits_per_id if encoding == 'bitpack' else None})"
        )
    n = num_tokens * spec.num_layers * spec.top_k
    if encoding == "uint8":
        ids = np.frombuffer(data, dtype=np.uint8).astype(np.int64)
    elif encoding == "uint16":
        ids = np.frombuffer(data, dtype="<u2").astype(np.int64)
    else:
        b = spec.bits_per_id
        bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")[: n * b]
        ids = (bits.reshape(n, b).astype(np.int64) << np.arange(b, dtype=np.int64)).sum(axis=1)
    ids_TLK = torch.from_numpy(ids.reshape(num_tokens, spec.num_layers, spec.top_k).copy())
    return RoutingTrace(ids_TLK, spec)


# --- engines' wire formats --------------------------------------------------------------------


def from_sglang(routed_experts_b64: str | bytes, *, seqlen: int, spec: RoutingSpec, start_len: int = 0) -> RoutingTrace:
    """SGLang `meta_info["routed_experts"]`: base64 of raw int32, logical shape
    (seqlen - 1 - start_len, num_hidden_layers, top_k) (PAPER.md "Engines' wire formats")."""
    raw = base64.b64decode(routed_experts_b64)
    if len(raw) % 4:
        raise ValueError(f"routed_experts has {len(raw)} bytes, not a whole number of int32 values")
    flat = np.frombuffer(raw, dtype="<i4")
    tokens = seqlen - 1 - start_len
    expected = tokens * spec.num_layers * spec.top_k
    if flat.size != expected:
        raise ValueError(
            f"routed_experts element count does not match sample tokens: got={flat.size}, expected={expected} "
            f"(tokens={tokens} = seqlen {seqlen} - 1 - start_len {start_len}, num_layers={spec.num_layers}, "
            f"topk={spec.top_k})"
        )
    ids = torch.from_numpy(flat.astype(np.int64).reshape(tokens, spec.num_layers, spec.top_k))
    return RoutingTrace(ids, spec)


def to_sglang(trace: RoutingTrace) -> str:
    """The inverse of from_sglang (used by tests and by fake servers)."""
    return base64.b64encode(trace.expert_ids_TLK.to(torch.int32).numpy().astype("<i4").tobytes()).decode()


# --- batching ---------------------------------------------------------------------------------


def trace_dtype(num_experts: int) -> torch.dtype:
    """The in-memory dtype of a batch trace: uint8 when E <= 256 (Qwen3-30B-A3B's 128 experts), else
    int32. Not int16: NCCL has no 16-bit integer type (its types: int8/uint8, int32/uint32,
    int64/uint64 and floats), and the batch trace is broadcast and recordings all-gathered over it.
    Index operations convert to int64 per micro-batch (r3.engines.*.replay)."""
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    return torch.uint8 if num_experts <= 256 else torch.int32


def dummy_rows(num_rows: int, num_layers: int, top_k: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Padding rows [num_rows, L, K] holding experts 0..K-1: distinct, so no token routes twice."""
    return torch.arange(top_k, dtype=dtype).expand(num_rows, num_layers, top_k).clone()


def pad_traces(
    traces: Sequence[RoutingTrace | torch.Tensor], T_max: int, *, num_experts: int | None = None
) -> torch.Tensor:
    """Right-pad per-sequence traces to T_max rows. Returns expert_ids_BTLK [B, T_max, L, K] of
    `trace_dtype(E)` (uint8 for E <= 256: the paper's 1024 x 9215 x 48 x 8 trace is 3.6 GB, not the
    29 GB of int64); padding rows hold the distinct dummy experts 0..K-1.

    E: `num_experts`, else the traces' RoutingSpec, else the largest id + 1 (ids of raw tensors are
    range-checked against the dtype's capacity before the cast, never wrapped)."""
    tensors = [t.expert_ids_TLK if isinstance(t, RoutingTrace) else torch.as_tensor(t) for t in traces]
    if not tensors:
        raise ValueError("pad_traces needs at least one trace")
    _, num_layers, top_k = tensors[0].shape
    for b, t in enumerate(tensors):
        if t.ndim != 3 or t.shape[1:] != (num_layers, top_k):
            raise ValueError(f"trace {b} has shape {tuple(t.shape)}, expected [T, {num_layers}, {top_k}]")
        if t.shape[0] > T_max:
            raise ValueError(f"trace {b} has {t.shape[0]} rows > T_max={T_max}; T_max must cover the longest")
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(f"trace {b}: routing ids must be integers, got dtype {t.dtype}")
    if num_experts is None:
        specs = [t.spec.num_experts for t in traces if isinstance(t, RoutingTrace)]
        num_experts = max(specs) if specs else 1 + max(int(t.max()) if t.numel() else 0 for t in tensors)
    dtype = trace_dtype(num_experts)
    for b, t in enumerate(tensors):
        if t.dtype != dtype and t.numel():
            lo, hi = int(t.min()), int(t.max())
            if lo < 0 or hi >= num_experts:
                raise ValueError(
                    f"trace {b}: expert ids must be in [0, {num_experts}), got min={lo} max={hi}; likely cause: "
                    "padding filled with -1, or a trace of a model with more experts"
                )
    out_BTLK = dummy_rows(len(tensors) * T_max, num_layers, top_k, dtype).view(len(tensors), T_max, num_layers, top_k)
    for b, t in enumerate(tensors):
        out_BTLK[b, : t.shape[0]] = t
    return out_BTLK


def place_traces(traces: Sequence[RoutingTrace | torch.Tensor], fed_mask_BT: torch.Tensor) -> torch.Tensor:
    """Scatter per-sequence traces onto the real (mask == 1) positions of a padded batch (left or
    right padding); other positions get dummy rows. Returns int64 [B, T, L, K]."""
    tensors = [t.expert_ids_TLK if isinstance(t, RoutingTrace) else torch.as_tensor(t) for t in traces]
    B, T = fed_mask_BT.shape
    if len(tensors) != B:
        raise ValueError(f"got {len(tensors)} traces for a batch of {B} sequences")
    _, num_layers, top_k = tensors[0].shape
    out_BTLK = dummy_rows(B * T, num_layers, top_k).view(B, T, num_layers, top_k)
    mask = fed_mask_BT.bool()
    for b, t in enumerate(tensors):
        n = int(mask[b].sum())
        if t.shape[0] != n:
            raise ValueError(
                f"sequence {b}: trace has {t.shape[0]} rows but the batch feeds {n} real tokens; likely "
                "cause: off-by-one from the last token (n tokens have n-1 rows: feed input_ids[:, :-1])"
            )
        out_BTLK[b, mask[b]] = t.to(torch.int64)
    return out_BTLK
