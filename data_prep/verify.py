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
    from eval.grader import parse_answer  # the grader's parse; see module docstring

    parsed = parse_answer(answer)
    return bool(parsed) and not isinstance(parsed[0], str)


CHUNK = 64
"""Answers per worker message. One message per answer cost more in pipe round trips than the
parse itself (~1.6 ms); a chunk times each answer separately inside the worker."""


def check_chunk(item: tuple[list[str], float]) -> list[str]:
    """Worker side: "ok" | "unparsable" | "timeout" per answer, each under its own SIGALRM
    (eval.workers.call_with_alarm; we are in the worker's main thread)."""
    from eval.workers import ItemTimeout, call_with_alarm

    answers, timeout_s = item
    out = []
    for a in answers:
        try:
            out.append("ok" if call_with_alarm(gold_is_comparable, a, timeout_s) else "unparsable")
        except ItemTimeout:
            out.append("timeout")
        except Exception:  # noqa: BLE001  a math-verify/sympy error on this answer
            out.append("unparsable")
    return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class VerifyOutcome:
    keep: list[bool]
    reasons: dict[str, str]
    """Dropped id -> "unparsable" | "timeout" | "worker crash"."""
    counts: dict[str, int]


def verify_answers(
    rows: Sequence[dict[str, Any]], *, workers: int, timeout_s: float, progress: bool = False
) -> VerifyOutcome:
    """Parse every distinct gold answer once (in workers) and keep the rows whose answer parses.

    The pool's per-message deadline is CHUNK * timeout_s (+ its grace), so a chunk can only be
    killed if its answers together exceed that; a killed or crashed chunk marks its answers
    "timeout" / "worker crash"."""
    import logging

    from eval.workers import map_in_workers

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns once per disabled timeout
    answers = sorted({r["answer"] for r in rows})
    chunks = [(answers[i : i + CHUNK], timeout_s) for i in range(0, len(answers), CHUNK)]
    outcomes = map_in_workers(
        check_chunk,
        chunks,
        workers=workers,
        timeout_s=timeout_s * CHUNK,
        on_error="none",
        progress="verify answers" if progress else False,
    )
    status = {}
    for (chunk, _), (res, timed_out) in zip(chunks, outcomes):
        res = res if res is not None else ["timeout" if timed_out else "worker crash"] * len(chunk)
        status.update(zip(chunk, res))
    keep, reasons, counts = [], {}, collections.Counter()
    for r in rows:
        s = status[r["answer"]]
        keep.append(s == "ok")
        counts[s] += 1
        if s != "ok":
            reasons[r["id"]] = s
    return VerifyOutcome(keep=keep, reasons=reasons, counts=dict(counts))
