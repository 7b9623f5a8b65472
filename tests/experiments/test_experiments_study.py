"""The collapse study: its cells, its aggregation on hand-written run directories, and
`python -m experiments.study collapse` end to end on the micro zoo (2 cells x 2 steps, rerun skips)."""

from __future__ import annotations

import contextlib
import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plots"))  # tests/plots/plots_fixtures.py
from plots_fixtures import write_run  # noqa: E402

from experiments import study_grid  # noqa: E402
from experiments.config import RunConfig  # noqa: E402


# --- the cells ----------------------------------------------------------------------------------
def test_full_plan_cells_are_arms_x_levels_x_seeds(tmp_path):
    cells = study_grid.cells("full", zoo_dir=tmp_path)
    assert len(cells) == 1 * 3 * 3  # fp8all x {GRPO, GRPO+TIS, GRPO+R3} x seeds
    c = cells["full-fp8all-grpo-r3-s2"]
    assert (c.replay, c.tis, c.seed, c.mini_steps, c.algorithm) == (True, False, 2, 1, "grpo")
    assert (c.rollout_engine, c.rollout_precision, c.rollout_fp8_scope) == ("hf", "fp8", "all")
    assert c.stop_on_collapse and c.global_steps == 150 and c.zoo_size == "tiny"
    assert c.zoo_dir == str(tmp_path.resolve())
    assert list(cells)[:3] == [n for n in cells if n.endswith("-s0")]  # seed 0 of every cell runs first
    # configs of one cell differ only in name and seed (plots average them as seeds)
    a, b = cells["full-fp8all-grpo-tis-s0"].to_dict(), cells["full-fp8all-grpo-tis-s1"].to_dict()
    assert {k for k in a if a[k] != b[k]} == {"name", "seed"}


def test_pilot_has_an_lr_axis_and_one_seed(tmp_path):
    cells = study_grid.cells("pilot", zoo_dir=tmp_path, pattern="*-grpo-lr*")
    assert sorted(cells) == sorted(
        f"pilot-{lv}-grpo-lr{lr}-s0" for lv in ("bf16", "fp8router", "fp8all") for lr in ("1e-4", "3e-4")
    )
    assert {c.lr for c in cells.values()} == {1e-4, 3e-4}
    assert study_grid.cells("pilot", zoo_dir=tmp_path, global_steps=7)["pilot-bf16-grpo-r3-lr1e-4-s0"].global_steps == 7


def test_a_plan_refuses_fields_runconfig_does_not_have():
    with pytest.raises(ValueError, match=r"\['max_tokens'\] are not RunConfig fields"):
        study_grid._Plan(name="x", zoo_size="tiny", levels=("bf16",), arms=("grpo",), seeds=(0,), lrs=(1e-4,),
                         run={"max_tokens": 96})  # fmt: skip


def test_fp8_scope_reaches_the_rollout_engine_config(tmp_path):
    from experiments.step import engine_configs

    c = study_grid.cells("full", zoo_dir=tmp_path, pattern="full-fp8all-grpo-s0")["full-fp8all-grpo-s0"]
    ro, _ = engine_configs(c, tmp_path, tmp_path / "run")
    assert (ro.precision, ro.fp8_scope) == ("fp8", "all")


