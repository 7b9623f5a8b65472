"""Evaluation sets: `load(name)` -> rows {"id", "problem", "answer", ...extra fields kept}.

Names, resolved in this order:
  1. registered names: the built-ins declared once in EVAL_SETS, `aime24`, `aime25`, `amc23`,
     `math500` (the project's own copies in eval/data, origins and licenses in eval/data/README.md)
     and `math500_l5` (the 134 level-5 MATH-500 problems: the subset the paper reports as
     "MATH500"), plus whatever other packages add with `register(name, loader_fn, title=...)`
     (the embedded task adds `synthetic`, its title with `declare_title`);
  2. a local file: `.jsonl`, `.json` (a list of objects) or `.parquet`;
  3. a Hugging Face dataset name (`datasets.load_dataset(name, split=...)`, needs network).
Rows of files and hub datasets are mapped from common field names (problem/question/prompt,
answer/final_answer/gold/solution's last box) and validated: a row without a problem or answer
stops the load with its index, since an evaluation set with holes would shift every score.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).resolve().parent / "data"


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalSet:
    """One built-in evaluation set: the one place it is declared. The grid evaluates the paper's
    sets (PAPER_BENCHMARKS), the plots title and order table columns by them, data_prep
    decontaminates the training pool against the shipped files (SHIPPED_FILES)."""

    name: str
    """Key of its scores in eval.jsonl and the name `load` takes."""
    title: str
    """Column title in tables and figures."""
    subset_of: str | None = None
    """A subset of another set's file (its problems are decontaminated through that set)."""


EVAL_SETS: tuple[EvalSet, ...] = (
    EvalSet(name="aime24", title="AIME24"),
    EvalSet(name="aime25", title="AIME25"),
    EvalSet(name="amc23", title="AMC23"),
    EvalSet(name="math500_l5", title="MATH500 (L5)", subset_of="math500"),
    EvalSet(name="math500", title="MATH500 (all)"),
)
"""The paper's evaluation sets in its table order (its MATH500 column is the level-5 subset; the
full MATH500 follows). Adding a set: its file in eval/data (origin in eval/data/README.md) and a line here."""
PAPER_BENCHMARKS = tuple(e.name for e in EVAL_SETS)
"""Names of EVAL_SETS, in the paper's column order."""
SHIPPED_FILES = tuple(e.name for e in EVAL_SETS if e.subset_of is None)
"""Sets with a file of their own in eval/data."""
_TITLES: dict[str, str] = {e.name: e.title for e in EVAL_SETS}

Row = dict[str, Any]
Loader = Callable[[], list[Row]]
_PROBLEM_KEYS = ("problem", "question", "prompt", "Problem", "Question")
_ANSWER_KEYS = ("answer", "final_answer", "gold", "Answer", "expected_answer")


def _read_local(path: Path) -> list[Row]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
        return rows
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
        return data
    if suffix == ".parquet":
        import pandas as pd

        return pd.read_parquet(path).to_dict(orient="records")
    raise ValueError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json or .parquet")


def normalize_rows(rows: list[Row], *, source: str) -> list[Row]:
    """Map field names to id/problem/answer (other fields kept) and validate every row."""
    from eval.grader import extract_answer

    out, seen = [], set()
    for i, raw in enumerate(rows):
        if not isinstance(raw, dict):
            raise ValueError(f"{source}: row {i} is {type(raw).__name__}, expected an object")
        row = dict(raw)
        problem = next((row[k] for k in _PROBLEM_KEYS if row.get(k)), None)
        answer = next((row[k] for k in _ANSWER_KEYS if row.get(k) not in (None, "")), None)
        if answer is None and isinstance(row.get("solution"), str):
            answer = extract_answer(row["solution"])  # MATH-style rows: the solution's last box
        if not isinstance(problem, str) or not problem.strip():
            raise ValueError(
                f"{source}: row {i} has no problem text (looked for {list(_PROBLEM_KEYS)}); keys present: {sorted(row)}"
            )
        if answer is None or not str(answer).strip():
            raise ValueError(
                f"{source}: row {i} has no answer (looked for {list(_ANSWER_KEYS)} and a "
                f"boxed answer in 'solution'); keys present: {sorted(row)}"
            )
        row["problem"], row["answer"] = problem, str(answer).strip()
        row["id"] = str(row.get("id", row.get("unique_id", f"{source}-{i}")))
        if row["id"] in seen:
            raise ValueError(
                f"{source}: duplicate id {row['id']!r} at row {i}; ids must be unique "
                "(resumable evaluation keys samples by id)"
            )
        seen.add(row["id"])
        out.append(row)
    if not out:
        raise ValueError(f"{source}: no rows")
    return out


