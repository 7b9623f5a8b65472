"""Submit grid cells as Slurm jobs (or local processes) with submitit.

    python -m slurm.submit --preset paper|tiny [--cells GLOBS] [--seeds 0,1] [--runs DIR]
        [--model-base P --model-sft P --model-dense P --train-data DIR]
        [--partition P --account A --qos Q --nodes N --rollout-nodes R --gpus-per-node G
         --cpus-per-task C --mem-gb M --time T --setup 'module load cuda']
        [--executor slurm|local] [--no-array] [--no-static] [--retry-failed] [--dry-run] [--wait]

Inputs: the grid (experiments.grid), the resource table (slurm.resources) and flags.
Outputs: one job per cell; cells of one kind with the same resources go out as one job array
(one array task per cell). The submitit folder of a single job is `<runs>/<cell>/slurm/`; an
array's is `<runs>/slurm/<array>/`, and each task links its logs into `<runs>/<cell>/slurm/`.
`<runs>/<cell>/slurm/job.json` records the job id. `--dry-run` writes the sbatch scripts to
`<runs>/slurm/dry-run/` and prints them without submitting.
Skipped: complete/collapsed cells, running cells, queued cells whose job is still in squeue.
Failed cells are reported with the tail of their log and resubmitted only with --retry-failed.
`--executor local` runs the same jobs as local processes (one node; `--max-parallel` at a time;
experiments.local, the demo's executor) and waits for them: this is the embedded path.

Departures: the paper does not describe its cluster; resources are our choice (slurm.resources).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import submitit
from submitit.slurm.slurm import _make_sbatch_string  # what SlurmExecutor writes; used for --dry-run

from experiments import grid
from r3 import rundir
from r3.engines import registry
from slurm.job import RL_BODY, STATIC_BODY, CellJob, JobSpec
from slurm.resources import PROMPT_TOKENS, Resources, parse_time_min, resources_for

REPO = Path(__file__).resolve().parent.parent
SIGNAL_DELAY_S = 120
"""Seconds between Slurm's SIGUSR2 and the time limit: enough to requeue (the body already
checkpoints every few steps, so nothing heavy happens in the handler)."""


def plan_cells(args: argparse.Namespace) -> tuple[list[JobSpec], list[str]]:
    """JobSpecs to submit and human-readable notes about the cells skipped."""
    mp = grid.model_paths_from(args)
    runs = Path(args.runs or Path("runs") / args.preset).absolute()
    prec = args.precisions.split(",") if args.precisions else None
    rl = grid.cells(args.preset, seeds=args.seeds, precisions=prec, model_paths=mp, pattern=args.cells,
                    **_overrides(args))  # fmt: skip
    specs: list[JobSpec] = []
    for name in rl:
        cfg = rl[name]
        specs.append(JobSpec(name=name, kind="rl", run_dir=str(runs / name), payload=cfg.to_dict(),
                             resources=_resources(args, "rl"), body=args.body or RL_BODY))  # fmt: skip
    if not args.no_static:
        st = grid.static_cells(args.preset, seeds=args.seeds, precisions=prec, model_paths=mp)
        for name in grid.select(st, args.cells):
            specs.append(JobSpec(name=name, kind="static", run_dir=str(st[name].run_dir(runs)),
                                 payload=st[name].to_dict(), resources=_resources(args, "static"),
                                 body=args.static_body or STATIC_BODY))  # fmt: skip
    if not specs:
        raise SystemExit(f"no cell of preset {args.preset!r} matches --cells {args.cells!r}")
    _check_placeholders(specs)
    todo, notes = [], []
    live = _live_jobs(specs) if args.executor == "slurm" and not args.dry_run else set()
    for s in specs:
        st = (rundir.static_status if s.kind == "static" else rundir.run_status)(Path(s.run_dir))
        if st.state in rundir.DONE:
            notes.append(f"skip {s.name}: {st.state.value}")
        elif st.state == rundir.RunState.RUNNING:
            notes.append(f"skip {s.name}: running ({st.detail})")
        elif st.state == rundir.RunState.FAILED and not args.retry_failed:
            notes.append(f"skip {s.name}: FAILED (resubmit with --retry-failed)\n{failure_report(Path(s.run_dir))}")
        elif _job_id(Path(s.run_dir)) in live:
            notes.append(f"skip {s.name}: job {_job_id(Path(s.run_dir))} still in the queue")
        else:
            todo.append(s)
    return todo, notes


def _overrides(args: argparse.Namespace) -> dict:
    out = grid.overrides_from(args)  # the preset's training layout is part of its cells (experiments.grid)
    for item in args.override or ():
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--override takes KEY=VALUE (a RunConfig field), got {item!r}")
        try:  # numbers, true/false, lists as JSON; anything else is a string
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _resources(args: argparse.Namespace, kind: str) -> Resources:
    res = resources_for(args.preset, kind)  # type: ignore[arg-type]
    rollout = args.rollout_nodes if args.rollout_nodes is not None else res.rollout_nodes
    train = None
    if args.nodes is not None:
        train = args.nodes - rollout
        if train < 1:
            raise SystemExit(f"--nodes {args.nodes} leaves {train} training nodes next to {rollout} rollout nodes")
    return res.replace(
        train_nodes=train, rollout_nodes=rollout, gpus_per_node=args.gpus_per_node,
        cpus_per_task=args.cpus_per_task, mem_gb=args.mem_gb,
        time_min=parse_time_min(args.time) if args.time else None,
        servers_per_node=args.servers_per_node, server_tp=args.server_tp, gpu_mem_gb=args.gpu_mem_gb,
        cpu_tasks_per_node=args.cpu_tasks_per_node,
    )  # fmt: skip


def memory_plan(spec: JobSpec, preset: str):
    """(MemoryPlan, note, layout kwargs) of one GPU cell's training rank: an RL cell's train step, or a
    static cell's forward-only recompute (compute_logprobs: step=False); (None, reason, None) when not
    planned."""
    from experiments.static_mismatch import CHECKPOINT_BATCH_PROMPTS
    from r3.engines.megatron.memory import QWEN3_30B_A3B, ModelShape, plan_memory

    p, res = spec.payload, spec.resources
    if not res.gpus_per_node or p.get("train_engine") != "megatron":
        return None, "no GPU training (CPU job or not the megatron trainer)", None
    static = spec.kind == "static"
    path, note = p.get("model_moe") if static else p.get("model_path"), ""
    try:
        shape = ModelShape.from_model_dir(path)
        note = f"model {path}/config.json"
    except (OSError, TypeError, KeyError, ValueError):
        if preset != "paper":
            return None, f"no readable config.json under model path {path!r}", None
        shape, note = QWEN3_30B_A3B, f"{path}/config.json not readable here: Qwen3-30B-A3B's published config"
    world = res.train_nodes * res.tasks_per_node
    tp, pp = p.get("train_tensor_parallel", 1), p.get("train_pipeline_parallel", 1)
    dp = world // (tp * pp)
    if static:  # experiments.static_mismatch: CHECKPOINT_BATCH_PROMPTS prompts x group_size rows per call
        batch = CHECKPOINT_BATCH_PROMPTS * p.get("group_size", 8)
    else:
        batch = p["prompts_per_step"] * p["group_size"] // p["mini_steps"]
    micro = p.get("train_micro_batch") or -(-batch // max(1, dp))  # 0: the rank's whole mini-batch share
    kw = dict(
        world=world,
        tp=tp,
        pp=pp,
        ep=p.get("train_expert_parallel", 1),
        micro_batch=micro,
        seq_len=PROMPT_TOKENS + p["max_new_tokens"],
        recompute=False if static else p.get("train_recompute", False),
    )
    precision = p.get("train_precision", "fp32")
    if precision == "fp32":
        note += "; train_precision='bf16' (bf16 + fp32 main grads + distributed optimizer) needs far less"
    if static:
        note += "; forward only (compute_logprobs: no Adam state, no activation gradients)"
    plan = plan_memory(shape, precision=precision, step=not static, **kw)
    return plan, note, dict(kw, precision=precision, shape=shape, static=static, call_rows=batch)


def rehearsed_peak(layout: dict, *, live: bool, cache: dict | None):
    """(step peak bytes, call dict, source note) of a layout's training rank from the CPU rehearsal
    (r3.engines.megatron.rehearsal): the cached paper rehearsal when it is of this layout, or, with
    `live`, a rehearsal run now (~1 minute) for Qwen3-30B-A3B layouts with TP = PP = 1, recompute,
    micro-batch 1; (None, None, reason) otherwise. RL cells only: the static job runs no step."""
    from r3.engines.megatron import rehearsal
    from r3.engines.megatron.memory import QWEN3_30B_A3B

    if layout["static"]:
        return None, None, "a forward-only cell: the plan only"
    keys = ("world", "ep", "tp", "pp", "micro_batch", "seq_len", "recompute", "precision", "shape")
    if cache and rehearsal.matches_cache(cache, **{k: layout[k] for k in keys}):
        return cache["step_peak"], cache["call"], "cached rehearsal r3/engines/megatron/rehearsal_paper.json"
    rehearsable = layout["shape"] == QWEN3_30B_A3B and (layout["tp"], layout["pp"], layout["micro_batch"]) == (
        1, 1, 1) and layout["recompute"] and layout["precision"] == "bf16"  # fmt: skip
    if live and rehearsable:
        r = rehearsal.rehearse_layout(world=layout["world"], ep=layout["ep"], seq_len=layout["seq_len"])
        return r["step_peak"], r["call"], "rehearsed now (--rehearse)"
    return None, None, "no rehearsal of this layout (plan only; --rehearse runs one for Qwen3-30B-A3B, TP = PP = 1)"


def check_memory(specs: Sequence[JobSpec], preset: str, *, rehearse: bool = False) -> None:
    """Print each GPU cell's memory plan and, where there is one, its rehearsed peak (the cached paper
    rehearsal, or one run now with `rehearse`); refuse (SystemExit, with the numbers) a layout whose plan
    or rehearsed step peak exceeds the GPU. The driver-to-follower call's message is printed beside it
    (a warning: its size is set by experiments.distributed, not by the layout)."""
    from r3.engines.megatron import rehearsal
    from r3.engines.megatron.memory import GB

    cache = rehearsal.load_cache()
    bad = []
    for s in specs:
        try:
            plan, note, layout = memory_plan(s, preset)
        except ValueError as e:
            bad.append(f"{s.name}: {e}")
            continue
        if plan is None:
            continue
        gpu = s.resources.gpu_mem_gb * GB
        peak, _, source = rehearsed_peak(layout, live=rehearse, cache=cache)
        need = max(plan.total, peak or 0.0)
        fits = need <= gpu
        lines = [f"{s.name}: {plan.table()}"]
        if peak is not None:
            lines.append(f"  rehearsed peak per GPU (train step)        {peak / GB:8.1f} GB  ({source})")
        else:
            lines.append(f"  ({source})")
        shape = layout["shape"]
        if shape.moe_layers:  # one train-engine call's message, from shapes (rehearsal.call_message_bytes)
            call = rehearsal.call_message_bytes(layout["call_rows"], layout["seq_len"], shape.moe_layers, shape.top_k)
            call_peak = plan.static + call["wire_peak"] + plan.reserve
            warn = " WARNING: exceeds the GPU" if call_peak > gpu else ""
            lines.append(
                f"  driver-to-follower call of {layout['call_rows']} rows: {call['total'] / GB:.1f} GB message "
                f"(routing trace {call['expert_ids'] / GB:.1f} GB), through each follower's GPU one part at a time: "
                f"{call_peak / GB:.1f} GB with the static state and reserve{warn}"
            )
        print(
            "\n".join(lines) + f"\n  ({note}; prompts assumed <= {PROMPT_TOKENS} tokens; "
            f"{s.resources.gpu_mem_gb} GB per GPU: {'fits' if fits else 'DOES NOT FIT'})"
        )
        if not fits:
            what = "rehearsed" if peak is not None and peak > plan.total else "planned"
            bad.append(f"{s.name}: {need / GB:.1f} GB per GPU needed ({what}), {s.resources.gpu_mem_gb} GB available")
    if bad:
        raise SystemExit(
            "refusing layouts that cannot fit:\n  " + "\n  ".join(bad) + "\nraise "
            "train_expert_parallel (experts dominate), set train_precision=bf16, train_recompute=true "
            "or train_micro_batch=1 (--override KEY=VALUE), add training nodes (--nodes), or set "
            "--gpu-mem-gb"
        )


def _check_placeholders(specs: Sequence[JobSpec]) -> None:
    bad = sorted(
        {f"{k}={v}" for s in specs for k, v in s.payload.items() if isinstance(v, str) and v.startswith("<set ")}
    )
    if bad:
        raise SystemExit(f"cells still hold placeholders: {bad}; pass the flags they name "
                         "(paper checkpoints and data live on your cluster)")  # fmt: skip
    for s in specs:
        engine = s.payload.get("rollout_engine", "hf")
        needs_servers = registry.server_launcher(engine) is not None and not s.payload.get("rollout_urls")
        if needs_servers and s.resources.rollout_nodes == 0:
            raise SystemExit(f"cell {s.name} rolls out with {engine} servers but its job has no rollout nodes; "
                             "pass --rollout-nodes N (or set rollout_urls with --override)")  # fmt: skip


def _job_id(run_dir: Path) -> str | None:
    job = rundir.read_job(run_dir)
    return None if job is None else str(job.get("job_id"))


def _live_jobs(specs: Sequence[JobSpec]) -> set[str]:
    ids = {j for s in specs if (j := _job_id(Path(s.run_dir)))}
    if not ids:
        return set()
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i", "-j", ",".join(sorted(ids))],
                             capture_output=True, text=True, timeout=60).stdout  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return set()
    return {line.strip() for line in out.splitlines()} & ids


def failure_report(run_dir: Path, lines: int = 20) -> str:
    """The error of a failed cell and the tail of its log (log.txt, else the newest Slurm stderr)."""
    failed = rundir.read_failed(run_dir) or {}
    out = [f"  error: {failed.get('error', '?')} (job {failed.get('job_id', '?')})"]
    logs = [run_dir / rundir.LOG] if (run_dir / rundir.LOG).exists() else []
    logs = logs or sorted((run_dir / "slurm").glob("*_log.err"), key=lambda p: p.stat().st_mtime)[-1:]
    for p in logs:
        tail = p.read_text(errors="replace").splitlines()[-lines:]
        out.append(f"  last {len(tail)} lines of {p}:\n" + "\n".join("    " + t for t in tail))
    return "\n".join(out)


def sbatch_parameters(res: Resources, args: argparse.Namespace, name: str) -> dict:
    """SlurmExecutor.update_parameters kwargs for one job (or array) with these resources."""
    setup = [f"cd {shlex.quote(str(REPO))}", f"export PYTHONPATH={shlex.quote(str(REPO))}${{PYTHONPATH:+:$PYTHONPATH}}"]
    activate = Path(sys.prefix) / "bin" / "activate"
    if sys.prefix != sys.base_prefix and activate.exists():
        setup.insert(0, f"source {shlex.quote(str(activate))}")
    params: dict = {
        "job_name": f"r3-{name}", "time": res.time_min, "nodes": res.nodes,
        "ntasks_per_node": res.tasks_per_node, "cpus_per_task": res.cpus_per_task,
        "signal_delay_s": SIGNAL_DELAY_S, "setup": setup + list(args.setup or ()),
        "additional_parameters": {"requeue": True}, "array_parallelism": args.array_parallelism,
        # srun does not inherit sbatch's --cpus-per-task since Slurm 22.05 (each task would get 1 CPU);
        # --kill-on-bad-exit: a task exiting nonzero ends the step (a driver that failed after the
        # timeouts of experiments.distributed must not wait for a hung follower until the time limit)
        "srun_args": [f"--cpus-per-task={res.cpus_per_task}", "--kill-on-bad-exit=1"],
    }  # fmt: skip
    if res.gpus_per_node:
        params["gpus_per_node"] = res.gpus_per_node
    if res.mem_gb is not None:
        params["mem"] = "0" if res.mem_gb == 0 else f"{res.mem_gb}GB"  # --mem=0: all of each node
    for key in ("partition", "account", "qos"):
        if getattr(args, key):
            params[key] = getattr(args, key)
    return params


def _groups(specs: Sequence[JobSpec], array: bool) -> list[list[JobSpec]]:
    """Cells of one kind with equal resources form one array (when `array`)."""
    if not array:
        return [[s] for s in specs]
    groups: dict[tuple, list[JobSpec]] = {}
    for s in specs:
        groups.setdefault((s.kind, s.resources, s.body), []).append(s)
    return list(groups.values())


def _folder(group: list[JobSpec], runs: Path) -> Path:
    if len(group) == 1:
        return Path(group[0].run_dir) / "slurm"
    return runs / "slurm" / f"{time.strftime('%Y%m%d-%H%M%S')}-{group[0].kind}-{group[0].name}"


def _record(spec: JobSpec, job_id: str, executor: str, folder: Path) -> None:
    run_dir = Path(spec.run_dir)
    rundir.write_job(run_dir, {"job_id": job_id, "executor": executor, "folder": str(folder), "submitted": time.time()})


def dry_run(groups: list[list[JobSpec]], args: argparse.Namespace, runs: Path) -> list[Path]:
    out_dir = runs / "slurm" / "dry-run"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for group in groups:
        folder = _folder(group, runs)
        command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"
        params = sbatch_parameters(group[0].resources, args, group[0].name if len(group) == 1 else group[0].kind)
        text = _make_sbatch_string(command=command, folder=folder, map_count=len(group) if len(group) > 1 else None,
                                   **params)  # fmt: skip
        cells = "\n".join(f"#   [{i}] {s.name} -> {s.run_dir}" for i, s in enumerate(group))
        text = text.replace("\n# Parameters", f"\n# Cells (array index -> run directory):\n{cells}\n\n# Parameters", 1)
        path = out_dir / f"{group[0].kind}-{group[0].name}{'-array' if len(group) > 1 else ''}.sbatch"
        path.write_text(text)
        written.append(path)
        print(f"===== {path}\n{text}")
    return written


def submit_slurm(groups: list[list[JobSpec]], args: argparse.Namespace, runs: Path) -> list[tuple[JobSpec, str]]:
    out = []
    for group in groups:
        folder = _folder(group, runs)
        ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=args.max_requeues)
        ex.update_parameters(**sbatch_parameters(group[0].resources, args,
                                                 group[0].name if len(group) == 1 else group[0].kind))  # fmt: skip
        with ex.batch():
            jobs = [ex.submit(CellJob(s)) for s in group]
        for s, j in zip(group, jobs):
            _record(s, j.job_id, "slurm", folder)
            out.append((s, j.job_id))
            print(f"submitted {s.name}: job {j.job_id} ({folder})")
    return out


def run_local(specs: Sequence[JobSpec], args: argparse.Namespace) -> None:
    """Run cells on this machine, `--max-parallel` at a time, through the Slurm job wrapper (CellJob:
    RUNNING/FAILED markers, the cell's body) in the one local executor (experiments.local: a progress
    bar in steps, Ctrl-C stops all); blocks until all end. A failed cell is reported, the others go on."""
    from experiments.local import LocalJob, run_jobs

    jobs = []
    for s in specs:
        if s.resources.nodes != 1:
            raise SystemExit(f"--executor local runs one node; cell {s.name} needs {s.resources.nodes}")
        if s.resources.cpu_tasks_per_node != 1:
            raise SystemExit(
                f"--executor local runs one task per cell; for {s.resources.cpu_tasks_per_node} "
                f"ranks use Slurm or `torchrun -m experiments.distributed`"
            )
        _record(s, f"local-{os.getpid()}", "local", Path(s.run_dir) / "slurm")
        steps = int(s.payload.get("global_steps", 1)) if s.kind == "rl" else 1
        done = (lambda d=Path(s.run_dir), n=steps: min(rundir.last_step(d) or 0, n)) if s.kind == "rl" else (lambda: 0)
        jobs.append(LocalJob(name=s.name, fn=CellJob(s), work=steps, done=done))
    try:
        run_jobs(
            jobs, parallel=args.max_parallel, desc=f"{len(jobs)} cells (local)", log=lambda m: print(m, flush=True)
        )
    except RuntimeError as e:  # each failed cell wrote its FAILED marker; the state report below shows it
        print(e, flush=True)


def wait_slurm(submitted: Sequence[tuple[JobSpec, str]], timeout_s: float | None) -> None:
    ids = {j for _, j in submitted}
    start = time.monotonic()
    while ids:
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i", "-j", ",".join(sorted(ids))],
                             capture_output=True, text=True).stdout  # fmt: skip
        ids &= {line.strip() for line in out.splitlines()}
        if ids and timeout_s is not None and time.monotonic() - start > timeout_s:
            raise SystemExit(f"--wait: jobs {sorted(ids)} still queued/running after {timeout_s:.0f} s")
        if ids:
            time.sleep(5)


def report(specs: Sequence[JobSpec]) -> int:
    """Print each cell's final state; failed ones with the tail of their log. Returns #failed."""
    failed = 0
    for s in specs:
        st = (rundir.static_status if s.kind == "static" else rundir.run_status)(Path(s.run_dir))
        print(f"{s.name}: {st.state.value}" + (f" (step {st.last_step})" if st.last_step is not None else ""))
        if st.state in (rundir.RunState.FAILED, rundir.RunState.INCOMPLETE):
            failed += 1
            print(failure_report(Path(s.run_dir)))
    return failed


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m slurm.submit", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=grid.PRESETS, required=True)
    ap.add_argument("--cells", default=None, help="comma-separated globs over cell names (default: all)")
    ap.add_argument("--seeds", type=grid.parse_seeds, default=(0,))
    ap.add_argument("--precisions", default=None, help="rollout precisions, e.g. fp8,bf16 (default: the preset's)")
    ap.add_argument("--runs", type=Path, default=None, help="runs root (default runs/<preset>)")
    grid.add_model_flags(ap)
    ap.add_argument("--override", action="append", metavar="KEY=VALUE", help="RunConfig field for every RL cell")
    g = ap.add_argument_group("resources (override slurm.resources)")
    for flag, typ in (("--partition", str), ("--account", str), ("--qos", str), ("--nodes", int),
                      ("--rollout-nodes", int), ("--gpus-per-node", int), ("--cpus-per-task", int),
                      ("--mem-gb", int), ("--time", str), ("--servers-per-node", int), ("--server-tp", int),
                      ("--gpu-mem-gb", int), ("--cpu-tasks-per-node", int)):  # fmt: skip
        g.add_argument(flag, type=typ, default=None)
    g.add_argument("--setup", action="append", help="extra shell line run before the job (repeatable)")
    ap.add_argument("--executor", choices=["slurm", "local"], default="slurm")
    ap.add_argument("--max-parallel", type=int, default=1, help="local executor: cells at a time")
    ap.add_argument("--max-requeues", type=int, default=50, help="time-limit requeues per job (preemptions are free)")
    ap.add_argument("--no-array", action="store_true", help="one sbatch per cell instead of job arrays")
    ap.add_argument("--array-parallelism", type=int, default=4, help="array tasks running at once")
    ap.add_argument("--no-static", action="store_true", help="leave out the static mismatch jobs")
    ap.add_argument("--retry-failed", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="write and print the sbatch scripts only")
    ap.add_argument("--rehearse", action="store_true",
                    help="rehearse each GPU layout's training rank on this CPU (~1 min each) instead of using "
                         "the cached paper rehearsal (r3/engines/megatron/rehearsal_paper.json)")  # fmt: skip
    ap.add_argument("--wait", action="store_true", help="slurm: block until the jobs leave the queue, then report")
    ap.add_argument("--wait-timeout", type=float, default=None, help="seconds (with --wait)")
    ap.add_argument("--body", default=None, help=f"RL job body module:function (default {RL_BODY})")
    ap.add_argument("--static-body", default=None, help=f"static job body (default {STATIC_BODY})")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    runs = Path(args.runs or Path("runs") / args.preset).absolute()
    todo, notes = plan_cells(args)
    for n in notes:
        print(n)
    if not todo:
        print("nothing to submit")
        return
    check_memory(todo, args.preset, rehearse=args.rehearse)
    if args.dry_run:
        dry_run(_groups(todo, not args.no_array), args, runs)
        return
    if args.executor == "local":
        run_local(todo, args)
        sys.exit(1 if report(todo) else 0)
    submitted = submit_slurm(_groups(todo, not args.no_array), args, runs)
    if args.wait:
        wait_slurm(submitted, args.wait_timeout)
        sys.exit(1 if report(todo) else 0)


if __name__ == "__main__":
    main()