def test_fp8_scope_all_quantises_every_linear_layer_per_row():
    """`fp8all`: attention, every expert's matrices and the router, one e4m3 scale per output row;
    embeddings, norms and lm_head stay as they are (what FP8 serving engines keep)."""
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from r3.engines.hf.fp8 import FP8_MAX, apply_fp8, fp8_param_names

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(
        vocab_size=40,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=8,
        intermediate_size=16,
    )
    m = Qwen3MoeForCausalLM(cfg)
    names = {n.removeprefix("model.layers.0.") for n in fp8_param_names(m, "all")}
    assert names == {
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
        "self_attn.o_proj.weight",
        "mlp.experts.gate_up_proj",
        "mlp.experts.down_proj",
        "mlp.gate.weight",
    }
    assert {n.removeprefix("model.layers.0.") for n in fp8_param_names(m, "router")} == {"mlp.gate.weight"}
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    apply_fp8(m, "all")
    after = dict(m.named_parameters())
    for n in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert torch.equal(before[n], after[n]), n
    w, q = before["model.layers.0.mlp.experts.gate_up_proj"], after["model.layers.0.mlp.experts.gate_up_proj"]
    # per (expert, output row): the row's largest |w| maps to 448 exactly, so it survives unchanged
    scale = w.abs().amax(dim=-1, keepdim=True) / FP8_MAX
    assert torch.allclose(q.abs().amax(dim=-1), w.abs().amax(dim=-1))
    assert ((q - w).abs() <= 2.0**-4 * w.abs() + 2.0**-10 * scale + 1e-12).all()
    assert not torch.equal(q, w)


def test_zoo_size_is_checked(tmp_path):
    from experiments import zoo

    (tmp_path / "zoo.json").write_text(json.dumps({"config": {"size": "micro"}}))
    zoo.check_size(tmp_path, None)
    zoo.check_size(tmp_path, "micro")
    with pytest.raises(ValueError, match="holds the 'micro' recipe.*zoo_size='tiny'"):
        zoo.check_size(tmp_path, "tiny")


# --- aggregation on hand-written run directories ------------------------------------------------
def _cfg(name: str, *, seed: int, replay: bool, precision: str, scope: str = "router") -> RunConfig:
    return RunConfig(
        name=name,
        seed=seed,
        replay=replay,
        rollout_precision=precision,
        rollout_fp8_scope=scope,
        global_steps=20,
        stop_on_collapse=True,
    )


def _write(root: Path, cfg: RunConfig, avgs: dict[int, float], *, k3: float, last_step: int) -> None:
    """A complete run whose k3 KL is `k3` at every step (so its mean is exactly k3)."""
    d = write_run(root, cfg, avgs, last_step=last_step)
    lines = [
        {
            "step": s,
            "time": 1.7e9 + s,
            "mismatch/k3_kl": k3,
            "mismatch/extreme_frac@2": k3 / 10,
            "mismatch/k3_kl_per_response": k3 * 100,
            "actor/grad_norm": 0.1 * s,
            "actor/entropy": 0.8,
            "rollout/response_len_mean": 30.0,
            # routing disagreement per MoE layer: grows with depth and with the dose
            **{f"routing/layer{layer}_disagreement": k3 * 10 * (layer + 1) for layer in range(3)},
        }
        for s in range(1, last_step + 1)
    ]
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def _study_root(root: Path) -> Path:
    flat = {0: 0.40, 5: 0.45, 10: 0.47, 15: 0.46, 20: 0.46}
    # low mismatch (bf16): nothing collapses
    _write(
        root,
        _cfg("bf16-grpo-s0", seed=0, replay=False, precision="bf16"),
        {0: 0.40, 5: 0.50, 10: 0.45, 15: 0.48, 20: 0.48},
        k3=1e-4,
        last_step=20,
    )
    _write(
        root,
        _cfg("bf16-grpo-s1", seed=1, replay=False, precision="bf16"),
        {0: 0.40, 5: 0.46, 10: 0.52, 15: 0.50, 20: 0.50},
        k3=3e-4,
        last_step=20,
    )
    for s in (0, 1):
        _write(root, _cfg(f"bf16-grpo-r3-s{s}", seed=s, replay=True, precision="bf16"), flat, k3=5e-5, last_step=20)
    # high mismatch (FP8, every linear layer): GRPO collapses (at 10 and at 15; stopped there), R3 does not
    _write(
        root,
        _cfg("fp8all-grpo-s0", seed=0, replay=False, precision="fp8", scope="all"),
        {0: 0.40, 5: 0.50, 10: 0.20, 15: 0.10},
        k3=1e-3,
        last_step=15,
    )
    _write(
        root,
        _cfg("fp8all-grpo-s1", seed=1, replay=False, precision="fp8", scope="all"),
        {0: 0.40, 5: 0.44, 10: 0.46, 15: 0.20, 20: 0.10},
        k3=2e-3,
        last_step=20,
    )
    for s in (0, 1):
        _write(
            root,
            _cfg(f"fp8all-grpo-r3-s{s}", seed=s, replay=True, precision="fp8", scope="all"),
            flat,
            k3=6e-5,
            last_step=20,
        )
    return root


