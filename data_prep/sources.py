"""Reading sources into validated rows; bad rows are reported, never altered, never fatal.

A source spec is one of
- a pool name (`deepscaler_40k`, `math_train`, `math_lvl3to5_8k`): data_prep/pools/<name>.parquet;
- `hub:bigmath`: SynthLabsAI/Big-Math-RL-Verified through `datasets` (columns problem, answer,
  source, domain, llama8b_solve_rate; the solve rate becomes `solve_rate`);
- `hub:orz`: the Open-Reasoner-Zero 57k collection (a JSON list of [human, assistant] pairs:
  `pair[0]["value"]` is the problem, `pair[1]["ground_truth"]["value"]` the answer);
- `[name=]path` to a local .jsonl / .json / .parquet with `problem` and `answer` fields, or an
  ORZ-format .json. The name defaults to the file stem.

Every output row has id (`<source>/<row id or index>`), problem, answer, source, and the
input's other fields as metadata (an input `source` field is kept as `orig_source`).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Literal

from data_prep.config import POOLS

POOLS_DIR = Path(__file__).parent / "pools"
HUB_SOURCES = {
    # name: (hub repo id, how it is read). Field names checked against the dataset cards
    # (huggingface.co/datasets/SynthLabsAI/Big-Math-RL-Verified; Open-Reasoner-Zero README).
    "bigmath": ("SynthLabsAI/Big-Math-RL-Verified", "datasets"),
    "orz": ("Open-Reasoner-Zero/orz_math_57k_collection", "json"),
}
ORZ_HUB_FILES = ("orz_math_57k_collection.json", "orz_math_57k_collected.json")
"""File names tried in the ORZ hub repo (both spellings occur in public code; untested here)."""
SOLVE_RATE_FIELDS = ("llama8b_solve_rate",)
MAX_EXAMPLES = 5

SourceKind = Literal["pool", "hub", "file"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SourceSpec:
    name: str
    kind: SourceKind
    location: str
    """Pool/file path, or the hub name (`bigmath`, `orz`)."""


@dataclasses.dataclass(kw_only=True)
class BadRows:
    """Rows that were reported and skipped: counts by reason and the first examples."""

    count: int = 0
    by_reason: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: list[dict[str, str]] = dataclasses.field(default_factory=list)

    def add(self, where: str, reason: str, raw: Any) -> None:
        self.count += 1
        self.by_reason[reason] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append({"where": where, "reason": reason, "preview": repr(raw)[:200]})

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "by_reason": dict(self.by_reason), "examples": self.examples}


@dataclasses.dataclass(kw_only=True)
class LoadedSource:
    spec: SourceSpec
    rows: list[dict[str, Any]]
    rows_read: int
    bad: BadRows
    sha256: str | None
    error: str | None = None
    """Set when the whole source was unreadable (e.g. a file that is not what its extension says)."""


def parse_spec(spec: str) -> SourceSpec:
    """Turn a `--sources` item into a SourceSpec; a missing path fails here, at start."""
    if spec in POOLS:
        return SourceSpec(name=spec, kind="pool", location=str(POOLS_DIR / f"{spec}.parquet"))
    if spec.startswith("hub:"):
        hub = spec[4:]
        if hub not in HUB_SOURCES:
            raise ValueError(f"unknown hub source {spec!r}; known: {sorted('hub:' + k for k in HUB_SOURCES)}")
        return SourceSpec(name=hub, kind="hub", location=hub)
    name, sep, path = spec.partition("=")
    if not sep:
        name, path = Path(spec).stem, spec
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"source {spec!r}: path {path!r} does not exist (expected a pool name {list(POOLS)}, "
            f"hub:{{{','.join(HUB_SOURCES)}}}, or an existing .jsonl/.json/.parquet file)"
        )
    if Path(path).suffix.lower() not in (".jsonl", ".json", ".parquet"):
        raise ValueError(f"source {spec!r}: unsupported extension {Path(path).suffix!r}; use .jsonl, .json or .parquet")
    return SourceSpec(name=name, kind="file", location=path)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- raw readers: yield (where, raw object) and raise ValueError for an unreadable file --------------
def _read_jsonl(path: Path, bad: BadRows) -> Iterable[tuple[str, Any]]:
    data = path.read_bytes()
    if data[:4] == b"PAR1" or b"\x00" in data[:4096]:
        raise ValueError(f"{path} has a .jsonl extension but binary content (Parquet magic or NUL bytes)")
    for i, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            bad.add(f"line {i}", f"undecodable UTF-8 ({e.reason})", line[:80])
            continue
        try:
            yield f"line {i}", json.loads(text)
        except json.JSONDecodeError as e:
            bad.add(f"line {i}", f"invalid JSON ({e.msg})", text[:80])


def _read_json(path: Path) -> Iterable[tuple[str, Any]]:
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} has a .json extension but is not one JSON document: {e}") from e
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        raise ValueError(f"{path}: expected a JSON list of rows, got {type(obj).__name__}")
    return ((f"item {i}", r) for i, r in enumerate(obj))


def _read_parquet(path: Path) -> Iterable[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a non-Parquet file
        raise ValueError(f"{path} has a .parquet extension but could not be read as Parquet: {e}") from e
    return ((f"row {i}", r) for i, r in enumerate(table.to_pylist()))


def _read_hub(hub: str, cache_dir: str | None) -> Iterable[tuple[str, Any]]:
    """Network path (cluster users); untested here: nothing reaches the hub from this machine."""
    repo, how = HUB_SOURCES[hub]
    if how == "datasets":
        import datasets

        ds = datasets.load_dataset(repo, split="train", cache_dir=cache_dir)
        return hub_rows(ds)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError

    for fname in ORZ_HUB_FILES:
        try:
            local = hf_hub_download(repo, fname, repo_type="dataset", cache_dir=cache_dir)
        except EntryNotFoundError:
            continue
        return _read_json(Path(local))
    raise ValueError(f"hub:{hub}: none of {ORZ_HUB_FILES} found in dataset repo {repo}")


def hub_rows(ds: Iterable[dict[str, Any]]) -> Iterable[tuple[str, Any]]:
    """Rows of a `datasets.Dataset` (or any iterable of dicts) as (where, raw)."""
    return ((f"row {i}", dict(r)) for i, r in enumerate(ds))


# --- row validation -------------------------------------------------------------------------------
def _orz_pair(raw: list) -> dict[str, Any] | None:
    """ORZ item [{"from": "human", "value": problem}, {"from": "assistant", "ground_truth":
    {"value": answer, "pass_at_n": ...}}] -> a flat dict; None if raw is not that shape."""
    if len(raw) < 2 or not all(isinstance(x, dict) for x in raw[:2]):
        return None
    gt = raw[1].get("ground_truth")
    if "value" not in raw[0] or not isinstance(gt, dict):
        return None
    out = {"problem": raw[0]["value"], "answer": gt.get("value")}
    if gt.get("pass_at_n") is not None:
        out["pass_at_n"] = gt["pass_at_n"]
    return out


def _text_problem(field: str, value: Any) -> str | None:
    if value is None:
        return f"missing {field}"
    if not isinstance(value, str):
        return f"{field} is {type(value).__name__}, expected str"
    if not value.strip():
        return f"empty {field}"
    if "\ufffd" in value:
        return f"undecodable {field} (U+FFFD replacement character)"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return f"undecodable {field} (lone surrogate)"
    return None


def to_row(raw: Any, *, source: str, index: int) -> tuple[dict[str, Any] | None, str | None]:
    """Validate one raw record: (row, None) or (None, reason). Never alters problem or answer."""
    if isinstance(raw, list):
        raw = _orz_pair(raw) or raw
    if not isinstance(raw, dict):
        return None, f"row is {type(raw).__name__}, expected an object with problem and answer"
    for field in ("problem", "answer"):
        reason = _text_problem(field, raw.get(field))
        if reason:
            return None, reason
    raw_id = raw.get("id")
    row = {
        "id": f"{source}/{raw_id if raw_id not in (None, '') else index}",
        "problem": raw["problem"],
        "answer": raw["answer"],
        "source": source,
    }
    for k, v in raw.items():
        if k in ("id", "problem", "answer"):
            continue
        if k == "source":
            if v != source:
                row["orig_source"] = v
        elif k in SOLVE_RATE_FIELDS:
            row["solve_rate"] = v
        else:
            row[k] = v
    return row, None


def load_source(spec: SourceSpec, *, cache_dir: str | None = None) -> LoadedSource:
    """Read and validate one source. An unreadable source comes back with `error` set and no rows."""
    bad = BadRows()
    path = Path(spec.location)
    sha = file_sha256(path) if spec.kind != "hub" else None
    rows: list[dict[str, Any]] = []
    seen_ids: set[str] = set()
    n_read = 0  # records handed to validation (lines that failed to decode are counted in `bad`)
    try:
        if spec.kind == "hub":
            raw_iter = _read_hub(spec.location, cache_dir)
        elif path.suffix.lower() == ".jsonl":
            raw_iter = _read_jsonl(path, bad)
        elif path.suffix.lower() == ".json":
            raw_iter = _read_json(path)
        else:
            raw_iter = _read_parquet(path)
        for where, raw in raw_iter:
            n_read += 1
            row, reason = to_row(raw, source=spec.name, index=n_read - 1)
            if row is not None and row["id"] in seen_ids:
                row, reason = None, "duplicate id"
            if row is None:
                bad.add(where, reason or "invalid", raw)
                continue
            seen_ids.add(row["id"])
            rows.append(row)
    except ValueError as e:
        return LoadedSource(spec=spec, rows=[], rows_read=len(rows) + bad.count, bad=bad, sha256=sha, error=str(e))
    return LoadedSource(spec=spec, rows=rows, rows_read=len(rows) + bad.count, bad=bad, sha256=sha)
