"""The grid (experiments.grid): cell definitions shared by the presets, names, seeds, listing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import grid
from experiments.config import RunConfig

REPO = Path(__file__).resolve().parents[2]
PAPER_CELLS = [
    "sft-single-grpo",
    "sft-single-grpo-tis",
    "sft-single-grpo-r3",
    "sft-single-grpo-tis-r3",
    "base-single-grpo",
    "base-single-grpo-tis",
    "base-single-grpo-r3",
    "base-single-grpo-tis-r3",
    "sft-multi-grpo",
    "sft-multi-gspo",
    "sft-multi-grpo-r3",
    "sft-multi-gspo-r3",
]


def test_paper_preset_has_every_cell_with_published_settings():
    cells = grid.cells("paper", model_paths={"base": "/b", "sft": "/s"})
    assert list(cells) == PAPER_CELLS
    for name, c in cells.items():
        assert isinstance(c, RunConfig) and c.name == name and c.preset == "paper"
        assert (c.rollout_engine, c.train_engine, c.rollout_precision) == ("sglang", "megatron", "bf16")
        assert c.global_steps == 180 and c.eval_every == 5
        assert c.eval_benchmarks == ("aime24", "aime25", "amc23", "math500_l5", "math500")
        assert c.model_path == {"base": "/b", "sft": "/s"}[c.model]
        single = "-single-" in name
        assert (c.mini_steps, c.lr) == ((1, 3e-6) if single else (8, 1e-6))
        assert c.replay == name.endswith("-r3") and c.tis == ("-tis" in name)
        assert c.algorithm == ("gspo" if "gspo" in name else "grpo")
        assert c.loss_agg == ("seq-mean-token-mean" if c.algorithm == "gspo" else "token-mean")
    assert cells["base-single-grpo"].model == "base" and cells["sft-multi-gspo"].model == "sft"


def test_a_tiny_cell_moved_to_megatron_drops_the_transformers_only_micro_batching():
    cell = "sft-single-grpo-r3"
    assert grid.cells("tiny", pattern=cell)[cell].train_max_tokens_per_micro_batch == 1024
    moved = grid.cells("tiny", pattern=cell, train_engine="megatron", train_expert_parallel=2)[cell]
    assert (moved.train_engine, moved.train_max_tokens_per_micro_batch, moved.train_expert_parallel) == (
        "megatron",
        0,
        2,
    )
    with pytest.raises(ValueError, match="not a setting of the 'megatron' train engine"):  # asked for: refused
        grid.cells("tiny", pattern=cell, train_engine="megatron", train_max_tokens_per_micro_batch=512)


def test_tiny_shares_definitions_and_changes_only_scale():
    paper, tiny = grid.cells("paper"), grid.cells("tiny")
    assert list(tiny) == [n + s for n in PAPER_CELLS for s in ("", "-bf16")] + [
        "sft-single-grpo-r3-mt",  # tiny-only multi-turn cells (grid.ONLY)
        "sft-single-grpo-r3-mt-bf16",
        "sft-single-grpo-r3-mt-vllm-bf16",
    ]
    scale_fields = {
        "preset",
        "model_path",
        "rollout_engine",
        "train_engine",
        "rollout_precision",
        "global_steps",
        "eval_benchmarks",
        "eval_samples",
        "eval_temperature",
        "lr",
        "prompts_per_step",
        "group_size",
        "max_new_tokens",
        "train_data",
        "name",
        "checkpoint_every",
        "eval_max_problems",
        "temperature",
        # batch shapes of the engines' calls (oversampled dynamic-sampling rounds, eval batches): scale
        "gen_prompts_per_round",
        "eval_batch_size",
        "train_max_tokens_per_micro_batch",
        # the paper's training layout (experiments.grid.TRAIN_LAYOUT): scale, not algorithm
        "train_expert_parallel",
        "train_recompute",
        "train_micro_batch",
        "train_precision",
    }
    for name in PAPER_CELLS:
        p, t = paper[name].to_dict(), tiny[name].to_dict()
        differ = {k for k in p if p[k] != t[k]}
        assert differ <= scale_fields, (name, differ - scale_fields)
        assert tiny[name].rollout_precision == "fp8" and tiny[name + "-bf16"].rollout_precision == "bf16"
        assert tiny[name].model_path is None and tiny[name].rollout_engine == "hf"
        assert tiny[name].mini_steps == paper[name].mini_steps


def test_seeds_are_an_axis_and_overrides_apply_everywhere():
    cells = grid.cells("tiny", seeds=(0, 1, 2), precisions=["fp8"], global_steps=3)
    assert len(cells) == 39 and "sft-multi-gspo-r3-s2" in cells and "sft-multi-gspo-r3" not in cells
    assert {c.global_steps for c in cells.values()} == {3}
    assert cells["sft-single-grpo-s1"].seed == 1
    with pytest.raises(ValueError, match=r"unknown RunConfig override\(s\) \['global_stepz'\]"):
        grid.cells("tiny", global_stepz=3)
    with pytest.raises(ValueError, match="grid axes"):
        grid.cells("tiny", seed=3)
    with pytest.raises(ValueError, match=r"rollout precisions \('bf16',\), not \['fp8'\]"):
        grid.cells("paper", precisions=["fp8"])
    with pytest.raises(ValueError, match="unknown preset"):
        grid.cells("huge")


def test_paper_placeholders_until_paths_are_given():
    c = grid.cells("paper")["sft-single-grpo"]
    assert c.model_path == grid.model_placeholder("sft") and c.train_data.startswith("<set ")
    assert grid.cells("paper", train_data="/data")["sft-single-grpo"].train_data == "/data"


def test_static_cells_one_per_precision():
    st = grid.static_cells("tiny")
    assert list(st) == ["static", "static-bf16"]
    assert st["static"].precision == "fp8" and st["static"].run_dir(Path("r")) == Path("r/static/fp8")
    paper = grid.static_cells("paper", model_paths={"sft": "/s", "dense": "/d"})["static"]
    assert (paper.model_moe, paper.model_dense, paper.rollout_engine) == ("/s", "/d", "sglang")


def test_select_globs():
    names = list(grid.cells("paper"))
    assert grid.select(names, "sft-single-*") == PAPER_CELLS[:4]
    assert grid.select(names, "*-r3,base-single-grpo") == [
        n for n in PAPER_CELLS if n.endswith("-r3") or n == "base-single-grpo"
    ]


def _write(run_dir: Path, files: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_text(text)


def test_list_cli_shows_states_from_run_directories(tmp_path):
    runs = tmp_path / "runs"
    m = lambda **kw: json.dumps({"steps": 180, "best_score": 0.7, "collapse_step": None, **kw})  # noqa: E731
    _write(runs / "sft-single-grpo-r3", {"manifest.json": m(), "metrics.jsonl": '{"step": 180}\n'})
    _write(runs / "sft-single-grpo", {"manifest.json": m(collapse_step=60)})
    _write(
        runs / "sft-single-grpo-tis",
        {"FAILED": json.dumps({"error": "RuntimeError: NaN"}), "metrics.jsonl": '{"step": 3}\n'},
    )
    _write(
        runs / "sft-multi-grpo",
        {"metrics.jsonl": '{"step": 1}\n{"step": 2}\n', "RUNNING": json.dumps({"host": "n7", "job_id": "5"})},
    )
    _write(runs / "sft-multi-gspo", {"slurm/job.json": json.dumps({"job_id": "6"})})
    _write(runs / "static" / "bf16", {"static.json": "{}"})
    p = subprocess.run(
        [sys.executable, "-m", "experiments.grid", "list", "--preset", "paper", "--runs", str(runs)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    rows = {line.split("  ")[0].strip(): line for line in p.stdout.splitlines()[1:] if line.strip()}
    assert "complete" in rows["sft-single-grpo-r3"] and "180/180" in rows["sft-single-grpo-r3"]
    assert "collapsed" in rows["sft-single-grpo"] and " 60 " in rows["sft-single-grpo"] + " "
    assert "failed" in rows["sft-single-grpo-tis"] and "RuntimeError: NaN" in rows["sft-single-grpo-tis"]
    assert "running" in rows["sft-multi-grpo"] and "2/180" in rows["sft-multi-grpo"] and "n7" in rows["sft-multi-grpo"]
    assert "queued" in rows["sft-multi-gspo"] and "not started" in rows["base-single-grpo"]
    assert all("complete" in rows[f"static: {label}"] for label in ("MoE native", "MoE + R3", "dense reference"))
    assert "15 rows" in p.stdout


def test_list_json_and_show(tmp_path):
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.grid",
            "list",
            "--preset",
            "tiny",
            "--runs",
            str(tmp_path),
            "--json",
            "--cells",
            "sft-multi-*",
            "--seeds",
            "0,1",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    rows = json.loads(p.stdout)
    assert [r["cell"] for r in rows][:2] == ["sft-multi-grpo-s0", "sft-multi-grpo-s1"] and len(rows) == 16
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.grid",
            "show",
            "sft-multi-gspo-r3",
            "--preset",
            "paper",
            "--model-sft",
            "/s",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    cfg = RunConfig.from_dict(json.loads(p.stdout))
    assert cfg.algorithm == "gspo" and cfg.replay and cfg.model_path == "/s" and cfg.mini_steps == 8
