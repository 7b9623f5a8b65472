"""CellJob outside Slurm: body call, markers, failure report, requeue submission, rollout wait."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import submitit

from experiments import grid
from r3 import rundir as state
from slurm.job import STOP_FILE, CellJob, JobSpec, resolve
from slurm.resources import Resources

CALLS = []


def recording_body(cfg, run_dir):
    CALLS.append((cfg, run_dir, os.environ.get("WORLD_SIZE"), (run_dir / state.RUNNING).exists()))
    return {"ok": cfg.name}


def failing_body(cfg, run_dir):
    raise ValueError(f"bad step in {cfg.name}")


def _spec(tmp_path, body: str) -> JobSpec:
    cfg = grid.cells("tiny", precisions=["fp8"])["sft-single-grpo-r3"]
    return JobSpec(
        name=cfg.name,
        kind="rl",
        run_dir=str(tmp_path / cfg.name),
        payload=cfg.to_dict(),
        resources=Resources(train_nodes=1),
        body=body,
    )


def test_body_runs_with_config_markers_and_rank_env(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    CALLS.clear()
    spec = _spec(tmp_path, f"{__name__}:recording_body")
    assert CellJob(spec)() == {"ok": "sft-single-grpo-r3"}
    cfg, run_dir, world, running = CALLS[0]
    assert cfg.replay and cfg.rollout_precision == "fp8" and run_dir == tmp_path / spec.name
    assert world == "1" and running  # RUNNING held during the body ...
    assert not (run_dir / state.RUNNING).exists()  # ... and removed after


def test_exception_writes_failed_with_the_error(tmp_path):
    spec = _spec(tmp_path, f"{__name__}:failing_body")
    with pytest.raises(ValueError):
        CellJob(spec)()
    failed = json.loads((tmp_path / spec.name / state.FAILED).read_text())
    assert failed["error"] == "ValueError: bad step in sft-single-grpo-r3" and "failing_body" in failed["traceback"]
    assert state.run_status(tmp_path / spec.name).state == state.RunState.FAILED


def test_checkpoint_resubmits_the_same_spec(tmp_path):
    job = CellJob(_spec(tmp_path, f"{__name__}:recording_body"))
    delayed = job.checkpoint()
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    assert isinstance(delayed.function, CellJob) and delayed.function.spec == job.spec


def test_resolve_errors():
    with pytest.raises(ValueError, match="module:function"):
        resolve("experiments.run")
    with pytest.raises(ImportError, match="cannot load job body"):
        resolve("experiments.grid:no_such_function")


def test_rollout_tasks_wait_for_a_fresh_stop_file(tmp_path, monkeypatch):
    import threading

    import slurm.job as job_mod

    monkeypatch.setattr(job_mod, "WAIT_POLL_S", 0.05)
    job = CellJob(_spec(tmp_path, f"{__name__}:recording_body"))
    run_dir = tmp_path / "r"
    (run_dir / STOP_FILE).parent.mkdir(parents=True)
    (run_dir / STOP_FILE).write_text("old")
    os.utime(run_dir / STOP_FILE, (1, 1))  # from before a requeue: ignored

    def stop_later():
        time.sleep(0.3)
        (run_dir / STOP_FILE).write_text("now")

    threading.Thread(target=stop_later).start()
    t0 = time.monotonic()
    job._wait_for_end(run_dir, time.time(), None)
    assert time.monotonic() - t0 >= 0.25


def test_forked_children_ignore_the_preemption_signal(tmp_path):
    """A fork (a worker pool) must not run submitit's checkpoint-and-requeue handler."""
    import multiprocessing
    import signal

    from slurm.job import guard_preemption_signal_in_forks

    calls = []
    old = signal.signal(signal.SIGUSR2, lambda s, f: calls.append(os.getpid()))
    old_term = signal.getsignal(signal.SIGTERM)
    try:
        guard_preemption_signal_in_forks()
        ctx = multiprocessing.get_context("fork")
        out = tmp_path / "child"

        def child():
            os.kill(os.getpid(), signal.SIGUSR2)
            out.write_text(str(len(calls)))

        p = ctx.Process(target=child)
        p.start()
        p.join(10)
        assert p.exitcode == 0 and out.read_text() == "0"
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.05)
        assert calls == [os.getpid()]
        # From then on SIGTERM is ignored, also by the `scontrol requeue` child the handler starts.
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
        child = subprocess.run(
            [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGTERM); print('alive')"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert child.stdout.strip() == "alive"
    finally:
        signal.signal(signal.SIGUSR2, old)
        signal.signal(signal.SIGTERM, old_term)


@pytest.mark.parametrize("engine, program", [("sglang", "sglang.launch_server"), ("vllm", "vllm.entrypoints")])
def test_rollout_node_launches_the_servers_rollout_engine_names(tmp_path, monkeypatch, engine, program):
    """RunConfig.rollout_engine chooses which servers a rollout node starts (SGLang's or vLLM's)."""
    from slurm import job as job_mod
    from slurm.topology import Plan

    started = []

    class Recorder:
        def __init__(self, specs, log_dir, **kw):
            started.extend(specs)

        def __enter__(self):
            raise KeyboardInterrupt  # stop right after the launch decision

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(job_mod, "ProcessServers", Recorder)
    spec = _spec(tmp_path, "tests.slurm.test_slurm_job:recording_body")
    spec.payload.update(rollout_engine=engine, rollout_precision="bf16", model_path=str(tmp_path / "ckpt"))
    spec = JobSpec(
        **{**spec.__dict__, "resources": Resources(train_nodes=1, rollout_nodes=1, servers_per_node=1, gpus_per_node=1)}
    )
    plan = Plan(role="rollout", dist_env={}, is_driver=False, owns_servers=True, server_urls=("http://h:30000",),
                server_host="h")  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        CellJob(spec)._serve(plan, tmp_path)
    assert started and all(program in " ".join(s.command) for s in started)


# --- the static job of user checkpoints (the paper preset's static cell) ---------------------------------
def test_paper_like_static_cell_with_explicit_paths_runs_through_the_job(micro_zoo, tmp_path):
    """A paper-preset StaticCell naming its MoE and dense checkpoints (here the micro zoo's, saved as user
    checkpoints), engines swapped for ones that run here (transformers bf16 rollout, fp32 trainer), run by
    CellJob with the real static body: static.json written, markers as for RL cells, state complete."""
    import dataclasses

    from experiments import task
    from slurm.job import STATIC_BODY

    prompts = tmp_path / "heldout.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in task.heldout_rows(3)))
    paper = grid.static_cells("paper", model_paths={"sft": str(micro_zoo / "sft"), "dense": str(micro_zoo / "dense")})
    cell = dataclasses.replace(
        paper["static"], rollout_engine="hf", train_engine="hf", prompts=str(prompts), group_size=2,
        max_new_tokens=6, template="plain", train_micro_batch=0,
    )  # fmt: skip
    assert (cell.preset, cell.precision, cell.prompts != "benchmarks") == ("paper", "bf16", True)
    run_dir = cell.run_dir(tmp_path / "runs")
    spec = JobSpec(name=cell.name, kind="static", run_dir=str(run_dir), payload=cell.to_dict(),
                   resources=Resources(train_nodes=1), body=STATIC_BODY)  # fmt: skip
    rec = CellJob(spec)()
    assert json.loads((run_dir / "static.json").read_text()) == rec
    assert rec["models"] == {"moe": str(micro_zoo / "sft"), "dense": str(micro_zoo / "dense")}
    assert (rec["rollout_engine"], rec["train_engine"], rec["n_prompts"]) == ("hf", "hf", 3)
    assert rec["moe"]["routing_pair_disagreement"] is not None and rec["dense"]["tokens"] > 0
    assert state.static_status(run_dir).state == state.RunState.COMPLETE
    assert not (run_dir / state.RUNNING).exists() and not (run_dir / state.FAILED).exists()


def test_static_cell_servers_alternate_moe_and_dense(tmp_path, monkeypatch):
    """The rollout node of a static cell serves both models (even servers the MoE, odd the dense); the
    body gets each model's URLs."""
    from slurm import job as job_mod
    from slurm.topology import Plan

    cell = grid.static_cells("paper", model_paths={"sft": "/ckpt/moe", "dense": "/ckpt/dense"})["static"]
    res = Resources(train_nodes=1, rollout_nodes=1, servers_per_node=2, server_tp=4, gpus_per_node=8)
    spec = JobSpec(name=cell.name, kind="static", run_dir=str(tmp_path), payload=cell.to_dict(), resources=res,
                   body=f"{__name__}:static_recording_body")  # fmt: skip
    started = []

    class Recorder:
        def __init__(self, specs, log_dir, **kw):
            started.extend(specs)

        def __enter__(self):
            raise KeyboardInterrupt

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(job_mod, "ProcessServers", Recorder)
    urls = ("http://r:30000", "http://r:30001")
    plan = Plan(role="rollout", dist_env={}, is_driver=False, owns_servers=True, server_urls=urls, server_host="r")
    with pytest.raises(KeyboardInterrupt):
        CellJob(spec)._serve(plan, tmp_path)
    cmds = [" ".join(s.command) for s in started]
    assert len(cmds) == 2 and "/ckpt/moe" in cmds[0] and "/ckpt/dense" in cmds[1]
    assert "--port 30000" in cmds[0] and "--base-gpu-id 0" in cmds[0]
    assert "--port 30001" in cmds[1] and "--base-gpu-id 4" in cmds[1] and "--tp-size 4" in cmds[1]
    STATIC_CALLS.clear()
    train = Plan(role="train", dist_env={}, is_driver=False, owns_servers=False, server_urls=urls)
    CellJob(spec)._call_body(train, tmp_path)
    assert STATIC_CALLS[0]["rollout_urls"] == ["http://r:30000"]
    assert STATIC_CALLS[0]["rollout_urls_dense"] == ["http://r:30001"]
    one = JobSpec(**{**spec.__dict__, "resources": res.replace(servers_per_node=1)})
    with pytest.raises(ValueError, match="dense control needs its own server"):
        CellJob(one)._serve(plan, tmp_path)


STATIC_CALLS = []


def static_recording_body(cell, run_dir):
    STATIC_CALLS.append(cell)


def test_training_tasks_export_timeouts_and_the_gpu_requirement(tmp_path):
    from experiments.distributed import Timeouts

    spec = _spec(tmp_path, f"{__name__}:recording_body")
    env = spec.training_env()
    assert env["R3_REQUIRE_CUDA"] == "0"  # a CPU job
    os_env = dict(os.environ)
    try:
        os.environ.update(env)
        assert Timeouts.from_env() == Timeouts(control_s=spec.control_timeout_s, collective_s=spec.collective_timeout_s)
    finally:
        os.environ.clear()
        os.environ.update(os_env)
    gpu = JobSpec(**{**spec.__dict__, "resources": Resources(train_nodes=1, gpus_per_node=8)})
    assert gpu.training_env()["R3_REQUIRE_CUDA"] == "1"
    with pytest.raises(ValueError, match="control_timeout_s=600.0 must exceed server_ready_timeout_s=1800.0"):
        JobSpec(**{**spec.__dict__, "control_timeout_s": 600.0})


def test_gpu_job_without_a_visible_gpu_refuses_to_fall_back_to_the_cpu(monkeypatch):
    from r3.engines.megatron import compat

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.delenv("SLURM_GPUS_ON_NODE", raising=False)
    monkeypatch.setenv("R3_REQUIRE_CUDA", "0")
    assert compat.require_cuda_if_asked() is False  # a CPU job: gloo
    monkeypatch.setenv("R3_REQUIRE_CUDA", "1")
    with pytest.raises(RuntimeError, match="asked for GPUs .* but torch sees none .* Refusing to fall back"):
        compat.require_cuda_if_asked()
    monkeypatch.setenv("R3_REQUIRE_CUDA", "0")
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "8")  # an allocation with GPUs, submitted by other means
    with pytest.raises(RuntimeError, match="SLURM_GPUS_ON_NODE='8'"):
        compat.require_cuda_if_asked()


