"""experiments.distributed's driver/follower protocol on 2 gloo ranks with a stand-in engine:
every call of the driver runs on the follower with the same arguments (tensors, keyword modes, the
loss closure), in the same order; a failure on a follower is raised on the driver, naming the rank."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dist_helpers import torchrun

pytestmark = pytest.mark.distributed
WORKER = Path(__file__).with_name("proxy_worker.py")


def test_followers_replay_every_call_and_report_failures(tmp_path):
    torchrun(2, WORKER, str(tmp_path / "out.json"), timeout=120)
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["logp"] == [0.0, 2.0, 4.0, 6.0]
    assert out["metrics"] == 7.0  # the closure's tensor travelled with it
    driver, follower = out["calls"]
    assert (
        driver
        == follower
        == [
            ["compute_logprobs", 6.0, "REPLAY", True],
            ["train_step", 7.0],
            ["save", "/ckpt/step_1"],
            ["load", "/ckpt/step_1"],
            ["rollout_state_dict"],
        ]
    )
    assert out["load_error"].startswith("train_engine.load failed on rank(s) 1: FileNotFoundError: no shard for rank 1")