def test_dose_response_aggregation_on_fixture_runs(tmp_path):
    from plots.figures_study import conditions, study_results, study_table
    from plots.runs import discover

    runs = discover(_study_root(tmp_path / "runs")).runs
    low, high = conditions(runs)
    assert low.source.startswith("bf16") and high.source.startswith("fp8all: FP8 weights of every linear")
    assert low.dose == pytest.approx((2e-4, 1e-4)) and high.dose == pytest.approx((1.5e-3, 5e-4))
    lg, lr3 = low.cells
    hg, hr3 = high.cells
    assert (lg.method, lr3.method, hg.method, hr3.method) == ("GRPO", "GRPO+R3", "GRPO", "GRPO+R3")
    # late = the last quarter of the points after step 0 (here the last point); change = late - step 0
    assert lg.start == pytest.approx((40.0, 0.0)) and lg.late == pytest.approx((49.0, 1.0))
    assert lg.change == pytest.approx((9.0, 1.0))
    assert lr3.paired(lg) == pytest.approx((-3.0, 1.0, 2))  # per seed: 6 - 8 and 6 - 10
    assert lg.collapse_steps == [None, None] and lg.collapse_rate == 0
    assert hg.collapse_steps == [10, 15] and hg.collapse_rate == 1.0
    assert hg.change == pytest.approx((-30.0, 0.0)) and hr3.paired(hg) == pytest.approx((36.0, 0.0, 2))
    assert hg.steps_to_collapse == pytest.approx((12.5, 2.5))
    assert hr3.collapse_rate == 0 and hr3.steps_to_collapse == pytest.approx((20.0, 0.0))
    assert hr3.k3 == pytest.approx((6e-5, 0.0))
    assert high.reference is hg

    t = study_table(runs)
    h = t.csv_header
    by = {(r[0], r[h.index("method")]): r for r in t.csv_rows}  # (condition, method) -> csv row
    row = by[(high.label, "GRPO")]
    assert row[h.index("collapse_steps")] == "10/15" and row[h.index("collapse_rate")] == 1.0
    assert row[h.index("dose_k3_native")] == pytest.approx(1.5e-3)
    assert by[(low.label, "GRPO+R3")][h.index("paired_vs_grpo_mean")] == pytest.approx(-3.0)
    md_rows = [r for r, k in zip(t.rows, t.kinds) if k == "ours"]
    assert md_rows[0][:8] == ["GRPO", "2", "20", "40.0 ± 0.0", "49.0 ± 1.0", "9.0 ± 1.0", "reference", "0/2 (-/-)"]
    assert md_rows[1][6] == "-3.0 ± 1.0 (MDE 2.8, 2 seeds)"
    assert md_rows[2][7] == "2/2 (10/15)"

    rec = study_results(runs)
    cells = {(c["condition"], c["method"]): c for c in rec["cells"]}
    r3_high = cells[(high.label, "GRPO+R3")]
    assert r3_high["seeds"] == [0, 1] and r3_high["change"] == pytest.approx(6.0)
    assert r3_high["minus_grpo"] == pytest.approx(36.0) and r3_high["collapses"] == 0
    assert r3_high["k3_per_token"] == pytest.approx(6e-5)
    per_seed = cells[(low.label, "GRPO")]["per_seed"]  # start 40 both; late - start 8 and 10 (mean 9 +/- 1)
    assert sorted(per_seed) == ["0", "1"] and per_seed["0"]["start"] == pytest.approx(40.0)
    assert sorted(v["change"] for v in per_seed.values()) == pytest.approx([8.0, 10.0])
    # grad norm 0.1 x step: percentiles over steps 1..15 and 1..20, averaged over the two seeds
    grpo_high = cells[(high.label, "GRPO")]
    assert grpo_high["grad_norm_p50"] == pytest.approx((0.8 + 1.05) / 2)
    assert grpo_high["grad_norm_max"] == pytest.approx((1.5 + 2.0) / 2)
    assert grpo_high["k3_drift"] == pytest.approx(1.0)  # constant k3
    assert "final_undosed" not in grpo_high  # no undosed.json given
    # served vs undosed final scores (experiments.undosed), paired per seed against GRPO
    und = {
        "cells": {
            "fp8all-grpo-s0": {"served": 0.10, "undosed": 0.50},
            "fp8all-grpo-s1": {"served": 0.10, "undosed": 0.40},
            "fp8all-grpo-r3-s0": {"served": 0.50, "undosed": 0.60},
            "fp8all-grpo-r3-s1": {"served": 0.50, "undosed": 0.60},
        }
    }
    cells = {(c["condition"], c["method"]): c for c in study_results(runs, undosed=und)["cells"]}
    g, r3 = cells[(high.label, "GRPO")], cells[(high.label, "GRPO+R3")]
    assert g["final_served"] == pytest.approx(10.0) and g["final_undosed"] == pytest.approx(45.0)
    assert r3["final_undosed_minus_grpo"] == pytest.approx(15.0) and r3["final_undosed_minus_grpo_se"] == pytest.approx(
        5.0
    )
    assert "final_undosed" not in cells[(low.label, "GRPO")]  # bf16 cells not in the file
    # re-scored with more samples (study served): the most samples per cell wins; paired per seed
    srv = {
        "cells": {
            "fp8all-grpo-s0@k8": {"served": 0.20, "undosed": 0.50},
            "fp8all-grpo-s1@k8": {"served": 0.30, "undosed": 0.40},
            "fp8all-grpo-s1@k2": {"served": 0.90, "undosed": 0.90},  # fewer samples: ignored
            "fp8all-grpo-r3-s0@k8": {"served": 0.40, "undosed": 0.60},
            "fp8all-grpo-r3-s1@k8": {"served": 0.40, "undosed": 0.50},
        }
    }
    cells = {(c["condition"], c["method"]): c for c in study_results(runs, served=srv)["cells"]}
    g, r3 = cells[(high.label, "GRPO")], cells[(high.label, "GRPO+R3")]
    assert g["resampled_samples"] == 8 and g["resampled_served"] == pytest.approx(25.0)
    assert g["resampled_cost"] == pytest.approx(-20.0) and "resampled_cost_minus_grpo" not in g
    assert r3["resampled_served_minus_grpo"] == pytest.approx(15.0)  # +20, +10
    assert r3["resampled_undosed_minus_grpo"] == pytest.approx(10.0)  # +10 on both seeds: no spread
    assert r3["resampled_undosed_minus_grpo_se"] == pytest.approx(0, abs=1e-9)
    assert r3["resampled_cost_minus_grpo"] == pytest.approx(5.0)  # -20 vs -30, -10 vs -10
    assert "resampled_served" not in cells[(low.label, "GRPO")]
    json.dumps(rec, allow_nan=False)  # strict JSON: no NaN


