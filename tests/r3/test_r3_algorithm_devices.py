"""r3.algorithm.policy_update with engine tensors on another device, at another temperature, and
with micro-batches of uneven token counts (DESIGN.md invariants 6 and 7).

A GPU engine keeps its tensors on cuda:LOCAL_RANK; an algorithm step that mixes them with host
tensors raises there, on the first step of the first GPU run. The `meta` device refuses the same
mixing on CPU, so a stand-in engine whose tensors live on `meta` catches it here.
"""

from __future__ import annotations

import copy

import pytest
import torch
from r3_tiny_models import tiny_moe

from experiments.config import RunConfig
from r3 import algorithm
from r3.algorithm import Batch, policy_update
from r3.engines.base import LogprobResult, SamplingParams, TrainBatch
from r3.engines.hf.rollout import HFRolloutEngine
from r3.engines.hf.train import HFTrainEngine
from r3.replay import ReplayMode
from r3.trace import pad_traces

META = torch.device("meta")
B, S, L, K, E = 4, 9, 2, 2, 8


class MetaEngine:
    """Test double of a TrainEngine on another device: results and loss inputs on `meta`, the
    loss called on two micro-batches (a slice and an index tensor, as the real engines do)."""

    is_moe = True
    device = META

    def __init__(self, *, whole: bool = True) -> None:
        self.train_step_sees_whole_batch = whole
        self.calls: list[str] = []

    def compute_logprobs(self, batch: TrainBatch, *, routing=ReplayMode.OFF, with_entropy=False) -> LogprobResult:
        self.calls.append(f"logprobs:{routing.name}")
        b, s = batch.input_ids_BS.shape
        ids = torch.empty(b, s - 1, L, K, dtype=torch.int64, device=META) if routing is ReplayMode.RECORD else None
        ent = torch.empty(b, s - 1, device=META) if with_entropy else None
        return LogprobResult(logp_BT=torch.empty(b, s - 1, device=META), entropy_BT=ent, expert_ids_BTLK=ids)

    def train_step(self, batch: TrainBatch, loss_fn, *, routing=ReplayMode.OFF) -> dict:
        self.calls.append(f"train:{routing.name}")
        b, s = batch.input_ids_BS.shape
        weight = torch.zeros((), device=META, requires_grad=True)
        sums: dict = {}
        for rows in (slice(0, 1), torch.arange(1, b)):
            n = 1 if isinstance(rows, slice) else len(rows)
            logp = torch.empty(n, s - 1, device=META) * weight
            loss, metrics = loss_fn(logp, torch.empty(n, s - 1, device=META), rows)
            loss.backward()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
        assert weight.grad is not None and weight.grad.device == META
        return {**sums, "actor/grad_norm": torch.empty((), device=META), "actor/loss": torch.empty((), device=META)}


def _host_batch() -> Batch:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 60, (B, S), generator=g)
    am = torch.ones(B, S, dtype=torch.long)
    am[1, 6:] = 0
    mask = am[:, 1:].float()
    mask[:, :3] = 0
    trace = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(B * (S - 1) * L)]).view(B, S - 1, L, K)
    tb = TrainBatch(input_ids_BS=ids, attention_mask_BS=am, loss_mask_BT=mask, expert_ids_BTLK=trace)
    return Batch(train=tb, infer_logp_BT=-torch.rand(B, S - 1, generator=g), rewards_B=torch.tensor([1.0, 0, 0, 1]))


@pytest.mark.parametrize("mini_steps", [1, 2])
@pytest.mark.parametrize("replay", [False, True])
@pytest.mark.parametrize(("algo", "tis"), [("grpo", False), ("grpo", True), ("gspo", False)])  # GSPO + TIS: refused
def test_policy_update_runs_with_engine_tensors_on_another_device(mini_steps, replay, algo, tis):
    s = RunConfig(name="dev", group_size=2, mini_steps=mini_steps, tis=tis, replay=replay, algorithm=algo)
    eng = MetaEngine()
    m = policy_update(s, eng, _host_batch())
    fused = mini_steps == 1 and replay  # pi_old from the update's own forward
    assert m["actor/fused_old_logprob"] == float(fused)
    assert eng.calls.count("logprobs:REPLAY") == (0 if fused or not replay else 1)
    assert eng.calls.count("logprobs:RECORD") == 1  # the routing probe (R3) or the pi_old forward
    for k, v in m.items():  # metrics stay on the engine's device until logged (no host copy in the step)
        if isinstance(v, torch.Tensor):
            assert v.device == META, k
    assert "mismatch/k3_kl" in m and "routing/pair_disagreement" in m


def test_fused_pi_old_refuses_rows_seen_twice_instead_of_once():
    """A loss that saw B rows, one of them twice, has still missed one: counted by distinct rows."""

    class Twice(MetaEngine):
        def train_step(self, batch, loss_fn, *, routing=ReplayMode.OFF):
            b, s = batch.input_ids_BS.shape
            for rows in (torch.tensor([0, 1]), torch.tensor([1, 2])):  # row 1 twice, row 3 never
                loss_fn(torch.empty(2, s - 1, device=META), None, rows)
            return {"actor/grad_norm": torch.empty((), device=META)}

    s = RunConfig(name="dev", group_size=2, replay=True)
    with pytest.raises(RuntimeError, match=r"never saw rows \[3\] of 4 \(it saw 3 distinct rows"):
        policy_update(s, Twice(), _host_batch())


