"""The job body of one cell, under Slurm or as a local process: roles, markers, requeue.

A `CellJob` is what `slurm.submit` hands to submitit. Inside the job, every task:
1. reads its place from submitit's JobEnvironment and the cell's Resources (slurm.topology);
2. rollout tasks: local rank 0 of each rollout node starts that node's SGLang servers
   (slurm.servers, logs in <run_dir>/servers/), everyone waits until the driver writes
   <run_dir>/slurm/servers.stop or the run is complete; SIGTERM stops the servers;
3. training tasks export MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE/LOCAL_RANK and call the body,
   `experiments.distributed.run_cell(cfg, run_dir)` (or `run_static_cell` below for a static cell),
   with the servers' URLs in `cfg.rollout_urls` once they answer /health. That body makes training
   rank 0 the driver (rollout, grading, metrics, every file of the run directory) and the other
   training ranks followers of its train engine (same calls, same collectives, no files but their
   own checkpoint shard); with one training task it is experiments.run.run_cell;
4. the driver (training rank 0) keeps a RUNNING heartbeat, writes FAILED with the error on an
   exception, and links this job's Slurm logs into <run_dir>/slurm/ (markers: r3.rundir).

Failures (docs/cluster.md, "Timeouts and failures"): training tasks export the JobSpec's timeouts
(experiments.distributed.Timeouts): the control group waits `control_timeout_s` (longer than the driver's
longest phase), one collective `collective_timeout_s`. A follower's failure reaches the driver through
the control group and fails the run (FAILED, cause on rank 0); the driver's failure or requeue stops
the followers; srun's --kill-on-bad-exit (slurm.submit) ends a step one of whose tasks exited nonzero.

Preemption and time limits: submitit's signal handler (SIGUSR2 by default, sent by Slurm
`--signal` before the time limit, or on preemption when the cluster sets
`SlurmctldParameters=preempt_send_user_signal`) calls `CellJob.checkpoint()`, which resubmits
the same CellJob; the job is requeued (`scontrol requeue`) and the body resumes from the last
complete checkpoint in run_dir. The body owns resumption: it truncates metrics.jsonl/eval.jsonl
to the checkpoint step, so the final metrics have no gap and no repeat.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import os
import signal
import time
import traceback
from pathlib import Path
from typing import Any

import submitit

from r3 import rundir
from r3.engines import registry
from slurm import topology
from slurm.resources import CellKind, Resources
from slurm.servers import ProcessServers, stop_on_sigterm, wait_healthy

log = logging.getLogger("submitit.r3")  # a child of submitit's logger: lands in the job log

RL_BODY = "experiments.distributed:run_cell"
STATIC_BODY = "slurm.job:run_static_cell"
STOP_FILE = "slurm/servers.stop"
WAIT_POLL_S = 5.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class JobSpec:
    """Everything a job needs, picklable and free of live objects."""

    name: str
    kind: CellKind
    run_dir: str
    """Absolute run directory (on a filesystem every node sees)."""
    payload: dict
    """RunConfig.to_dict() for an RL cell, StaticCell.to_dict() for a static one."""
    resources: Resources
    body: str
    """`module:function` called as function(config, run_dir) on the training tasks."""
    server_ready_timeout_s: float = 1800.0
    """Seconds the driver waits for every SGLang server's /health."""
    control_timeout_s: float = 4 * 3600.0
    """Seconds a training rank waits on the driver's control group (experiments.distributed.Timeouts):
    the rendezvous (the driver arrives after the servers answer), a follower's wait for the next call
    (the driver evaluates and rolls out meanwhile), the per-call error exchange."""
    collective_timeout_s: float = 1800.0
    """Seconds one collective inside a train-engine call waits (NCCL's watchdog ends the rank after it)."""

    def __post_init__(self) -> None:
        if self.control_timeout_s <= self.server_ready_timeout_s:
            raise ValueError(
                f"cell {self.name}: control_timeout_s={self.control_timeout_s} must exceed "
                f"server_ready_timeout_s={self.server_ready_timeout_s}: the followers wait on the control group "
                "while the driver waits for the servers"
            )

    def training_env(self) -> dict[str, str]:
        """What every training task exports besides the rendezvous: the timeouts, and R3_REQUIRE_CUDA=1 in
        a GPU job (a task whose torch sees no GPU stops instead of training on gloo/CPU)."""
        from experiments.distributed import Timeouts
        from r3.engines.megatron.compat import REQUIRE_CUDA_ENV

        env = Timeouts(control_s=self.control_timeout_s, collective_s=self.collective_timeout_s).env()
        env[REQUIRE_CUDA_ENV] = "1" if self.resources.gpus_per_node > 0 else "0"
        return env


def resolve(body: str):
    """`package.module:function` -> the function (imported inside the job, not pickled)."""
    mod, sep, fn = body.partition(":")
    if not sep or not mod or not fn:
        raise ValueError(f"job body must be 'module:function', got {body!r}")
    try:
        return getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise ImportError(f"cannot load job body {body!r}: {e}; is the repository on PYTHONPATH?") from e