def test_a_report_of_complete_cells_leaves_running_ones_out(tmp_path):
    from plots.all import make_all

    root = _study_root(tmp_path / "runs")
    (root / "fp8all-grpo-r3-s1" / "manifest.json").unlink()  # a cell still running
    make_all(root, tmp_path / "plots", progress=False, study=True, complete_only=True)
    rec = json.loads((tmp_path / "plots" / "tables" / "study_results.json").read_text())
    r3 = [c for c in rec["cells"] if c["method"] == "GRPO+R3" and c["condition"].startswith("fp8all")]
    assert [c["seeds"] for c in r3] == [[0]] and r3[0]["status"] == "complete"


def test_k3_drift_compares_the_last_quarter_of_steps_with_the_first(tmp_path):
    from plots.figures_study import run_drift
    from plots.runs import discover

    d = write_run(tmp_path, _cfg("drift-s0", seed=0, replay=False, precision="bf16"), {0: 0.4, 20: 0.4}, last_step=20)
    k3 = [1e-4] * 5 + [2e-4] * 10 + [5e-4] * 5  # first quarter 1e-4, last quarter 5e-4
    (d / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s + 1, "mismatch/k3_kl": v}) + "\n" for s, v in enumerate(k3))
    )
    (run,) = discover(tmp_path).runs
    assert run_drift(run, "mismatch/k3_kl") == pytest.approx(5.0)
    assert math.isnan(run_drift(run, "mismatch/no_such_metric"))


