"""experiments.gpu_smoke without a GPU: it stops at once with the reason and exit status 2 (the
checks themselves need one NVIDIA GPU and run only there, via `make gpu-smoke`)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from experiments import gpu_smoke

REPO = Path(__file__).resolve().parents[2]


def test_without_a_gpu_it_exits_at_once_with_the_reason(capsys):
    assert gpu_smoke.no_gpu_reason() is not None  # this machine: CPU build of torch
    assert gpu_smoke.main([]) == gpu_smoke.EXIT_NO_GPU
    out = capsys.readouterr().out
    assert "cannot run here" in out and "CPU build" in out and "make gpu-smoke" in out


def test_make_target_refuses_a_machine_without_a_gpu():
    p = subprocess.run(["make", "-s", "gpu-smoke"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode != 0
    assert "no NVIDIA GPU on this machine" in p.stdout + p.stderr
    assert not (REPO / ".venv-gpu").exists()  # stopped before installing anything