def task_info() -> topology.TaskInfo:
    """This task's place from submitit's JobEnvironment; one local task outside a submitit job."""
    try:
        env = submitit.JobEnvironment()
    except RuntimeError:  # not inside a submitit job (called directly)
        return topology.TaskInfo.single()
    return topology.TaskInfo.from_job_environment(env)


def _link_logs(run_dir: Path) -> None:
    """Make this job's stdout/stderr visible in <run_dir>/slurm/ when submitit's folder is elsewhere
    (job arrays share one folder)."""
    with contextlib.suppress(RuntimeError, KeyError, OSError):
        paths = submitit.JobEnvironment().paths
        dest = run_dir / "slurm"
        if paths.folder.resolve() == dest.resolve():
            return
        dest.mkdir(parents=True, exist_ok=True)
        for src in (paths.stdout, paths.stderr):
            link = dest / src.name
            if not link.exists():
                link.symlink_to(src)


def _write_failed(run_dir: Path, err: BaseException, job_id: str) -> None:
    rundir.write_json_atomic(run_dir / rundir.FAILED, {
        "error": f"{type(err).__name__}: {err}"[:2000],
        "traceback": traceback.format_exc()[-8000:],
        "job_id": job_id, "time": time.time(),
    })  # fmt: skip


def guard_preemption_signal_in_forks() -> None:
    """Wrap submitit's preemption handler so that requeueing survives a real preemption.

    1. Forked children (e.g. a grader worker pool) inherit submitit's SIGUSR2 handler, and Slurm
       signals every process of the step: each worker would checkpoint and `scontrol requeue`
       too (the second requeue fails: "Job is pending execution"). Only the process that
       installed the handler acts on it.
    2. On preemption Slurm also sends SIGTERM to every process of the step, in no fixed order
       with SIGUSR2; the `scontrol requeue` child that submitit starts would die of it. SIGTERM
       is ignored from the moment the handler runs (an ignored signal stays ignored across
       fork/exec, so the scontrol child ignores it too); submitit only logs SIGTERM anyway.
    """
    sig = submitit.JobEnvironment._usr_sig()
    previous, owner = signal.getsignal(sig), os.getpid()
    if not callable(previous):  # not inside a submitit job: nothing to guard
        return

    def handler(signum, frame):
        if os.getpid() == owner:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            previous(signum, frame)

    signal.signal(sig, handler)


