"""Run directories written by an earlier version of the harness stay readable and plottable.

tests/plots/fixtures/runs_v0_1fb90cc/ was written by the RL loop of commit 1fb90cc (two
3-step cells on the micro zoo; checkpoints and per-sample eval files left out)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from experiments.config import RunConfig
from plots.all import make_all
from plots.runs import discover
from r3 import rundir

V0 = Path(__file__).parent / "fixtures" / "runs_v0_1fb90cc"


def test_runs_written_by_commit_1fb90cc_are_read_and_plotted(tmp_path):
    root = discover(V0)
    assert sorted(r.name for r in root.runs) == ["sft-single-grpo-r3", "sft-single-grpo-tis"]
    for r in root.runs:
        assert r.status == "complete" and list(r.metrics.index) == [1, 2, 3]
        assert "mismatch/k3_kl" in r.metrics.columns and list(r.evals.index) == [0, 2, 3]
    make_all(V0, tmp_path / "plots")
    assert any((tmp_path / "plots" / "figures").glob("*.png"))


def test_config_with_keys_this_version_lacks_still_loads(tmp_path):
    run = tmp_path / "sft-single-grpo-r3"
    shutil.copytree(V0 / "sft-single-grpo-r3", run)
    cfg = json.loads((run / rundir.CONFIG).read_text())
    cfg["a_field_removed_later"] = 3
    del cfg["keep_checkpoints"]  # a field added later: takes its default
    (run / rundir.CONFIG).write_text(json.dumps(cfg))
    read = rundir.read_config(run, RunConfig)
    assert read.unknown == ("a_field_removed_later",) and read.config.replay
    assert discover(tmp_path).runs[0].config.name == "sft-single-grpo-r3"


def test_torn_last_line_is_skipped_while_running_and_refused_when_complete(tmp_path):
    p = tmp_path / rundir.METRICS
    p.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "mis')
    assert [r["step"] for r in rundir.read_jsonl(p)] == [1, 2]
    import pytest

    with pytest.raises(ValueError, match="line 3 is not JSON"):
        rundir.read_jsonl(p, complete=True)
    p.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        rundir.read_jsonl(p)
