"""The transformers rollout engine's preallocated KV cache (r3.engines.hf.rollout._PreallocatedLayer):
the same samples, logprobs and routing as transformers' DynamicCache, with row compaction."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from r3.engines.base import SamplingParams
from r3.engines.hf import rollout

SFT = Path(__file__).resolve().parents[2] / "experiments" / "shipped_zoo" / "tiny" / "sft"
pytestmark = pytest.mark.skipif(not (SFT / "config.json").exists(), reason="shipped tiny zoo missing")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_preallocated_cache_samples_exactly_what_dynamic_cache_samples(precision, monkeypatch):
    from experiments import task

    tok = task.build_tokenizer()
    prompts = [tok(task.format_prompt(p.problem))["input_ids"] for p in task.heldout_problems(24)] * 2
    eng = rollout.HFRolloutEngine(SFT, precision=precision, seed=0)
    params = SamplingParams(max_new_tokens=40, temperature=1.0, seed=5)
    ours = eng.generate(prompts, params, capture_routing=True)
    assert eng.last_generate["compactions"] > 0  # rows left the cache mid-call
    monkeypatch.setattr(rollout, "_preallocated_cache", lambda config, capacity: DynamicCache(config=config))
    ref = eng.generate(prompts, params, capture_routing=True)
    for a, b in zip(ours, ref):
        assert a.response_ids == b.response_ids
        assert torch.equal(a.logprobs_R, b.logprobs_R)
        assert torch.equal(a.expert_ids_TLK, b.expert_ids_TLK)


def test_a_full_cache_says_so():
    layer = rollout._PreallocatedLayer(4)
    layer.update(torch.zeros(2, 1, 3, 8), torch.zeros(2, 1, 3, 8))
    assert layer.get_seq_length() == 3 and layer.keys.shape == (2, 1, 3, 8)
    with pytest.raises(RuntimeError, match=r"KV cache of 4 positions is full \(3 held, 2 more fed\)"):
        layer.update(torch.zeros(2, 1, 2, 8), torch.zeros(2, 1, 2, 8))
