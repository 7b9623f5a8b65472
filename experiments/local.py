"""The one local executor: jobs in spawned processes, `parallel` at a time, one progress bar.

Used by the demo (static measurements and grid cells) and by `slurm.submit --executor local` (the
Slurm job wrapper, run on this machine). Every job is resumable by its own design (a run
directory), so the executor only has to run, watch and stop them:
- a progress bar over all jobs, in units of work each job reports (grid steps), with an ETA; work
  done before (a resumed grid) is the bar's start, so the ETA counts only new work;
- a failed job is reported (its FAILED marker written when it names a run directory) while the
  others go on; the failures are raised together at the end;
- Ctrl-C or SIGTERM stops every job within seconds (queued ones never start, running ones are
  terminated) and says how to resume. No time limit: a job runs until it ends.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import multiprocessing as mp
import signal
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from r3 import rundir


@dataclasses.dataclass(frozen=True, kw_only=True)
class LocalJob:
    name: str
    fn: Callable[..., Any]
    """A module-level function (it is pickled into a spawned process)."""
    args: tuple = ()
    work: float = 1.0
    """The job's share of the progress bar (grid steps)."""
    done: Callable[[], float] = lambda: 0.0
    """Work done so far, read in this process from the job's files (0 when it cannot tell)."""
    run_dir: Path | None = None
    """Where a failure's FAILED marker goes (None: the job writes its own)."""


class Interrupted(SystemExit):
    """Ctrl-C / SIGTERM: workers stopped, queued jobs never started."""


def _stop_pool(ex: cf.ProcessPoolExecutor) -> None:
    """Cancel queued jobs and terminate the running ones now (their run directories stay resumable).
    `_processes` is the executor's own table of worker processes (CPython
    concurrent/futures/process.py); shutdown() alone would wait for the running jobs, and the pool
    would start the queued ones."""
    procs = list((ex._processes or {}).values())  # read before shutdown(), which drops the table
    ex.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=10)


def run_jobs(
    jobs: Sequence[LocalJob],
    *,
    parallel: int,
    desc: str,
    worker_init: Callable[[], None] | None = None,
    resume_hint: str = "run the same command again",
    log: Callable[[str], None] = lambda msg: None,
) -> dict[str, Any]:
    """Run `jobs` in `parallel` spawned processes, in order; returns {name: result}. Raises
    RuntimeError naming every failed job after all others ended, Interrupted on Ctrl-C/SIGTERM."""
    results: dict[str, Any] = {}
    errors: dict[str, str] = {}
    ex = cf.ProcessPoolExecutor(max_workers=parallel, mp_context=mp.get_context("spawn"), initializer=worker_init)
    # Ctrl-C and SIGTERM raise KeyboardInterrupt here, even when the shell started us with SIGINT
    # ignored (a background job of a script); the parent then stops the workers itself.
    prev = {s: signal.signal(s, signal.default_int_handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with tqdm(total=sum(j.work for j in jobs), initial=_done(jobs, results), desc=desc, unit="step") as bar:
            for j in jobs:
                if j.run_dir is not None:
                    rundir.clear_failed(j.run_dir)
            futs = {ex.submit(j.fn, *j.args): j for j in jobs}
            for j in jobs:
                log(f"started {j.name}: local process")
            pending = set(futs)
            while pending:
                finished, pending = cf.wait(pending, timeout=2.0)
                for f in finished:
                    j = futs[f]
                    try:
                        results[j.name] = f.result()
                        log(f"finished {j.name}")
                    except Exception as e:  # report every failed job, keep the others running
                        errors[j.name] = f"{type(e).__name__}: {e}"
                        log(f"FAILED {j.name}: {type(e).__name__}")
                        if j.run_dir is not None:
                            Path(j.run_dir).mkdir(parents=True, exist_ok=True)
                            rundir.write_failed(j.run_dir, e, log=str(Path(j.run_dir) / rundir.LOG))
                done = round(_done(jobs, results))
                # a resumed job first drops the steps logged after its checkpoint: count the rate (and
                # the ETA) from the lowest point, not from the steps found on disk at the start
                bar.initial = min(bar.initial, done)
                bar.n = done
                bar.set_postfix(done=f"{len(results)}/{len(jobs)}", failed=len(errors), refresh=False)
                bar.refresh()
    except KeyboardInterrupt:
        _stop_pool(ex)
        raise Interrupted(
            f"\ninterrupted: stopped every job ({len(results)} of {len(jobs)} complete). Every run directory is "
            f"resumable: {resume_hint}; complete jobs are skipped, the others resume from their last checkpoint."
        ) from None
    finally:
        for s, h in prev.items():
            signal.signal(s, h)
    ex.shutdown(wait=True)
    if errors:
        raise RuntimeError("jobs failed:\n" + "\n".join(f"  {n}: {e}" for n, e in errors.items()))
    return results


def _done(jobs: Sequence[LocalJob], results: dict[str, Any]) -> float:
    return sum(j.work if j.name in results else min(j.work, j.done()) for j in jobs)
