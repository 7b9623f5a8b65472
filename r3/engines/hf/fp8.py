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

`which="w8a8"`: the numerics of FP8 serving (W8A8, e.g. vLLM serving an FP8-dynamic checkpoint:
per-channel weight scales, dynamic per-token activation scales). The weights of attention, dense
MLP and experts are quantised as above; the MoE routers and lm_head stay in the compute dtype
(bf16), as serving engines keep them; and the input of each quantised matmul is quantised too,
with one scale per token, computed on the fly:
    s_t = max_h |x_th| / 448,   x'_th = fp8_e4m3fn(x_th / s_t) * s_t
(the same per-row rounding as the weights, rows = tokens), through forward pre-hooks on the
nn.Linear layers and on each experts module (its input) and a wrapper of the experts' `_apply_gate`
(the down projection's input, act(gate) * up). The hooks are installed once per model; a weight
sync re-quantises only the weights. The experts' hook needs the `batched_mm` or `grouped_mm`
experts implementation (the transformers default; `eager` computes act(gate) * up inline).
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
    if which not in Fp8Scope.__args__:
        raise ValueError(f"fp8 scope must be one of {Fp8Scope.__args__}, got {which!r}")
    names = []
    for name, p in model.named_parameters():
        if p.ndim < 2 or "embed" in name or name.startswith("lm_head"):
            continue
        is_router = name.endswith("mlp.gate.weight")
        if (is_router and which != "w8a8") or (not is_router and which != "router"):
            names.append(name)
    return names


@torch.no_grad()
def apply_fp8(model: nn.Module, which: Fp8Scope) -> list[str]:
    """Replace the selected weights in place by their fp8 quantise-dequantise (and, for `w8a8`, install
    the per-token activation quantisation once). Returns the weights' names."""
    names = fp8_param_names(model, which)
    params = dict(model.named_parameters())
    for name in names:
        params[name].copy_(quantize_dequantize_fp8(params[name]))
    if which == "w8a8" and not hasattr(model, _ACT_HANDLES):
        setattr(model, _ACT_HANDLES, install_activation_quantization(model))
    return names


_ACT_HANDLES = "_r3_fp8_activation_hooks"
"""Model attribute holding the activation-quantisation hooks (installed once, kept across weight syncs)."""
_HOOKED_EXPERTS = ("batched_mm", "grouped_mm")
"""Experts implementations whose forward calls `_apply_gate` (so the down projection's input can be quantised)."""


def _quantize_input(module: nn.Module, args):
    """Forward pre-hook: the first input quantised per token (rows of its last dimension)."""
    return (quantize_dequantize_fp8(args[0]), *args[1:])


def install_activation_quantization(model: nn.Module) -> list:
    """Dynamic per-token e4m3 quantisation of the input of every linear layer whose weight `w8a8`
    quantises: nn.Linear layers but lm_head (attention q/k/v/o, dense MLPs), and each experts module's
    two matmuls (its input, and its `_apply_gate` output: the down projection's input). The routers
    (not nn.Linear: their input stays bf16) and lm_head are untouched. Returns the hook handles."""
    head = model.get_output_embeddings()
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module is not head:
            handles.append(module.register_forward_pre_hook(_quantize_input))
        elif isinstance(getattr(module, "gate_up_proj", None), nn.Parameter) and hasattr(module, "down_proj"):
            impl = getattr(getattr(module, "config", None), "_experts_implementation", None)
            if impl not in _HOOKED_EXPERTS:
                raise ValueError(
                    f"W8A8 emulation of {name}: expected experts_implementation in {_HOOKED_EXPERTS} (their forward "
                    f"calls _apply_gate, where the down projection's input is quantised), got {impl!r}; "
                    "likely cause: a model built with set_experts_implementation('eager')"
                )
            handles.append(module.register_forward_pre_hook(_quantize_input))
            apply_gate = module._apply_gate  # the class's method, bound
            # an instance attribute shadows the class's method: act(gate) * up, then quantised per token
            module._apply_gate = lambda gate_up, f=apply_gate: quantize_dequantize_fp8(f(gate_up))
    return handles