def _builtin(name: str) -> Loader:
    def load_builtin() -> list[Row]:
        path = DATA_DIR / f"{name}.jsonl"
        if not path.exists():
            raise FileNotFoundError(
                f"{path} is missing: the evaluation sets ship in eval/data "
                "(reinstall the package or restore the file from git)"
            )
        return _read_local(path)

    return load_builtin


def _math500_l5() -> list[Row]:
    rows = [r for r in _builtin("math500")() if r.get("level") == 5]
    if len(rows) != 134:  # the paper's MATH500 column is this subset
        raise ValueError(
            f"math500_l5: expected 134 level-5 problems, found {len(rows)}: "
            "eval/data/math500.jsonl differs from the shipped copy (check its sha256)"
        )
    return rows


_SUBSETS: dict[str, Loader] = {"math500_l5": _math500_l5}
_REGISTRY: dict[str, Loader] = {e.name: _SUBSETS.get(e.name) or _builtin(e.name) for e in EVAL_SETS}
_BUILTINS = frozenset(_REGISTRY)


def register(name: str, loader_fn: Loader) -> None:
    """Make `load(name)` call `loader_fn()` (rows with id, problem, answer). Re-registering a name
    replaces it; the built-in names cannot be replaced."""
    if name in _BUILTINS:
        raise ValueError(f"benchmark {name!r} is built in and cannot be re-registered; pick another name")
    if not callable(loader_fn):
        raise TypeError(f"loader_fn for {name!r} must be callable, got {type(loader_fn).__name__}")
    _REGISTRY[name] = loader_fn


def declare_title(name: str, title_: str) -> None:
    """The column title of a set another package provides (declared with the set, at its import)."""
    if name in _BUILTINS:
        raise ValueError(f"benchmark {name!r} is built in: its title is declared in EVAL_SETS")
    _TITLES[name] = title_


def title(name: str) -> str:
    """A benchmark's column title (tables, figures); unknown names are their own title."""
    return _TITLES.get(name, name)


def short_name(name: str) -> str:
    """The key a benchmark's scores are stored under: the name itself, or a file's stem for a path."""
    if name in _REGISTRY:
        return name
    return Path(name).stem if Path(name).suffix.lower() in (".jsonl", ".json", ".parquet") else name


def available() -> list[str]:
    """Registered benchmark names."""
    return sorted(_REGISTRY)


def load(name: str, *, split: str = "test", limit: int = 0) -> list[Row]:
    """Rows {id, problem, answer, ...} of a registered name, a local file, or a hub dataset.

    limit > 0 keeps the first `limit` rows (in the set's own order).
    """
    if limit < 0:
        raise ValueError(f"limit must be >= 0 (0: all rows), got {limit}")
    if name in _REGISTRY:
        rows, source = _REGISTRY[name](), name
    elif Path(name).exists():
        rows, source = _read_local(Path(name)), Path(name).stem
    elif Path(name).suffix.lower() in (".jsonl", ".json", ".parquet"):
        raise FileNotFoundError(f"benchmark file {name!r} does not exist")
    else:
        try:
            import datasets
        except ImportError as e:  # pragma: no cover - datasets is a declared dependency
            raise ValueError(f"unknown benchmark {name!r} and `datasets` is not importable") from e
        try:
            ds = datasets.load_dataset(name, split=split)
        except Exception as e:
            raise ValueError(
                f"unknown benchmark {name!r}: not registered ({available()}), not a local file, and "
                f"loading it as a Hugging Face dataset (split {split!r}) failed: {type(e).__name__}: {e}"
            ) from e
        rows, source = [dict(r) for r in ds], name.replace("/", "_")
    rows = normalize_rows(list(rows), source=source)
    return rows[:limit] if limit else rows
