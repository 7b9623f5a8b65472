"""Build configuration: one frozen keyword-only dataclass; every filter has a switch here.

Written verbatim into the manifest, so a build is reproducible from its manifest alone.
Thresholds the paper does not publish (it says only "about 100k verifiable math problems
filtered from Big-Math and ORZ") are marked "not published" with the reasoning behind the
default.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from eval.benchmarks import SHIPPED_FILES

POOLS = ("deepscaler_40k", "math_train", "math_lvl3to5_8k")
"""The offline training pools shipped in data_prep/pools (see pools/README.md)."""
EVAL_SETS = SHIPPED_FILES
"""Evaluation sets the pool is decontaminated against: each built-in set with a file of its own
(eval.benchmarks.EVAL_SETS; MATH500-L5 is covered through math500)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class BuildConfig:
    """One data build: sources, filters, sampling."""

    sources: tuple[str, ...] = POOLS
    """Source specs: a pool name, `hub:bigmath`, `hub:orz`, or `[name=]path` to a local
    .jsonl/.json/.parquet file (problem/answer fields, or the ORZ list-of-pairs JSON)."""
    seed: int = 0
    """Seed of the target-size sampling; same seed and inputs, same output bytes."""

    # --- bad rows / lengths --------------------------------------------------------------------
    length_filter: bool = True
    """Drop rows whose problem or answer length is outside the limits below."""
    problem_chars: tuple[int, int] = (16, 4000)
    """Problem length limits in characters (not published; 4000 keeps 99.9% of the pools)."""
    answer_chars: tuple[int, int] = (1, 200)
    """Answer length limits in characters (not published; matrices reach ~150 characters)."""

    # --- format filters ------------------------------------------------------------------------
    drop_multiple_choice: bool = True
    """Drop problems with listed options or option-letter answers."""
    drop_proofs: bool = True
    """Drop problems whose final request is a proof."""
    drop_binary_answers: bool = True
    """Drop yes/no and true/false answers."""
    drop_missing_figures: bool = True
    """Drop problems that refer to a figure absent from the text."""
    drop_multipart: bool = True
    """Drop multi-part problems/answers unless one comma list answers every part."""

    # --- deduplication -------------------------------------------------------------------------
    exact_dedup: bool = True
    """Drop later rows whose normalised problem text equals an earlier kept row's."""
    near_dedup: bool = True
    """Drop later rows whose shingle Jaccard similarity to an earlier kept row >= threshold."""
    near_dup_threshold: float = 0.8
    """Jaccard threshold on word shingles (not published; 0.8 is a common choice)."""
    shingle_size: int = 5
    """Tokens per shingle for near-duplicate detection."""
    minhash_perms: int = 128
    """MinHash signature length; LSH bands x rows is chosen from it and the threshold."""

    # --- decontamination -----------------------------------------------------------------------
    decontaminate: bool = True
    """Drop rows that overlap any evaluation set (n-gram overlap or normalised exact match)."""
    eval_sets: tuple[str, ...] = EVAL_SETS
    """Evaluation sets to decontaminate against (eval.benchmarks names)."""
    decontam_ngram: int = 13
    """n of the n-gram overlap test (13, as in GPT-3's decontamination)."""
    decontam_source_flags: bool = True
    """Also drop rows their source flagged as overlapping an eval set (`eval_overlap`)."""
    decontam_min_coverage: float = 0.5
    """A row matches an eval item when it contains at least this fraction of the item's distinct
    n-grams (not published; with "any shared 13-gram" one AIME boilerplate sentence removed
    hundreds of unrelated problems, see data_prep/README.md)."""

    # --- verifiability -------------------------------------------------------------------------
    verify_answers: bool = True
    """Keep only rows whose gold answer math-verify parses to a comparable object."""
    verify_workers: int = 2
    """Worker processes for math-verify (SIGALRM timeouts need each worker's main thread)."""
    verify_timeout_s: float = 5.0
    """Per-answer parse timeout; timeouts are dropped and counted."""

    # --- difficulty and size -------------------------------------------------------------------
    difficulty_filter: bool = False
    """Keep rows whose solve rate lies in [solve_rate_min, solve_rate_max] (Big-Math
    `llama8b_solve_rate`); rows without a solve rate are kept and counted."""
    solve_rate_min: float = 0.0
    """Lowest solve rate kept."""
    solve_rate_max: float = 0.9
    """Highest solve rate kept (not published; drops problems a small model nearly always solves)."""
    target_size: int | None = None
    """Final row count, sampled with `seed` and balanced by source; None keeps every row."""

    # --- hub ------------------------------------------------------------------------------------
    hub_cache_dir: str | None = None
    """Hugging Face cache directory for hub sources (None: the library default)."""

    def __post_init__(self) -> None:
        errors = []
        if not self.sources:
            errors.append("sources is empty: give at least one pool name, hub:<name> or path")
        for label, (lo, hi) in (("problem_chars", self.problem_chars), ("answer_chars", self.answer_chars)):
            if not 0 <= lo <= hi:
                errors.append(f"{label} must satisfy 0 <= min <= max, got ({lo}, {hi})")
        if not 0.0 < self.near_dup_threshold <= 1.0:
            errors.append(f"near_dup_threshold must be in (0, 1], got {self.near_dup_threshold}")
        if self.shingle_size < 1 or self.decontam_ngram < 1:
            errors.append(f"shingle_size ({self.shingle_size}) and decontam_ngram ({self.decontam_ngram}) must be >= 1")
        if not 0.0 < self.decontam_min_coverage <= 1.0:
            errors.append(f"decontam_min_coverage must be in (0, 1], got {self.decontam_min_coverage}")
        if self.minhash_perms < 8:
            errors.append(f"minhash_perms must be >= 8, got {self.minhash_perms}")
        if self.verify_workers < 1 or self.verify_timeout_s <= 0:
            errors.append(
                f"verify_workers ({self.verify_workers}) must be >= 1 and "
                f"verify_timeout_s ({self.verify_timeout_s}) > 0"
            )
        if not 0.0 <= self.solve_rate_min <= self.solve_rate_max <= 1.0:
            errors.append(
                f"need 0 <= solve_rate_min <= solve_rate_max <= 1, got {self.solve_rate_min}, {self.solve_rate_max}"
            )
        if self.target_size is not None and self.target_size < 1:
            errors.append(f"target_size must be >= 1 or None, got {self.target_size}")
        if errors:
            raise ValueError("invalid BuildConfig: " + "; ".join(errors))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
