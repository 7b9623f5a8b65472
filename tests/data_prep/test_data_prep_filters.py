"""Format filters on hand-made rows, traps included (True = the row is dropped)."""

import pytest

from data_prep import filters as F

MC = [
    ("What is $1+1$?\n$\\textbf{(A) } 1 \\qquad \\textbf{(B) } 2 \\qquad \\textbf{(C) } 3$", "2", True),
    ("Pick one: (A) 3 (B) 4 (C) 5 (D) 6 (E) 7. Which equals $2+2$?", "4", True),
    ("Which value is correct?\nA. $1$\nB. $2$\nC. $3$\nD. $4$", "B", True),
    ("Which of the following numbers is prime: 4, 6, 7?", "C", True),  # letter answer + options talk
    # traps: rods/conditions labelled with a few letters; a letter answer to an open question
    ("Disks start on rod (A) and must move to rod (C). Minimum number of moves for 5 disks?", "31", False),
    ("What is the 100th letter in the pattern ABCABCABC...?", "A", False),
    ("Find $x$ if $3x = 12$.", "4", False),
]


@pytest.mark.parametrize("problem,answer,drop", MC)
def test_multiple_choice(problem, answer, drop):
    assert F.is_multiple_choice(problem, answer) is drop


PROOF = [
    ("Let $n$ be odd. Prove that $n^2 - 1$ is divisible by 8.", "0", True),
    ("Show that $\\sqrt{2}$ is irrational.", "\\sqrt{2}", True),
    ("Find the largest $n$ with $n! < 10^6$.", "\\text{Proof}", True),  # proof placeholder answer
    # trap: a proof on the way, but the final request is a number
    ("Prove that $f$ is increasing. Then find $f(2)$ if $f(x) = x^2 + 1$.", "5", False),
]


@pytest.mark.parametrize("problem,answer,drop", PROOF)
def test_proof(problem, answer, drop):
    assert F.is_proof(problem, answer) is drop


@pytest.mark.parametrize(
    "answer,drop",
    [
        ("Yes", True),
        ("\\text{No}", True),
        ("\\text { No }", True),
        ("TRUE", True),
        ("false.", True),
        ("\\text{Tuesday}", False),
        ("7", False),
        ("\\text{(C)}", False),
    ],
)
def test_binary_answer(answer, drop):
    assert F.is_binary_answer(answer) is drop


FIG = [
    ("In the diagram, $PQ$ is a diameter. Find the area.", True),
    ("As shown in the figure below, six semicircles lie in a hexagon. Find the shaded area.", True),
    ("The diagram shows a solid with six faces. Find its volume.", True),
    # traps: the figure is present (Asymptote), or "picture" is not a figure reference
    ("In the diagram, find $x$.\n[asy]\ndraw((0,0)--(1,1));\n[/asy]", False),
    ("A photographer takes a picture of five students in a row. In how many orders can they sit?", False),
]


@pytest.mark.parametrize("problem,drop", FIG)
def test_missing_figure(problem, drop):
    assert F.has_missing_figure(problem) is drop


MULTI = [
    ("Given $f(x) = x^2$.\n(1) Find $f(2)$;\n(2) Find $f(3)$.", "4", True),  # one answer, two parts
    ("Given $f(x) = x^2$.\n(1) Find $f(2)$;\n(2) Find $f(3)$.", "4, 9", False),  # one item per part
    ("Solve the system.", "(1) x = 2; (2) y = 3", True),  # labelled answer
    ("Find both roots.", "2; 3", True),  # separator
    # trap: a list of conditions, not sub-questions
    (
        "A number is squarish if (i) none of its digits are zero; (ii) it is a perfect square. "
        "How many six-digit squarish numbers are there?",
        "2",
        False,
    ),
    ("Find the point of intersection of $y = x$ and $y = 2 - x$.", "(1, 1)", False),
]


@pytest.mark.parametrize("problem,answer,drop", MULTI)
def test_multipart(problem, answer, drop):
    assert F.is_unrepresentable_multipart(problem, answer) is drop


def test_length_limits():
    kw = dict(problem_chars=(16, 40), answer_chars=(1, 5))
    assert not F.is_out_of_length("What is $2 + 2$, please?", "4", **kw)
    assert F.is_out_of_length("Short?", "4", **kw)
    assert F.is_out_of_length("What is $2 + 2$, please?", "123456", **kw)
    assert F.is_out_of_length("x" * 41, "4", **kw)
