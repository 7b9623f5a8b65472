"""Format filters: one named predicate per rule, each returning True when a row must be DROPPED.

The paper's data are "verifiable math problems" (PAPER.md, Setup); Big-Math's own desiderata
(arXiv 2502.17387: uniquely verifiable, open-ended, closed-form) motivate the rules below.
All rules are heuristics on text; each is tested on hand-made rows, traps included
(tests/data_prep/test_data_prep_filters.py).
"""

from __future__ import annotations

import re

# --- multiple choice --------------------------------------------------------------------------
# Choices formatted as contest options: \textbf{(A)}, \mathrm{(B)}, \text{(C)} ...
_MC_STYLED = re.compile(r"\\(?:textbf|mathrm|text|mathbf)\s*\{\s*\(\s*([A-Ea-e])\s*\)")
# Parenthesised letters, e.g. "(A) 3 (B) 4 (C) 5 (D) 6". Labelled rods or conditions use one to
# three letters; option lists use four or five, so four distinct letters are required.
_MC_PAREN = re.compile(r"(?:^|[\s$:;,.])\(\s*([A-Ea-e])\s*\)")
# Options on their own lines: "A. 3", "B) 4", "C: 5".
_MC_LINE = re.compile(r"(?m)^\s*\(?([A-E])[.):]\s+\S")
# A bare option letter as the answer, optionally wrapped: "C", "(C)", "\text{(C)}", "\textbf{C}".
_LETTER_ANSWER = re.compile(r"\s*(?:\\(?:text|textbf|mathrm)\s*\{)?\s*\(?\s*([A-E])\s*\)?\s*\}?\s*\.?\s*")
_MC_WORDS = re.compile(r"\b(?:which of the following|correct option|correct choice|options?|choices?)\b", re.I)


def has_choices(problem: str) -> bool:
    """True when the problem lists answer options (contest-style multiple choice)."""
    if len({m.upper() for m in _MC_STYLED.findall(problem)}) >= 2:
        return True
    if len({m.upper() for m in _MC_PAREN.findall(problem)}) >= 4:
        return True
    return len(set(_MC_LINE.findall(problem))) >= 3


def is_multiple_choice(problem: str, answer: str) -> bool:
    """Drop: the problem offers options, or the answer is an option letter and the text speaks
    of options. A letter answer alone is kept ("the 100th letter of ABCABC..." is open-ended)."""
    if has_choices(problem):
        return True
    return bool(_LETTER_ANSWER.fullmatch(answer)) and bool(_MC_WORDS.search(problem))


# --- proofs -------------------------------------------------------------------------------------
_SENTENCE_END = re.compile(r"(?<=[.?!])\s+|\n+")
_PROOF_ASK = re.compile(r"^(?:\(?\w{1,3}\)\s*)?(?:prove|show|demonstrate|verify|justify)\b", re.I)
_PROOF_ANSWER = re.compile(
    r"\s*(?:\\text\s*\{)?\s*(?:proof|q\.?e\.?d\.?|see (?:the )?proof|proven|shown)\b.*", re.I | re.S
)


def is_proof(problem: str, answer: str) -> bool:
    """Drop: the final request is to prove/show something, or the answer is a proof placeholder.
    A problem that proves a lemma on the way but ends with "Find ..." is kept."""
    if _PROOF_ANSWER.fullmatch(answer):
        return True
    sentences = [s.strip() for s in _SENTENCE_END.split(problem.strip()) if s.strip()]
    return bool(sentences) and bool(_PROOF_ASK.match(sentences[-1]))


# --- yes / no, true / false --------------------------------------------------------------------
_BINARY_ANSWERS = frozenset({"yes", "no", "true", "false", "correct", "incorrect", "possible", "impossible"})


def is_binary_answer(answer: str) -> bool:
    """Drop: the answer is yes/no or true/false (a coin flip earns reward half the time)."""
    letters = re.sub(r"\\(?:text|textbf|mathrm)\b", "", answer)
    letters = re.sub(r"[^a-z]", "", letters.lower())
    return letters in _BINARY_ANSWERS


