"""The shared canonical text form (data_prep.text.canonical) and the two pool cases it fixes.

The fixtures are copied verbatim from the shipped data: a DeepScaleR variant of a MATH500 item
that the 50%-coverage rule missed before canonicalisation, and a square-pyramid problem that
appears twice in DeepScaleR, once with `\\overline{AE}` and once with `AE`.
"""

import json

import pytest

from data_prep.build import build, canonicalisation_table
from data_prep.config import BuildConfig
from data_prep.decontam import EvalIndex, decontaminate
from data_prep.dedup import exact_duplicates
from data_prep.text import LEGACY, canonical, match_tokens, ngram_hashes

# eval/data/math500.jsonl, id test/intermediate_algebra/1063.json
MATH500_ID = "test/intermediate_algebra/1063.json"
MATH500_FZ = (
    "Let $F(z)=\\frac{z+i}{z-i}$ for all complex numbers $z\\not= i,$ and let $z_n=F(z_{n-1})$ for all "
    "positive integers $n.$ Given that $z_0=\\frac 1{137}+i,$ find $z_{2002}.$"
)
# data_prep/pools/deepscaler_40k.parquet, id deepscaler-L3-train-2300 (asks for a+b, answer 275)
POOL_FZ = (
    "Let $F(z)=\\dfrac{z+i}{z-i}$ for all complex numbers $z\\neq i$, and let $z_n=F(z_{n-1})$ for all "
    "positive integers $n$. Given that $z_0=\\dfrac{1}{137}+i$ and $z_{2002}=a+bi$, where $a$ and $b$ are "
    "real numbers, find $a+b$."
)
# data_prep/pools/deepscaler_40k.parquet, ids deepscaler-L5-train-3961 and deepscaler-L5-test-8038
PYRAMID_PLAIN = (
    "A square pyramid with base $ABCD$ and vertex $E$ has eight edges of length $4$. A plane passes "
    "through the midpoints of $AE$, $BC$, and $CD$. The plane's intersection with the pyramid has an "
    "area that can be expressed as $\\sqrt{p}$. Find $p$."
)
PYRAMID_OVERLINE = (
    "A square pyramid with base $ABCD$ and vertex $E$ has eight edges of length 4. A plane passes "
    "through the midpoints of $\\overline{AE}$, $\\overline{BC}$, and $\\overline{CD}$. The plane's "
    "intersection with the pyramid has an area that can be expressed as $\\sqrt{p}$. Find $p$."
)
UNRELATED = (
    "A jar holds 3 red and 5 green marbles. Two are drawn without replacement. Find the probability both are green."
)


