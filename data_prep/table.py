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
            columns[name] = pa.array([None if v is None else json.dumps(v, sort_keys=True) for v in values], pa.string())
            json_cols.append(name)
    if not rows:
        columns = {k: pa.array([], pa.string()) for k in REQUIRED}
    return pa.table(columns), json_cols


def write_parquet(table, path: Path) -> None:
    """zstd level 19: the text compresses ~6x; byte-identical for identical input and pyarrow."""
    import pyarrow.parquet as pq

    pq.write_table(table, path, compression="zstd", compression_level=19, use_dictionary=False)


def load_train(path: str | Path) -> list[dict]:
    """Rows {id, problem, answer, source, ...metadata} of a data_prep output.

    `path` is a build directory (reads DIR/train.parquet and requires DIR/manifest.json, which is
    written last, so an interrupted build is refused) or a .parquet file.
    """
    import pyarrow.parquet as pq

    p = Path(path)
    if p.is_dir():
        if not (p / "manifest.json").is_file():
            raise FileNotFoundError(
                f"{p} has no manifest.json: the build did not finish (the manifest is written last). "
                f"Re-run `python -m data_prep.build --out {p}`."
            )
        p = p / "train.parquet"
    if not p.is_file():
        raise FileNotFoundError(f"training data {p} does not exist (expected a data_prep output directory or .parquet)")
    rows = pq.read_table(p).to_pylist()
    missing = [k for k in REQUIRED if rows and k not in rows[0]]
    if missing:
        raise ValueError(f"{p}: columns {missing} missing; expected at least {list(REQUIRED)} (is this a data_prep output?)")
    return rows