class CellJob(submitit.helpers.Checkpointable):
    """Checkpointable callable: requeued with the same spec; the body resumes from run_dir."""

    def __init__(self, spec: JobSpec) -> None:
        self.spec = spec

    def __call__(self) -> Any:
        spec = self.spec
        run_dir = Path(spec.run_dir)
        task = task_info()
        guard_preemption_signal_in_forks()
        plan = topology.plan(task, spec.resources)
        log.info("cell %s: job %s task %d -> %s", spec.name, task.job_id, task.global_rank, plan.role)
        if plan.role == "rollout":
            return self._serve(plan, run_dir)
        os.environ.update(plan.dist_env)
        os.environ.update(spec.training_env())
        if not plan.is_driver:
            return self._call_body(plan, run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        _link_logs(run_dir)
        with rundir.RunningMarker(run_dir, task.job_id):
            try:
                return self._call_body(plan, run_dir)
            except Exception as e:  # not SystemExit: a requeue exits through here and is no failure
                _write_failed(run_dir, e, task.job_id)
                raise
            finally:
                if plan.server_urls:
                    (run_dir / STOP_FILE).parent.mkdir(parents=True, exist_ok=True)
                    (run_dir / STOP_FILE).write_text(f"{time.time()}\n")

    def _call_body(self, plan: topology.Plan, run_dir: Path) -> Any:
        spec = self.spec
        payload = dict(spec.payload)
        if plan.server_urls:
            if plan.is_driver:
                wait_healthy(plan.server_urls, timeout_s=spec.server_ready_timeout_s)
            payload["rollout_urls"] = list(plan.server_urls)
            if spec.kind == "static":  # server i of each node serves static_server_models(...)[i % 2]
                moe, dense = split_static_urls(plan.server_urls, spec.resources.servers_per_node)
                payload["rollout_urls"], payload["rollout_urls_dense"] = list(moe), list(dense)
        fn = resolve(spec.body)
        if spec.kind == "rl":
            from experiments.config import RunConfig

            return fn(RunConfig.from_dict(payload), run_dir)
        return fn(payload, run_dir)

    def _serve(self, plan: topology.Plan, run_dir: Path) -> None:
        """Rollout node: own the servers (local rank 0) or idle until the run ends."""
        spec, started = self.spec, time.time()
        res = spec.resources
        p = spec.payload
        models = [p.get("model_path")] if spec.kind == "rl" else static_server_models(p, res.servers_per_node)
        if not all(models):
            raise ValueError(f"cell {spec.name}: rollout servers need a model path, got {models!r}")
        if plan.owns_servers:
            # the rollout engine says which servers it needs (its config's server_launcher)
            engine = p.get("rollout_engine", "sglang")
            specs_for = registry.server_launcher(engine)
            if specs_for is None:
                raise ValueError(f"cell {spec.name}: rollout engine {engine!r} has no servers to launch")
            specs = []
            for i in range(res.servers_per_node):  # one spec per server: server i serves models[i % len]
                one = specs_for(model_path=models[i % len(models)], host=plan.server_host, servers=i + 1,
                                tp=res.server_tp, port=topology.SERVER_PORT,
                                precision=p.get("rollout_precision", p.get("precision", "bf16")),
                                seed=p.get("seed", 0))  # fmt: skip
                specs.append(one[i])  # port SERVER_PORT + i, GPUs i*tp .. i*tp+tp-1
            servers = ProcessServers(specs, run_dir / "servers", ready_timeout_s=spec.server_ready_timeout_s)
            with stop_on_sigterm(servers), servers:
                self._wait_for_end(run_dir, started, servers)
        else:
            self._wait_for_end(run_dir, started, None)

    def _wait_for_end(self, run_dir: Path, started: float, servers: ProcessServers | None) -> None:
        stop, done = run_dir / STOP_FILE, (rundir.MANIFEST, rundir.STATIC)
        while True:
            if any((run_dir / d).exists() for d in done):
                return
            with contextlib.suppress(OSError):
                if stop.stat().st_mtime >= started:  # a stop file from before a requeue is stale
                    return
            if servers is not None and not servers.alive():
                raise RuntimeError(f"a rollout server of cell {self.spec.name} exited; see {run_dir / 'servers'}")
            time.sleep(WAIT_POLL_S)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on SIGUSR2 (preemption / near the time limit): requeue the same job.

        Nothing is saved here: the body checkpoints every `checkpoint_every` steps and resumes
        from the newest complete one; work after it is redone with the same seeds.
        """
        log.warning("cell %s: checkpoint requested; requeueing (resume from the last checkpoint)", self.spec.name)
        return submitit.helpers.DelayedSubmission(CellJob(self.spec))


def static_server_models(cell, servers_per_node: int) -> list[str | None]:
    """What the servers of a static cell's rollout node serve: server i serves models[i % 2], the MoE
    checkpoint on even and the dense control on odd servers (one server per node: the MoE only, for
    a cell measuring the zoo). `cell`: an experiments.grid.StaticCell (or its dict form)."""
    from experiments.grid import StaticCell

    cell = StaticCell.from_dict(cell) if isinstance(cell, dict) else cell
    if not cell.model_dense or servers_per_node < 2:
        if cell.model_dense and registry.server_launcher(cell.rollout_engine) is not None:
            raise ValueError(
                f"static cell {cell.name}: the dense control needs its own server; the rollout node runs "
                f"{servers_per_node}; pass --servers-per-node 2 or more (even servers serve the MoE model, odd the "
                "dense one)"
            )
        return [cell.model_moe]
    return [cell.model_moe, cell.model_dense]


def split_static_urls(urls: tuple[str, ...] | list[str], servers_per_node: int) -> tuple[list[str], list[str]]:
    """(MoE server URLs, dense server URLs) of a static cell, by the rule of static_server_models (URLs
    in slurm.topology's order: node by node, server i on port SERVER_PORT + i)."""
    if servers_per_node < 2:
        return list(urls), []
    moe = [u for j, u in enumerate(urls) if (j % servers_per_node) % 2 == 0]
    dense = [u for j, u in enumerate(urls) if (j % servers_per_node) % 2 == 1]
    return moe, dense


def run_static_cell(payload: dict, out_dir: Path) -> dict:
    """Static-mismatch job body: one precision's static.json in out_dir.

    payload: a StaticCell as a dict (experiments.grid), with `rollout_urls` / `rollout_urls_dense` set by
    the job when it runs servers; out_dir: <runs>/static/<precision>. A cell naming no checkpoints
    measures the embedded zoo (`experiments.static_mismatch.run_static`); one naming its MoE and dense
    checkpoints (the paper preset: SGLang rollout vs megatron, Qwen3-30B-A3B and Qwen3-8B) runs the same
    measurement on them with the cell's engines (`run_static_checkpoints`): every training task calls
    this, rank 0 measures and writes, the others follow its megatron engine.
    """
    from experiments.grid import StaticCell
    from experiments.static_mismatch import run_static, run_static_checkpoints

    cell = StaticCell.from_dict(payload)
    out_dir = Path(out_dir)
    if (out_dir.parent.name, out_dir.name) != (rundir.STATIC_DIR, cell.precision):
        raise ValueError(f"static cell {cell.name}: out_dir must be <runs>/static/{cell.precision}, got {out_dir}")
    if cell.model_moe or cell.model_dense:
        if not (cell.model_moe and cell.model_dense):
            raise ValueError(
                f"static cell {cell.name}: name both checkpoints (model_moe={cell.model_moe!r}, "
                f"model_dense={cell.model_dense!r}); pass --model-sft and --model-dense"
            )
        return run_static_checkpoints(cell, out_dir)
    return run_static(out_dir.parent.parent, cell.precision, seed=cell.seed, train_engine=cell.train_engine)