# --- the canonicaliser on a table of spellings ----------------------------------------------------
SAME = [
    ("\\dfrac{1}{2}", "\\frac{1}{2}"),
    ("\\tfrac{a}{b}", "\\frac ab"),
    ("\\frac12", "\\frac{1}{2}"),
    ("\\frac 1{137}", "\\dfrac{1}{137}"),
    ("z \\neq i", "z\\not= i"),
    ("z \\ne i", "z \\not = i"),
    ("z ≠ i", "z\\neq i"),
    ("x \\le 3", "x\\leq 3"),
    ("x \\leqslant 3", "x ≤ 3"),
    ("x \\ge 3", "x \\geq 3"),
    ("\\left( x+1 \\right)", "(x+1)"),
    ("\\Bigl[ x \\Bigr]", "[x]"),
    ("$\\overline{AE}$", "$AE$"),
    ("\\bar{x} + \\bar y", "x + y"),
    ("a \\cdot b", "a \\times b"),
    ("a · b", "a\\times b"),
    ("1, 2, \\ldots, n", "1,2,\\dots,n"),
    ("1 + 2 + \\cdots + n", "1+2+\\dots+n"),
    ("f: A \\rightarrow B", "f : A \\to B"),
    ("$x$ and $y$", "\\(x\\) and \\(y\\)"),
    ("\\[x^2\\]", "$$x^{2}$$"),
    ("$2x$", "$2 x$"),
    ("$A B C D$", "$ABCD$"),  # TeX ignores spaces in math mode
    ("$x\\,y$", "$xy$"),
    ("$x \\cdot y$", "$x\\cdot y$"),
    ("$x = 1 \\text{ if } y$", "\\(x=1\\mbox{ if }y\\)"),
    ("In triangle $A B C, \\angle A B C$ is obtuse.", "In triangle \\( ABC \\), \\( \\angle ABC \\) is obtuse."),
    # an unpaired money $ must not glue the words of the prose it encloses
    (
        "Each starts with $1. A bell rings every $15$ seconds and gives $1 to a player.",
        "Each starts with $1$. A bell rings every $15$ seconds and gives $1$ to a player.",
    ),
    ("costs \\$5 and \\$7", "costs 5 and 7"),
    ("$z_0$", "$z_{0}$"),
    ("Find   THE   value.", "find the value"),
    ("\\text{ cm}", "\\mbox{cm}"),
    ("a\\,b\\;c\\quad d", "a b c d"),
    ("\\sin x", "sin x"),
    ("\\sqrt{2}", "√2"),
    ("$90^\\circ$", "90°"),
    ("$f\\left(x\\right)$", "$f(x)$"),
    ("$|x|$", "$\\lvert x \\rvert$"),
    ("$x \\lt y$", "$x<y$"),
    ("$a*b$", "$a \\times b$"),
    ("a five-digit number", "a five digit number"),
    ("Find $x$.", "Find $x$"),
]
DIFFERENT = [
    ("\\sin x", "\\cos x"),
    ("x + 1", "x + 2"),
    ("z \\neq i", "z = i"),
    ("x \\leq 3", "x \\geq 3"),
    ("1, 2, 3", "123"),  # punctuation becomes a word break, not nothing
    ("\\pi r", "\\pir"),
    ("$a+b$", "$ab$"),
    ("$x+2018$", "$x-2018$"),  # operators are tokens: these are different problems
    ("What is $88 \\div (4 \\div 2)$?", "What is $88 \\div 4 \\div 2$?"),
    ("$x<y$", "$x>y$"),
    ("slope $-\\frac{1}{3}$", "slope $\\dfrac{1}{3}$"),
    ("$x-y$", "$x y$"),
    ("x y z", "xyz"),  # outside math, spaces separate words
]


@pytest.mark.parametrize("a, b", SAME)
def test_canonical_folds_spellings(a, b):
    assert canonical(a) == canonical(b), (canonical(a), canonical(b))


@pytest.mark.parametrize("a, b", DIFFERENT)
def test_canonical_keeps_different_mathematics_apart(a, b):
    assert canonical(a) != canonical(b)


def test_canonical_form_is_words_and_single_spaces():
    c = canonical("Let $F(z)=\\dfrac{z+i}{z-i}$ for  all $z\\neq i$.\n")
    assert c == "let f ( z ) = frac z + i z - i for all z neq i"
    assert match_tokens("Let $F(z)$.") == ["let", "f", "z"]  # n-gram tokens: no operators
    assert canonical(c) == c  # idempotent


# --- the F(z) item: decontamination ----------------------------------------------------------------
def _coverage(tokens) -> float:
    ev = set(ngram_hashes(tokens(MATH500_FZ), 13).tolist())
    return len(ev & set(ngram_hashes(tokens(POOL_FZ), 13).tolist())) / len(ev)


def test_fixture_is_the_shipped_math500_item():
    from eval.benchmarks import load

    assert {r["id"]: r["problem"] for r in load("math500")}[MATH500_ID] == MATH500_FZ


def test_fz_variant_of_math500_item_is_decontaminated():
    assert _coverage(match_tokens) == pytest.approx(24 / 27)  # ~88%, as the issue measured
    assert _coverage(LEGACY.tokens) < 0.5  # why it survived: \not= vs \neq split the 13-grams
    evals = {"math500": [{"id": MATH500_ID, "problem": MATH500_FZ}]}
    rows = [{"id": "deepscaler-L3-train-2300", "problem": POOL_FZ}, {"id": "other", "problem": UNRELATED}]
    keep, m = decontaminate(rows, EvalIndex(evals, n=13, min_coverage=0.5))
    assert keep == [False, True]
    assert (
        m[0].eval_item == f"math500/{MATH500_ID}"
        and m[0].method == "13-gram"
        and m[0].coverage == pytest.approx(0.8889, abs=1e-4)
    )
    keep_legacy, _ = decontaminate(rows, EvalIndex(evals, n=13, min_coverage=0.5, form=LEGACY))
    assert keep_legacy == [True, True]


