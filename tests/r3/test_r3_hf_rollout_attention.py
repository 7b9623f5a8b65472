"""The transformers rollout engine's bf16 attention with fp32 internals (r3.engines.hf.rollout._sdpa_fp32):
the fp32 engine is untouched, and a bf16 engine keeps bf16's mismatch against the fp32 trainer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from r3.engines.base import SamplingParams
from r3.engines.hf.rollout import _SDPA_FP32, HFRolloutEngine

SFT = Path(__file__).resolve().parents[2] / "experiments" / "shipped_zoo" / "tiny" / "sft"
pytestmark = pytest.mark.skipif(not (SFT / "config.json").exists(), reason="shipped tiny zoo missing")


def _token_logp(model, ids_BS: torch.Tensor) -> torch.Tensor:
    """float32 [B, S-1]: log p(ids[t+1] | ids[:t+1]) under `model`."""
    with torch.no_grad():
        logits = model(input_ids=ids_BS).logits.float()
    return torch.log_softmax(logits[:, :-1], -1).gather(-1, ids_BS[:, 1:, None])[..., 0]


def test_precisions_pick_their_attention():
    """fp32 attention internals are opt-in (fp32_attention) for bf16 / fp8 engines; fp32 never changes."""
    assert HFRolloutEngine(SFT, precision="fp32", fp32_attention=True).model.config._attn_implementation == "sdpa"
    for precision in ("bf16", "fp8"):
        assert HFRolloutEngine(SFT, precision=precision).model.config._attn_implementation == "sdpa"
        on = HFRolloutEngine(SFT, precision=precision, fp32_attention=True)
        assert on.model.config._attn_implementation == _SDPA_FP32


def test_bf16_attention_in_fp32_keeps_the_bf16_mismatch():
    """Against an fp32 forward (the trainer's numerics), the bf16 engine with fp32 attention
    internals differs as much as one with torch's bf16 attention kernel (same class of mismatch,
    not fp32's); and the two bf16 variants are far closer to each other than either is to fp32."""
    torch.manual_seed(0)
    ref = HFRolloutEngine(SFT, precision="fp32")
    new = HFRolloutEngine(SFT, precision="bf16", fp32_attention=True)
    native = HFRolloutEngine(SFT, precision="bf16")
    prompts = [[1, 5 + i % 10, 7, 4 + i % 7, 9] for i in range(32)]
    out = ref.generate(prompts, SamplingParams(max_new_tokens=24, seed=0))
    L = min(len(s.prompt_ids) + len(s.response_ids) for s in out)
    ids_BS = torch.tensor([(s.prompt_ids + s.response_ids)[:L] for s in out])
    lp_ref, lp_new, lp_native = (_token_logp(e.model, ids_BS) for e in (ref, new, native))
    d_new = (lp_new - lp_ref).abs().mean().item()
    d_native = (lp_native - lp_ref).abs().mean().item()
    d_pair = (lp_new - lp_native).abs().mean().item()
    assert d_native > 1e-4  # bf16 really differs from fp32 here
    assert 0.5 * d_native < d_new < 2.0 * d_native, (d_new, d_native)
    assert d_pair < d_native, (d_pair, d_native)


def test_bf16_generate_with_fp32_attention_is_seeded_and_captures():
    eng = HFRolloutEngine(SFT, precision="bf16", fp32_attention=True)
    prompts = [[1, 6, 7, 8, 9]] * 4
    a = eng.generate(prompts, SamplingParams(max_new_tokens=12, seed=3), capture_routing=True)
    b = eng.generate(prompts, SamplingParams(max_new_tokens=12, seed=3), capture_routing=True)
    assert [s.response_ids for s in a] == [s.response_ids for s in b]
    for s in a:
        assert s.expert_ids_TLK.shape[0] == len(s.prompt_ids) + len(s.response_ids) - 1