def _fp32_rollout(model, temperature: float) -> Batch:
    eng = HFRolloutEngine(copy.deepcopy(model), precision="fp32", seed=0)
    prompts = [[5, 6, 7, 8], [5, 6, 7, 8], [9, 10, 11], [9, 10, 11]]
    samples = eng.generate(prompts, SamplingParams(max_new_tokens=8, temperature=temperature), capture_routing=True)
    seqs = [s.prompt_ids + s.response_ids for s in samples]
    S_ = max(len(q) for q in seqs)
    ids, am = torch.zeros(len(seqs), S_, dtype=torch.long), torch.zeros(len(seqs), S_, dtype=torch.long)
    mask, infer = torch.zeros(len(seqs), S_ - 1), torch.zeros(len(seqs), S_ - 1)
    for b, (smp, q) in enumerate(zip(samples, seqs)):
        ids[b, : len(q)], am[b, : len(q)] = torch.tensor(q), 1
        p = len(smp.prompt_ids)
        mask[b, p - 1 : len(q) - 1] = 1
        infer[b, p - 1 : len(q) - 1] = smp.logprobs_R
    trace = pad_traces([smp.expert_ids_TLK for smp in samples], S_ - 1)
    tb = TrainBatch(input_ids_BS=ids, attention_mask_BS=am, loss_mask_BT=mask, expert_ids_BTLK=trace)
    return Batch(train=tb, infer_logp_BT=infer, rewards_B=torch.tensor([1.0, 0.0, 0.0, 1.0]))


@pytest.mark.parametrize("replay", [False, True])
def test_fp32_trainer_scores_an_fp32_rollout_at_its_temperature(replay, monkeypatch):
    """Same weights, same numerics, T = 0.7: pi_old equals pi_infer (k3 KL at the fp32 floor).
    Scoring at temperature 1 instead (the trainer ignoring the sampler's temperature) gives a KL
    orders of magnitude larger: the check below is not 0 == 0."""
    model = tiny_moe(seed=3)
    batch = _fp32_rollout(model, 0.7)
    s = RunConfig(name="temp", group_size=2, temperature=0.7, replay=replay, lr=1e-3)
    m = algorithm.to_host(policy_update(s, HFTrainEngine(copy.deepcopy(model), lr=1e-3), batch))
    assert m["mismatch/k3_kl"] < 1e-6
    wrong = RunConfig(name="temp", group_size=2, temperature=1.0, replay=replay, lr=1e-3)
    m1 = algorithm.to_host(policy_update(wrong, HFTrainEngine(copy.deepcopy(model), lr=1e-3), batch))
    assert m1["mismatch/k3_kl"] > 1e-4


def test_training_rollouts_refuse_truncation_and_greedy_decoding():
    with pytest.raises(ValueError, match="top_p must be 1 for training rollouts"):
        RunConfig(name="x", top_p=0.9)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        RunConfig(name="x", temperature=0.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        TrainBatch(
            input_ids_BS=torch.zeros(1, 2, dtype=torch.long),
            attention_mask_BS=torch.ones(1, 2),
            loss_mask_BT=torch.ones(1, 1),
            temperature=0.0,
        )


def test_actor_metrics_are_token_means_however_rows_are_micro_batched():
    """Two mini-steps (the second sees a moved policy: ratios != 1, clipping) on rows of different
    response lengths: actor/* metrics with one micro-batch per row equal the whole batch's (token
    means of the mini-batch, not row-weighted means of micro-batch means)."""
    model = tiny_moe(seed=1)
    rollout = _fp32_rollout(model, 1.0)
    # the second mini-batch (the one with a moved policy) holds the rows of uneven lengths
    order = torch.tensor([2, 3, 0, 1])
    batch = Batch(
        train=rollout.train.rows(order), infer_logp_BT=rollout.infer_logp_BT[order], rewards_B=rollout.rewards_B
    )
    lens = batch.train.loss_mask_BT.sum(1).tolist()
    assert lens[2] != lens[3], lens  # uneven token counts, or the check below could not fail
    s = RunConfig(name="mb", group_size=2, mini_steps=2, lr=5e-2)
    out = {}
    for mb in (0, 1):
        eng = HFTrainEngine(copy.deepcopy(model), lr=s.lr, micro_batch=mb)
        out[mb] = algorithm.to_host(policy_update(s, eng, batch))
    keys = [k for k in out[0] if k.startswith("actor/") and k not in ("actor/grad_norm", "actor/loss")]
    assert "actor/ratio_mean" in keys and out[0]["actor/ratio_mean"] != 1.0
    for k in keys:
        assert out[1][k] == pytest.approx(out[0][k], rel=1e-3, abs=1e-6), k  # micro-batch shapes: fp32 rounding
