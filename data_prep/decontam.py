"""Decontamination against the evaluation sets: canonical exact match and n-gram coverage.

A training row is contaminated when its canonical problem text equals an evaluation problem's
(data_prep.text.canonical: LaTeX spellings such as `\\dfrac`/`\\frac` or `\\neq`/`\\not=`,
`$`, braces, punctuation, whitespace and case do not count), or when it contains at least
`min_coverage` of an evaluation problem's distinct `n`-token sequences (data_prep.text.match_tokens,
the words of the same canonical text; n = 13 by default, the GPT-3 paper's decontamination,
Brown et al. 2020, appendix C). Evaluation problems shorter than n tokens are caught by the exact
match only: a short n-gram would flag any problem containing a common phrase. The manifest lists
each removed id with the evaluation item it matched.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from data_prep.text import CANONICAL, TextForm, ngram_hashes


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalMatch:
    id: str
    """The removed training row."""
    eval_item: str
    """`<eval set>/<eval id>` of the matched evaluation problem."""
    method: str
    """"exact" or "<n>-gram"."""
    coverage: float
    """Fraction of the eval item's distinct n-grams found in the training problem (1.0 for exact)."""
    evidence: str
    """The shared n-gram's tokens (or the first 80 canonical characters for an exact match)."""


class EvalIndex:
    """The evaluation problems, indexed by canonical text and by n-gram hash of its words.

    `form` exists so the build can count what the legacy text form would have removed."""

    def __init__(
        self, eval_rows: dict[str, Sequence[dict[str, Any]]], *, n: int, min_coverage: float, form: TextForm = CANONICAL
    ):
        self.n, self.min_coverage, self.form = n, min_coverage, form
        self.exact: dict[str, str] = {}
        self.grams: dict[int, tuple[tuple[str, ...], list[str]]] = {}  # hash -> (tokens, eval keys)
        self.num_grams: dict[str, int] = {}
        for set_name, rows in eval_rows.items():
            for r in rows:
                key = f"{set_name}/{r['id']}"
                self.exact.setdefault(form.key(r["problem"]), key)
                toks = form.tokens(r["problem"])
                hashes = ngram_hashes(toks, n).tolist()
                self.num_grams[key] = len(set(hashes))
                for pos, h in enumerate(hashes):
                    entry = self.grams.setdefault(h, (tuple(toks[pos : pos + n]), []))
                    if key not in entry[1]:
                        entry[1].append(key)
        self.size = sum(len(v) for v in eval_rows.values())

    def match(self, problem: str, row_id: str) -> EvalMatch | None:
        """The evaluation item this problem overlaps most, or None.

        coverage(eval item) = |n-grams shared with the problem| / |n-grams of the eval item|
        (distinct n-grams); a match needs coverage >= min_coverage. One shared boilerplate
        sentence ("... where m and n are relatively prime positive integers. Find m+n.") covers
        a small part of an AIME problem and does not match; a copy with other whitespace or
        LaTeX spacing covers all of it.
        """
        norm = self.form.key(problem)
        if norm in self.exact:
            return EvalMatch(id=row_id, eval_item=self.exact[norm], method="exact", coverage=1.0, evidence=norm[:80])
        toks = self.form.tokens(problem)
        shared: dict[str, int] = {}
        first: dict[str, str] = {}
        seen: set[int] = set()
        for pos, h in enumerate(ngram_hashes(toks, self.n).tolist()):
            hit = self.grams.get(h)
            if hit is None or h in seen:
                continue
            seen.add(h)
            # Compare the tokens too, so a 64-bit hash collision can never remove a row.
            if hit[0] != tuple(toks[pos : pos + self.n]):
                continue
            for key in hit[1]:
                shared[key] = shared.get(key, 0) + 1
                first.setdefault(key, " ".join(hit[0]))
        best = max(shared, key=lambda k: (shared[k] / self.num_grams[k], k), default=None)
        if best is None:
            return None
        coverage = shared[best] / self.num_grams[best]
        if coverage < self.min_coverage:
            return None
        return EvalMatch(
            id=row_id, eval_item=best, method=f"{self.n}-gram", coverage=round(coverage, 4), evidence=first[best]
        )


def decontaminate(
    rows: Sequence[dict[str, Any]], index: EvalIndex, *, honor_source_flags: bool = True, progress: bool = False
) -> tuple[list[bool], list[EvalMatch]]:
    """keep [N] and the matches of the dropped rows. With honor_source_flags, a row whose source
    already marked it as overlapping an eval set (the pools' `eval_overlap` field, computed with
    difflib similarity >= 0.9 and the same answer) is dropped too (method "source-flag")."""
    keep, matches = [], []
    for r in tqdm(rows, desc="decontaminate", disable=not progress, leave=False):
        m = index.match(r["problem"], r["id"])
        if m is None and honor_source_flags and r.get("eval_overlap"):
            flag = r["eval_overlap"]
            m = EvalMatch(
                id=r["id"],
                eval_item=f"{flag[0] if isinstance(flag, list) else flag}/?",
                method="source-flag",
                coverage=0.0,
                evidence=f"eval_overlap={flag}",
            )
        keep.append(m is None)
        if m is not None:
            matches.append(m)
    return keep, matches


def load_eval_sets(
    names: Sequence[str], loader: Callable[[str], list[dict[str, Any]]] | None = None
) -> dict[str, list[dict[str, Any]]]:
    """{name: rows} through `eval.benchmarks.load` (the project's own copy of the eval sets)."""
    if loader is None:
        from eval.benchmarks import load as loader
    return {name: loader(name) for name in names}