# --- missing figures ----------------------------------------------------------------------------
_FIGURE_REF = re.compile(
    r"\b(?:in|from|of|on) the (?:accompanying |adjacent |given |following )?(?:figure|diagram|picture|graph)"
    r" (?:below|above|shown)"
    r"|\b(?:in|from|of|on) the (?:accompanying |adjacent |given |following )?(?:figure|diagram)\b"
    r"|\b(?:shown|pictured|depicted|illustrated|drawn) (?:below|above|at (?:the )?(?:right|left))"
    r"|\bthe (?:figure|diagram|picture) (?:below|above|shows|to the)\b"
    r"|\b(?:the|this) diagram\b|\bsee (?:the )?(?:figure|diagram)|\bas shown\b",
    re.I,
)
# A figure that is present in the text: Asymptote, TikZ, or a markdown image.
_FIGURE_PRESENT = re.compile(r"\[asy\]|\\begin\{tikzpicture\}|!\[[^\]]*\]\(")


def has_missing_figure(problem: str) -> bool:
    """Drop: the problem refers to a figure or diagram that is not in the text."""
    return bool(_FIGURE_REF.search(problem)) and not _FIGURE_PRESENT.search(problem)


# --- multi-part ---------------------------------------------------------------------------------
_PART_MARK = re.compile(r"(?:^|[\s:.;])\(\s*(1|2|3|4|I|II|III|IV|i|ii|iii|iv|a|b|c|d)\s*\)")
_ASKS = re.compile(
    r"\?|\b(?:find|calculate|compute|determine|evaluate|what|how|solve|simplify|prove|show|express)\b", re.I
)
_ANSWER_PART_LABEL = re.compile(r"(?:^|[\s,;])\(\s*(?:1|I|i|a)\s*\)|\bpart\b|\\text\s*\{\s*\(", re.I)
_ANSWER_SEPARATOR = re.compile(r";|\\quad|\\qquad|\n")


def question_parts(problem: str) -> int:
    """Number of enumerated sub-questions: marked segments ("(1) ... (2) ...") that each ask
    something. Lists of conditions ("(i) none of its digits are zero; (ii) ...") ask nothing
    in their items and count as zero."""
    marks = list(_PART_MARK.finditer(problem))
    if len(marks) < 2:
        return 0
    bounds = [m.start() for m in marks] + [len(problem)]
    asking = sum(1 for a, b in zip(bounds, bounds[1:]) if _ASKS.search(problem[a:b]))
    return asking if asking >= 2 else 0


def _top_level_items(answer: str) -> int:
    """Comma-separated items at bracket depth 0 ("3, 4" -> 2; "(3, 4)" -> 1)."""
    depth, items = 0, 1
    for ch in answer:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            items += 1
    return items


def is_unrepresentable_multipart(problem: str, answer: str) -> bool:
    """Drop: the answer carries part labels or separators ("(1) 3; (2) 5"), or the problem asks
    several sub-questions and the answer is not one item per part. A multi-part problem whose
    answer is a comma list with one item per part is representable (math-verify compares it as
    a tuple) and is kept."""
    if _ANSWER_PART_LABEL.search(answer) or _ANSWER_SEPARATOR.search(answer):
        return True
    parts = question_parts(problem)
    return parts >= 2 and _top_level_items(answer) != parts


# --- lengths ------------------------------------------------------------------------------------
def is_out_of_length(
    problem: str, answer: str, *, problem_chars: tuple[int, int], answer_chars: tuple[int, int]
) -> bool:
    """Drop: problem or answer length (characters, after stripping) outside [min, max]."""
    p, a = len(problem.strip()), len(answer.strip())
    return not (problem_chars[0] <= p <= problem_chars[1] and answer_chars[0] <= a <= answer_chars[1])
