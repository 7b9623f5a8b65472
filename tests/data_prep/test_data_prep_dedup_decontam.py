"""Deduplication and decontamination on hand-made rows, with the traps the issue names."""

import numpy as np

from data_prep.decontam import EvalIndex, decontaminate
from data_prep.dedup import exact_duplicates, lsh_params, minhash_signatures, near_duplicates, shingles
from data_prep.text import canonical, match_tokens

EVAL_PROBLEM = (
    "Let $x,$ $y,$ and $z$ be positive real numbers such that $xyz = 32.$ Find the minimum value of "
    "\\[x^2 + 4xy + 4y^2 + 2z^2.\\] Express your answer as an integer and justify each step."
)
AIME_LIKE = (
    "A bag holds 4 red and 6 blue marbles. Two are drawn at random without replacement. The probability "
    "that both are red is $\\tfrac{m}{n}$, where $m$ and $n$ are relatively prime positive integers. Find $m+n$."
)


def rows(*problems):
    return [{"id": f"r{i}", "problem": p, "answer": "1", "source": "s"} for i, p in enumerate(problems)]


def test_canonical_ignores_whitespace_latex_spacing_and_case():
    a = "Find $\\dfrac{1}{2} + x$ if $x=3$."
    b = "find  \\(\\frac{1}{2}\\,+\\;x\\)   if $x = 3$ ."
    assert canonical(a) == canonical(b)
    assert match_tokens(a) == match_tokens(b)
    assert canonical("Find $x+1$.") != canonical("Find $x+2$.")


def test_exact_duplicates_keep_first():
    keep, m = exact_duplicates(rows("What is $2+2$?", "what is 2 + 2 ?", "What is $2+3$?"))
    assert keep == [True, False, True]
    assert (m[0].id, m[0].kept_id) == ("r1", "r0")


def test_near_duplicates_threshold_and_chain():
    base = (
        "A train travels 120 miles in 2 hours and then 180 miles in 3 hours. "
        "What is its average speed in miles per hour over the whole trip?"
    )
    near = base.replace("trip?", "journey?")  # last token changed in a long problem
    other = (
        "A cyclist rides 30 km uphill at 10 km per hour and back at 30 km per hour. "
        "Find her average speed in km per hour for the round trip."
    )
    keep, m = near_duplicates(rows(base, near, other), threshold=0.8, shingle_size=5, num_perm=128)
    assert keep == [True, False, True]
    assert m[0].kept_id == "r0" and 0.8 <= m[0].similarity < 1.0
    keep, _ = near_duplicates(rows(base, near), threshold=0.99, shingle_size=5, num_perm=128)
    assert keep == [True, True]


def test_minhash_estimates_jaccard():
    rng = np.random.default_rng(0)
    a = np.unique(rng.integers(0, 2**32, 400, dtype=np.uint64).astype(np.uint32))
    b = np.unique(np.concatenate([a[:300], rng.integers(0, 2**32, 100, dtype=np.uint64).astype(np.uint32)]))
    true_j = np.intersect1d(a, b).size / np.union1d(a, b).size
    sig = minhash_signatures([a, b], 256)
    est = float(np.mean(sig[0] == sig[1]))
    assert abs(est - true_j) < 0.1, (est, true_j)


def test_lsh_params_fit_budget_and_threshold():
    b, r = lsh_params(0.8, 128)
    assert b * r <= 128
    assert 0.6 < (1 / b) ** (1 / r) < 0.9  # the S-curve's midpoint sits near the threshold


def test_short_text_is_one_shingle():
    assert shingles("Compute 2+2.", 5).size == 1


def index():
    return EvalIndex(
        {"math500": [{"id": "e1", "problem": EVAL_PROBLEM}], "aime24": [{"id": "a1", "problem": AIME_LIKE}]},
        n=13,
        min_coverage=0.5,
    )


def test_decontam_catches_whitespace_and_latex_spacing_changes():
    changed = (
        EVAL_PROBLEM.replace(" ", "  ")
        .replace("$xyz = 32.$", "$xyz\\,=\\,32$.")
        .replace("\\[", "$$")
        .replace("\\]", "$$")
    )
    keep, m = decontaminate(rows(changed), index())
    assert keep == [False] and m[0].eval_item == "math500/e1"


def test_decontam_catches_embedded_copy_by_ngrams():
    embedded = "Warm-up question from a contest. " + EVAL_PROBLEM + " Then also find where the minimum occurs."
    keep, m = decontaminate(rows(embedded), index())
    assert keep == [False] and m[0].method == "13-gram" and m[0].coverage >= 0.5


def test_decontam_spares_different_problem_sharing_a_sentence():
    # Shares the full boilerplate sentence (more than 13 tokens) with the AIME-like item.
    other = (
        "Three fair dice are rolled. The probability that their sum is 10 is $\\tfrac{m}{n}$, where $m$ and $n$ "
        "are relatively prime positive integers. Find $m+n$."
    )
    keep, _ = decontaminate(rows(other), index())
    assert keep == [True]


def test_decontam_source_flags():
    r = rows("An unrelated problem about counting sheep in a field of ten.")
    r[0]["eval_overlap"] = ["math500"]
    assert decontaminate(r, index(), honor_source_flags=True)[0] == [False]
    assert decontaminate(r, index(), honor_source_flags=False)[0] == [True]
