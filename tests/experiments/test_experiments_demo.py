"""`python -m experiments.demo` end to end on the micro zoo: 2 cells x 2 steps in 2 processes."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_demo_end_to_end_micro(micro_zoo, tmp_path):
    from experiments import demo

    out = tmp_path / "demo"
    s = demo.main(
        [
            "--out",
            str(out),
            "--zoo-dir",
            str(micro_zoo),
            "--zoo-size",
            "micro",
            "--steps",
            "2",
            "--cells",
            "sft-single-grpo-r3,sft-multi-gspo",
            "--jobs",
            "2",
            "--static-prompts",
            "16",
        ]
    )
    assert set(s["cells"]) == {"sft-single-grpo-r3", "sft-multi-gspo"}
    assert set(s["static_by_precision"]) == {"bf16", "fp8"}
    for prec in ("bf16", "fp8"):  # the workers reported their phases to the parent's progress bar
        assert demo._static_done(out, prec) == 1.0
    assert s["static"] == s["static_by_precision"]["fp8"]
    c = s["cells"]["sft-multi-gspo"]
    got = (c["algorithm"], c["replay"], c["mini_steps"], c["rollout_precision"], c["steps"])
    assert got == ("gspo", False, 8, "fp8", 2)
    assert json.loads((out / "summary.json").read_text()) == s
    assert "sft-single-grpo-r3" in (out / "summary.md").read_text()
    for cell in s["cells"]:
        assert (out / cell / "manifest.json").exists()


@pytest.mark.slow
def test_ctrl_c_stops_every_cell_and_queued_cells_never_start(micro_zoo, tmp_path):
    """SIGINT to the demo's process group (what Ctrl-C in a terminal sends)
    used to kill the running cells while the pool went on to start the queued ones. Now all stop
    within seconds, no queued cell starts, the message says how to resume, and a rerun resumes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "demo"
    cells = "sft-single-grpo,sft-single-grpo-r3,sft-multi-gspo,sft-multi-gspo-r3"
    cmd = [
        sys.executable,
        "-m",
        "experiments.demo",
        "--out",
        str(out),
        "--zoo-dir",
        str(micro_zoo),
        "--zoo-size",
        "micro",
        "--steps",
        "40",
        "--cells",
        cells,
        "--jobs",
        "2",
        "--static-prompts",
        "8",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    first_two = ("sft-single-grpo", "sft-single-grpo-r3")
    deadline = time.time() + 240
    while time.time() < deadline and not all((out / c / "metrics.jsonl").exists() for c in first_two):
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.5)
    assert all((out / c / "metrics.jsonl").exists() for c in first_two), "cells never started"
    t0 = time.time()
    os.killpg(proc.pid, signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    assert time.time() - t0 < 30, "Ctrl-C took more than 30 s to stop the demo"
    assert proc.returncode != 0
    assert "interrupted" in output and "resume" in output
    time.sleep(3)  # nothing may still be running and writing
    for c in ("sft-multi-gspo", "sft-multi-gspo-r3"):
        assert not (out / c / "metrics.jsonl").exists(), f"queued cell {c} started after Ctrl-C"
    sizes = {c: (out / c / "metrics.jsonl").stat().st_size for c in first_two}
    time.sleep(3)
    assert sizes == {c: (out / c / "metrics.jsonl").stat().st_size for c in first_two}, "a cell kept running"


def test_summary_claims_rest_on_late_scores_not_best_points(tmp_path):
    """A cell whose best point is high by chance but whose late points sit at step 0 is 'within
    noise', and the R3-vs-twin line is a paired late-score difference with its standard error."""
    import json

    from experiments import summary
    from experiments.config import RunConfig

    evs = {
        "c-grpo": [0.50, 0.60, 0.50, 0.50, 0.50],  # one lucky point, no late gain
        "c-grpo-r3": [0.50, 0.50, 0.52, 0.51, 0.52],
    }
    for name, scores in evs.items():
        d = tmp_path / name
        d.mkdir()
        RunConfig(name=name, replay=name.endswith("r3")).save(d / "config.json")
        (d / "eval.jsonl").write_text(
            "".join(
                json.dumps({"step": 5 * i, "avg": a, "problems": {"synthetic": 512}, "n_samples": 1}) + "\n"
                for i, a in enumerate(scores)
            )
        )
        (d / "metrics.jsonl").write_text(json.dumps({"step": 20, "mismatch/k3_kl": 1e-4}) + "\n")
    lines = summary._claims(summary.build(tmp_path), tmp_path)
    text = "\n".join(lines)
    assert "c-grpo: late score (steps 20-20) minus step 0: +0.0 points" in text and "within noise" in text
    assert "best" not in text.split("The paper's gap")[0]  # (the paper itself reports best checkpoints)
    assert "R3 minus its twin, late score, paired over 1 twin(s) (c-grpo-r3: +2.0)" in text
    assert "within 2 s.e." in text