def test_dose_response_figure_on_fixture_runs(tmp_path):
    from plots import figures_study
    from plots.runs import discover
    from plots.style import paper_style, save

    root = _study_root(tmp_path / "runs")
    with paper_style():
        fig = figures_study.dose_response_figure(discover(root).runs)
        paths = save(fig, tmp_path / "figures", "study_dose_response")
    change_ax, per_response_ax, rate_ax = fig.axes[:3]
    ys = {c.get_label(): list(c.lines[0].get_ydata()) for c in rate_ax.containers}
    assert ys == {"GRPO": [0.0, 1.0], "GRPO+R3": [0.0, 0.0]}
    dodge = 10 ** -(figures_study.DODGE_DECADES / 2)  # GRPO sits left of GRPO+R3
    assert list(rate_ax.containers[0].lines[0].get_xdata()) == pytest.approx([2e-4 * dodge, 1.5e-3 * dodge])
    assert list(change_ax.containers[0].lines[0].get_ydata()) == pytest.approx([9.0, -30.0])
    assert figures_study.PAPER_K3 in [ln.get_xdata()[0] for ln in change_ax.lines]  # the paper's dose marked
    # the legend sits in the collapse panel (inside its frame), naming every method and the paper's dose
    legend = [t.get_text() for t in rate_ax.get_legend().get_texts()]
    assert {"GRPO", "GRPO+R3", "paper's k3 KL / token"} <= set(legend) and change_ax.get_legend() is None
    assert "20 steps" in change_ax.get_title()
    assert paths[0].suffix == ".png" and paths[0].stat().st_size > 10_000


@pytest.mark.parametrize(("xlim", "labelled"), [((1e-3, 2e-1), ["1.0e-3", "1.0e-2", "1.0e-1"]), ((1e-2, 1e-1), None)])
def test_dose_axis_labels_only_decades_when_it_spans_more_than_a_factor_of_20(xlim, labelled):
    import matplotlib.pyplot as plt

    from plots import figures_study

    fig, ax = plt.subplots()
    figures_study._log_axis(ax)
    ax.set_xlim(*xlim)
    fig.canvas.draw()
    ticks = [
        (t.get_position()[0], t.get_text()) for t in ax.get_xticklabels() if xlim[0] <= t.get_position()[0] <= xlim[1]
    ]
    texts = [text for _, text in ticks if text]
    if labelled is None:  # within a factor of 20: 1, 2, 5 of the decade all labelled
        assert texts == [figures_study.fmt_sci(v, digits=2) for v, _ in ticks] and len(texts) >= 3
    else:
        assert texts == labelled and len(ticks) > len(labelled)  # 2e-3, 5e-3, ... ticked, not labelled
    plt.close(fig)


