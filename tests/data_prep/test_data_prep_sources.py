"""Reading sources: formats, the shipped pools, hub-format fixtures, and bad input."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from data_prep.config import POOLS
from data_prep.sources import POOLS_DIR, hub_rows, load_source, parse_spec, to_row

FIXTURES = Path(__file__).resolve().parents[2] / "data_prep" / "fixtures"
SHARED = Path("/work/shared/data/train")


def test_missing_path_fails_at_start_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        parse_spec(str(tmp_path / "nope.jsonl"))


def test_bad_rows_reported_not_fatal_not_altered(tmp_path):
    lines = [
        json.dumps({"id": "a", "problem": "What is $1+1$?", "answer": "2"}),
        json.dumps({"id": "b", "problem": "", "answer": "2"}),
        json.dumps({"id": "c", "problem": "What is $2+2$?"}),
        json.dumps({"id": "d", "problem": "What is $3+3$?", "answer": 6}),
        "{not json",
        json.dumps({"id": "e", "problem": "Bad \ud800 text", "answer": "1"}),
        json.dumps(["not", "an", "object"]),
        json.dumps({"id": "a", "problem": "Duplicate id?", "answer": "1"}),
        json.dumps({"id": "f", "problem": "  What is $4+4$?  ", "answer": " 8 ", "level": 3}),
    ]
    data = ("\n".join(lines) + "\n").encode("utf-8") + b"\xff\xfe broken bytes\n"
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(data)
    src = load_source(parse_spec(str(path)))
    assert src.error is None
    assert [r["id"] for r in src.rows] == ["mixed/a", "mixed/f"]
    assert src.rows[1]["problem"] == "  What is $4+4$?  " and src.rows[1]["answer"] == " 8 "  # never altered
    assert src.rows[1]["level"] == 3
    assert src.bad.count == 8 and src.rows_read == 10
    reasons = src.bad.by_reason
    for r in ("empty problem", "missing answer", "answer is int, expected str", "duplicate id"):
        assert reasons[r] == 1, reasons
    assert any(r.startswith("invalid JSON") for r in reasons) and any(
        r.startswith("undecodable UTF-8") for r in reasons
    )
    assert any("lone surrogate" in r for r in reasons)
    assert len(src.bad.examples) == 5


@pytest.mark.parametrize(
    "suffix,content",
    [
        (".parquet", b'{"problem": 1}\n'),
        (".jsonl", b"PAR1\x00\x00binary"),
        (".json", b'{"problem": "x", "answer": "1"}\n{}'),
    ],
)
def test_file_not_what_extension_says(tmp_path, suffix, content):
    path = tmp_path / f"liar{suffix}"
    path.write_bytes(content)
    src = load_source(parse_spec(str(path)))
    assert src.rows == [] and src.error and str(path) in src.error


def test_orz_fixture_format():
    src = load_source(parse_spec(str(FIXTURES / "orz_sample.json")))
    assert src.bad.count == 0 and len(src.rows) == 8
    r = src.rows[1]
    assert (r["problem"], r["answer"], r["pass_at_n"], r["source"]) == (
        "Find all real $x$ with $x^2 = 2x + 3$.",
        "-1, 3",
        0.5,
        "orz_sample",
    )


def test_bigmath_fixture_through_datasets_maps_solve_rate():
    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset("parquet", data_files=str(FIXTURES / "bigmath_sample.parquet"), split="train")
    rows = [to_row(raw, source="bigmath", index=i)[0] for i, (_, raw) in enumerate(hub_rows(ds))]
    assert len(rows) == 12 and rows[0]["solve_rate"] == pytest.approx(0.95)
    assert rows[0]["orig_source"] == "orca_math" and rows[0]["source"] == "bigmath"
    assert rows[8]["solve_rate"] is None


@pytest.mark.skipif(not SHARED.is_dir(), reason="the shared JSONL originals are not in a plain clone")
@pytest.mark.parametrize("pool", POOLS)
def test_pools_equal_shared_jsonl(pool):
    from data_prep.ship_pools import check_roundtrip

    assert check_roundtrip(SHARED / f"{pool}.jsonl", POOLS_DIR / f"{pool}.parquet") > 7000


def test_pools_shipped_and_readable():
    counts = {p: pq.read_metadata(POOLS_DIR / f"{p}.parquet").num_rows for p in POOLS}
    assert counts == {"deepscaler_40k": 40308, "math_train": 7470, "math_lvl3to5_8k": 8521}
