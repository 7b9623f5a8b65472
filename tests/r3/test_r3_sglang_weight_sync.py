"""Weight sync to SGLang writes what SGLang's (and vLLM's) Qwen3-MoE loader loads: on-disk
per-expert names (`mlp.experts.{e}.{gate,up,down}_proj.weight`), never transformers-5's fused
in-memory names, which those loaders skip. The written directory is loaded
back with transformers and compared tensor by tensor; the megatron trainer's export goes through
the same writer."""

from __future__ import annotations

import re

import pytest
import torch
from r3_tiny_models import tiny_moe
from safetensors import safe_open

from r3.engines.hf_checkpoint import to_checkpoint_names
from r3.engines.sglang.engine import SGLangRolloutEngine

FUSED = re.compile(r"experts\.(gate_up_proj|down_proj|gate_proj|up_proj)$")


class _Server:
    """A transport that accepts update_weights_from_disk and remembers the paths."""

    def __init__(self):
        self.loaded = []

    def __call__(self, method, url, body, timeout_s):
        assert url.endswith("/update_weights_from_disk"), url
        self.loaded.append(body["model_path"])
        return 200, {"success": True, "message": "ok"}


def _sync(state_dict, base_dir, tmp_path):
    server = _Server()
    eng = SGLangRolloutEngine(
        ["http://sglang:30000"], weight_sync_dir=tmp_path / "sync", base_model_path=base_dir, transport=server
    )
    eng.sync_weights(state_dict)
    return server.loaded[-1]


def _check_on_disk_names(path, cfg):
    with safe_open(f"{path}/model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert not [k for k in keys if FUSED.search(k)], "fused in-memory expert names written"
    for layer in range(cfg.num_hidden_layers):
        for e in range(cfg.num_experts):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                assert f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight" in keys, (layer, e, proj)
    return keys


def test_sync_writes_per_expert_names_that_transformers_loads_exactly(tmp_path):
    from transformers import AutoModelForCausalLM

    hf = tiny_moe(0, router_std=0.5)
    base = tmp_path / "base"
    hf.save_pretrained(base)
    with torch.no_grad():  # new policy weights, different from the served checkpoint
        for p in hf.parameters():
            p.add_(0.01 * torch.randn_like(p))
    sd = hf.state_dict()
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in sd)  # transformers 5 fuses in memory
    path = _sync(sd, base, tmp_path)
    _check_on_disk_names(path, hf.config)
    back = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert torch.equal(back[k], v), k  # every expert tensor loaded, none left at the old value


def test_sync_casts_to_the_served_dtype(tmp_path):
    hf = tiny_moe(1)
    base = tmp_path / "base"
    hf.to(torch.bfloat16).save_pretrained(base)  # a bf16 checkpoint, as Qwen3-30B-A3B
    sd = tiny_moe(1).state_dict()  # the fp32 trainer's weights
    path = _sync(sd, base, tmp_path)
    with safe_open(f"{path}/model.safetensors", "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes == {torch.bfloat16}


def test_fused_split_follows_transformers_gate_up_order():
    gate_up = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)  # E=2, 2I=4, H=3
    out = to_checkpoint_names(
        {
            "model.layers.0.mlp.experts.gate_up_proj": gate_up,
            "model.layers.0.mlp.experts.down_proj": torch.zeros(2, 3, 2),
        }
    )
    assert torch.equal(out["model.layers.0.mlp.experts.1.gate_proj.weight"], gate_up[1, :2])
    assert torch.equal(out["model.layers.0.mlp.experts.1.up_proj.weight"], gate_up[1, 2:])
    assert out["model.layers.0.mlp.experts.0.down_proj.weight"].shape == (3, 2)
    with pytest.raises(ValueError, match=r"\[E, 2I, H\]"):
        to_checkpoint_names({"model.layers.0.mlp.experts.gate_up_proj": torch.zeros(3, 3)})


@pytest.mark.megatron
def test_megatron_export_synced_loads_exactly(tmp_path):
    pytest.importorskip("megatron.core")
    from transformers import AutoModelForCausalLM

    from r3.engines.megatron.train import MegatronTrainEngine

    hf = tiny_moe(2, router_std=0.5)
    base = tmp_path / "base"
    hf.save_pretrained(base)
    eng = MegatronTrainEngine(hf, lr=1e-3)
    with torch.no_grad():
        for p in eng.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    sd = eng.rollout_state_dict()
    path = _sync(sd, base, tmp_path)
    _check_on_disk_names(path, hf.config)
    back = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
    for k, v in sd.items():
        assert torch.equal(back[k], v), k


def test_a_server_still_on_old_weights_stops_the_step(tmp_path):
    from r3.engines.base import SamplingParams
    from r3.engines.sglang.engine import SGLangError

    version = {"v": "0"}

    def transport(method, url, body, timeout_s):
        if url.endswith("/update_weights_from_disk"):
            return 200, {"success": True}
        return 200, [
            {
                "meta_info": {
                    "finish_reason": {"type": "length"},
                    "weight_version": version["v"],
                    "output_token_logprobs": [[-1.0, 5, None]],
                }
            }
        ]

    eng = SGLangRolloutEngine(["http://sglang:30000"], weight_sync_dir=tmp_path / "sync", transport=transport)
    params = SamplingParams(max_new_tokens=1)
    eng.generate([[1, 2]], params)  # before any sync: any version is fine
    eng.sync_weights({"model.embed_tokens.weight": torch.zeros(2, 2)})
    with pytest.raises(SGLangError, match="weight version '0', but the trainer's last sync is version 1"):
        eng.generate([[1, 2]], params)
    version["v"] = "1"
    assert len(eng.generate([[1, 2]], params)) == 1
