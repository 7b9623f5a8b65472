"""The tables' numbers are the ones the fixture runs imply (see conftest.EXPECTED)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from plots_fixtures import EXPECTED, STATIC, write_static

from plots import paper_numbers
from plots.runs import discover
from plots.tables import static_table


def _rows(out: Path, name: str) -> list[dict[str, str]]:
    with open(out / "tables" / f"{name}.csv") as f:
        return list(csv.DictReader(f))


def _ours(out: Path) -> dict[str, dict[str, str]]:
    """Our rows of every results table, keyed by the cell's first run name without seed suffix."""
    rows = {}
    for path in sorted((out / "tables").glob("results__*.csv")):
        for r in _rows(out, path.stem):
            if r["kind"] == "ours":
                rows[r["runs"].split(";")[0].removesuffix("-s0")] = r
    return rows


@pytest.mark.parametrize("cell", sorted(EXPECTED))
def test_best_step_avg_and_collapse_match_fixture(plots_out, cell):
    out, _ = plots_out
    row = _ours(out)[cell]
    want = EXPECTED[cell]
    assert int(row["best_step"]) == want["best_step"]
    assert float(row["avg"]) == pytest.approx(want["avg"])
    collapse = row["collapse_step"]
    if cell.endswith("tis-r3"):  # two seeds: one entry per seed
        assert collapse == "-/-"
    else:
        assert (int(collapse) if collapse else None) == want["collapse"]


def test_running_and_missing_eval_are_marked(plots_out):
    out, _ = plots_out
    md = (out / "tables" / "results__tiny-sft-mini1-fp8.md").read_text()
    assert "| GRPO+TIS (running) |" in md
    assert "run sft-single-grpo-r3 has no evaluation at step(s) [15]" in md
    assert "GRPO+TIS+R3 (2 seeds)" in md
    row = _ours(out)["sft-single-grpo-r3"]
    assert row["missing_eval_steps"] == "sft-single-grpo-r3:15"
    assert _ours(out)["sft-single-grpo-tis"]["status"] == "running"


def test_collapsed_row_renders_step_and_dash(plots_out):
    out, _ = plots_out
    md = (out / "tables" / "results__tiny-sft-mini1-fp8.md").read_text()
    assert "| GRPO | 50.00 | 50.00 | 10 | 20 |" in md
    assert "| GRPO+R3 | 55.00 | 55.00 | 25 | - |" in md


def test_paper_rows_beside_matching_cells_without_diff_for_tiny(plots_out):
    out, _ = plots_out
    rows = _rows(out, "results__tiny-sft-mini1-fp8")
    paper = [r for r in rows if r["kind"] == "paper"]
    assert {r["method"] for r in paper} == {"GRPO", "GRPO+TIS", "GRPO+R3", "GRPO+TIS+R3"}
    grpo = next(r for r in paper if r["method"] == "GRPO")
    assert float(grpo["avg"]) == paper_numbers.SINGLE_SFT.rows["GRPO"].avg
    assert grpo["collapse_step"] == "60"
    assert not [r for r in rows if r["kind"] == "diff"]  # synthetic benchmark: nothing to difference
    # A layout the paper does not have gets no paper rows.
    assert paper_numbers.main_table_for("sft", 4) is None


def test_paper_preset_difference_row(plots_out):
    out, _ = plots_out
    rows = {r["kind"]: r for r in _rows(out, "results__paper-sft-mini1-bf16")}
    # Fixture: best step 5, avg .50; per-benchmark offsets +.01 -.02 +.03 -.04 and +.02 (math500_l5).
    ours, pub, diff = rows["ours"], rows["paper"], rows["diff"]
    assert int(ours["best_step"]) == 5
    assert float(ours["score_aime24"]) == pytest.approx(51.0)
    assert float(ours["score_math500_l5"]) == pytest.approx(52.0)
    assert float(ours["score_math500"]) == pytest.approx(46.0)
    assert float(pub["score_math500_l5"]) == 83.77 and pub["score_math500"] == ""
    assert float(diff["score_aime24"]) == pytest.approx(51.0 - 49.06)
    assert float(diff["score_math500_l5"]) == pytest.approx(52.0 - 83.77)
    assert float(diff["avg"]) == pytest.approx(50.0 - 62.23)


