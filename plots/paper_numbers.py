"""The paper's published numbers, as data: the anchors the tables print beside our results.

Source: /work/shared/PAPER.md, section "Reported numbers (anchors; all from the summaries)",
which transcribes arXiv 2510.11370 ("Stabilizing MoE Reinforcement Learning by Aligning
Training and Inference Routers"). These are the paper's results, never ours: the tables
label them "paper" and only print them beside a reproduced cell of the same layout.

Scores are percentages as published (the paper's MATH500 column is the level-5 subset, 134
problems, so it is keyed `math500_l5`). A collapse step of None is the paper's "-".

Observation on the data (arithmetic on the numbers below, not a claim of the paper): every
published average is 0.05-1.21 points below the mean of its four published columns (multi-step
GRPO: mean 50.05, published 48.84), so the paper's columns are probably each benchmark's own
best over evaluation points while the average is the best average. Our tables report every
column at the best-average step (plots.tables); the differences are computed column by column.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, kw_only=True)
class PaperResult:
    """One published row of a main results table."""

    scores: dict[str, float]
    """Benchmark name (run_format.md keys) -> score in percent; empty when only avg is published."""
    avg: float
    """The published average, percent."""
    collapse: int | None
    """Published collapse step (global steps); None is the paper's "-"."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class PaperTable:
    """One of the paper's main results tables."""

    title: str
    model: str
    """RunConfig.model of the matching setting ("sft" or "base")."""
    mini_steps: int
    """RunConfig.mini_steps of the matching setting (paper: 8 multi, 1 single)."""
    lr: float
    """Published learning rate (informational; matching uses model and mini_steps)."""
    rows: dict[str, PaperResult]
    """Method label ("GRPO", "GRPO+TIS+R3", ...) -> published row."""


def _row(
    aime24: float, aime25: float, amc23: float, math500_l5: float, avg: float, collapse: int | None
) -> PaperResult:
    scores = {"aime24": aime24, "aime25": aime25, "amc23": amc23, "math500_l5": math500_l5}
    return PaperResult(scores=scores, avg=avg, collapse=collapse)


# PAPER.md: "Multi-mini-step (mini_step=8, lr 1e-6), SFT model".
MULTI_SFT = PaperTable(
    title="Multi-mini-step (8), SFT model",
    model="sft",
    mini_steps=8,
    lr=1e-6,
    rows={
        "GRPO": _row(32.81, 20.73, 74.84, 71.83, 48.84, 120),
        "GSPO": _row(55.52, 38.23, 90.16, 86.38, 66.76, None),
        "GRPO+R3": _row(57.92, 38.02, 90.16, 88.62, 68.05, None),
        "GSPO+R3": _row(58.44, 39.17, 92.50, 87.87, 69.00, None),
    },
)

# PAPER.md: "Single-mini-step (mini_step=1, lr 3e-6), SFT model".
SINGLE_SFT = PaperTable(
    title="Single-mini-step, SFT model",
    model="sft",
    mini_steps=1,
    lr=3e-6,
    rows={
        "GRPO": _row(49.06, 32.08, 86.41, 83.77, 62.23, 60),
        "GRPO+TIS": _row(54.90, 36.67, 88.59, 85.63, 66.24, 105),
        "GRPO+R3": _row(62.92, 41.98, 93.91, 89.93, 71.83, None),
        "GRPO+TIS+R3": _row(58.75, 41.15, 91.87, 88.99, 70.14, None),
    },
)

# PAPER.md: "Single-mini-step, Base model (averages only published)".
SINGLE_BASE = PaperTable(
    title="Single-mini-step, Base model",
    model="base",
    mini_steps=1,
    lr=3e-6,
    rows={
        "GRPO": PaperResult(scores={}, avg=61.69, collapse=105),
        "GRPO+TIS": PaperResult(scores={}, avg=69.22, collapse=None),
        "GRPO+R3": PaperResult(scores={}, avg=70.73, collapse=None),
    },
)

MAIN_TABLES: tuple[PaperTable, ...] = (MULTI_SFT, SINGLE_SFT, SINGLE_BASE)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PaperStatic:
    """One published static-mismatch row (PAPER.md appendix table)."""

    f2_native: float
    f2_r3: float
    kl_native: float
    kl_r3: float


# PAPER.md appendix table: "model | F(2) native / R3 | KL native / R3".
STATIC: dict[str, PaperStatic] = {
    "Qwen3-30B-A3B": PaperStatic(f2_native=2.54e-4, f2_r3=5.83e-6, kl_native=1.37e-3, kl_r3=7.03e-4),
    "DeepSeek-V2-Lite": PaperStatic(f2_native=2.25e-3, f2_r3=2.16e-4, kl_native=4.06e-3, kl_r3=1.17e-3),
    "Mixtral-8x7B": PaperStatic(f2_native=9.77e-5, f2_r3=1.08e-6, kl_native=1.03e-3, kl_r3=4.98e-4),
    "Moonlight": PaperStatic(f2_native=1.73e-5, f2_r3=6.94e-7, kl_native=3.67e-4, kl_r3=1.92e-4),
}

# PAPER.md main text: dense Qwen3-8B k3 KL 6.4e-4 (no routing, so no R3 value).
STATIC_DENSE_KL: dict[str, float] = {"Qwen3-8B": 6.4e-4}


def main_table_for(model: str, mini_steps: int) -> PaperTable | None:
    """The paper table with this (RunConfig.model, RunConfig.mini_steps), or None."""
    for t in MAIN_TABLES:
        if t.model == model and t.mini_steps == mini_steps:
            return t
    return None
