"""r3.algorithm.policy_update: the single-mini-step update takes pi_old from its own forward
(one forward fewer) and must give exactly what the separate no-grad pi_old forward gives."""

from __future__ import annotations

import copy

import pytest
import torch
from r3_tiny_models import tiny_dense, tiny_moe

from experiments.config import RunConfig
from r3 import algorithm
from r3.algorithm import Batch, policy_update
from r3.engines.base import SamplingParams, TrainBatch
from r3.engines.hf.rollout import HFRolloutEngine
from r3.engines.hf.train import HFTrainEngine
from r3.trace import pad_traces

PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16], [17, 18]]
GROUP = 2


def _batch(model) -> Batch:
    """A rollout of the model in bf16 (a real mismatch against the fp32 trainer), two groups of 2."""
    eng = HFRolloutEngine(copy.deepcopy(model), precision="bf16", seed=0)
    samples = eng.generate(PROMPTS, SamplingParams(max_new_tokens=6, temperature=1.0), capture_routing=True)
    seqs = [s.prompt_ids + s.response_ids for s in samples]
    S = max(len(q) for q in seqs)
    B = len(seqs)
    ids, attn = torch.zeros(B, S, dtype=torch.long), torch.zeros(B, S, dtype=torch.long)
    loss_mask, infer = torch.zeros(B, S - 1), torch.zeros(B, S - 1)
    for b, (s, q) in enumerate(zip(samples, seqs)):
        ids[b, : len(q)] = torch.tensor(q)
        attn[b, : len(q)] = 1
        p = len(s.prompt_ids)
        loss_mask[b, p - 1 : len(q) - 1] = 1
        infer[b, p - 1 : len(q) - 1] = s.logprobs_R.float()
    routing = pad_traces([s.expert_ids_TLK for s in samples], S - 1) if samples[0].expert_ids_TLK is not None else None
    tb = TrainBatch(input_ids_BS=ids, attention_mask_BS=attn, loss_mask_BT=loss_mask, expert_ids_BTLK=routing)
    return Batch(train=tb, infer_logp_BT=infer, rewards_B=torch.tensor([1.0, 0.0, 0.0, 1.0]))


def _settings(**kw) -> RunConfig:
    return RunConfig(name="alg", group_size=GROUP, lr=1e-2, **kw)


def _run(model, batch, s, *, fuse: bool, micro_batch: int = 0, monkeypatch) -> tuple[dict, dict]:
    eng = HFTrainEngine(copy.deepcopy(model), lr=s.lr, micro_batch=micro_batch)
    monkeypatch.setattr(algorithm, "_fuses_old", lambda *a: fuse)
    m = algorithm.to_host(policy_update(s, eng, batch))
    return m, {k: v.clone() for k, v in eng.model.state_dict().items()}


@pytest.mark.parametrize(
    ("kind", "kw", "micro_batch"),
    [
        ("moe", {"replay": True, "tis": True}, 0),
        ("moe", {"replay": True}, 3),  # micro-batches: pi_old assembled from each one's forward
        ("dense", {"tis": True}, 0),
    ],
)
def test_fused_pi_old_equals_the_separate_forward(kind, kw, micro_batch, monkeypatch):
    model = tiny_moe(seed=1) if kind == "moe" else tiny_dense(seed=1)
    batch = _batch(model)
    s = _settings(**kw)
    fused_m, fused_w = _run(model, batch, s, fuse=True, micro_batch=micro_batch, monkeypatch=monkeypatch)
    sep_m, sep_w = _run(model, batch, s, fuse=False, micro_batch=micro_batch, monkeypatch=monkeypatch)
    assert fused_m["actor/fused_old_logprob"] == 1.0 and sep_m["actor/fused_old_logprob"] == 0.0
    assert "time/old_logprob" not in fused_m and "time/old_logprob" in sep_m
    assert fused_m["mismatch/k3_kl"] > 0  # the bf16 rollout really differs: the equality below is not 0 == 0
    skip = ("time/", "actor/fused_old_logprob")
    assert {k: v for k, v in fused_m.items() if not k.startswith(skip)} == pytest.approx(
        {k: v for k, v in sep_m.items() if not k.startswith(skip)}, rel=1e-6, abs=1e-9
    )
    for name in sep_w:
        torch.testing.assert_close(fused_w[name], sep_w[name], rtol=1e-6, atol=1e-8, msg=name)


def test_when_pi_old_is_fused():
    moe, dense = HFTrainEngine(tiny_moe(), lr=1e-3), HFTrainEngine(tiny_dense(), lr=1e-3)
    moe.train_step_sees_whole_batch = dense.train_step_sees_whole_batch = True
    assert algorithm._fuses_old(_settings(replay=True), moe, True)
    assert algorithm._fuses_old(_settings(), dense, False)
    assert not algorithm._fuses_old(_settings(), moe, True)  # native MoE: that forward records routing
    assert not algorithm._fuses_old(_settings(replay=True, mini_steps=2), moe, True)  # policy moves between
    moe.train_step_sees_whole_batch = False  # data parallel: this rank's loss sees its rows only
    assert not algorithm._fuses_old(_settings(replay=True), moe, True)


def test_routing_probe_off_drops_the_metric_and_the_forward(monkeypatch):
    model = tiny_moe(seed=1)
    batch = _batch(model)
    on, _ = _run(model, batch, _settings(replay=True), fuse=True, monkeypatch=monkeypatch)
    off, _ = _run(model, batch, _settings(replay=True, routing_probe=False), fuse=True, monkeypatch=monkeypatch)
    assert "routing/pair_disagreement" in on and "time/routing_probe" in on
    assert not any(k.startswith(("routing/", "time/routing_probe")) for k in off)


def test_fused_pi_old_refuses_an_engine_that_skipped_rows(monkeypatch):
    model = tiny_moe(seed=1)
    batch = _batch(model)
    eng = HFTrainEngine(copy.deepcopy(model), lr=1e-3)
    eng.train_step_sees_whole_batch = True
    real_step = eng.train_step

    def drops_a_row(b, loss_fn, *, routing):  # a data-parallel rank's view, wrongly declared whole
        return real_step(algorithm.slice_batch(b, slice(0, 3)), loss_fn, routing=routing)

    monkeypatch.setattr(eng, "train_step", drops_a_row)
    with pytest.raises(RuntimeError, match=r"never saw rows \[3\] of 4"):
        policy_update(_settings(replay=True), eng, batch)
