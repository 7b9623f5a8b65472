"""Every figure is written as a non-empty PNG and PDF; figures cope with partial data."""

from __future__ import annotations

from pathlib import Path

from plots_fixtures import tiny_cfg, write_run

from plots.all import make_all

SETTINGS = ("tiny-sft-mini1-fp8", "tiny-sft-mini8-fp8", "paper-sft-mini1-bf16")
STATIC_FIGURES = ("static_f_tau", "static_routing_per_layer", "static_ratio_hist")


def _assert_figure(paths: list[Path], fig_dir: Path, stem: str) -> None:
    png, pdf = fig_dir / f"{stem}.png", fig_dir / f"{stem}.pdf"
    assert png in paths and pdf in paths
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 2000


def test_every_figure_written(plots_out):
    out, paths = plots_out
    stems = [f"{kind}__{s}" for s in SETTINGS for kind in ("kl", "dynamics", "eval")] + list(STATIC_FIGURES)
    for stem in stems:
        _assert_figure(paths, out / "figures", stem)
    assert len(list((out / "figures").iterdir())) == 2 * len(stems)
    index = (out / "index.md").read_text()
    assert all(f"figures/{stem}.png" in index for stem in stems)
    assert all(p.exists() for p in paths)


def test_subset_without_static_and_a_just_started_cell(tmp_path):
    """One cell with data, one that has only written config.json: no static figures, no crash."""
    runs = tmp_path / "runs"
    write_run(runs, tiny_cfg("sft-single-grpo-r3", replay=True), {0: 0.4, 5: 0.5}, last_step=7, complete=False)
    fresh = runs / "sft-single-grpo"
    fresh.mkdir()
    tiny_cfg("sft-single-grpo").save(fresh / "config.json")
    paths = make_all(runs, tmp_path / "out", progress=False)
    for kind in ("kl", "dynamics", "eval"):
        _assert_figure(paths, tmp_path / "out" / "figures", f"{kind}__tiny-sft-mini1-fp8")
    assert not list((tmp_path / "out" / "figures").glob("static_*"))
    md = (tmp_path / "out" / "tables" / "results__tiny-sft-mini1-fp8.md").read_text()
    assert "| GRPO (running) | n/a | n/a | n/a | - |" in md
    assert "| GRPO+R3 (running) | 50.00 | 50.00 | 5 | - |" in md


def test_static_only_root(tmp_path):
    from plots_fixtures import write_static

    write_static(tmp_path / "runs")
    paths = make_all(tmp_path / "runs", tmp_path / "out", progress=False)
    for stem in STATIC_FIGURES:
        _assert_figure(paths, tmp_path / "out" / "figures", stem)
    assert (tmp_path / "out" / "tables" / "static_mismatch.md").exists()
