"""Convert the shared JSONL training pools into the Parquet files shipped in data_prep/pools.

`python -m data_prep.ship_pools --src /work/shared/data/train` (maintainers only; a plain clone
already has the Parquet files). Every field is kept; a field missing from some rows becomes a
nullable column. The conversion is lossless: `check_roundtrip` re-reads each Parquet file and
compares it with the JSONL row by row (absent fields read back as null).
Prints the sha256 of each JSONL and Parquet file for data_prep/pools/README.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from data_prep.config import POOLS
from data_prep.sources import POOLS_DIR, file_sha256
from data_prep.table import write_parquet


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def jsonl_to_table(rows: list[dict]):
    import pyarrow as pa

    keys = list(dict.fromkeys(k for r in rows for k in r))  # union, first-seen order
    return pa.table({k: pa.array([r.get(k) for r in rows]) for k in keys})


def check_roundtrip(jsonl: Path, parquet: Path) -> int:
    """Row count after checking that Parquet rows equal the JSONL rows (nulls for absent keys)."""
    import pyarrow.parquet as pq

    src, back = read_jsonl(jsonl), pq.read_table(parquet).to_pylist()
    if len(src) != len(back):
        raise ValueError(f"{parquet}: {len(back)} rows, JSONL has {len(src)}")
    for i, (a, b) in enumerate(zip(src, back)):
        if {k: v for k, v in b.items() if v is not None} != a:
            raise ValueError(f"{parquet}: row {i} differs from {jsonl}: {a!r} vs {b!r}")
    return len(src)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m data_prep.ship_pools")
    p.add_argument("--src", type=Path, required=True, help="directory holding <pool>.jsonl")
    p.add_argument("--out", type=Path, default=POOLS_DIR)
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    for name in POOLS:
        src, dst = a.src / f"{name}.jsonl", a.out / f"{name}.parquet"
        write_parquet(jsonl_to_table(read_jsonl(src)), dst)
        n = check_roundtrip(src, dst)
        print(
            f"{name}: rows {n}; jsonl {src.stat().st_size} B sha256 {file_sha256(src)}; "
            f"parquet {dst.stat().st_size} B sha256 {file_sha256(dst)}"
        )


if __name__ == "__main__":
    main()
