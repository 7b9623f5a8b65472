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


def spawn_ranks(
    nproc: int, script: Path, *args: str, timeout: float, env: dict | None = None, kill_on_bad_exit: bool = False
) -> tuple[list[int | None], list[str], float]:
    """Run `script` as `nproc` independent ranks, as srun starts tasks: nobody stops the others when one
    exits (unlike torchrun's agent), unless `kill_on_bad_exit` (srun --kill-on-bad-exit=1: a rank
    exiting nonzero ends the others). Returns (exit code per rank, None for a rank still running at
    `timeout` and then killed, or ended by kill_on_bad_exit; output per rank; seconds until the last
    rank ended, a bad exit, or the timeout)."""
    import time

    port = str(free_port())
    procs = []
    for rank in range(nproc):
        full_env = {
            **os.environ,
            "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "OMP_NUM_THREADS": "1",
            "RANK": str(rank),
            "WORLD_SIZE": str(nproc),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(nproc),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            **(env or {}),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), *args],
                cwd=REPO,
                env=full_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    t0 = time.monotonic()
    codes: list[int | None] = [None] * nproc
    while time.monotonic() - t0 < timeout and any(p.poll() is None for p in procs):
        if kill_on_bad_exit and any(p.poll() for p in procs):
            break
        time.sleep(0.2)
    elapsed = time.monotonic() - t0
    for i, p in enumerate(procs):
        codes[i] = p.poll()
        if codes[i] is None:
            p.kill()  # this test's own child, by its handle
    outs = [p.communicate()[0] for p in procs]
    return codes, outs, elapsed
