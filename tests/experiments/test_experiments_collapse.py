"""The collapse rule (r3.collapse) as the run loop and the summary use it."""

from __future__ import annotations

import json

import pytest

from experiments.config import RunConfig
from experiments.summary import cell_entry
from r3.collapse import collapse_step

S = [0, 5, 10, 15, 20, 25]


@pytest.mark.parametrize(
    "scores, expected",
    [
        ([0.4, 0.5, 0.6, 0.6, 0.6, 0.6], None),  # rises, stays
        ([0.4, 0.6, 0.2, 0.1, 0.0, 0.0], 10),  # below 0.5 x best (0.6) from step 10 on
        ([0.4, 0.6, 0.2, 0.5, 0.5, 0.5], None),  # one low point, recovers
        ([0.4, 0.6, 0.5, 0.4, 0.6, 0.2], None),  # drops only at the last point: patience 2 not met
        ([0.4, 0.6, 0.5, 0.4, 0.2, 0.1], 20),  # the last two points
        ([0.0, 0.0, 0.0, 0.0, 0.0, 0.0], None),  # never above zero: nothing to fall from
    ],
)
def test_collapse_table(scores, expected):
    assert collapse_step(S, scores, frac=0.5, patience=2) == expected


def test_summary_uses_the_run_config_rule(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    RunConfig(name="run", collapse_frac=0.8, collapse_patience=1).save(d / "config.json")
    (d / "metrics.jsonl").write_text(json.dumps({"step": 10}) + "\n")
    points = ((0, 0.5), (5, 0.5), (10, 0.39))
    (d / "eval.jsonl").write_text("".join(json.dumps({"step": s, "avg": a}) + "\n" for s, a in points))
    assert cell_entry(d)["collapse_step"] == 10  # 0.39 < 0.8 x 0.5, patience 1
