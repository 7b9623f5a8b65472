"""Grading throughput: graded pairs per second, serial (inline) vs the worker pool, side by side.

    python benchmarks/bench_grading.py [--workers 2] [--repeats 3]

Pairs are real benchmark answers with realistic responses: every MATH-500 reference solution
against its own answer and against the next problem's answer (mostly wrong), every AIME24
solution against its answer and a wrong one, and for AIME25 / AMC23 (no solutions shipped) a short
worked response ending in a boxed right or wrong answer. Each measurement runs in a fresh
subprocess (so no mode inherits the other's sympy/math-verify caches), after the grader's
warm-up (untimed in both modes, run once in the measuring process; the pool's workers are forked
from it afterwards and inherit it).
Target: the pool reaches at least 1.7x serial on 2 cores. The machine's load, the cores
this session can actually get (busy-loop probe), and the CPU seconds of every process involved
are printed: other jobs on the cores lower the pool's wall-clock advantage, and workers * serial
CPU / pool CPU is what the pool could reach on idle cores (its CPU overhead: IPC, per-worker
caches).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_pairs() -> list[tuple[str, str]]:
    sys.path.insert(0, str(ROOT))
    from eval import benchmarks

    pairs = []
    m = benchmarks.load("math500")
    for i, r in enumerate(m):
        pairs.append((r["solution"], r["answer"]))
        pairs.append((r["solution"], m[(i + 1) % len(m)]["answer"]))
    for r in benchmarks.load("aime24"):
        pairs.append((r["solution"], r["answer"]))
        pairs.append((r["solution"], str(int(r["answer"]) + 1)))
    for name in ("aime25", "amc23"):
        for r in benchmarks.load(name):
            for ans in (r["answer"], str(int(r["answer"]) + 7)):
                resp = (
                    f"We set up the problem: {r['problem'][:200]} ... Simplifying step by step gives "
                    f"$x = \\frac{{{ans}}}{{1}}$, so the final result is \\boxed{{{ans}}}."
                )
                pairs.append((resp, r["answer"]))
    return pairs


def _cpu_seconds(pids: list[int]) -> float:
    """utime + stime of processes (Linux /proc), in seconds."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)
    return total / tick


def available_cores(procs: int, seconds: float = 1.0) -> float:
    """CPU seconds per wall second that `procs` busy-looping processes get right now: the cores
    this benchmark's session can use. Other sessions' jobs lower it (Linux autogroup scheduling
    shares the CPU fairly between sessions, not between processes)."""
    spin = (
        f"import time\nt=time.perf_counter()\nwhile time.perf_counter()-t<{seconds}: pass\nprint(time.process_time())"
    )
    kids = [subprocess.Popen([sys.executable, "-c", spin], stdout=subprocess.PIPE, text=True) for _ in range(procs)]
    return sum(float(k.communicate()[0]) for k in kids) / seconds


def measure(mode: str, workers: int) -> dict:
    """One timed pass in this process (called in a fresh subprocess). CPU seconds are those of
    every process doing the work (the caller, and the workers), so CPU-bound contention from other
    programs on the machine shows up as wall >> CPU / cores."""
    sys.path.insert(0, str(ROOT))
    from eval.grader import grade_detailed, make_pool, warm_up

    pairs = build_pairs()
    if mode == "serial":
        warm_up()
        c0, t0 = _cpu_seconds([os.getpid()]), time.perf_counter()
        res = grade_detailed(pairs, workers=0)
        dt, cpu = time.perf_counter() - t0, _cpu_seconds([os.getpid()]) - c0
    else:
        warm_up()  # the same warm-up as serial, in the parent: the forked workers inherit it
        with make_pool(workers=workers) as pool:
            pool.start()  # fork every worker and wait for its (no-op) initializer
            pids = [os.getpid()] + pool.pids
            c0, t0 = _cpu_seconds(pids), time.perf_counter()
            res = grade_detailed(pairs, pool=pool)
            dt, cpu = time.perf_counter() - t0, _cpu_seconds(pids) - c0
    return {
        "mode": mode,
        "pairs": len(pairs),
        "seconds": dt,
        "cpu_seconds": cpu,
        "correct": sum(r.correct for r in res),
        "timeouts": sum(r.timed_out for r in res),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._child:
        print(json.dumps(measure(args._child, args.workers)))
        return
    load_before, cores_before = os.getloadavg()[0], available_cores(args.workers)
    runs: dict[str, list[dict]] = {"serial": [], "pool": []}
    for rep in range(args.repeats):
        for mode in ("serial", "pool"):  # alternate, so drifting machine load hits both
            out = subprocess.run(
                [sys.executable, __file__, "--_child", mode, "--workers", str(args.workers)],
                capture_output=True,
                text=True,
                check=True,
                cwd=ROOT,
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            runs[mode].append(r)
            print(
                f"repeat {rep + 1}/{args.repeats} {mode:>6}: {r['pairs']} pairs in {r['seconds']:.2f} s "
                f"= {r['pairs'] / r['seconds']:.1f} pairs/s, {r['cpu_seconds']:.2f} CPU s "
                f"(correct {r['correct']}, timeouts {r['timeouts']})",
                flush=True,
            )
    rate = {m: statistics.median(r["pairs"] / r["seconds"] for r in rs) for m, rs in runs.items()}
    assert runs["serial"][0]["correct"] == runs["pool"][0]["correct"], "serial and pool disagree"
    print(
        f"\ncores: {os.cpu_count()}, load average (1 min) before/after: {load_before:.2f} / "
        f"{os.getloadavg()[0]:.2f}; cores that {args.workers} busy processes of this session get, before/after: "
        f"{cores_before:.2f} / {available_cores(args.workers):.2f} (a bound on the wall-clock ratio)"
    )
    print(f"serial          : {rate['serial']:.1f} pairs/s (median of {args.repeats})")
    print(f"pool ({args.workers} workers): {rate['pool']:.1f} pairs/s (median of {args.repeats})")
    print(f"ratio pool/serial: {rate['pool'] / rate['serial']:.2f}x (target >= 1.7x on 2 cores)")
    cpu = {m: statistics.median(r["cpu_seconds"] for r in rs) for m, rs in runs.items()}
    print(
        f"CPU seconds      : serial {cpu['serial']:.2f}, pool {cpu['pool']:.2f} (all processes); "
        f"CPU-bound ceiling on {args.workers} idle cores: {args.workers * cpu['serial'] / cpu['pool']:.2f}x"
    )


if __name__ == "__main__":
    main()
