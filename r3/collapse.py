"""The collapse rule, in one place: used by the run loop, the grid listing and the plots.

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
