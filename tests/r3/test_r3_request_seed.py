"""r3.engines.base.request_seed: per-request sampling seeds that do not repeat across calls."""

from __future__ import annotations

from experiments.rollout import sampling_seed
from r3.engines.base import request_seed


def test_request_seeds_of_nearby_calls_never_collide():
    """`base + i` made request i of step s + 1 reuse request i + 101 of step s (bases 101 apart);
    scattered bases give every (step, round, request) of a 200-step run its own seed."""
    seeds = {
        request_seed(sampling_seed(0, step, rnd), i) for step in range(1, 201) for rnd in range(4) for i in range(1024)
    }
    assert len(seeds) == 200 * 4 * 1024
    assert all(0 <= s < 2**31 for s in seeds)
    assert request_seed(5, 3) == request_seed(5, 3) != request_seed(5, 4)
