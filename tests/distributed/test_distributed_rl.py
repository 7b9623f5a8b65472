"""One driver per run: a 3-step RL cell (megatron trainer, R3 + TIS) through experiments.distributed
on 2 gloo ranks writes one run directory whose metrics.jsonl equals the 1-rank run of the same cell,
step for step; then a resume on 2 ranks from the step-2 checkpoint (every rank loads its own shard)
rewrites step 3 identically, with no gap or repeat. Two layouts of the 2 ranks:

- EP = 2, DP = 2: each rank trains on half the rows and holds half of every layer's experts;
- PP = 2 (DP = 1): the micro zoo's 2 MoE layers split 1 + 1 over two pipeline stages (megatron's
  1F1B schedule, 4 micro-batches of 4 rows), each stage replaying its own layer's rollout routing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from dist_helpers import torchrun

from experiments.config import RunConfig

pytestmark = [pytest.mark.distributed, pytest.mark.megatron, pytest.mark.slow]  # torchrun launches: ~10-15 s each
WORKER = Path(__file__).with_name("rl_worker.py")
REL_TOL = 1e-5  # measured: max relative difference 1.1e-6 (EP/DP) and 8.4e-7 (PP), actor/grad_norm, fp32
PP_MICRO_BATCH = 4  # 16 rows per step: 4 micro-batches in flight through the 2 stages


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


def _run(tmp: Path, cfg: RunConfig, nproc: int) -> Path:
    cfg.save(tmp / f"{cfg.name}.json")
    torchrun(nproc, WORKER, str(tmp / f"{cfg.name}.json"), str(tmp / cfg.name))
    return tmp / cfg.name


def _lines(p: Path) -> list[dict]:
    return [json.loads(x) for x in p.read_text().splitlines()]


# How pi_old was obtained differs by layout, not its value: one rank takes it from the single
# mini-step's own forward (r3.algorithm fused pi_old: no time/old_logprob), DP ranks and pipeline
# stages run the separate forward (each rank's loss sees only its rows; only the last stage has a loss).
LAYOUT_KEYS = ("time", "actor/fused_old_logprob")


def _assert_close(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for x, y in zip(a, b):
        assert {k for k in x if not k.startswith(LAYOUT_KEYS)} == {k for k in y if not k.startswith(LAYOUT_KEYS)}
        for k in x:
            if not k.startswith(LAYOUT_KEYS):
                assert abs(x[k] - y[k]) <= REL_TOL * max(1.0, abs(x[k])), (x["step"], k, x[k], y[k])


def _check_two_rank_run(one: Path, two: Path, tmp: Path) -> None:
    """`two` (2 ranks) wrote one run equal to `one` (1 rank); a requeue after step 2 resumes equal."""
    first, second = _lines(one / "metrics.jsonl"), _lines(two / "metrics.jsonl")
    _assert_close(first, second)  # exactly one line per step: the followers write nothing
    assert first[0]["actor/grad_norm"] > 0
    assert json.loads((two / "manifest.json").read_text())["steps"] == 3
    shards = sorted(p.name for p in (two / "checkpoints" / "step_2" / "train").iterdir())
    assert shards == ["megatron_train_engine.rank00000-of-00002.pt", "megatron_train_engine.rank00001-of-00002.pt"]

    # requeue after step 2: drop what step 3 wrote, resume on 2 ranks from the step-2 checkpoint
    (two / "manifest.json").unlink()
    shutil.rmtree(two / "checkpoints" / "step_3")
    torchrun(2, WORKER, str(tmp / f"{two.name}.json"), str(two))
    _assert_close(second, _lines(two / "metrics.jsonl"))
    assert "resumed from checkpoint step 2" in (two / "log.txt").read_text()


def test_ep_dp_ranks_write_one_run_equal_to_one_rank(micro_zoo, tmp_path):
    pytest.importorskip("megatron.core")
    one = _run(tmp_path, _cfg(micro_zoo, "rl-1"), 1)
    two = _run(tmp_path, _cfg(micro_zoo, "rl-ep2", train_expert_parallel=2), 2)
    _check_two_rank_run(one, two, tmp_path)


def test_pipeline_stages_write_one_run_equal_to_one_rank(micro_zoo, tmp_path):
    pytest.importorskip("megatron.core")
    one = _run(tmp_path, _cfg(micro_zoo, "rl-1", train_micro_batch=PP_MICRO_BATCH), 1)
    cfg = _cfg(micro_zoo, "rl-pp2", train_pipeline_parallel=2, train_micro_batch=PP_MICRO_BATCH)
    two = _run(tmp_path, cfg, 2)
    # the ranks really were two pipeline stages: each shard holds one decoder layer (local index 0),
    # the embedding on the first stage, the output layer on the last
    train = two / "checkpoints" / "step_2" / "train"
    stages = [torch.load(train / f"megatron_train_engine.rank0000{r}-of-00002.pt", weights_only=True) for r in (0, 1)]
    names = [set(s["model"]) for s in stages]
    assert "embedding.word_embeddings.weight" in names[0] and "output_layer.weight" not in names[0]
    assert "output_layer.weight" in names[1] and "embedding.word_embeddings.weight" not in names[1]
    assert all({k.split(".")[2] for k in n if k.startswith("decoder.layers.")} == {"0"} for n in names)
    _check_two_rank_run(one, two, tmp_path)