@pytest.mark.parametrize(
    ("local_rank", "local_world", "visible", "expected"),
    [(3, 8, 8, 3), (3, 8, 1, 0), (0, 1, 1, 0), (5, 8, 4, None)],  # all GPUs, one bound per task, refused
)
def test_local_device_is_local_rank_modulo_the_visible_gpus(monkeypatch, local_rank, local_world, visible, expected):
    from r3.engines.megatron import compat

    chosen = []
    monkeypatch.setattr("torch.cuda.device_count", lambda: visible)
    monkeypatch.setattr("torch.cuda.set_device", chosen.append)
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
    if expected is None:
        with pytest.raises(RuntimeError, match="8 ranks on this node .* each sees 4 GPUs"):
            compat.set_local_device()
        return
    assert compat.set_local_device() == expected and chosen == [expected]


def test_generated_scripts_give_srun_the_cpus_per_task_and_kill_on_bad_exit(tmp_path):
    import argparse

    from submitit.slurm.slurm import _make_sbatch_string

    from slurm.submit import sbatch_parameters

    args = argparse.Namespace(setup=None, array_parallelism=4, partition=None, account=None, qos=None)
    params = sbatch_parameters(Resources(train_nodes=2, gpus_per_node=8, cpus_per_task=12), args, "cell")
    text = _make_sbatch_string(command="python -m x", folder=str(tmp_path), **params)
    srun = next(line for line in text.splitlines() if line.startswith("srun "))
    assert "--cpus-per-task=12" in srun and "--kill-on-bad-exit=1" in srun
    assert "#SBATCH --cpus-per-task=12" in text