# --- end to end on the micro zoo ------------------------------------------------------------------
@pytest.mark.slow
def test_undosed_evaluation_of_an_fp32_cell_reproduces_its_served_samples(micro_zoo, tmp_path):
    """With no dose to remove, the undosed evaluation must regenerate the cell's own final evaluation
    sample for sample: same checkpoint, engine numerics, sampling seed and batches."""
    from experiments import demo, undosed

    p = study_grid.plan("smoke")
    cfg = study_grid.cell(p, level="fp32", arm="grpo", seed=0, lr=1e-3, zoo_dir=micro_zoo)
    out = tmp_path / "study"
    demo.run_cells({cfg.name: cfg}, out, jobs=1)
    rec = undosed.evaluate_cell(out / cfg.name)
    assert rec["step"] == 2 and rec["undosed"] == pytest.approx(rec["served"])
    mine = [json.loads(x) for x in (out / "undosed" / cfg.name / "step_2.jsonl").read_text().splitlines()]
    served = [json.loads(x) for x in (out / cfg.name / "eval" / "step_2.jsonl").read_text().splitlines()]
    key = lambda r: (r["problem_id"], r["sample"])  # noqa: E731
    assert [r["response"] for r in sorted(mine, key=key)] == [r["response"] for r in sorted(served, key=key)]
    assert not undosed.is_dosed(json.loads((out / cfg.name / "config.json").read_text()))


@pytest.mark.slow
def test_study_command_end_to_end_and_rerun_skips(micro_zoo, tmp_path, monkeypatch):
    from experiments import demo, study

    out = tmp_path / "study"
    argv = ["collapse", "--out", str(out), "--plan", "smoke", "--zoo-dir", str(micro_zoo), "--jobs", "2"]
    assert study.main(argv) == 0
    cells = ("smoke-fp8router-grpo-s0", "smoke-fp8router-grpo-r3-s0")
    for c in cells:
        man = json.loads((out / c / "manifest.json").read_text())
        assert man["status"] == "complete" and man["steps"] == 2
        k3 = [json.loads(x)["mismatch/k3_kl"] for x in (out / c / "metrics.jsonl").read_text().splitlines()]
        assert len(k3) == 2 and all(math.isfinite(v) for v in k3)
    md = (out / "plots" / "tables" / "study_collapse.md").read_text()
    assert "GRPO+R3" in md and "fp8router: FP8 router weights" in md
    assert (out / "plots" / "figures" / "study_dose_response.png").exists()
    assert (
        "study_collapse" in (out / "plots" / "index.md").read_text()
        or "Collapse study" in (out / "plots" / "index.md").read_text()
    )

    # rerun: every cell is complete, so no worker process starts and no file changes
    mtimes = {c: (out / c / "metrics.jsonl").stat().st_mtime_ns for c in cells}

    def no_run(*a, **k):
        raise AssertionError("run_cells called although every cell is complete")

    monkeypatch.setattr(demo, "run_cells", no_run)
    assert study.main([*argv, "--no-plots"]) == 0
    assert mtimes == {c: (out / c / "metrics.jsonl").stat().st_mtime_ns for c in cells}
    rows = study.state_rows(study_grid.cells("smoke", zoo_dir=micro_zoo), out)
    assert [r[1] for r in rows] == ["complete", "complete"]

    # undosed: each dosed cell's final checkpoint through an fp32 engine, its own eval seed
    assert study.main(["undosed", "--out", str(out), "--plan", "smoke", "--zoo-dir", str(micro_zoo)]) == 0
    rec = json.loads((out / "undosed.json").read_text())["cells"]
    assert sorted(rec) == sorted(cells)
    for c in cells:
        served = [json.loads(x) for x in (out / c / "eval.jsonl").read_text().splitlines()]
        assert rec[c]["step"] == 2 and rec[c]["served"] == pytest.approx(served[-1]["avg"])
        samples = (out / "undosed" / c / "step_2.jsonl").read_text().splitlines()
        assert len(samples) == 8 and all(json.loads(x)["seed"] == 2 for x in samples)  # cfg.seed + step

    # served: the final checkpoint through the cell's own dosed engine reproduces the cell's final
    # evaluation sample for sample (FP8 numerics have no noise stream), and the undosed pass beside it
    # is the fp32 one above
    argv = ["served", "--out", str(out), "--plan", "smoke", "--zoo-dir", str(micro_zoo), "--samples", "1"]
    assert study.main(argv) == 0
    res = json.loads((out / "served.json").read_text())["cells"]
    assert sorted(res) == sorted(f"{c}@k1" for c in cells)
    for c in cells:
        assert res[f"{c}@k1"]["served"] == pytest.approx(rec[c]["served"])
        assert res[f"{c}@k1"]["undosed"] == pytest.approx(rec[c]["undosed"])
        key = lambda r: (r["problem_id"], r["sample"])  # noqa: E731
        mine = [json.loads(x) for x in (out / "served" / c / "step_2-served-k1.jsonl").read_text().splitlines()]
        theirs = [json.loads(x) for x in (out / c / "eval" / "step_2.jsonl").read_text().splitlines()]
        assert [r["response"] for r in sorted(mine, key=key)] == [r["response"] for r in sorted(theirs, key=key)]
    # at this scale FP8 and fp32 sample alike, so check the engines themselves: the dose is in the
    # served one only, router and logit noise included
    from experiments import undosed as und
    from experiments.config import RunConfig
    from r3 import rundir as rd

    cfg = rd.read_config(out / cells[0], RunConfig).config
    served_engine = und._final_engine(out / cells[0], cfg, dosed=True)
    assert (served_engine.precision, served_engine.fp8_scope) == ("fp8", "router")
    assert und._final_engine(out / cells[0], cfg, dosed=False).precision == "fp32"
    noisy = cfg.replace(rollout_precision="fp32", rollout_router_noise=0.3, rollout_logit_noise=0.2)
    noise = und._final_engine(out / cells[0], noisy, dosed=True).noise
    assert (noise.router_std, noise.logit_std) == (0.3, 0.2)


