"""FP8 e4m3 per-row quantise-dequantise: error bound and scope."""

import torch
from r3_tiny_models import tiny_moe

from r3.engines.hf.fp8 import FP8_MAX, FP8_REL_ERR, FP8_SUBNORMAL_ABS_ERR, apply_fp8, quantize_dequantize_fp8


def test_error_bound_per_row():
    g = torch.Generator().manual_seed(0)
    # rows with very different magnitudes, including tiny entries that land in the subnormal range
    w = torch.randn(16, 64, generator=g) * torch.logspace(-4, 2, 16)[:, None]
    w[0, :4] = torch.tensor([1e-9, -3e-7, 0.0, 5e-6])
    q = quantize_dequantize_fp8(w)
    scale = w.abs().amax(dim=-1, keepdim=True) / FP8_MAX
    bound = FP8_REL_ERR * w.abs() + FP8_SUBNORMAL_ABS_ERR * scale
    assert ((q - w).abs() <= bound * (1 + 1e-6)).all()
    assert not torch.equal(q, w)  # it does quantise
    # row maxima are exactly representable (they map to 448)
    torch.testing.assert_close(q.abs().amax(-1), w.abs().amax(-1))
    # at most 2^8 distinct magnitudes per row
    assert max(q[r].abs().unique().numel() for r in range(16)) <= 256


def test_3d_expert_weights_and_bf16():
    """Fused expert weights [E, out, in] are quantised per (expert, row): the same as quantising
    each expert's matrix alone, within the error bound, and really on the e4m3 grid."""
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(4, 6, 64, generator=g) * torch.logspace(-2, 1, 4)[:, None, None]).to(torch.bfloat16)
    q = quantize_dequantize_fp8(w)
    assert q.shape == w.shape and q.dtype == torch.bfloat16
    for e in range(4):
        assert torch.equal(q[e], quantize_dequantize_fp8(w[e]))
    wf, qf = w.float(), q.float()
    scale = wf.abs().amax(dim=-1, keepdim=True) / FP8_MAX
    # e4m3 rounding, then bf16's own rounding of the dequantised value (2^-8 relative)
    bound = (FP8_REL_ERR + 2.0**-8) * wf.abs() + FP8_SUBNORMAL_ABS_ERR * scale
    assert ((qf - wf).abs() <= bound * (1 + 1e-6)).all()
    assert not torch.equal(q, w)
    # on each row's grid: value / scale is an e4m3 number (up to bf16 rounding of the product)
    on_grid = (qf / scale).to(torch.float8_e4m3fn).float() * scale
    torch.testing.assert_close(qf, on_grid, rtol=2.0**-7, atol=0)


def test_scope_router_vs_all():
    model = tiny_moe()
    before = {n: p.clone() for n, p in model.named_parameters()}
    names = apply_fp8(model, "router")
    assert names == ["model.layers.0.mlp.gate.weight", "model.layers.1.mlp.gate.weight"]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(names)
    names_all = apply_fp8(tiny_moe(), "all")
    assert (
        "model.layers.0.mlp.experts.gate_up_proj" in names_all and "model.layers.0.self_attn.q_proj.weight" in names_all
    )
    assert not any("embed" in n or n.startswith("lm_head") or "norm" in n for n in names_all)
