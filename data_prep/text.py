"""Text normalisation shared by deduplication and decontamination.

Two problems that differ only in whitespace, `$` delimiters, LaTeX spacing commands
(`\\,`, `\\;`, `\\quad`, ...), `\\left`/`\\right`, `\\dfrac` vs `\\frac` or letter case are the
same problem for our purposes. `normalize` maps them to one string (exact matching);
`match_tokens` maps them to one token sequence (n-gram / shingle matching).

Tokens are alphanumeric runs and LaTeX command names; punctuation and operators are dropped,
so `x+y` and `x + y` give the same tokens. Dropping operators makes n-grams a little coarser
(`x+y` and `x-y` agree), which is the safe direction for decontamination.
"""

from __future__ import annotations

import re
import unicodedata
import zlib

import numpy as np

# LaTeX spacing and sizing commands that carry no content. Order matters: longer names first.
_LATEX_NOISE = re.compile(
    r"\\(?:qquad|quad|displaystyle|textstyle|scriptstyle|left|right|bigl|bigr|Bigl|Bigr|big|Big"
    r"|biggl|biggr|bigg|Bigg|limits|nolimits|mathrm|mathbf|mathit|textbf|textit|text|operatorname"
    r"|hspace\*?\{[^}]*\}|vspace\*?\{[^}]*\})(?![a-zA-Z])"
    r"|\\[,;:! ]"  # \, \; \: \! and "\ " (control symbols: no letter check)
)
# Same command, different spelling: fold onto one name.
_LATEX_SYNONYMS = (
    (re.compile(r"\\[dt]frac(?![a-zA-Z])"), r"\\frac"),
    (re.compile(r"\\le(?![a-zA-Z])"), r"\\leq"),
    (re.compile(r"\\ge(?![a-zA-Z])"), r"\\geq"),
    (re.compile(r"\\ne(?![a-zA-Z])"), r"\\neq"),
    (re.compile(r"\\cdot(?![a-zA-Z])"), r"\\times"),
)
_DELIMS = re.compile(r"\$|\\\(|\\\)|\\\[|\\\]|~")
_WS = re.compile(r"\s+")
_TOKEN = re.compile(r"\\[a-z]+|[a-z0-9]+")


def _clean(text: str) -> str:
    text = unicodedata.normalize("NFKC", text)
    for pat, rep in _LATEX_SYNONYMS:
        text = pat.sub(rep, text)
    text = _LATEX_NOISE.sub(" ", text)
    text = _DELIMS.sub(" ", text)
    return text.lower()


def normalize(text: str) -> str:
    """Canonical form for exact matching: cleaned, lower-cased, all whitespace removed."""
    return _WS.sub("", _clean(text))


def match_tokens(text: str) -> list[str]:
    """Token sequence for n-gram matching: alphanumeric runs and LaTeX command names."""
    return _TOKEN.findall(_clean(text))


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
