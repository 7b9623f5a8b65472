"""Dynamic sampling bookkeeping, batch alignment and mini-batch splitting (no model needed)."""

from __future__ import annotations

import pytest
import torch

from experiments import rollout, task
from r3.engines.base import RolloutSample, SamplingParams


class FakeEngine:
    """Returns response '<answer>' or a wrong one following a per-call script; routing rows [T, 2, 2]."""

    def __init__(self, script):
        self.script = list(script)  # per call: list of booleans (right?) per sample
        self.seeds = []

    def generate(self, prompts, params, *, capture_routing=False):
        self.seeds.append(params.seed)
        right = self.script.pop(0)
        out = []
        for p, ok in zip(prompts, right):
            resp = [1, 2] if ok else [3]
            T = len(p) + len(resp) - 1
            ids = torch.arange(T * 4).view(T, 2, 2) % 8 if capture_routing else None
            out.append(RolloutSample(prompt_ids=list(p), response_ids=resp, logprobs_R=torch.full((len(resp),), -0.5),
                                     expert_ids_TLK=ids, finish_reason="stop"))
        return out


def _collect(engine, *, prompts=2, G=2, rounds=4, dynamic=True):
    stream = task.TrainStream(seed=0, difficulty=2)
    return rollout.collect(
        engine, lambda text: [5] * (len(text) % 3 + 1), lambda ids: ["ok" if i == [1, 2] else "no" for i in ids],
        stream, reward_fn=lambda texts, golds: [1.0 if t == "ok" else 0.0 for t in texts],
        prompts_per_step=prompts, group_size=G, params=SamplingParams(max_new_tokens=4), dynamic=dynamic,
        max_rounds=rounds, capture_routing=True, run_seed=7, step=3,
    )


def test_dynamic_sampling_drops_uniform_groups_until_full():
    # round 0: group A all right (dropped), group B mixed (kept); round 1: all wrong, mixed -> full
    eng = FakeEngine([[1, 1, 1, 0], [0, 0, 0, 1]])
    ro = _collect(eng)
    assert len(ro.kept) == 2 and ro.rounds == 2 and ro.sampled_groups == 4
    assert all(g.informative for g in ro.kept)
    assert ro.reward_mean == pytest.approx(4 / 8)
    assert eng.seeds == [rollout.sampling_seed(7, 3, 0), rollout.sampling_seed(7, 3, 1)]


def test_dynamic_sampling_cap_stops_short():
    eng = FakeEngine([[1, 1, 0, 0]] * 3)  # every group uniform: nothing kept
    ro = _collect(eng, rounds=3)
    assert ro.kept == [] and ro.rounds == 3 and ro.sampled_groups == 6


def test_without_dynamic_sampling_everything_is_kept_in_one_round():
    ro = _collect(FakeEngine([[1, 1, 0, 0]]), dynamic=False)
    assert len(ro.kept) == 2 and ro.rounds == 1


def test_build_batch_aligns_response_positions_and_traces():
    g = rollout.Group(problem=task.make_problem(0, 0, 2), rewards=[1.0, 0.0], samples=[
        RolloutSample(prompt_ids=[9, 9, 9], response_ids=[1, 2], logprobs_R=torch.tensor([-0.1, -0.2]),
                      expert_ids_TLK=torch.tensor([[[0, 1]], [[2, 3]], [[4, 5]], [[6, 7]]])),
        RolloutSample(prompt_ids=[9], response_ids=[4], logprobs_R=torch.tensor([-0.3]),
                      expert_ids_TLK=torch.tensor([[[5, 6]]])),
    ])
    b = rollout.build_batch([g], pad_id=0, with_routing=True)
    tb = b.train
    assert tb.input_ids_BS.tolist() == [[9, 9, 9, 1, 2], [9, 4, 0, 0, 0]]
    assert tb.loss_mask_BT.tolist() == [[0, 0, 1, 1], [1, 0, 0, 0]]
    assert b.infer_logp_BT[0, 2:].tolist() == pytest.approx([-0.1, -0.2])
    assert b.infer_logp_BT[1, 0].item() == pytest.approx(-0.3)
    assert tb.expert_ids_BTLK.shape == (2, 4, 1, 2)
    assert tb.expert_ids_BTLK[1, 0].tolist() == [[5, 6]]
    assert tb.expert_ids_BTLK[1, 1].tolist() == [[0, 1]]  # dummy distinct experts on padding
    assert b.rewards_B.tolist() == [1.0, 0.0]


def test_build_batch_rejects_misaligned_or_missing_traces():
    s = RolloutSample(prompt_ids=[9, 9], response_ids=[1], logprobs_R=torch.tensor([-0.1]),
                      expert_ids_TLK=torch.zeros(3, 1, 2, dtype=torch.long))  # 3 rows for 3 tokens: one too many
    g = rollout.Group(problem=task.make_problem(0, 0, 2), rewards=[1.0], samples=[s])
    with pytest.raises(ValueError, match="has 3 rows, expected 2"):
        rollout.build_batch([g], pad_id=0, with_routing=True)
    s.expert_ids_TLK = None
    with pytest.raises(ValueError, match="capture_routing=True"):
        rollout.build_batch([g], pad_id=0, with_routing=True)


@pytest.mark.parametrize("n_groups, mini, sizes", [(16, 1, [16]), (16, 8, [2] * 8), (5, 8, [1] * 5), (7, 2, [4, 3])])
def test_mini_batches_hold_whole_groups(n_groups, mini, sizes):
    sl = rollout.mini_batch_slices(n_groups, 4, mini)
    assert [(s.stop - s.start) // 4 for s in sl] == sizes
    assert sl[0].start == 0 and sl[-1].stop == n_groups * 4
    assert all(a.stop == b.start for a, b in zip(sl, sl[1:]))
