"""Fixture run directories for the plots tests, written in the docs/run_format.md format.

(A uniquely named module, not conftest.py, so `from plots_fixtures import ...` cannot pick up
another package's conftest.)

The eval averages are chosen by hand so the expected table numbers follow from them
(see the EXPECTED dict): a collapsed run, a run with a missing evaluation point, a run still
in progress (no manifest, a half-written last line), two seeds of one cell, a multi-mini-step
setting, a `paper`-preset run on the paper's benchmarks, and static measurements at two
rollout precisions.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from experiments.config import RunConfig

PAPER_BENCH = ("aime24", "aime25", "amc23", "math500", "math500_l5")

# cell name -> what the tables must show (hand-derived from the averages below).
EXPECTED = {
    # best 0.50 at 10; from step 20 the average stays below 0.5 x 0.50 = 0.25 -> collapse 20.
    "sft-single-grpo": {"best_step": 10, "avg": 50.0, "collapse": 20},
    # step 15 missing; 0.55 at 25 and 35 -> earliest, 25; never below half the best.
    "sft-single-grpo-r3": {"best_step": 25, "avg": 55.0, "collapse": None},
    # running: eval up to 20 (steps 21-23 in metrics, line 24 torn); best 0.47 at 20.
    "sft-single-grpo-tis": {"best_step": 20, "avg": 47.0, "collapse": None},
    # two seeds: mean of [.40, .50, .60] and [.40, .60, .40] = [.40, .55, .50] -> best step 5.
    "sft-single-grpo-tis-r3": {"best_step": 5, "avg": 55.0, "collapse": None},
    "sft-multi-gspo": {"best_step": 10, "avg": 30.0, "collapse": None},
    "sft-multi-gspo-r3": {"best_step": 15, "avg": 35.0, "collapse": None},
}


def _metrics_line(step: int, *, cfg: RunConfig, collapsed_from: int | None) -> dict:
    late = collapsed_from is not None and step >= collapsed_from
    replay = cfg.replay
    # Distinct, smooth curves per cell (so the figures can be read), same for every seed but one.
    k = 1.0 + 0.15 * cfg.tis + 0.1 * (cfg.algorithm == "gspo") + 0.05 * cfg.seed
    return {
        "step": step,
        "time": 1.7e9 + step,
        "rollout/reward_mean": 0.5,
        "rollout/response_len_mean": k * (30.0 + (0.8 if replay else 0.4) * step) + (25.0 if late else 0.0),
        "actor/grad_norm": k * (0.3 if replay else 0.6) * (20.0 if late else 1.0),
        "actor/entropy": k * (0.8 + (0.01 if replay else -0.005) * step),
        "mismatch/k3_kl": k * (5e-5 if replay else 4e-4) * (1 + 0.02 * step),
        "mismatch/extreme_frac@2": 0.0 if replay else 1e-4,
        "routing/pair_disagreement": 0.035,
        "routing/token_disagreement": 0.12,
    }


def write_run(
    root: Path,
    cfg: RunConfig,
    avgs: dict[int, float],
    *,
    last_step: int,
    complete: bool = True,
    torn_tail: bool = False,
    collapsed_from: int | None = None,
    dir_name: str | None = None,
) -> Path:
    """One cell directory; eval points are exactly the keys of `avgs`."""
    d = root / (dir_name or cfg.name)
    d.mkdir(parents=True)
    cfg.save(d / "config.json")
    lines = [json.dumps(_metrics_line(s, cfg=cfg, collapsed_from=collapsed_from)) for s in range(1, last_step + 1)]
    if torn_tail:
        lines.append('{"step": ' + str(last_step + 1) + ', "time": 17')
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    evals = []
    for step, avg in sorted(avgs.items()):
        benches = cfg.eval_benchmarks
        if benches == ("synthetic",):
            scores = {"synthetic": avg}
        else:  # spread around the average, mean exactly avg
            offsets = [(-1) ** i * 0.01 * (i + 1) for i in range(len(benches))]
            offsets[-1] = -sum(offsets[:-1])
            scores = {b: avg + o for b, o in zip(benches, offsets)}
        evals.append(
            json.dumps(
                {
                    "step": step,
                    "time": 1.7e9 + step,
                    "scores": scores,
                    "avg": avg,
                    "n_samples": 1,
                    "template": "fixture",
                }
            )
        )
    (d / "eval.jsonl").write_text("\n".join(evals) + "\n")
    if complete:
        manifest = {"name": cfg.name, "status": "complete", "steps": last_step, "finished": 1.7e9, "versions": {}}
        (d / "manifest.json").write_text(json.dumps(manifest))
    return d


def _static_arm(kl: float, f2: float, per_layer: list[float] | None, spread: float) -> dict:
    tau = [1.25 + 0.25 * i for i in range(16)]  # r3.metrics.extreme_token_curve needs tau > 1
    f = [f2 * math.exp(-(t - 2.0) / spread) for t in tau]
    f = [v if v > 1e-7 else 0.0 for v in f]
    edges = [-1.5 + 0.1 * i for i in range(31)]
    centers = [(a + b) / 2 for a, b in zip(edges, edges[1:])]
    counts = [int(1e5 * math.exp(-abs(c) / (0.05 * spread))) for c in centers]
    return {
        "k3_kl": kl,
        "extreme_frac@2": f2,
        "routing_pair_disagreement": None if per_layer is None else sum(per_layer) / len(per_layer),
        "routing_token_disagreement": None if per_layer is None else 0.12,
        "per_layer_disagreement": per_layer,
        "F_curve": {"tau": tau, "F": f},
        "log_ratio_hist": {"edges": edges, "counts": counts},
        "tokens": 20000,
    }


STATIC = {
    "bf16": {
        "moe": (5.5e-5, 0.0, [0.01, 0.02, 0.015, 0.01]),
        "moe_r3": (3.5e-5, 0.0, [0.0] * 4),
        "dense": (2.3e-5, 0.0, None),
    },
    "fp8": {
        "moe": (3.8e-4, 1.7e-4, [0.03, 0.04, 0.035, 0.03]),
        "moe_r3": (5.2e-5, 1e-6, [0.0] * 4),
        "dense": (3.0e-5, 0.0, None),
    },
}


def write_static(root: Path) -> None:
    for precision, arms in STATIC.items():
        d = root / "static" / precision
        d.mkdir(parents=True)
        data = {"precision": precision, "tokens": 20000}
        for arm, (kl, f2, per_layer) in arms.items():
            data[arm] = _static_arm(kl, f2, per_layer, spread=1.0 if arm == "moe" else 0.3)
        (d / "static.json").write_text(json.dumps(data))


def tiny_cfg(name: str, **kw) -> RunConfig:
    return RunConfig(name=name, preset="tiny", rollout_precision="fp8", global_steps=40, **kw)


def build_runs_root(root: Path) -> Path:
    write_run(
        root,
        tiny_cfg("sft-single-grpo"),
        dict(zip(range(0, 45, 5), [0.40, 0.45, 0.50, 0.48, 0.20, 0.15, 0.10, 0.12, 0.10])),
        last_step=40,
        collapsed_from=20,
    )
    write_run(
        root,
        tiny_cfg("sft-single-grpo-r3", replay=True),
        {0: 0.40, 5: 0.44, 10: 0.47, 20: 0.52, 25: 0.55, 30: 0.53, 35: 0.55, 40: 0.54},
        last_step=40,
    )
    write_run(
        root,
        tiny_cfg("sft-single-grpo-tis", tis=True),
        {0: 0.40, 5: 0.42, 10: 0.46, 15: 0.45, 20: 0.47},
        last_step=23,
        complete=False,
        torn_tail=True,
    )
    for seed, avgs in ((0, [0.40, 0.50, 0.60]), (1, [0.40, 0.60, 0.40])):
        cfg = tiny_cfg(f"sft-single-grpo-tis-r3-s{seed}", tis=True, replay=True, seed=seed)
        write_run(root, cfg, dict(zip((0, 5, 10), avgs)), last_step=10)
    write_run(
        root,
        tiny_cfg("sft-multi-gspo", algorithm="gspo", mini_steps=8),
        {0: 0.25, 5: 0.28, 10: 0.30, 15: 0.29},
        last_step=15,
    )
    write_run(
        root,
        tiny_cfg("sft-multi-gspo-r3", algorithm="gspo", mini_steps=8, replay=True),
        {0: 0.25, 5: 0.30, 10: 0.33, 15: 0.35},
        last_step=15,
    )
    paper_cfg = RunConfig(
        name="paper-sft-single-grpo",
        preset="paper",
        lr=3e-6,
        global_steps=180,
        eval_benchmarks=PAPER_BENCH,
        rollout_precision="bf16",
    )
    write_run(root, paper_cfg, {0: 0.45, 5: 0.50, 10: 0.48}, last_step=10)
    write_static(root)
    return root