def test_static_table_numbers(plots_out):
    out, _ = plots_out
    rows = _rows(out, "static_mismatch")
    for precision, arms in STATIC.items():
        moe = next(r for r in rows if r["precision"] == precision and r["model"] == "MoE")
        dense = next(r for r in rows if r["precision"] == precision and r["model"].startswith("dense"))
        assert float(moe["kl_native"]) == pytest.approx(arms["moe"][0])
        assert float(moe["kl_r3"]) == pytest.approx(arms["moe_r3"][0])
        assert float(moe["kl_ratio"]) == pytest.approx(arms["moe"][0] / arms["moe_r3"][0])
        assert float(moe["f2_native"]) == pytest.approx(arms["moe"][1])
        assert float(moe["routing_pair_disagreement"]) == pytest.approx(sum(arms["moe"][2]) / len(arms["moe"][2]))
        assert float(dense["kl_native"]) == pytest.approx(arms["dense"][0]) and dense["kl_r3"] == ""
    md = (out / "tables" / "static_mismatch.md").read_text()
    assert "| MoE | 1.70e-4 / 1.00e-6 | 3.80e-4 / 5.20e-5 | 7.31x |" in md
    assert "**rollout precision bf16**" in md and "**rollout precision fp8**" in md


def test_static_paper_row_when_model_matches(tmp_path):
    write_static(tmp_path)

    f = tmp_path / "static" / "fp8" / "static.json"
    data = json.loads(f.read_text())
    data["model"] = "/ckpt/Qwen3-30B-A3B-SFT"  # a checkpoint path naming the paper's model
    data["dense_model"] = "/ckpt/Qwen3-8B"
    f.write_text(json.dumps(data))
    t = static_table(discover(tmp_path).static)
    paper = [r for r in t.csv_rows if r[1] == "paper"]
    assert len(paper) == 2
    pub = paper_numbers.STATIC["Qwen3-30B-A3B"]
    assert paper[0][:7] == ["fp8", "paper", "Qwen3-30B-A3B", pub.f2_native, pub.f2_r3, pub.kl_native, pub.kl_r3]
    assert paper[1][2] == "Qwen3-8B" and paper[1][5] == paper_numbers.STATIC_DENSE_KL["Qwen3-8B"]
    assert ["Qwen3-30B-A3B-SFT"] == [r[0] for r, k in zip(t.rows, t.kinds) if k == "ours" and "30B" in r[0]]
    assert not [r for r in t.csv_rows if r[0] == "bf16" and r[1] == "paper"]  # no model recorded: no match


def test_every_table_in_three_formats(plots_out):
    out, paths = plots_out
    stems = {p.stem for p in (out / "tables").iterdir()}
    assert stems == {
        "static_mismatch",
        "results__tiny-sft-mini1-fp8",
        "results__tiny-sft-mini8-fp8",
        "results__paper-sft-mini1-bf16",
    }
    for stem in stems:
        for ext in ("md", "tex", "csv"):
            p = out / "tables" / f"{stem}.{ext}"
            assert p in paths and p.stat().st_size > 0
        tex = (out / "tables" / f"{stem}.tex").read_text()
        assert tex.count(r"\begin{tabular}") == 1 and r"\bottomrule" in tex
        body = tex.split(r"\midrule", 1)[1]
        assert "_" not in body.replace(r"\_", "")  # every underscore escaped


def test_table_shape_validation():
    from plots.table_format import Table

    with pytest.raises(ValueError, match="row 0 .* has 1 cells, expected 2"):
        Table(
            name="x",
            title="x",
            header=["a", "b"],
            rows=[["1"]],
            kinds=["ours"],
            notes=[],
            csv_header=["a"],
            csv_rows=[[1]],
        )


def test_tex_escape():
    from plots.table_format import tex_escape

    assert tex_escape("a_b 5% {x} > 2 & #1") == r"a\_b 5\% \{x\} \textgreater{} 2 \& \#1"


def test_fmt_sci():
    from plots.table_format import fmt_sci

    assert fmt_sci(2.54e-4) == "2.54e-4"
    assert fmt_sci(0.0) == "0"
    assert fmt_sci(math.nan) == "n/a"
    assert fmt_sci(12345.0) == "1.23e4"
