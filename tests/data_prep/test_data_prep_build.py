"""The whole stage: small builds on the fixtures, reproducibility, sampling; the full offline build."""

import json
from pathlib import Path

import pytest

from data_prep import load_train
from data_prep.build import build, filter_table, main
from data_prep.config import BuildConfig
from data_prep.sampling import balanced_quotas, difficulty_keep, sample_balanced

FIXTURES = Path(__file__).resolve().parents[2] / "data_prep" / "fixtures"
FIX_SOURCES = (f"bigmath={FIXTURES / 'bigmath_sample.parquet'}", f"orz={FIXTURES / 'orz_sample.json'}")


def small(**kw):
    return BuildConfig(sources=FIX_SOURCES, verify_workers=1, **kw)


def test_fixture_build_manifest_and_load_train(tmp_path):
    m = build(small(), tmp_path, progress=False, log=lambda s: None)
    rows = load_train(tmp_path)
    assert len(rows) == m["final_count"] > 0
    ids = {r["id"] for r in rows}
    # the MC, yes/no, proof, true/false and missing-figure fixture rows are gone
    assert "bigmath/5" not in ids and "bigmath/4" not in ids and "bigmath/8" not in ids
    assert "orz/7" not in ids and "orz/4" not in ids
    assert {r["source"] for r in rows} == {"bigmath", "orz"}
    on = [f for f in m["filters"] if f["enabled"]]
    for a, b in zip(on, on[1:]):
        assert b["rows_in"] == a["rows_in"] - a["dropped"]
    assert on[-1]["rows_in"] - on[-1]["dropped"] == m["final_count"]
    assert m["sources"]["bigmath"]["rows_read"] == 12 and m["config"]["seed"] == 0
    assert "| **final** |" in filter_table(m)


def test_same_seed_same_bytes_and_balanced(tmp_path):
    a = build(small(target_size=6, seed=3), tmp_path / "a", progress=False, log=lambda s: None)
    b = build(small(target_size=6, seed=3), tmp_path / "b", progress=False, log=lambda s: None)
    assert a["output"]["sha256"] == b["output"]["sha256"]
    assert a["final_by_source"] == {"bigmath": 3, "orz": 3}


def test_difficulty_filter(tmp_path):
    m = build(
        small(difficulty_filter=True, solve_rate_min=0.2, solve_rate_max=0.9),
        tmp_path,
        progress=False,
        log=lambda s: None,
    )
    rows = load_train(tmp_path)
    rates = [r["solve_rate"] for r in rows if r["source"] == "bigmath"]
    assert rates and all(0.2 <= x <= 0.9 for x in rates)
    assert [f for f in m["filters"] if f["name"] == "difficulty"][0]["rows_without_solve_rate"] > 0


def test_unfinished_build_is_refused(tmp_path):
    build(small(), tmp_path, progress=False, log=lambda s: None)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="manifest"):
        load_train(tmp_path)


def test_cli_missing_source_fails_at_start(tmp_path, capsys):
    assert main(["--sources", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_balanced_quotas_water_filling():
    assert balanced_quotas({"a": 100, "b": 2, "c": 100}, 30) == {"a": 14, "b": 2, "c": 14}
    assert balanced_quotas({"a": 5, "b": 5}, 100) == {"a": 5, "b": 5}
    rows = [{"id": str(i), "source": "a" if i < 50 else "b"} for i in range(60)]
    k1, k2 = sample_balanced(rows, target=20, seed=1), sample_balanced(rows, target=20, seed=1)
    assert k1 == k2 and sum(k1[:50]) == 10 and sum(k1[50:]) == 10
    assert sample_balanced(rows, target=20, seed=2) != k1


def test_difficulty_keep_missing_rates():
    keep, missing = difficulty_keep(
        [{"solve_rate": 0.5}, {"solve_rate": None}, {"solve_rate": 0.95}, {}], lo=0.0, hi=0.9
    )
    assert keep == [True, True, False, True] and missing == 2


@pytest.mark.slow
def test_full_offline_build_on_shipped_pools(tmp_path):
    m = build(BuildConfig(), tmp_path, progress=False, log=lambda s: None)
    assert m["final_count"] > 30000 and set(m["final_by_source"]) == {"deepscaler_40k", "math_train", "math_lvl3to5_8k"}
    decon = [f for f in m["filters"] if f["name"] == "decontaminate"][0]
    assert decon["dropped"] == len(decon["removed"]) > 0
    assert all(r["eval_item"].split("/")[0] in ("aime24", "aime25", "amc23", "math500") for r in decon["removed"])
    assert json.loads((tmp_path / "manifest.json").read_text())["output"]["sha256"] == m["output"]["sha256"]
    print(filter_table(m))
