"""ProcessServers with a fake server command (a tiny HTTP server answering /health); the real
`python -m sglang.launch_server` cannot run here (no GPU, no sglang): only its command line is checked."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from r3.engines.serving import ServerSpec
from r3.engines.sglang.servers import sglang_command
from r3.engines.sglang.servers import specs as sglang_specs
from slurm.servers import ProcessServers, ServerLauncher, is_healthy, wait_healthy

FAKE = str(Path(__file__).with_name("fake_health_server.py"))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spec(port: int, *extra: str) -> ServerSpec:
    return ServerSpec(
        name=f"fake-{port}", command=(sys.executable, FAKE, "--port", str(port), *extra), url=f"http://127.0.0.1:{port}"
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still has a pid; count it as dead.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


def test_start_waits_for_health_then_stop_ends_the_processes(tmp_path):
    ports = [_port(), _port()]
    servers = ProcessServers([_spec(ports[0], "--ready-after", "1.0"), _spec(ports[1])], tmp_path / "logs", poll_s=0.2)
    assert isinstance(servers, ServerLauncher)
    t0 = time.monotonic()
    with servers as urls:
        assert time.monotonic() - t0 >= 1.0  # waited for the slow one
        assert urls == tuple(f"http://127.0.0.1:{p}" for p in ports)
        assert all(is_healthy(u) for u in urls) and servers.alive()
        pids = [p.pid for p in servers.procs]
    assert not any(_alive(p) for p in pids) and not any(is_healthy(u) for u in urls)
    log = (tmp_path / "logs" / f"fake-{ports[0]}.log").read_text()
    assert "=== start" in log and f"fake server on port {ports[0]}" in log


def test_a_server_dying_during_startup_is_reported_with_its_log(tmp_path):
    port = _port()
    servers = ProcessServers([_spec(port, "--ready-after", "60", "--exit-after", "0.5")], tmp_path, poll_s=0.1)
    with pytest.raises(RuntimeError, match=r"exited with code 3 before becoming healthy(.|\n)*exiting on purpose"):
        servers.start()
    assert not servers.procs


def test_health_timeout_stops_everything(tmp_path):
    port = _port()
    servers = ProcessServers([_spec(port, "--ready-after", "60")], tmp_path, ready_timeout_s=1.0, poll_s=0.1)
    with pytest.raises(TimeoutError, match=rf"fake-{port}.*not healthy after 1 s"):
        servers.start()
    assert not servers.procs


def test_wait_healthy_names_silent_servers():
    with pytest.raises(TimeoutError, match=r"1/1 servers not healthy"):
        wait_healthy([f"http://127.0.0.1:{_port()}"], timeout_s=0.3, poll_s=0.1)


def test_sigterm_to_the_launcher_stops_its_servers(tmp_path):
    """A launcher process (as on a rollout node) gets SIGTERM: its servers go down with it."""
    port = _port()
    script = tmp_path / "launcher.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
        from r3.engines.serving import ServerSpec
        from slurm.servers import ProcessServers, stop_on_sigterm
        spec = ServerSpec(name="s", command=(sys.executable, {FAKE!r}, "--port", "{port}"), url="http://127.0.0.1:{port}")
        servers = ProcessServers([spec], {str(tmp_path / "logs")!r}, poll_s=0.1)
        with stop_on_sigterm(servers), servers:
            print("up", servers.procs[0].pid, flush=True)
            time.sleep(60)
    """)
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().split()
    assert line[0] == "up", line
    server_pid = int(line[1])
    assert is_healthy(f"http://127.0.0.1:{port}")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 128 + signal.SIGTERM
    deadline = time.monotonic() + 10
    while _alive(server_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(server_pid)


def test_sglang_command_line():
    cmd = sglang_command(model_path="/ckpt/sft", port=30001, tp=4, base_gpu_id=4, precision="fp8", seed=3, python="py")
    assert cmd[:3] == ["py", "-m", "sglang.launch_server"]
    joined = " ".join(cmd)
    for part in (
        "--model-path /ckpt/sft",
        "--port 30001",
        "--tp-size 4",
        "--base-gpu-id 4",
        "--random-seed 3",
        "--enable-return-routed-experts",
        "--quantization fp8",
    ):
        assert part in joined
    assert "--enable-return-routed-experts" not in sglang_command(model_path="m", port=1, capture_routing=False)
    with pytest.raises(ValueError, match="bf16 or fp8"):
        sglang_command(model_path="m", port=1, precision="fp32")


def test_sglang_specs_split_the_gpus():
    specs = sglang_specs(model_path="m", host="gpu3", servers=2, tp=4, port=30000)
    assert [s.url for s in specs] == ["http://gpu3:30000", "http://gpu3:30001"]
    assert [s.command[s.command.index("--base-gpu-id") + 1] for s in specs] == ["0", "4"]
