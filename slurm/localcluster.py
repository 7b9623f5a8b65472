"""A real one-node Slurm cluster on localhost, for tests (munged + slurmctld + slurmd).

Inputs: the Debian packages `slurmctld slurmd slurm-client munge` (installed by `.ci/run`, never
here) and root. Outputs: a running cluster whose config, state, spool, logs and munge key all live
in one temporary directory; `LocalSlurm.env` holds the `SLURM_CONF` that points clients at it.
Nothing is written outside that directory, and `local_slurm()` stops every daemon it started.

Departures from a production cluster (on purpose, to run without systemd or cgroups):
ProctrackType=proctrack/linuxproc, TaskPlugin=task/none, no accounting (so `sacct` does not
work: code that needs job state uses `squeue`/`scontrol`), SlurmUser=root.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "sinfo", "scancel", "srun")


def missing_requirements() -> str | None:
    """Why a local cluster cannot start here (None when it can)."""
    if os.name != "posix" or os.geteuid() != 0:
        return "needs root (slurmd runs jobs as their user; munged and slurmctld run as root here)"
    missing = [p for p in (*DAEMONS, *CLIENTS) if shutil.which(p) is None and not Path("/usr/sbin", p).exists()]
    if missing:
        return (
            f"Slurm/munge binaries not found: {missing}; install them with "
            "`apt-get install -y slurmctld slurmd slurm-client munge` (what .ci/run does as root)"
        )
    return None


def _which(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LocalSlurm:
    """A running local cluster: where it lives and how to talk to it."""

    root: Path
    """Temporary directory holding slurm.conf, state, spool, logs and the munge key/socket."""
    conf: Path
    """The slurm.conf that every client must read (through `SLURM_CONF`)."""
    node: str
    """The single node's name (this machine's short hostname)."""
    partition: str = "debug"
    """The default partition."""

    @property
    def env(self) -> dict[str, str]:
        """os.environ plus SLURM_CONF, for subprocesses that run Slurm clients."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, args: Sequence[str], *, check: bool = True, timeout: float = 30) -> str:
        """Run a Slurm client command against this cluster; return its stdout."""
        p = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed with {p.returncode}: {p.stderr.strip()}")
        return p.stdout

    def node_state(self) -> str:
        return self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False).strip()

    def logs(self, tail: int = 40) -> str:
        """The last lines of each daemon log, for failure messages."""
        out = []
        for name in ("munged.log", "slurmctld.log", "slurmd.log"):
            p = self.root / "log" / name
            if p.exists():
                out.append(f"--- {name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-tail:]))
        return "\n".join(out)


def write_config(root: Path, *, node: str, cpus: int, mem_mb: int) -> Path:
    """Write slurm.conf (and an empty plugstack.conf) under root; return the slurm.conf path."""
    for d in ("state", "spool", "log", "run", "munge"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "plugstack.conf").write_text("")
    conf = root / "slurm.conf"
    conf.write_text(
        "\n".join(
            [
                "ClusterName=r3local",
                f"SlurmctldHost={node}(127.0.0.1)",
                f"SlurmctldPort={_free_port()}",
                f"SlurmdPort={_free_port()}",
                "AuthType=auth/munge",
                "CredType=cred/munge",
                # cred_expire: Slurm holds a requeued job for cred_expire + 1 s (default 120) so that
                # the revoked credential of the killed instance has expired; 10 s keeps tests short.
                f"AuthInfo=socket={root / 'munge' / 'munge.socket.2'},cred_expire=10",
                "SlurmUser=root",
                "SlurmdUser=root",
                f"StateSaveLocation={root / 'state'}",
                f"SlurmdSpoolDir={root / 'spool'}",
                f"SlurmctldPidFile={root / 'run' / 'slurmctld.pid'}",
                f"SlurmdPidFile={root / 'run' / 'slurmd.pid'}",
                f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
                f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
                f"PlugStackConfig={root / 'plugstack.conf'}",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_CPU",
                "SchedulerType=sched/backfill",
                # Short scheduling cycles so a requeued job starts as soon as it is eligible.
                "SchedulerParameters=sched_interval=2,bf_interval=2",
                "MpiDefault=none",
                "JobAcctGatherType=jobacct_gather/none",
                "AccountingStorageType=accounting_storage/none",
                "JobCompType=jobcomp/none",
                # Requeue on preemption/time limit is what submitit's checkpointing relies on.
                "JobRequeue=1",
                "ReturnToService=2",
                # Seconds between SIGTERM and SIGKILL when a job is cancelled or requeued.
                "KillWait=5",
                "MinJobAge=600",
                "SlurmctldDebug=info",
                "SlurmdDebug=info",
                f"NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN",
                f"PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP",
                "",
            ]
        )
    )
    return conf


def _stop(proc: subprocess.Popen, name: str, timeout: float = 15) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@contextlib.contextmanager
def local_slurm(
    root: Path, *, cpus: int | None = None, mem_mb: int = 20000, timeout: float = 60
) -> Iterator[LocalSlurm]:
    """Start munged, slurmctld and slurmd with all state under `root`; yield; stop them.

    Raises RuntimeError (with the daemons' log tails) if the node is not idle within `timeout` s.
    """
    reason = missing_requirements()
    if reason:
        raise RuntimeError(f"cannot start a local Slurm cluster: {reason}")
    root = Path(root).absolute()
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)  # munged refuses keys/sockets in directories writable by others
    node = socket.gethostname().split(".")[0]
    cpus = cpus or os.cpu_count() or 1
    conf = write_config(root, node=node, cpus=cpus, mem_mb=mem_mb)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o400)
    os.chmod(root / "munge", 0o700)
    cluster = LocalSlurm(root=root, conf=conf, node=node)
    env = cluster.env
    procs: list[tuple[str, subprocess.Popen]] = []
    try:
        munge_cmd = [
            _which("munged"), "-F", "--force",
            f"--key-file={key}", f"--socket={root / 'munge' / 'munge.socket.2'}",
            f"--pid-file={root / 'run' / 'munged.pid'}", f"--log-file={root / 'log' / 'munged.log'}",
            f"--seed-file={root / 'munge' / 'munged.seed'}",
        ]  # fmt: skip
        procs.append(
            ("munged", subprocess.Popen(munge_cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        )
        _wait_for(lambda: (root / "munge" / "munge.socket.2").exists(), 10, "munged socket", cluster)
        procs.append(("slurmctld", _daemon([_which("slurmctld"), "-D", "-i", "-f", str(conf)], env, root, "slurmctld")))
        procs.append(("slurmd", _daemon([_which("slurmd"), "-D", "-f", str(conf), "-N", node], env, root, "slurmd")))
        _wait_for(lambda: cluster.node_state() == "idle", timeout, "node idle (sinfo)", cluster, procs)
        yield cluster
    finally:
        with contextlib.suppress(Exception):  # cancel leftover jobs so slurmd kills their processes
            cluster.run(["scancel", "--full", "--user=root"], check=False, timeout=10)
            time.sleep(1)
        for name, proc in reversed(procs):
            _stop(proc, name)


def _daemon(cmd: list[str], env: dict[str, str], root: Path, name: str) -> subprocess.Popen:
    out = open(root / "log" / f"{name}.stdout", "ab")  # noqa: SIM115  (closed with the process)
    return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=root)


def _wait_for(cond, timeout: float, what: str, cluster: LocalSlurm, procs=()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dead = [n for n, p in procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"local Slurm: {dead} exited while waiting for {what}\n{cluster.logs()}")
        if cond():
            return
        time.sleep(0.5)
    raise RuntimeError(f"local Slurm: timed out after {timeout:.0f} s waiting for {what}\n{cluster.logs()}")
