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


def test_paper_dry_run_refuses_a_layout_that_cannot_fit(tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"sft-single-grpo: 223\.6 GB per GPU needed, 80 GB available"):
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
    with pytest.raises(SystemExit, match=r"103\.3 GB per GPU needed, 80 GB available"):
        submit.main(
            PAPER + ["--runs", str(tmp_path), "--cells", "sft-single-grpo", "--override", "train_precision=fp32"]
        )
