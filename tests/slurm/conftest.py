"""Fixtures for the Slurm tests: a real one-node Slurm cluster on localhost.

The daemons come from Debian's slurmctld/slurmd/slurm-client/munge packages, which `.ci/run`
installs as root; this fixture installs nothing. Without root or without those binaries every
test using `slurm_cluster` skips with the reason. Config, state and logs live in a temporary
directory removed afterwards (slurm.localcluster).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from slurm.localcluster import local_slurm, missing_requirements


@pytest.fixture(scope="session")
def slurm_cluster():
    reason = missing_requirements()
    if reason:
        pytest.skip(f"no local Slurm cluster: {reason}")
    root = Path(tempfile.mkdtemp(prefix="r3-slurm-"))
    try:
        with local_slurm(root / "cluster") as cluster:
            yield cluster
    finally:
        shutil.rmtree(root, ignore_errors=True)
