"""The "answer is verifiable" filter: math-verify must parse the gold answer to a comparable object.

"Comparable" means the first parse result is a SymPy object (number, expression, set, interval,
matrix, equation), not the raw-string fallback math-verify returns when parsing fails (e.g. an
unbalanced `\\sqrt{`). The parse is the grader's own (`eval.grader`: the answer wrapped in
`\\boxed{}`, LaTeX then plain-expression extraction), so every kept row can be graded the way
the RL reward grades it. math-verify bounds its work with SIGALRM, which needs a process's main
thread: answers are parsed in worker processes (`eval.workers.map_in_workers`, the evaluation
package's pool) with a per-answer timeout; timeouts and worker crashes are dropped and counted.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Sequence


def gold_is_comparable(answer: str) -> bool:
    """True when the grader's math-verify parse of `answer` yields a non-string first result."""
    from eval.grader import _parse  # the grader's parse; see module docstring

    parsed = _parse(answer)
    return bool(parsed) and not isinstance(parsed[0], str)


@dataclasses.dataclass(frozen=True, kw_only=True)
class VerifyOutcome:
    keep: list[bool]
    reasons: dict[str, str]
    """Dropped id -> "unparsable" | "timeout" | "worker crash"."""
    counts: dict[str, int]


def verify_answers(rows: Sequence[dict[str, Any]], *, workers: int, timeout_s: float, progress: bool = False) -> VerifyOutcome:
    """Parse every distinct gold answer once (in workers) and keep the rows whose answer parses."""
    import logging

    from eval.workers import map_in_workers

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns once per disabled timeout
    answers = sorted({r["answer"] for r in rows})
    outcomes = map_in_workers(gold_is_comparable, answers, workers=workers, timeout_s=timeout_s,
                              on_error="none", progress="verify answers" if progress else False)
    status = {}
    for ans, (ok, timed_out) in zip(answers, outcomes):
        status[ans] = "ok" if ok else ("timeout" if timed_out else ("unparsable" if ok is False else "worker crash"))
    keep, reasons, counts = [], {}, collections.Counter()
    for r in rows:
        s = status[r["answer"]]
        keep.append(s == "ok")
        counts[s] += 1
        if s != "ok":
            reasons[r["id"]] = s
    return VerifyOutcome(keep=keep, reasons=reasons, counts=dict(counts))
