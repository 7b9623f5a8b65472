"""Rollout servers as child processes: start, health-check, log, stop (also on SIGTERM).

    python -m slurm.servers --model-path PATH [--servers 2 --tp 4 --port 30000] --log-dir DIR
    python -m slurm.servers --engine vllm --model-path PATH [--precision bf16|fp32] --log-dir DIR

Inputs: a model checkpoint (HF format) and a GPU layout. Outputs: running SGLang servers whose
logs go to `<log-dir>/<host>-<port>.log`, their URLs printed once every `/health` answers 200.
The command stops them (process group: SIGTERM, then SIGKILL after a grace period) on exit,
Ctrl-C or SIGTERM. The Slurm job (slurm.job) uses the same `ProcessServers` on rollout nodes.

One interface, `ServerLauncher`: `start()` returns the URLs of healthy servers, `stop()` ends them.
`ProcessServers` runs any list of launch specs (r3.engines.serving.ServerSpec), so tests drive it
with a tiny HTTP server. Which servers a rollout engine needs is the engine's to say: its config
names a launcher (r3.engines.registry.server_launcher: r3.engines.sglang.servers,
r3.engines.vllm.servers), never compared by name here.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from r3.engines import registry
from r3.engines.serving import ServerSpec


@runtime_checkable
class ServerLauncher(Protocol):
    """Starts inference servers and tells the rollout engine where they are."""

    def start(self) -> tuple[str, ...]:
        """Start every server and block until all are healthy; return their base URLs."""
        ...

    def stop(self) -> None:
        """Stop every server (idempotent)."""
        ...


def is_healthy(url: str, path: str = "/health", timeout: float = 5.0) -> bool:
    try:
        with urllib.request.urlopen(url.rstrip("/") + path, timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout, OSError):
        return False


def wait_healthy(urls: Sequence[str], *, timeout_s: float, poll_s: float = 2.0, path: str = "/health") -> None:
    """Block until every URL answers 200 on `path`; raise TimeoutError naming the silent ones."""
    deadline = time.monotonic() + timeout_s
    pending = list(urls)
    while pending:
        pending = [u for u in pending if not is_healthy(u, path)]
        if not pending:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{len(pending)}/{len(urls)} servers not healthy after {timeout_s:.0f} s: {pending}; "
                "check their logs (run_dir/servers/) and raise the timeout for large models"
            )
        time.sleep(poll_s)


def _tail(path: Path, lines: int = 30) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):  # Linux: SIGTERM the server if its launcher dies (even by SIGKILL)
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1


class ProcessServers:
    """ServerLauncher running each spec as a child process in its own process group."""

    def __init__(self, specs: Sequence[ServerSpec], log_dir: Path, *, ready_timeout_s: float = 1800,
                 poll_s: float = 2.0, grace_s: float = 20.0) -> None:  # fmt: skip
        if not specs:
            raise ValueError("ProcessServers needs at least one ServerSpec")
        self.specs = list(specs)
        self.log_dir = Path(log_dir)
        self.ready_timeout_s, self.poll_s, self.grace_s = ready_timeout_s, poll_s, grace_s
        self.procs: list[subprocess.Popen] = []

    def log_path(self, spec: ServerSpec) -> Path:
        return self.log_dir / f"{spec.name}.log"

    def start(self) -> tuple[str, ...]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        atexit.register(self.stop)
        for spec in self.specs:
            log = open(self.log_path(spec), "ab")  # noqa: SIM115  (the child keeps it open)
            log.write(f"\n=== start {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(spec.command)}\n".encode())
            log.flush()
            self.procs.append(subprocess.Popen(
                list(spec.command), stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **dict(spec.env)},
                start_new_session=True, preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            ))  # fmt: skip
            log.close()
        deadline = time.monotonic() + self.ready_timeout_s
        pending = list(range(len(self.specs)))
        while pending:
            for i in list(pending):
                spec, proc = self.specs[i], self.procs[i]
                if proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(
                        f"server {spec.name} exited with code {proc.returncode} before becoming healthy; "
                        f"last lines of {self.log_path(spec)}:\n{_tail(self.log_path(spec))}"
                    )
                if is_healthy(spec.url, spec.health_path):
                    pending.remove(i)
            if pending and time.monotonic() > deadline:
                names = [self.specs[i].name for i in pending]
                self.stop()
                raise TimeoutError(
                    f"servers {names} not healthy after {self.ready_timeout_s:.0f} s "
                    f"(GET {self.specs[0].health_path}); see {self.log_dir}; raise ready_timeout_s if the model is "
                    "still loading"
                )
            if pending:
                time.sleep(self.poll_s)
        return tuple(s.url for s in self.specs)

    def alive(self) -> bool:
        return bool(self.procs) and all(p.poll() is None for p in self.procs)

    def stop(self) -> None:
        """SIGTERM each process group, wait up to grace_s, then SIGKILL what is left."""
        live = [p for p in self.procs if p.poll() is None]
        for p in live:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        for p in live:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.0, deadline - time.monotonic()))
        for p in live:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)  # the group: SGLang's scheduler/detokenizer children too
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)
        self.procs = [p for p in self.procs if p.poll() is None]

    def __enter__(self) -> tuple[str, ...]:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def stop_on_sigterm(launcher: ServerLauncher) -> Iterator[None]:
    """While inside, SIGTERM stops the servers first, then runs the previous handler.

    Under submitit the previous handler logs and ignores SIGTERM (the preemption signal is
    SIGUSR2), so the job still checkpoints; with the default handler the process exits 143.
    Only usable from the main thread (Python delivers signals there).
    """
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame):
        launcher.stop()
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--servers", type=int, default=1, help="servers on this node")
    ap.add_argument("--tp", type=int, default=1, help="GPUs per server")
    ap.add_argument("--port", type=int, default=30000, help="port of server 0 (server i: port + i)")
    ap.add_argument(
        "--engine",
        choices=[n for n in registry.rollout_engine_names() if registry.server_launcher(n)],
        default="sglang",
        help="which inference server (a rollout engine with servers)",
    )
    ap.add_argument(
        "--precision", choices=["bf16", "fp8", "fp32"], default="bf16", help="sglang: bf16 or fp8; vllm: bf16 or fp32"
    )
    ap.add_argument("--no-routing", action="store_true", help="do not pass --enable-return-routed-experts")
    ap.add_argument("--log-dir", type=Path, required=True)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds to wait for /health")
    a = ap.parse_args(argv)
    make_specs = registry.server_launcher(a.engine)
    specs = make_specs(model_path=a.model_path, host=socket.gethostname(), servers=a.servers, tp=a.tp,
                       port=a.port, capture_routing=not a.no_routing, precision=a.precision)  # fmt: skip
    servers = ProcessServers(specs, a.log_dir, ready_timeout_s=a.timeout)
    with stop_on_sigterm(servers), servers as urls:
        print("\n".join(urls), flush=True)
        while servers.alive():
            time.sleep(5)
        raise SystemExit(f"a server exited; see {a.log_dir}")


if __name__ == "__main__":
    main()