def test_ngram_tokens_ignore_operators_and_brackets():
    """A MATH500 item copied with other parentheses (deepscaler-L3-train-7483 vs
    math500 test/precalculus/742.json) is still caught: n-grams are over words only."""
    item = "Evaluate \\[\\sin (\\arcsin 0.4 + \\arcsin 0.5) \\cdot \\sin (\\arcsin 0.5 - \\arcsin 0.4).\\]"
    copy = (
        "Evaluate $\\sin (\\arcsin (0.4)+\\arcsin (0.5)) \\cdot \\sin (\\arcsin (0.5)-\\arcsin (0.4))$ where for "
        "$x \\in[-1,1]$, $\\arcsin (x)$ denotes the unique real number $y \\in[-\\pi, \\pi]$ such that $\\sin (y)=x$."
    )
    assert canonical(item) != canonical(copy)[: len(canonical(item))]  # the exact key keeps the brackets
    assert " ".join(match_tokens(copy)).startswith(" ".join(match_tokens(item)))
    keep, m = decontaminate(
        [{"id": "t", "problem": copy}], EvalIndex({"math500": [{"id": "e", "problem": item}]}, n=13, min_coverage=0.5)
    )
    assert keep == [False] and m[0].coverage == 1.0


# --- the pyramid pair: exact dedup -----------------------------------------------------------------
def test_pyramid_spelled_with_and_without_overline_is_an_exact_duplicate():
    rows = [
        {"id": "deepscaler-L5-train-3961", "problem": PYRAMID_PLAIN},
        {"id": "deepscaler-L5-test-8038", "problem": PYRAMID_OVERLINE},
        {"id": "other", "problem": UNRELATED},
    ]
    keep, m = exact_duplicates(rows)
    assert keep == [True, False, True]
    assert (m[0].id, m[0].kept_id, m[0].similarity) == ("deepscaler-L5-test-8038", "deepscaler-L5-train-3961", 1.0)
    assert exact_duplicates(rows, form=LEGACY)[0] == [True, True, True]


# --- the build reports what canonicalisation changed -----------------------------------------------
def test_build_manifest_counts_rows_removed_by_canonicalisation(tmp_path):
    src = tmp_path / "pool.jsonl"
    problems = [POOL_FZ, PYRAMID_PLAIN, PYRAMID_OVERLINE, UNRELATED]
    src.write_text(
        "".join(json.dumps({"id": f"p{i}", "problem": p, "answer": "1"}) + "\n" for i, p in enumerate(problems))
    )
    evals = {"math500": [{"id": MATH500_ID, "problem": MATH500_FZ, "answer": "1+274i"}]}
    cfg = BuildConfig(sources=(f"pool={src}",), eval_sets=("math500",), verify_answers=False)
    m = build(cfg, tmp_path / "out", progress=False, log=lambda s: None, eval_loader=lambda name: evals[name])
    f = {x["name"]: x for x in m["filters"]}
    exact, decon = f["exact_dedup"]["canonicalisation"], f["decontaminate"]["canonicalisation"]
    assert f["exact_dedup"]["dropped"] == 1 and exact["dropped_with_legacy_text"] == 0
    assert exact["dropped_only_with_canonical_text"] == 1 and exact["examples_only_canonical"] == ["pool/p2"]
    assert f["decontaminate"]["dropped"] == 1 and decon["dropped_with_legacy_text"] == 0
    assert decon["examples_only_canonical"] == ["pool/p0"] and decon["dropped_only_with_legacy_text"] == 0
    assert f["decontaminate"]["removed"][0]["eval_item"] == f"math500/{MATH500_ID}"
    assert m["final_count"] == 2
    table = canonicalisation_table(m)
    assert "| exact_dedup | 4 | 1 | 0 | 1 | 0 |" in table and "| decontaminate | 3 | 1 | 0 | 1 | 0 |" in table