def test_two_commands_on_one_out_keep_each_others_records(tmp_path, monkeypatch):
    """`undosed` / `served` write their file after each cell; a record another command wrote in the
    meantime (another plan on the same --out) must survive."""
    from experiments import undosed

    for name in ("a-s0", "b-s0"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"rollout_router_noise": 1.0}))
        (tmp_path / name / "manifest.json").write_text("{}")

    def fake(d, n_samples, *, grader_pool=None):
        path = tmp_path / undosed.SERVED_FILE
        other = json.loads(path.read_text()) if path.exists() else {"cells": {}}
        other["cells"][f"other-{d.name}@k{n_samples}"] = {"served": 0.0}  # the other command's write
        path.write_text(json.dumps(other))
        return {"served": 0.5, "undosed": 0.9}

    monkeypatch.setattr(undosed, "resample_cell", fake)
    monkeypatch.setattr("eval.grader.make_pool", lambda workers: contextlib.nullcontext())
    undosed.run(tmp_path, ["a-s0", "b-s0"], samples=4)
    cells = json.loads((tmp_path / undosed.SERVED_FILE).read_text())["cells"]
    assert sorted(cells) == ["a-s0@k4", "b-s0@k4", "other-a-s0@k4", "other-b-s0@k4"]


def test_resample_cell_scores_served_through_the_dosed_engine_and_undosed_without(tmp_path, monkeypatch):
    """At micro scale the dosed and fp32 engines sample alike, so the end-to-end test cannot tell the
    two passes apart: here each engine scores differently and the record must say which was which."""
    from types import SimpleNamespace

    from experiments import undosed

    cfg = SimpleNamespace(global_steps=2, seed=1)
    monkeypatch.setattr(undosed.rundir, "read_config", lambda d, cls: SimpleNamespace(config=cfg))
    monkeypatch.setattr(undosed, "_final_engine", lambda d, c, *, dosed: "dosed" if dosed else "fp32")
    scores = {"dosed": 0.3, "fp32": 0.9}
    paths = []

    def score(d, c, engine, path, n, pool):
        paths.append((engine, path.name, n))
        return scores[engine]

    monkeypatch.setattr(undosed, "_score_final", score)
    rec = undosed.resample_cell(tmp_path / "cell-s1", 4)
    assert rec == {"step": 2, "seed": 1, "samples": 4, "served": 0.3, "undosed": 0.9}
    assert paths == [("dosed", "step_2-served-k4.jsonl", 4), ("fp32", "step_2-undosed-k4.jsonl", 4)]


