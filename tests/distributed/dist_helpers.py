"""Helpers of the multi-rank tests: launch a worker script under torch.distributed.run (gloo).

A separate module name (not `conftest`: pytest's default import mode caches one module called
`conftest`, so `from conftest import ...` would find another directory's)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, script: Path, *args: str, timeout: float = 240.0, env: dict | None = None) -> str:
    """Run `script` on `nproc` local gloo ranks; returns stdout+stderr, raises with its tail on failure."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        str(script),
        *args,
    ]
    full_env = {
        **os.environ,
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
        **(env or {}),
    }
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # torchrun sets its own
        if k not in (env or {}):
            full_env.pop(k, None)
    p = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    out = p.stdout + p.stderr
    if p.returncode:
        lines = [ln for ln in out.splitlines() if "Warning" not in ln and "warn(" not in ln]
        raise AssertionError(
            f"torchrun {nproc} x {script.name} {' '.join(args)} exited {p.returncode}:\n" + "\n".join(lines[-60:])
        )
    return out
