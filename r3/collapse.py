"""The collapse rule and the late score, in one place: used by the run loop, the grid listing,
the summaries and the plots.

PAPER.md: a run collapses when its score "falls sharply and does not recover". Made precise
here (the paper does not publish its rule): the collapse step is the first evaluation step
from which the evaluation average stays below `frac` x (the best average seen up to that
point) for at least `patience` consecutive evaluation points and never climbs back above it
for the rest of the run. A run still in progress can only be called collapsed once
`patience` points below the line exist.
"""

from __future__ import annotations

from collections.abc import Sequence


def collapse_step(steps: Sequence[int], scores: Sequence[float], *, frac: float = 0.5, patience: int = 2) -> int | None:
    """Return the global step at which the run collapsed, or None.

    steps, scores: evaluation points in step order (score = the average over benchmarks).
    """
    if len(steps) != len(scores):
        raise ValueError(f"steps and scores differ in length: {len(steps)} vs {len(scores)}")
    best = float("-inf")
    below_from: int | None = None  # index where the current run of low points started
    for i, s in enumerate(scores):
        if below_from is None:
            best = max(best, s)
        if best > 0 and s < frac * best:
            if below_from is None:
                below_from = i
        else:
            below_from = None
            best = max(best, s)
    if below_from is not None and len(scores) - below_from >= patience:
        return int(steps[below_from])
    return None


def late_score(steps: Sequence[int], scores: Sequence[float]) -> tuple[float, list[int]] | None:
    """The decision metric's late score: the mean evaluation average over the last quarter (at least
    one) of the evaluation points after step 0, and their steps; None without such a point. The
    study compares `late - score at step 0`, never the best point (the maximum of many noisy
    evaluations is biased upwards: of 31 points with s.e. 2 the maximum sits about +4 above the mean)."""
    if len(steps) != len(scores):
        raise ValueError(f"steps and scores differ in length: {len(steps)} vs {len(scores)}")
    pts = [(st, sc) for st, sc in zip(steps, scores) if st > 0]
    if not pts:
        return None
    late = pts[-max(1, len(pts) // 4) :]
    return sum(sc for _, sc in late) / len(late), [int(st) for st, _ in late]
