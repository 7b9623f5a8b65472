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


# --- W8A8: FP8 serving numerics (weights and per-token activations; routers and lm_head bf16) ------
def _on_row_grid(x: torch.Tensor) -> bool:
    """Each row of x (last dimension) is an e4m3 number times the row's scale max|x|/448, up to the
    compute dtype's rounding of the dequantised value."""
    xf = x.float()
    scale = (xf.abs().amax(-1, keepdim=True) / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    on_grid = (xf / scale).to(torch.float8_e4m3fn).float() * scale
    return bool(torch.allclose(xf, on_grid, rtol=2.0**-7, atol=0))


def test_w8a8_scope_keeps_routers_and_head_and_quantises_the_rest():
    names = apply_fp8(tiny_moe(experts_implementation="grouped_mm"), "w8a8")
    assert "model.layers.0.self_attn.q_proj.weight" in names and "model.layers.1.mlp.experts.down_proj" in names
    assert not any(n.endswith("mlp.gate.weight") or n.startswith("lm_head") or "embed" in n for n in names)


def test_w8a8_engine_quantises_activations_per_token_and_keeps_router_and_head_bf16():
    from r3.engines.base import SamplingParams
    from r3.engines.hf.rollout import HFRolloutEngine

    src = tiny_moe(seed=3, experts_implementation="grouped_mm")
    eng = HFRolloutEngine(src, precision="fp8", fp8_scope="w8a8")
    m, ref = eng.model, dict(src.named_parameters())
    for name, p in m.named_parameters():
        bf16 = ref[name].detach().to(torch.bfloat16)
        if name.endswith("mlp.gate.weight") or name.startswith("lm_head") or "embed" in name or "norm" in name:
            assert torch.equal(p, bf16), name  # bf16, unquantised
        else:
            assert not torch.equal(p, bf16) and torch.equal(p, quantize_dequantize_fp8(bf16)), name
    seen: dict[str, list[torch.Tensor]] = {"q_proj": [], "o_proj": [], "experts": [], "down_in": [], "router": []}
    layer = m.model.layers[0]
    # pre-hooks registered after the W8A8 ones see the quantised inputs
    layer.self_attn.q_proj.register_forward_pre_hook(lambda mod, a: seen["q_proj"].append(a[0]))
    layer.self_attn.o_proj.register_forward_pre_hook(lambda mod, a: seen["o_proj"].append(a[0]))
    layer.mlp.experts.register_forward_pre_hook(lambda mod, a: seen["experts"].append(a[0]))
    layer.mlp.gate.register_forward_pre_hook(lambda mod, a: seen["router"].append(a[0]))
    apply_gate = layer.mlp.experts._apply_gate
    layer.mlp.experts._apply_gate = lambda x: seen["down_in"].append(apply_gate(x)) or seen["down_in"][-1]
    s = eng.generate([[5, 6, 7, 8], [9, 10]], SamplingParams(max_new_tokens=3, seed=0), capture_routing=True)
    assert all(len(x.response_ids) == 3 for x in s)
    for key in ("q_proj", "o_proj", "experts", "down_in"):
        assert seen[key] and all(_on_row_grid(x.reshape(-1, x.shape[-1])) for x in seen[key]), key
    assert not all(_on_row_grid(x.reshape(-1, x.shape[-1])) for x in seen["router"])  # the router's input is bf16
    # hooks are installed once: a weight sync re-quantises the weights and adds no second hook
    n_hooks = len(layer.self_attn.q_proj._forward_pre_hooks)
    eng.sync_weights(src.state_dict())
    assert len(layer.self_attn.q_proj._forward_pre_hooks) == n_hooks
    w = layer.self_attn.q_proj.weight
    assert torch.equal(w, quantize_dequantize_fp8(ref["model.layers.0.self_attn.q_proj.weight"].detach().bfloat16()))


def test_w8a8_refuses_the_eager_experts_implementation():
    import pytest

    with pytest.raises(
        ValueError, match=r"expected experts_implementation in \('batched_mm', 'grouped_mm'\).*got 'eager'"
    ):
        apply_fp8(tiny_moe(experts_implementation="eager"), "w8a8")
