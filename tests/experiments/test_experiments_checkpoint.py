"""Checkpoints: COMPLETE marker last, partial / corrupt ones skipped, pruning, RNG restored."""

from __future__ import annotations

import json

import torch

from experiments import checkpoint


class FakeEngine:
    def __init__(self, value=0.0):
        self.value = value

    def save(self, path):
        torch.save({"value": self.value}, path + ".pt")

    def load(self, path):
        self.value = torch.load(path + ".pt", weights_only=True)["value"]


def test_latest_complete_checkpoint_is_loaded_partial_skipped(tmp_path):
    eng = FakeEngine(1.0)
    checkpoint.save(tmp_path, 5, eng, {"stream_position": 80}, keep=3)
    eng.value = 2.0
    checkpoint.save(tmp_path, 10, eng, {"stream_position": 160}, keep=3)
    fresh = FakeEngine()
    state = checkpoint.load_latest(tmp_path, fresh)
    assert state["step"] == 10 and state["stream_position"] == 160 and fresh.value == 2.0
    # RNG of step 5 restored when step 10 is gone
    (tmp_path / "checkpoints" / "step_10" / checkpoint.MARKER).unlink()
    logs = []
    state = checkpoint.load_latest(tmp_path, fresh, log=logs.append)
    assert state["step"] == 5 and fresh.value == 1.0
    assert "no COMPLETE marker" in logs[0]


def test_corrupt_checkpoint_falls_back_to_previous(tmp_path):
    eng = FakeEngine(1.0)
    checkpoint.save(tmp_path, 5, eng, {"stream_position": 1}, keep=3)
    eng.value = 2.0
    checkpoint.save(tmp_path, 10, eng, {"stream_position": 2}, keep=3)
    (tmp_path / "checkpoints" / "step_10" / "train.pt").write_bytes(b"garbage")
    logs = []
    fresh = FakeEngine()
    state = checkpoint.load_latest(tmp_path, fresh, log=logs.append)
    assert state["step"] == 5 and fresh.value == 1.0
    assert "step_10 is corrupt" in logs[0]
    # a state.json naming another step is corrupt too
    (tmp_path / "checkpoints" / "step_5" / "state.json").write_text(json.dumps({"step": 4, "torch_rng": ""}))
    assert checkpoint.load_latest(tmp_path, FakeEngine(), log=logs.append) is None


def test_pruning_keeps_the_newest_complete(tmp_path):
    eng = FakeEngine()
    for s in (5, 10, 15):
        checkpoint.save(tmp_path, s, eng, {}, keep=2)
    assert [s for s, _ in checkpoint.checkpoint_dirs(tmp_path)] == [15, 10]


def test_rng_state_round_trips(tmp_path):
    torch.manual_seed(3)
    checkpoint.save(tmp_path, 1, FakeEngine(), {}, keep=1)
    after_save = torch.rand(4)
    torch.manual_seed(99)
    checkpoint.load_latest(tmp_path, FakeEngine())
    assert torch.equal(torch.rand(4), after_save)
