"""Answer extraction and math-verify grading, in worker processes (SIGALRM needs a main thread).

Extraction (`extract_answer`), in order; the first rule that yields a non-empty answer wins:
  1. the content of the LAST complete `\\boxed{...}` or `\\fbox{...}` (balanced braces; a box
     left open by truncation is skipped), or `\\boxed 5` (the brace-less form);
  2. Minerva style "final answer is X" (last occurrence; X up to the end of the line, `$...$`
     unwrapped, a trailing "I hope it is correct." and full stop dropped);
  3. "answer: X" / "answer is X" (last occurrence, same clean-up);
  4. otherwise None: no answer, graded wrong. There is deliberately no "last number in the text"
     fallback: it rewards unformatted guesses and would make the template's instruction moot.
Several answers must share one box (`\\boxed{2, 3}`, compared as a set); with several boxes the
last one is the answer.

Grading (`_grade_extracted`): both the extracted answer and the gold answer are wrapped in
`\\boxed{}` and parsed with math_verify.parse (LaTeX first, then plain expressions), then
math_verify.verify(gold, pred) (asymmetric: gold first). Before parsing, digit groups separated
by a LaTeX thin space (`1\\,000`, `1\\!000`) are joined; math-verify already handles `1,000` and
`1{,}000`, `\\dfrac`, degrees, `\\text{}` units, percentages, intervals and sets. Both math-verify
timeouts are disabled and the whole pair runs under one SIGALRM alarm (eval.workers), because a
nested `signal.alarm` inside math-verify would cancel the outer one.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
import threading
from collections.abc import Sequence

from eval.workers import OnError, WorkerPool, map_in_workers  # noqa: F401  (re-exported)

DEFAULT_TIMEOUT_S = 5.0
"""Per pair, extraction excluded (math-verify's own default per call is 5 s)."""

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*")
_FINAL_RE = re.compile(r"final answer is[:\s]*(.+)", re.IGNORECASE)
_ANSWER_RE = re.compile(r"answer(?:\s*:|\s+is\b:?)\s*(.+)", re.IGNORECASE)
_THIN_SPACE_DIGITS_RE = re.compile(r"(?<=\d)\\[,!;: ]\s*(?=\d{3}(?!\d))")


def _last_complete_box(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` whose braces close; `\\boxed X` form too."""
    starts = [m.end() for m in _BOX_RE.finditer(text)]
    for start in reversed(starts):
        if start < len(text) and text[start] == "{":
            depth = 0
            for k in range(start, len(text)):
                if text[k] == "{":
                    depth += 1
                elif text[k] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[start + 1 : k]
            continue  # unclosed (truncated): try an earlier box
        m = re.match(r"([^\s$]+)", text[start:])  # `\boxed 5`
        if m and m.group(1).rstrip("."):
            return m.group(1).rstrip(".")
    return None


def _clean_tail(s: str) -> str:
    s = s.strip().split("\n")[0].strip()
    s = re.sub(r"\s*I hope it is correct\.?\s*$", "", s, flags=re.IGNORECASE).strip()
    if s.startswith("$"):
        end = s.find("$", 1)
        s = s[1:end] if end > 0 else s[1:]
    s = s.strip()
    if s.endswith("."):
        s = s[:-1].rstrip()
    return s


def extract_answer(response: str) -> str | None:
    """The final answer of a response (rules in the module docstring), or None if it has none."""
    if not isinstance(response, str):
        raise TypeError(f"response must be str, got {type(response).__name__}")
    boxed = _last_complete_box(response)
    if boxed is not None and boxed.strip():
        return boxed.strip()
    for pattern in (_FINAL_RE, _ANSWER_RE):
        matches = list(pattern.finditer(response))
        if matches:
            ans = _clean_tail(matches[-1].group(1))
            if ans:
                return ans
    return None


def normalize_answer(ans: str) -> str:
    """The pre-parse clean-up applied to both sides (thin-space digit groups joined)."""
    return _THIN_SPACE_DIGITS_RE.sub("", ans.strip())


@functools.lru_cache(maxsize=8192)
def parse_answer(ans: str):
    """math-verify's parse of one answer string, as the grader compares it (shared with
    data_prep's verifiability filter so training answers are parsed exactly like rewards)."""
    # Imported lazily so that `import eval.grader` stays light; fork-started workers inherit it.
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    _silence_math_verify()
    return parse(
        "\\boxed{" + normalize_answer(ans) + "}",
        extraction_config=[LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()],
        parsing_timeout=None,  # the caller's SIGALRM bounds the whole pair
    )


def _grade_extracted(pair: tuple[str, str]) -> bool:
    """(extracted answer, gold answer) -> equivalent? Runs under the caller's timeout."""
    from math_verify import verify

    pred, gold = pair
    gold_p = parse_answer(gold)
    if not gold_p:
        return False
    return bool(verify(gold_p, parse_answer(pred), timeout_seconds=None))


@dataclasses.dataclass(frozen=True, kw_only=True)
class GradeResult:
    """The grade of one response."""

    correct: bool
    extracted: str | None
    """The extracted final answer (None: no answer found)."""
    timed_out: bool = False
    """Grading exceeded its time limit (graded wrong)."""


def _silence_math_verify() -> None:
    # With its timeouts disabled math-verify logs one warning per process; we time out ourselves.
    logging.getLogger("math_verify").setLevel(logging.ERROR)


_WARMUP = [
    ("\\frac{1}{2}", "0.5"),
    ("[2,5)", "[2, 5)"),
    ("1,2", "\\{2,1\\}"),
    ("\\text{(C)}", "C"),
    ("x^2+1", "1+x^2"),
    ("30^\\circ", "30"),
    ("\\sqrt{2}/2", "\\frac{\\sqrt2}{2}"),
]


_warm = False


def warm_up() -> None:
    """Import math-verify and run a few typical comparisons: the first parse in a fresh process
    costs seconds (imports, sympy and ANTLR caches), which must not count against an item's timeout.
    Once per process (a forked worker of a warm parent inherits the warm state)."""
    global _warm
    if _warm:
        return
    for pred, gold in _WARMUP:
        _grade_extracted((pred, gold))
    _warm = True


def _answers_of(pair: tuple[str, str]) -> tuple[str, str]:
    """Worker affinity of an (extracted, gold) pair: the strings it parses (parse_answer is cached
    per process, ~4 ms a miss), so pairs sharing a gold or a predicted answer go to one worker."""
    return pair


def make_pool(*, workers: int = 2, timeout_s: float = DEFAULT_TIMEOUT_S) -> WorkerPool:
    """A persistent grading pool for `grade_detailed`/`grade_many(pool=...)` (the RL loop keeps one).

    Warms math-verify in this process first (imports, ~1 s once): workers are forked lazily at the
    first map and inherit it, as do replacements of killed workers (their warm_up is then a no-op).
    """
    _silence_math_verify()
    if workers > 0:
        warm_up()
    return WorkerPool(
        _grade_extracted,
        workers=workers,
        timeout_s=timeout_s,
        on_error="none",
        initializer=warm_up,
        affinity=_answers_of,
    )


def grade_detailed(
    pairs: Sequence[tuple[str, str]],
    *,
    workers: int = 2,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    pool: WorkerPool | None = None,
    progress: bool | str = False,
) -> list[GradeResult]:
    """Grade (response, gold) pairs: extraction here, math-verify in worker processes.

    workers=0 grades inline (main thread only). A pair that times out or crashes its worker is
    graded wrong; a timeout is flagged in GradeResult.timed_out. Pairs with the same extracted
    and gold answer are graded once.
    """
    extracted: list[str | None] = []
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ValueError(f"pair {i} must be (response, gold), got {type(pair).__name__} {pair!r:.80}")
        response, gold = pair
        if not isinstance(gold, str) or not gold.strip():
            raise ValueError(f"pair {i}: gold answer must be a non-empty string, got {gold!r}")
        extracted.append(extract_answer(response))
    # Identical (extracted, gold) pairs are graded once: grading is a pure function of the pair,
    # and RL groups repeat answers (many samples of one problem agree).
    unique: dict[tuple[str, str], int] = {}
    for i, ex in enumerate(extracted):
        if ex is not None:
            unique.setdefault((ex, pairs[i][1]), len(unique))
    todo = list(unique)
    if pool is None:
        _silence_math_verify()
        if workers > 0 and todo:
            warm_up()  # inherited by the forked workers (see make_pool)
        outcomes = map_in_workers(
            _grade_extracted,
            todo,
            workers=workers,
            timeout_s=timeout_s,
            on_error="none",
            progress=progress,
            initializer=warm_up,
            affinity=_answers_of,
        )
    else:
        outcomes = pool.map(todo, progress=progress)
    results = []
    for i, ex in enumerate(extracted):
        ok, timed_out = outcomes[unique[(ex, pairs[i][1])]] if ex is not None else (False, False)
        results.append(GradeResult(correct=bool(ok), extracted=ex, timed_out=timed_out))
    return results


def grade_many(
    pairs: Sequence[tuple[str, str]],
    workers: int = 2,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    pool: WorkerPool | None = None,
) -> list[bool]:
    """[correct] for (response, gold) pairs; see grade_detailed."""
    return [r.correct for r in grade_detailed(pairs, workers=workers, timeout_s=timeout_s, pool=pool)]


def grade(response: str, gold: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Is the final answer of `response` equivalent to `gold`? Inline in the main thread, else in
    one worker process (SIGALRM needs a main thread)."""
    inline = threading.current_thread() is threading.main_thread()
    return grade_many([(response, gold)], workers=0 if inline else 1, timeout_s=timeout_s)[0]
