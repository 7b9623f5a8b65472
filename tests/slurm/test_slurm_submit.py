"""slurm.submit without a cluster: dry-run scripts, refusals, and the local executor."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from r3 import rundir as state
from slurm.submit import main

REPO = Path(__file__).resolve().parents[2]
PAPER_FLAGS = ["--model-base", "/m/base", "--model-sft", "/m/sft", "--model-dense", "/m/dense", "--train-data", "/d"]


def test_dry_run_writes_one_array_per_resource_group(tmp_path, capsys):
    main(
        [
            "--preset",
            "paper",
            "--runs",
            str(tmp_path),
            "--dry-run",
            *PAPER_FLAGS,
            "--partition",
            "gpu",
            "--account",
            "proj",
            "--time",
            "2-00:00:00",
            "--setup",
            "module load cuda",
        ]
    )
    out = capsys.readouterr().out
    scripts = sorted((tmp_path / "slurm" / "dry-run").glob("*.sbatch"))
    assert [p.name for p in scripts] == ["rl-sft-single-grpo-array.sbatch", "static-static.sbatch"]
    static = (tmp_path / "slurm" / "dry-run" / "static-static.sbatch").read_text()
    assert "#SBATCH --nodes=2" in static and "#SBATCH --gpus-per-node=8" in static  # 1 train + 1 rollout node
    rl = scripts[0].read_text()
    for line in (
        "#SBATCH --array=0-11%4",
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj",
        "#SBATCH --time=2880",
        "#SBATCH --signal=USR2@120",
        "#SBATCH --requeue",
        "#SBATCH --mem=0",
        "module load cuda",
        "-m submitit.core._submit",
    ):
        assert line in rl, line
    assert "#   [11] sft-multi-gspo-r3 -> " in rl and rl in out
    # With a static body of one's own, the static job gets its own resources (1 train + 1 rollout node).
    main(
        [
            "--preset",
            "paper",
            "--runs",
            str(tmp_path),
            "--dry-run",
            *PAPER_FLAGS,
            "--cells",
            "static",
            "--static-body",
            "mypkg.static:run",
        ]
    )
    assert "#SBATCH --nodes=2" in (tmp_path / "slurm" / "dry-run" / "static-static.sbatch").read_text()
    assert not any((tmp_path / c / "slurm" / "job.json").exists() for c in ("sft-single-grpo",))  # nothing submitted


def test_resource_flags_and_no_array(tmp_path):
    main(
        [
            "--preset",
            "paper",
            "--runs",
            str(tmp_path),
            "--dry-run",
            *PAPER_FLAGS,
            "--cells",
            "sft-multi-*",
            "--no-array",
            "--nodes",
            "3",
            "--rollout-nodes",
            "1",
            "--gpus-per-node",
            "4",
            "--server-tp",
            "2",
            "--gpu-mem-gb",
            "141",
        ]
    )  # 8 training GPUs: 94 GB per GPU by the memory plan, so H200-sized GPUs
    scripts = sorted((tmp_path / "slurm" / "dry-run").glob("*.sbatch"))
    assert len(scripts) == 4 and not any("--array" in p.read_text() for p in scripts)
    text = scripts[0].read_text()
    assert "#SBATCH --nodes=3" in text and "#SBATCH --ntasks-per-node=4" in text
    assert re.search(r"#SBATCH --output=.*/sft-multi-\w+(-r3)?/slurm/%j_0_log.out", text)


def test_refusals_name_the_missing_flags(tmp_path):
    with pytest.raises(SystemExit, match=r"placeholders.*--model-sft"):
        main(["--preset", "paper", "--runs", str(tmp_path), "--dry-run"])
    with pytest.raises(SystemExit, match="no rollout nodes; pass --rollout-nodes"):
        main(
            [
                "--preset",
                "paper",
                "--runs",
                str(tmp_path),
                "--dry-run",
                *PAPER_FLAGS,
                "--rollout-nodes",
                "0",
                "--no-static",
            ]
        )
    with pytest.raises(SystemExit, match="matches --cells"):
        main(["--preset", "tiny", "--runs", str(tmp_path), "--dry-run", "--cells", "nope-*"])
    with pytest.raises(SystemExit, match="leaves 0 training nodes"):
        main(["--preset", "paper", "--runs", str(tmp_path), "--dry-run", *PAPER_FLAGS, "--nodes", "2"])


def test_local_executor_runs_cells_and_skips_complete_and_failed(tmp_path):
    runs = tmp_path / "runs"
    cmd = [
        sys.executable,
        "-m",
        "slurm.submit",
        "--preset",
        "tiny",
        "--executor",
        "local",
        "--no-static",
        "--cells",
        "sft-multi-gspo,sft-multi-gspo-r3",
        "--precisions",
        "fp8",
        "--runs",
        str(runs),
        "--body",
        "tests.slurm.toyrun:run_cell",
        "--override",
        "global_steps=4",
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    for cell in ("sft-multi-gspo", "sft-multi-gspo-r3"):
        assert state.run_status(runs / cell).state == state.RunState.COMPLETE
        assert [json.loads(x)["step"] for x in (runs / cell / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
        assert json.loads((runs / cell / "config.json").read_text())["mini_steps"] == 8
    # A failed cell is reported with its error and log tail, not resubmitted; complete ones are skipped.
    bad = runs / "sft-multi-grpo"
    state.write_json_atomic(bad / state.FAILED, {"error": "RuntimeError: NaN loss at step 3", "job_id": "9"})
    (bad / "log.txt").write_text("step 1 ok\nstep 2 ok\nstep 3 loss=nan\n")
    p = subprocess.run([*cmd[:9], "sft-multi-*", *cmd[10:]], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "skip sft-multi-gspo: complete" in p.stdout and "skip sft-multi-gspo-r3: complete" in p.stdout
    assert (
        "skip sft-multi-grpo: FAILED" in p.stdout and "NaN loss at step 3" in p.stdout and "step 3 loss=nan" in p.stdout
    )
    assert "started sft-multi-grpo-r3" in p.stdout and "started sft-multi-grpo:" not in p.stdout


def test_static_body_refuses_cells_it_cannot_measure(tmp_path):
    from experiments import grid
    from slurm.job import run_static_cell

    paper = grid.static_cells("paper", model_paths={"sft": "/s", "dense": "/d"})["static"].to_dict()
    with pytest.raises(FileNotFoundError, match="model_moe='/s' is not a transformers checkpoint"):
        run_static_cell(paper, tmp_path / "static" / "bf16")
    with pytest.raises(ValueError, match="name both checkpoints"):
        run_static_cell({**paper, "model_dense": None}, tmp_path / "static" / "bf16")
    tiny = grid.static_cells("tiny")["static"].to_dict()
    with pytest.raises(ValueError, match="out_dir must be <runs>/static/fp8"):
        run_static_cell(tiny, tmp_path / "static" / "bf16")
