"""Parallel layout validation and DP row slicing (r3.engines.megatron.parallel), no processes."""

from __future__ import annotations

import pytest

from r3.engines.megatron.parallel import Layout, dp_slice, env_world


def test_layout_derives_dp_and_expert_dp():
    lay = Layout(world_size=16, ep=8)
    assert (lay.dp, lay.expert_dp) == (16, 2)
    assert lay.describe() == "world 16 = TP 1 x PP 1 x DP 16 (experts: EP 8 x expert-DP 2)"
    assert Layout(world_size=8, tp=2, pp=2).dp == 2
    assert Layout(world_size=4, tp=2, ep=2).expert_dp == 2  # experts are not TP-sharded


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(world_size=6, tp=4), r"world size 6 is not divisible by TP x PP = 4 x 1 = 4"),
        (dict(world_size=4, ep=3), r"world size 4 is not divisible by EP x PP = 3 x 1 = 3"),
        (dict(world_size=2, ep=0), r"ep must be >= 1, got 0"),
    ],
)
def test_layout_errors_carry_the_numbers(kw, msg):
    with pytest.raises(ValueError, match=msg):
        Layout(**kw)


def test_experts_must_split_evenly():
    with pytest.raises(ValueError, match="8 experts cannot be split over EP = 3"):
        Layout(world_size=3, ep=3).check_experts(8)


def test_dp_slices_cover_the_batch_once_and_pad_to_equal_shapes():
    for B, dp in ((5, 2), (16, 4), (7, 3), (3, 3)):
        slices = [dp_slice(B, dp, r) for r in range(dp)]
        rows = [i for s, _ in slices for i in range(s.start, s.stop)]
        assert rows == list(range(B))
        assert {n for _, n in slices} == {-(-B // dp)}
        assert all(s.stop > s.start for s, _ in slices)
    # fewer rows than ranks (the 1-row post-sync probe): ranks past the rows get an empty slice and pad to 1
    slices = [dp_slice(1, 2, r) for r in range(2)]
    assert slices == [(slice(0, 1), 1), (slice(1, 1), 1)]
    assert [dp_slice(3, 4, r)[0] for r in range(4)] == [slice(0, 1), slice(1, 2), slice(2, 3), slice(3, 3)]
    with pytest.raises(ValueError, match="at least one sequence"):
        dp_slice(0, 2, 0)


def test_env_world(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    assert env_world() is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(RuntimeError, match=r"\['MASTER_ADDR', 'MASTER_PORT'\] are not"):
        env_world()
    monkeypatch.setenv("MASTER_ADDR", "h")
    monkeypatch.setenv("MASTER_PORT", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert env_world() == (1, 2, 1)
