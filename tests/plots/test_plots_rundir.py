"""Reading run directories: status, torn tails, contract violations, collapse via r3.collapse."""

from __future__ import annotations

import json

import pytest
from plots_fixtures import tiny_cfg, write_run

from plots.groups import group_cells
from plots.runs import discover, load_run, method_label
from r3.collapse import collapse_step


def test_status_and_torn_tail(tmp_path):
    d = write_run(tmp_path, tiny_cfg("a", tis=True), {0: 0.4, 5: 0.5}, last_step=6, complete=False, torn_tail=True)
    run = load_run(d)
    assert run.status == "running" and run.last_step == 6 and list(run.metrics.index) == list(range(1, 7))
    (d / "manifest.json").write_text(json.dumps({"name": "a", "status": "complete", "steps": 6}))
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 7 is not JSON"):
        load_run(d)  # a finished run may not end in a torn line
    (d / "manifest.json").unlink()
    (d / "FAILED").write_text(json.dumps({"error": "RuntimeError: boom"}))
    assert load_run(d).status == "failed"
    (d / "FAILED").unlink()
    (d / "manifest.json").write_text(json.dumps({"name": "a", "status": "failed", "steps": 6}))
    with pytest.raises(ValueError, match=r"line 7 is not JSON"):
        load_run(d)  # a manifest (even a failed one) means the writer has finished
    lines = (d / "metrics.jsonl").read_text().splitlines()
    (d / "metrics.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    assert load_run(d).status == "failed"


def test_metrics_gap_is_refused(tmp_path):
    d = write_run(tmp_path, tiny_cfg("gap"), {0: 0.4}, last_step=4)
    lines = (d / "metrics.jsonl").read_text().splitlines()
    (d / "metrics.jsonl").write_text("\n".join(lines[:2] + lines[3:]) + "\n")
    with pytest.raises(ValueError, match=r"line 3 has step 4, expected 3"):
        load_run(d)


def test_repeated_eval_step_is_refused(tmp_path):
    d = write_run(tmp_path, tiny_cfg("dup"), {0: 0.4, 5: 0.5}, last_step=5)
    with open(d / "eval.jsonl", "a") as f:
        f.write(json.dumps({"step": 5, "scores": {"synthetic": 0.5}, "avg": 0.5}) + "\n")
    with pytest.raises(ValueError, match=r"evaluation steps must increase strictly.*repeated: \[5\]"):
        load_run(d)


def test_bad_config_names_the_file(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    # unknown keys are tolerated (older/newer versions); invalid values are not
    (d / "config.json").write_text(json.dumps({"name": "bad", "no_such_field": 1, "mini_steps": 0}))
    with pytest.raises(ValueError, match=r"bad/config.json: not a RunConfig .*mini_steps must be >= 1"):
        discover(tmp_path)


def test_collapse_uses_the_shared_rule(runs_root):
    run = load_run(runs_root / "sft-single-grpo")
    want = collapse_step(
        list(run.evals.index),
        list(run.evals["avg"]),
        frac=run.config.collapse_frac,
        patience=run.config.collapse_patience,
    )
    assert run.collapse_step == want == 20
    assert load_run(runs_root / "sft-single-grpo-r3").missing_eval_steps == [15]
    # Running run: only points up to its last written step are expected.
    assert load_run(runs_root / "sft-single-grpo-tis").missing_eval_steps == []


def test_grouping_seeds_and_variants(runs_root, tmp_path):
    settings = group_cells(discover(runs_root).runs)
    cells = {c.label: c for s in settings.values() for c in s}
    assert len(cells["GRPO+TIS+R3"].runs) == 2
    assert [c.method for c in next(s for k, s in settings.items() if k.mini_steps == 1 and k.preset == "tiny")] == [
        "GRPO",
        "GRPO+TIS",
        "GRPO+R3",
        "GRPO+TIS+R3",
    ]
    # Two cells with one method label but a different lr are kept apart and labelled by lr.
    write_run(tmp_path, tiny_cfg("lr-a", lr=1e-5), {0: 0.4}, last_step=1)
    write_run(tmp_path, tiny_cfg("lr-b", lr=3e-5), {0: 0.4}, last_step=1)
    labels = sorted(c.label for s in group_cells(discover(tmp_path).runs).values() for c in s)
    assert labels == ["GRPO (lr=1e-05)", "GRPO (lr=3e-05)"]
    assert method_label(tiny_cfg("x", algorithm="grpo", replay=True, tis=True)) == "GRPO+TIS+R3"
    assert method_label(tiny_cfg("x", algorithm="gspo", replay=True)) == "GSPO+R3"
