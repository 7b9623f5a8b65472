"""Fixtures shared across test packages: a micro zoo built once per test session (seconds),
used by the RL-loop tests (tests/experiments) and the real-Slurm tests (tests/slurm)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def micro_zoo(tmp_path_factory):
    """A complete micro zoo (2 layers, hidden 32, 8 experts top-2; accuracy not measured)."""
    import torch

    from experiments import zoo

    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("zoo")
    zoo.build_zoo(d, size="micro", measure=False, parallel=False)
    return d
