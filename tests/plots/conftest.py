"""pytest fixtures for the plots tests; the run-directory writers live in plots_fixtures.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from plots_fixtures import build_runs_root


@pytest.fixture(scope="session")
def runs_root(tmp_path_factory) -> Path:
    return build_runs_root(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="session")
def plots_out(runs_root, tmp_path_factory) -> tuple[Path, list[Path]]:
    from plots.all import make_all

    out = tmp_path_factory.mktemp("plots_out")
    return out, make_all(runs_root, out, progress=False)
