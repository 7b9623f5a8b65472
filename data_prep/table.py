"""The output table: written as Parquet (zstd), read back by the RL loop with `load_train`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

REQUIRED = ("id", "problem", "answer", "source")


def rows_to_table(rows: Sequence[dict[str, Any]]):
    """pyarrow.Table with id, problem, answer, source first, then every metadata field seen (in
    first-seen order, null where a row lacks it). A metadata field whose values have
    incompatible types across sources is stored as JSON text; returns (table, json_columns)."""
    import pyarrow as pa

    names = list(REQUIRED) + [k for k in dict.fromkeys(k for r in rows for k in r) if k not in REQUIRED]
    columns, json_cols = {}, []
    for name in names:
        values = [r.get(name) for r in rows]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
            columns[name] = pa.array(
                [None if v is None else json.dumps(v, sort_keys=True) for v in values], pa.string()
            )
            json_cols.append(name)
    if not rows:
        columns = {k: pa.array([], pa.string()) for k in REQUIRED}
    return pa.table(columns), json_cols


def write_parquet(table, path: Path) -> None:
    """zstd level 19: the text compresses ~6x; byte-identical for identical input and pyarrow."""
    import pyarrow.parquet as pq

    pq.write_table(table, path, compression="zstd", compression_level=19, use_dictionary=False)


def _check_manifest(d: Path, data_file: Path) -> None:
    """Refuse `data_file` unless d/manifest.json marks a finished build of exactly this file.

    The build deletes the manifest first and writes it last (after train.parquet), so a missing,
    torn or non-"complete" manifest means an interrupted build, and a sha256 mismatch means the
    table changed after the manifest was written (a second, interrupted build into the same
    directory, or a hand edit)."""
    fix = f"rerun `python -m data_prep.build --out {d}`"
    mpath = d / "manifest.json"
    if not mpath.is_file():
        found = f"{data_file.name} without it" if data_file.exists() else f"neither it nor {data_file.name}"
        raise FileNotFoundError(
            f"{d}: expected manifest.json (a data_prep build writes it last, when it finishes), found {found}: "
            f"the build did not finish or this is not a data_prep output; {fix}"
        )
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(
            f"{mpath}: expected the JSON manifest of a finished build, found unreadable text ({e}); {fix}"
        ) from e
    status = manifest.get("status") if isinstance(manifest, dict) else None
    if status != "complete":
        raise ValueError(f"{mpath}: expected status 'complete', found {status!r}: the build did not finish; {fix}")
    out = manifest.get("output") or {}
    if out.get("file", data_file.name) != data_file.name:
        raise ValueError(
            f"{mpath} describes {out.get('file')!r}, not {data_file.name!r}; load {d / out['file']} or {fix}"
        )
    if not data_file.is_file():
        raise FileNotFoundError(f"{d}: manifest.json is complete but {data_file.name} is missing; {fix}")
    if "sha256" in out:
        from data_prep.sources import file_sha256

        got = file_sha256(data_file)
        if got != out["sha256"]:
            raise ValueError(
                f"{data_file}: expected sha256 {out['sha256'][:16]}... (recorded in manifest.json), "
                f"found {got[:16]}...: "
                f"the table changed after its build finished; {fix}"
            )


def load_train(path: str | Path) -> list[dict]:
    """Rows {id, problem, answer, source, ...metadata} of a data_prep output.

    `path` is a build directory (reads DIR/train.parquet; DIR/manifest.json must mark the build
    complete and carry train.parquet's sha256, so an interrupted build is refused), or a .parquet
    file: checked against a manifest.json beside it when there is one; a file named
    train.parquet without one is refused like an unfinished build directory; any other .parquet
    (a hand-made table) is read as it is.
    """
    import pyarrow.parquet as pq

    p = Path(path)
    if p.is_dir():
        p = p / "train.parquet"
        _check_manifest(p.parent, p)
    elif p.is_file() and ((p.parent / "manifest.json").is_file() or p.name == "train.parquet"):
        _check_manifest(p.parent, p)
    if not p.is_file():
        raise FileNotFoundError(
            f"training data {p} does not exist (expected a data_prep output directory or .parquet); "
            "build one with `python -m data_prep.build --out DIR`"
        )
    rows = pq.read_table(p).to_pylist()
    missing = [k for k in REQUIRED if rows and k not in rows[0]]
    if missing:
        raise ValueError(
            f"{p}: columns {missing} missing; expected at least {list(REQUIRED)} (is this a data_prep output?)"
        )
    return rows
