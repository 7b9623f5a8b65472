"""The one canonical text form shared by deduplication and decontamination, plus n-gram hashing.

Two problems that differ only in how the same mathematics is spelled are the same problem for
our purposes. `canonical` is the single function that decides this. Its output is the exact
key (exact duplicates, exact eval matches); its words without the operator tokens are the
tokens of the decontamination n-grams and the near-duplicate shingles (`match_tokens`):

- Unicode NFKC; `≠ ≤ ≥ × · π √ °` spelled as their LaTeX commands;
- inside math (`$..$`, `$$..$$`, `\\(..\\)`, `\\[..\\]`), where TeX ignores spaces, the
  spaces between one-character words and the spacing symbols are dropped (`$A B C D$` =
  `$ABCD$`, `$x\\,y$` = `$xy$`); longer words keep theirs, so a `$` left unpaired by a money
  amount ("gives $1 to ...") cannot glue the prose after it into one word;
- one spelling per command: `\\dfrac`, `\\tfrac`, `\\cfrac` -> `\\frac` (and `\\frac12`,
  `\\frac ab` -> `\\frac{1}{2}`, `\\frac{a}{b}`); `\\neq`, `\\ne`, `\\not=` -> `\\neq`; `\\le`,
  `\\leqslant` -> `\\leq` (same for geq); `\\cdot`, `\\times` -> `\\times`; `\\ldots`,
  `\\cdots`, `\\dots` -> `\\dots`; `\\rightarrow` -> `\\to`;
- commands that only decorate or space are dropped, keeping their argument: `\\left`,
  `\\right`, sizing (`\\big`, ...), `\\displaystyle`, `\\text`, `\\mathrm`, `\\mathbf`,
  `\\operatorname`, `\\overline{AE}` and `\\bar{x}` / `\\underline` (-> `AE`, `x`), `\\,` `\\;`
  `\\quad` and other spacing;
- remaining command names become plain words (`\\sqrt` -> `sqrt`), so `\\sin x` and `sin x` agree
  while `\\sin` and `\\cos` still differ;
- lower case; `$`, `\\(`, braces, underscores and punctuation (`. , ; : ?`, quotes) dropped;
  operators and brackets (`+ - = < > / ^ | ! % ( ) [ ]`; `*` read as `\\times`, `\\lt` as `<`,
  `\\mid` as `|`) kept as one-character tokens in the exact key, since `x-1` and `x+1`
  are different problems (the n-gram tokens leave them out);
  a hyphen between two words is a space (`five-digit`); letters and digits split (`2x` -> `2 x`,
  `z_0` -> `z 0`); whitespace collapsed to single spaces.

`LEGACY` is the text form used before this canonicalisation (kept only so the build manifest can
report what canonicalisation changed; data_prep/README.md).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import unicodedata
import zlib
from collections.abc import Callable

import numpy as np

_NO_LETTER = r"(?![a-zA-Z])"
_UNICODE = {
    "≠": r" \neq ",
    "≤": r" \leq ",
    "≥": r" \geq ",
    "×": r" \times ",
    "·": r" \times ",
    "⋅": r" \times ",
    "π": r" \pi ",
    "√": r" \sqrt ",
    "°": r"^\circ ",
    "∞": r" \infty ",
    "−": "-",
    "…": r" \dots ",
    "÷": r" \div ",
}
_UNICODE_RE = re.compile("|".join(map(re.escape, _UNICODE)))
# Same symbol, different spelling: fold onto one command. Applied in order, before case folding.
_SYNONYMS = (
    (re.compile(r"\\[dtc]frac" + _NO_LETTER), r"\\frac"),
    (re.compile(r"\\frac(?=\s|[0-9])\s*([0-9a-zA-Z])\s*([0-9a-zA-Z])"), r"\\frac{\1}{\2}"),  # \frac12, \frac ab
    (re.compile(r"\\not\s*=|\\ne(?:q)?" + _NO_LETTER), r" \\neq "),
    (re.compile(r"\\(?:leq?|leqslant)" + _NO_LETTER), r" \\leq "),
    (re.compile(r"\\(?:geq?|geqslant)" + _NO_LETTER), r" \\geq "),
    (re.compile(r"\\(?:cdot|times)" + _NO_LETTER), r" \\times "),
    (re.compile(r"\\(?:[lc]?dots|dots[cbmio])" + _NO_LETTER), r" \\dots "),
    (re.compile(r"\\(?:to|rightarrow)" + _NO_LETTER), r" \\to "),
    (re.compile(r"\\lt" + _NO_LETTER), " < "),
    (re.compile(r"\\gt" + _NO_LETTER), " > "),
    (re.compile(r"\\(?:mid|vert|lvert|rvert)" + _NO_LETTER), " | "),
)
# Commands that decorate or space but carry no content of their own; an argument in braces is
# kept (the braces are dropped later). Longer names first.
_DROP = re.compile(
    r"\\(?:qquad|quad|displaystyle|textstyle|scriptstyle|left|right|bigl|bigr|Bigl|Bigr|biggl|biggr|bigg|Bigg"
    r"|big|Big|limits|nolimits|mathrm|mathbf|mathit|mathsf|boldsymbol|textbf|textit|textrm|text|mbox|hbox|operatorname"
    r"|overline|underline|bar|hspace\*?\{[^}]*\}|vspace\*?\{[^}]*\})"
    + _NO_LETTER
    + r"|\\[,;:! >]"  # \, \; \: \! \> and "\ " (control symbols: no letter check)
)
_ESCAPED_DOLLAR = re.compile(r"\\\$")
_MATH = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)
_MATH_SPACE = re.compile(r"\\[,;:!> ]|(?<=\b\w)\s+(?=\w\b)")
"""Inside math: spacing control symbols, and whitespace between two one-character words."""


def _math_without_spaces(m: re.Match) -> str:
    body = next(g for g in m.groups() if g is not None)
    return " " + _MATH_SPACE.sub("", body) + " "


_COMMAND = re.compile(r"\\([a-zA-Z]+)")
_PROSE_HYPHEN = re.compile(r"(?<=[^\W\d_]{2})-(?=[^\W\d_]{2})")
"""five-digit = five digit; between one-letter words (x-y) a hyphen is a minus and stays."""
_OPERATORS = "+-=<>/^|!%()[]"
"""Kept as one-character tokens: `88 \\div (4 \\div 2)`, `x-2018` and `x<y` are other problems than
`88 \\div 4 \\div 2`, `x+2018` and `x>y`."""
_OPERATOR = re.compile("([" + re.escape(_OPERATORS) + "])")
_OPERATOR_TOKENS = frozenset(_OPERATORS)
_NON_WORD = re.compile(r"[^\w\s" + re.escape(_OPERATORS) + r"]+|_+")  # punctuation, braces, $, backslashes, _
_LETTER_DIGIT = re.compile(r"(?<=[0-9])(?=[^\W\d_])|(?<=[^\W\d_])(?=[0-9])")
_WS = re.compile(r"\s+")


@functools.lru_cache(maxsize=1 << 16)
def canonical(text: str) -> str:
    """The canonical form (module docstring): lower-case words and operator characters
    separated by single spaces.

    Equal canonical forms mean an exact duplicate (or an exact eval match); the n-gram and
    shingle tokens are its words without the operators (`match_tokens`). Cached: a build asks for the same problem's
    form in exact dedup, decontamination and near dedup (~4 s per pass over the 56k pool rows).
    """
    text = unicodedata.normalize("NFKC", text)
    text = _UNICODE_RE.sub(lambda m: _UNICODE[m.group(0)], text)
    text = _MATH.sub(_math_without_spaces, _ESCAPED_DOLLAR.sub(" ", text))
    for pat, rep in _SYNONYMS:
        text = pat.sub(rep, text)
    text = _DROP.sub(" ", text)
    text = _COMMAND.sub(r" \1 ", text).lower().replace("*", " times ")
    text = _OPERATOR.sub(r" \1 ", _PROSE_HYPHEN.sub(" ", text))
    text = _NON_WORD.sub(" ", text)
    text = _LETTER_DIGIT.sub(" ", text)
    return _WS.sub(" ", text).strip()


def match_tokens(text: str) -> list[str]:
    """Token sequence for n-gram and shingle matching: the words of `canonical(text)`, without its
    operator and bracket tokens.

    Coarser than the exact key on purpose, the safe direction for decontamination: an eval item
    copied as `\\sin(\\arcsin(0.4)+...)` instead of `\\sin (\\arcsin 0.4 + ...)`, or with one sign
    changed, still shares its 13-grams. Near-dedup compares these tokens too.
    """
    return [t for t in canonical(text).split() if t not in _OPERATOR_TOKENS]


# --- the text form before canonicalisation (for the manifest's before/after counts only) -------
_LEGACY_NOISE = re.compile(
    r"\\(?:qquad|quad|displaystyle|textstyle|scriptstyle|left|right|bigl|bigr|Bigl|Bigr|big|Big"
    r"|biggl|biggr|bigg|Bigg|limits|nolimits|mathrm|mathbf|mathit|textbf|textit|text|operatorname"
    r"|hspace\*?\{[^}]*\}|vspace\*?\{[^}]*\})(?![a-zA-Z])"
    r"|\\[,;:! ]"
)
_LEGACY_SYNONYMS = (
    (re.compile(r"\\[dt]frac(?![a-zA-Z])"), r"\\frac"),
    (re.compile(r"\\le(?![a-zA-Z])"), r"\\leq"),
    (re.compile(r"\\ge(?![a-zA-Z])"), r"\\geq"),
    (re.compile(r"\\ne(?![a-zA-Z])"), r"\\neq"),
    (re.compile(r"\\cdot(?![a-zA-Z])"), r"\\times"),
)
_LEGACY_DELIMS = re.compile(r"\$|\\\(|\\\)|\\\[|\\\]|~")
_LEGACY_TOKEN = re.compile(r"\\[a-z]+|[a-z0-9]+")


def _legacy_clean(text: str) -> str:
    text = unicodedata.normalize("NFKC", text)
    for pat, rep in _LEGACY_SYNONYMS:
        text = pat.sub(rep, text)
    text = _LEGACY_DELIMS.sub(" ", _LEGACY_NOISE.sub(" ", text))
    return text.lower()


@dataclasses.dataclass(frozen=True)
class TextForm:
    """How text is compared: an exact-match key and an n-gram token sequence."""

    name: str
    key: Callable[[str], str]
    tokens: Callable[[str], list[str]]


CANONICAL = TextForm("canonical", canonical, match_tokens)
"""What the build uses."""
LEGACY = TextForm("legacy", lambda t: _WS.sub("", _legacy_clean(t)), lambda t: _LEGACY_TOKEN.findall(_legacy_clean(t)))
"""The form before canonicalisation: `$`, LaTeX spacing, \\dfrac/\\tfrac, \\le/\\ge/\\ne, \\cdot
and case folded, whitespace removed; braces, `\\overline`, `\\not=` and punctuation kept in the
exact key. Only for reporting how many rows canonicalisation removed."""


# --- n-gram hashing ----------------------------------------------------------------------------
def _token_hash(tok: str) -> int:
    return zlib.crc32(tok.encode("utf-8"))


def ngram_hashes(tokens: list[str], n: int) -> np.ndarray:
    """uint64 [max(len(tokens) - n + 1, 0)]: a rolling hash of every contiguous n-gram.

    Deterministic across processes and runs (crc32 per token, then a polynomial combination
    mod 2^64), unlike Python's salted `hash`. 64 bits keep accidental collisions negligible
    for millions of look-ups (32 bits would give tens of false hits on the shipped pools).
    """
    if len(tokens) < n:
        return np.zeros(0, dtype=np.uint64)
    tok_hashes = np.fromiter((_token_hash(t) for t in tokens), dtype=np.uint64, count=len(tokens))
    num = len(tokens) - n + 1
    acc = np.zeros(num, dtype=np.uint64)
    base = np.uint64(1_000_003)
    for j in range(n):  # acc = sum_j h[i + j] * base^(n-1-j)  (mod 2^64; numpy wraps silently)
        acc = acc * base + tok_hashes[j : j + num]
    return acc


def fold32(h: np.ndarray) -> np.ndarray:
    """uint64 -> uint32 by xor-folding the halves (MinHash works on 32-bit values)."""
    return ((h ^ (h >> np.uint64(32))) & np.uint64(0xFFFFFFFF)).astype(np.uint32)
