"""`python -m slurm.submit --preset paper --dry-run` prints each cell's layout and memory plan per
GPU and refuses a layout that cannot fit (r3.engines.megatron.memory)."""

from __future__ import annotations

import pytest

from slurm import submit

PAPER = [
    "--preset",
    "paper",
    "--model-base",
    "/ckpt/base",
    "--model-sft",
    "/ckpt/sft",
    "--train-data",
    "/data/rl",
    "--dry-run",
    "--no-static",
]


def test_paper_dry_run_prints_fitting_plans(tmp_path, capsys):
    submit.main(PAPER + ["--runs", str(tmp_path), "--cells", "sft-single-grpo-r3,base-single-grpo"])
    out = capsys.readouterr().out
    assert out.count("memory plan per GPU: bf16; world 16 = TP 1 x PP 1 x DP 16, experts EP 8 x expert-DP 2") == 2
    assert "80 GB per GPU: fits" in out and "total per GPU" in out
    assert "Qwen3-30B-A3B's published config" in out
    # the cached CPU rehearsal of this layout beside the plan, and the call's message from shapes
    assert out.count("rehearsed peak per GPU (train step)") == 2 and "rehearsal_paper.json" in out
    assert "driver-to-follower call of 1024 rows: 3.8 GB message (routing trace 3.6 GB)" in out


def test_static_cells_are_planned_forward_only(tmp_path, capsys):
    args = [a for a in PAPER if a != "--no-static"] + ["--model-dense", "/ckpt/dense", "--runs", str(tmp_path)]
    submit.main(args + ["--cells", "static*"])
    out = capsys.readouterr().out
    assert "static: memory plan per GPU: bf16; world 8 = TP 1 x PP 1 x DP 8, experts EP 8 x expert-DP 1" in out
    assert "forward only" in out and "call of 64 rows" in out and "80 GB per GPU: fits" in out


def test_a_layout_whose_rehearsed_peak_exceeds_the_gpu_is_refused(tmp_path, capsys, monkeypatch):
    from r3.engines.megatron import rehearsal

    cache = rehearsal.load_cache()
    monkeypatch.setattr(rehearsal, "load_cache", lambda: {**cache, "step_peak": 85e9})  # plan 69.3 GB fits
    with pytest.raises(SystemExit, match=r"sft-single-grpo-r3: 85\.0 GB per GPU needed \(rehearsed\), 80 GB"):
        submit.main(PAPER + ["--runs", str(tmp_path), "--cells", "sft-single-grpo-r3"])
    assert "DOES NOT FIT" in capsys.readouterr().out


def test_paper_dry_run_refuses_a_layout_that_cannot_fit(tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"sft-single-grpo: 221\.5 GB per GPU needed \(planned\), 80 GB available"):
        submit.main(
            PAPER + ["--runs", str(tmp_path), "--cells", "sft-single-grpo", "--override", "train_expert_parallel=1"]
        )
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert not (tmp_path / "slurm" / "dry-run").exists()  # nothing written


def test_paper_cells_carry_the_layout(tmp_path):
    todo, _ = submit.plan_cells(submit.parse_args(PAPER + ["--runs", str(tmp_path), "--cells", "sft-multi-gspo"]))
    p = todo[0].payload
    assert (p["train_expert_parallel"], p["train_recompute"], p["train_micro_batch"], p["train_precision"]) == (
        8,
        True,
        1,
        "bf16",
    )


def test_fp32_training_is_refused_for_the_paper_layout(tmp_path):
    with pytest.raises(SystemExit, match=r"107\.4 GB per GPU needed \(planned\), 80 GB available"):
        submit.main(
            PAPER + ["--runs", str(tmp_path), "--cells", "sft-single-grpo", "--override", "train_precision=fp32"]
        )


def test_rehearse_flag_rehearses_a_layout_without_a_cached_rehearsal(tmp_path, capsys, monkeypatch):
    from r3.engines.megatron import rehearsal

    asked = []

    def fake(**kw):  # the real one takes ~1 minute (benchmarks/rehearse_paper.py); its result's fields
        asked.append(kw)
        return {"step_peak": 70e9, "call": {}}

    monkeypatch.setattr(rehearsal, "rehearse_layout", fake)
    submit.main(PAPER + ["--runs", str(tmp_path), "--cells", "sft-single-grpo-r3", "--rehearse",
                         "--override", "train_expert_parallel=16"])  # fmt: skip
    assert asked == [{"world": 16, "ep": 16, "seq_len": 9216}]
    out = capsys.readouterr().out
    assert "70.0 GB  (rehearsed now (--rehearse))" in out
    submit.main(PAPER + ["--runs", str(tmp_path), "--cells", "sft-single-grpo-r3", "--override",
                         "train_expert_parallel=16"])  # fmt: skip
    assert "no rehearsal of this layout (plan only" in capsys.readouterr().out and len(asked) == 1