def test_served_table_pairs_each_arm_with_grpo_per_seed():
    from experiments import study

    cfgs = study_grid.cells("strong", pattern="strong-router-30x-*")
    rows = {}
    for name, cfg in cfgs.items():
        r3 = study_grid.arm_of(cfg) == "grpo-r3"
        rows[name] = {"seed": cfg.seed, "served": 0.5 + 0.01 * cfg.seed + 0.02 * r3, "undosed": 0.9 + 0.01 * r3}
    text = study.served_table(cfgs, rows, 8)
    grpo, r3 = (line for line in text.splitlines() if line.startswith("| strong-router-30x"))
    assert grpo.split(" | ")[1:4] == ["grpo", "3", "51.0 ± 0.6"] and grpo.endswith("|  |  |  |")
    # per seed: served +2, undosed +1, cost +1 with no spread (the seed effect cancels in the pair)
    assert r3.split(" | ")[1:3] == ["grpo-r3", "3"] and r3.endswith("| 2.0 ± 0.0 | 1.0 ± 0.0 | 1.0 ± 0.0 |")


def test_routing_layers_figure_on_fixture_runs(tmp_path):
    from plots import figures_study
    from plots.runs import discover
    from plots.style import paper_style, save

    runs = discover(_study_root(tmp_path / "runs")).runs
    with paper_style():
        fig = figures_study.routing_layers_figure(runs)
        paths = save(fig, tmp_path / "figures", "study_routing_layers")
    lines = {c.get_label(): c.lines[0].get_ydata() for c in fig.axes[0].containers}
    assert len(lines) == 2  # one per condition: its native (GRPO) arm only, not the R3 arm
    # per layer, the native arm's mean over seeds: k3 1e-4 and 3e-4 (bf16), 1e-3 and 2e-3 (fp8all)
    by_dose = sorted(lines.values(), key=lambda y: y[0])
    assert list(by_dose[0]) == pytest.approx([2e-3 * (layer + 1) for layer in range(3)])
    assert list(by_dose[1]) == pytest.approx([1.5e-2 * (layer + 1) for layer in range(3)])
    assert paths[0].stat().st_size > 10_000


def test_study_zoo_plans_share_the_control_and_use_the_study_ladder(tmp_path):
    from experiments import doses

    learn = study_grid.cells("learn", zoo_dir=tmp_path)
    assert sorted(learn) == [f"learn-fp32-grpo-s{s}" for s in range(3)]
    study = study_grid.cells("study", zoo_dir=tmp_path)
    assert len(study) == 4 * 2 * 3
    c = study["study-router-3x-grpo-r3-s1"]
    assert c.rollout_router_noise == doses.NOISE_STDS["study"]["router-3x"] and c.replay and c.seed == 1
    assert (c.zoo_size, c.task_difficulty, c.max_new_tokens, c.global_steps) == ("study", 5, 256, 50)
    # the control and every dosed cell differ only in the dose, the arm, the name and the seed
    a, b = learn["learn-fp32-grpo-s1"].to_dict(), c.to_dict()
    assert {k for k in a if a[k] != b[k]} == {"name", "replay", "rollout_router_noise"}
    mini = study_grid.cells("ministeps", zoo_dir=tmp_path)
    assert {x.mini_steps for x in mini.values()} == {8}
    assert mini["ministeps-router-10x-gspo-r3-s0"].algorithm == "gspo"
    assert {x.tis for x in study_grid.cells("studytis", zoo_dir=tmp_path).values()} == {True}


def test_an_uncalibrated_noise_dose_says_which_levels_the_zoo_has(tmp_path):
    p = study_grid._Plan(name="x", zoo_size="micro", levels=("router-3x",), arms=("grpo",), seeds=(0,), lrs=(1e-4,))
    with pytest.raises(ValueError, match=r"levels of zoo 'micro' \[.*'fp32'.*\]"):
        study_grid.cell(p, level="router-3x", arm="grpo", seed=0, lr=1e-4, zoo_dir=tmp_path)
