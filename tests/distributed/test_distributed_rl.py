"""One driver per run: a 3-step RL cell (megatron trainer, R3 + TIS) on 2 gloo ranks (EP = 2,
DP = 2) through experiments.distributed writes one run directory whose metrics.jsonl equals the
1-rank run of the same cell, step for step; then a resume on 2 ranks from the step-2 checkpoint
(every rank loads its own shard) rewrites step 3 identically, with no gap or repeat."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from dist_helpers import torchrun

from experiments.config import RunConfig

pytestmark = [pytest.mark.distributed, pytest.mark.megatron, pytest.mark.slow]  # torchrun launches: ~1-2 min
WORKER = Path(__file__).with_name("rl_worker.py")
REL_TOL = 1e-5  # measured: max relative difference 1.1e-6 (actor/grad_norm), fp32 rollout


def _cfg(zoo: Path, name: str, **kw) -> RunConfig:
    return RunConfig(
        name=name,
        zoo_dir=str(zoo),
        model="sft",
        global_steps=3,
        prompts_per_step=4,
        group_size=4,
        max_new_tokens=12,
        eval_every=3,
        eval_max_problems=4,
        checkpoint_every=2,
        lr=1e-3,
        rollout_precision="fp32",
        max_sampling_rounds=2,
        train_engine="megatron",
        replay=True,
        tis=True,
        **kw,
    )


def _lines(p: Path) -> list[dict]:
    return [json.loads(x) for x in p.read_text().splitlines()]


# How pi_old was obtained differs by layout, not its value: one rank takes it from the single
# mini-step's own forward (r3.algorithm fused pi_old: no time/old_logprob), DP ranks run the separate
# forward (each rank's loss sees only its rows).
LAYOUT_KEYS = ("time", "actor/fused_old_logprob")


def _assert_close(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for x, y in zip(a, b):
        assert {k for k in x if not k.startswith(LAYOUT_KEYS)} == {k for k in y if not k.startswith(LAYOUT_KEYS)}
        for k in x:
            if not k.startswith(LAYOUT_KEYS):
                assert abs(x[k] - y[k]) <= REL_TOL * max(1.0, abs(x[k])), (x["step"], k, x[k], y[k])


def test_two_ranks_write_one_run_equal_to_one_rank(micro_zoo, tmp_path):
    pytest.importorskip("megatron.core")
    runs = {}
    for nproc, ep in ((1, 1), (2, 2)):
        cfg = _cfg(micro_zoo, f"rl-{nproc}", train_expert_parallel=ep)
        cfg.save(tmp_path / f"{cfg.name}.json")
        torchrun(nproc, WORKER, str(tmp_path / f"{cfg.name}.json"), str(tmp_path / cfg.name))
        runs[nproc] = tmp_path / cfg.name
    one, two = _lines(runs[1] / "metrics.jsonl"), _lines(runs[2] / "metrics.jsonl")
    _assert_close(one, two)  # exactly one line per step: the followers write nothing
    assert one[0]["actor/grad_norm"] > 0
    assert json.loads((runs[2] / "manifest.json").read_text())["steps"] == 3
    shards = sorted(p.name for p in (runs[2] / "checkpoints" / "step_2" / "train").iterdir())
    assert shards == ["megatron_train_engine.rank00000-of-00002.pt", "megatron_train_engine.rank00001-of-00002.pt"]

    # requeue after step 2: drop what step 3 wrote, resume on 2 ranks from the step-2 checkpoint
    d = runs[2]
    (d / "manifest.json").unlink()
    shutil.rmtree(d / "checkpoints" / "step_3")
    torchrun(2, WORKER, str(tmp_path / "rl-2.json"), str(d))
    again = _lines(d / "metrics.jsonl")
    _assert_close(two, again)
    assert "resumed from checkpoint step 2" in (d / "log.txt").read_text()
