"""Shared fixtures for tests/experiments: a micro zoo built once per session (seconds)."""

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
