"""Lazy per-rank checkpoint reading (r3.engines.megatron.hf_io): the on-disk per-expert names read
back as transformers' fused in-memory tensors, and an EP rank reads only its own experts."""

from __future__ import annotations

import pytest
import torch
from r3_tiny_models import tiny_moe

from r3.engines.megatron.hf_io import ExpertStack, LazyHFStateDict


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    hf = tiny_moe(0, router_std=0.5)
    d = tmp_path_factory.mktemp("ckpt")
    hf.save_pretrained(d)
    return hf, d


def test_lazy_state_dict_equals_the_in_memory_one(saved):
    hf, d = saved
    lazy, ref = LazyHFStateDict(d), hf.state_dict()
    assert set(lazy) == set(ref)
    for k, v in ref.items():
        got = lazy[k]
        if isinstance(got, ExpertStack):
            got = torch.stack([got[e] for e in range(got.shape[0])])
        assert torch.equal(got, v), k


@pytest.mark.megatron
def test_an_ep_rank_reads_only_its_experts(saved):
    pytest.importorskip("megatron.core")
    from r3.engines.megatron.model import hf_to_megatron

    hf, d = saved
    lazy = LazyHFStateDict(d)
    reads = []
    read = lazy.read
    lazy.read = lambda name: (reads.append(name), read(name))[1]
    out = hf_to_megatron(lazy, hf.config, ep_rank=1, ep_size=2)
    experts = {int(n.split(".experts.")[1].split(".")[0]) for n in reads if ".experts." in n}
    assert experts == {4, 5, 6, 7}
    ref = hf.state_dict()["model.layers.1.mlp.experts.gate_up_proj"][5]
    assert torch.equal(out["decoder.layers.1.mlp.experts.local_experts.1.linear_fc1.weight"], ref)


def test_not_a_checkpoint_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        LazyHFStateDict(tmp_path)


@pytest.mark.megatron
def test_export_hf_loads_into_transformers_with_equal_logits(tmp_path):
    pytest.importorskip("megatron.core")
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from r3.engines.megatron.model import gpt_logits
    from r3.engines.megatron.train import MegatronTrainEngine

    eng = MegatronTrainEngine(tiny_moe(3, router_std=0.5), lr=1e-3)
    with torch.no_grad():
        for p in eng.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = eng.export_hf(str(tmp_path / "hf"), dtype=torch.float32)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in keys and not any(k.endswith("gate_up_proj") for k in keys)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (hf(ids).logits - gpt_logits(eng.model.eval(), ids)).abs().max().item() < 1e-5
