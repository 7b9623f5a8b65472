"""Difficulty filter and the seeded, source-balanced sampling to a target size."""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import numpy as np


def difficulty_keep(rows: Sequence[dict[str, Any]], *, lo: float, hi: float) -> tuple[list[bool], int]:
    """keep [N] (solve rate in [lo, hi]; rows without a numeric solve rate are kept) and the
    number of rows that had no solve rate."""
    keep, missing = [], 0
    for r in rows:
        rate = r.get("solve_rate")
        if not isinstance(rate, (int, float)) or isinstance(rate, bool) or rate != rate:  # None, str, NaN
            missing += 1
            keep.append(True)
        else:
            keep.append(lo <= float(rate) <= hi)
    return keep, missing


def balanced_quotas(available: dict[str, int], target: int) -> dict[str, int]:
    """Rows per source: equal shares of `target`, a source with fewer rows than its share gives
    the rest to the others (water-filling); remainders go to sources in name order."""
    quotas = {s: 0 for s in available}
    open_ = sorted(s for s, n in available.items() if n > 0)
    left = min(target, sum(available.values()))
    while left > 0 and open_:
        share, extra = divmod(left, len(open_))
        for i, s in enumerate(open_):
            quotas[s] += min(share + (1 if i < extra else 0), available[s] - quotas[s])
        left = min(target, sum(available.values())) - sum(quotas.values())
        open_ = [s for s in open_ if quotas[s] < available[s]]
    return quotas


def _source_seed(seed: int, source: str) -> int:
    # Per-source stream, so adding a source does not reshuffle the others.
    return int.from_bytes(hashlib.sha256(f"{seed}:{source}".encode()).digest()[:8], "little")


def sample_balanced(rows: Sequence[dict[str, Any]], *, target: int, seed: int) -> list[bool]:
    """keep [N]: `balanced_quotas` rows per source, chosen uniformly with a seeded generator;
    kept rows stay in their input order."""
    by_source: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_source.setdefault(r["source"], []).append(i)
    quotas = balanced_quotas({s: len(ix) for s, ix in by_source.items()}, target)
    keep = [False] * len(rows)
    for s, ix in by_source.items():
        rng = np.random.default_rng(_source_seed(seed, s))
        for j in rng.choice(len(ix), size=quotas[s], replace=False):
            keep[ix[int(j)]] = True
    return keep
