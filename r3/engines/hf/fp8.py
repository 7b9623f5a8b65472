"""FP8 inference-engine weight numerics: quantise-dequantise to float8 e4m3 with per-row scales.

An FP8 inference engine (e.g. SGLang/vLLM with `--quantization fp8`) stores linear weights in
float8_e4m3fn with one scale per output channel and computes in bf16. We emulate its numerics on
CPU by replacing each weight W by dequant(quant(W)):
    s_r = max_c |W_rc| / 448            (448 = largest finite e4m3fn value; one scale per row r)
    W'_rc = fp8_e4m3fn(W_rc / s_r) * s_r
e4m3 keeps 3 mantissa bits, so for values in its normal range the round-to-nearest error is at
most 2^-4 of |W| (half an ulp of 2^-3); below the smallest normal (2^-6, scaled) the absolute
error is at most half the smallest subnormal step, 2^-10 * s_r. Hence
    |W - W'| <= 2^-4 |W| + 2^-10 s_r.
Which weights: `which="router"` quantises only the MoE routers (the paper's point: routing is the
fragile part); `which="all"` also quantises attention, dense MLP and expert weights. Embeddings,
norms and lm_head stay in the compute dtype, as FP8 serving engines keep them.
"""

from __future__ import annotations

import torch
from torch import nn

from r3.engines.hf.config import Fp8Scope

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
"""Largest finite float8_e4m3fn value (torch.finfo(torch.float8_e4m3fn).max)."""
FP8_REL_ERR = 2.0**-4
"""Bound on the relative rounding error in e4m3's normal range (3 mantissa bits)."""
FP8_SUBNORMAL_ABS_ERR = 2.0**-10
"""Bound on the absolute rounding error below the normal range, in units of the row scale."""


def quantize_dequantize_fp8(w: torch.Tensor) -> torch.Tensor:
    """Per-row (last-dimension vectors; per output channel of a Linear [out, in]) fp8 e4m3
    quantise-dequantise. Returns a tensor of w's shape and dtype."""
    w32 = w.detach().float()
    scale = (w32.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    q = (w32 / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return (q.float() * scale).to(w.dtype)


def fp8_param_names(model: nn.Module, which: Fp8Scope) -> list[str]:
    """Names of the parameters an FP8 engine would store in fp8."""
    if which not in ("router", "all"):
        raise ValueError(f"fp8 scope must be 'router' or 'all', got {which!r}")
    names = []
    for name, p in model.named_parameters():
        if p.ndim < 2 or "embed" in name or name.startswith("lm_head"):
            continue
        is_router = name.endswith("mlp.gate.weight")
        if is_router or which == "all":
            names.append(name)
    return names


@torch.no_grad()
def apply_fp8(model: nn.Module, which: Fp8Scope) -> list[str]:
    """Replace the selected weights in place by their fp8 quantise-dequantise. Returns their names."""
    names = fp8_param_names(model, which)
    params = dict(model.named_parameters())
    for name in names:
        params[name].copy_(quantize_dequantize_fp8(params[name]))
    return names
