"""Data-prep throughput: rows per second of the whole stage on the shipped pools, and how the
near-duplicate step scales with the row count (target: near-linear; 100k rows < 10 min on 2 cores).

`python benchmarks/bench_data_prep.py [--sizes 10000 20000 50000 100000] [--skip-full]`

Rows beyond the ~56k pool rows are the pool rows with their words shuffled (seeded), so they
are new problems to the near-duplicate step rather than exact copies that exact dedup would
have removed first. All sizes are measured in this one run, side by side.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from data_prep.build import build
from data_prep.config import POOLS, BuildConfig
from data_prep.dedup import near_duplicates
from data_prep.sources import POOLS_DIR


def pool_rows() -> list[dict]:
    rows = []
    for p in POOLS:
        for r in pq.read_table(POOLS_DIR / f"{p}.parquet", columns=["id", "problem"]).to_pylist():
            rows.append({"id": f"{p}/{r['id']}", "problem": r["problem"]})
    return rows


def rows_of_size(base: list[dict], n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = list(base[:n])
    k = 0
    while len(out) < n:
        src = base[k % len(base)]
        words = src["problem"].split()
        rng.shuffle(words)
        out.append({"id": f"shuffled{k}", "problem": " ".join(words)})
        k += 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="+", type=int, default=[10_000, 20_000, 50_000, 100_000])
    ap.add_argument("--skip-full", action="store_true", help="skip the whole-stage run")
    a = ap.parse_args()
    cfg = BuildConfig()
    if not a.skip_full:
        with tempfile.TemporaryDirectory() as d:
            t = time.perf_counter()
            m = build(cfg, d, progress=False, log=lambda s: None)
            dt = time.perf_counter() - t
        n_in = sum(s["rows_read"] for s in m["sources"].values())
        print(f"whole stage: {n_in} rows in {dt:.1f} s = {n_in / dt:.0f} rows/s -> {m['final_count']} rows")
        for f in m["filters"]:
            if f["enabled"]:
                print(
                    f"  {f['name']:<18} {f['seconds']:>7.2f} s  ({f['rows_in'] / max(f['seconds'], 1e-9):.0f} rows/s)"
                )
    base = pool_rows()
    results = []
    for n in a.sizes:
        rows = rows_of_size(base, n)
        t = time.perf_counter()
        keep, _ = near_duplicates(
            rows, threshold=cfg.near_dup_threshold, shingle_size=cfg.shingle_size, num_perm=cfg.minhash_perms
        )
        dt = time.perf_counter() - t
        results.append((n, dt))
        print(f"near-dup {n:>7} rows: {dt:6.1f} s  ({n / dt:.0f} rows/s, {len(keep) - sum(keep)} dropped)")
    n0, t0 = results[0]
    for n, dt in results[1:]:
        print(f"  {n // 1000}k vs {n0 // 1000}k: rows x{n / n0:.1f}, time x{dt / t0:.2f} (linear = x{n / n0:.1f})")


if __name__ == "__main__":
    main()
