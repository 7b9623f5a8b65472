"""Static mismatch on the micro zoo, and the summary built from run directories."""

from __future__ import annotations

import json

import pytest

from experiments import static_mismatch, summary
from experiments.config import RunConfig


@pytest.fixture(scope="module")
def fp8_static(micro_zoo, tmp_path_factory):
    out = tmp_path_factory.mktemp("static_runs")
    rec = static_mismatch.run_static(out, "fp8", zoo_dir=micro_zoo, n_prompts=8, group_size=4, max_new_tokens=12)
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
