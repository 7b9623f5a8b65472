"""Golden-number and gradient-path tests for r3.losses (arithmetic in the comments)."""

import math

import pytest
import torch

from r3.losses import group_advantages, gspo_loss, ppo_clip_loss, tis_weights


def test_group_advantages_golden():
    # group 1: r = [1, 0, 0, 1]: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.577350
    #   A = +-0.5 / (0.577350 + 1e-6) = +-0.866024
    # group 2: r = [1, 1, 1, 1]: std 0 -> A = 0
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    a = group_advantages(r, 4)
    expected = 0.5 / (math.sqrt(1.0 / 3.0) + 1e-6)
    torch.testing.assert_close(a[:4], torch.tensor([expected, -expected, -expected, expected]))
    assert torch.equal(a[4:], torch.zeros(4))
    # without std: r - mean
    torch.testing.assert_close(group_advantages(r, 4, std_normalize=False)[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    # a group of one gets 0
    assert torch.equal(group_advantages(torch.tensor([3.0, 5.0]), 1), torch.zeros(2))
    with pytest.raises(ValueError, match="whole groups"):
        group_advantages(torch.ones(7), 4)


def _ppo_case():
    # old logp 0; ratios r = [[1, 1.5], [0.5, 4]]; A = [+1, -1]
    old = torch.zeros(2, 2)
    logp = torch.log(torch.tensor([[1.0, 1.5], [0.5, 4.0]])).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0])
    return logp, old, adv


def test_ppo_clip_golden_token_mean():
    logp, old, adv = _ppo_case()
    # A=+1, r=1:   max(-1, -1)              = -1
    # A=+1, r=1.5: max(-1.5, -1.2)          = -1.2  (clipped branch)
    # A=-1, r=0.5: max(0.5, 0.8)            =  0.8  (clipped branch), dual min(0.8, 3) = 0.8
    # A=-1, r=4:   max(4, 1.2) = 4, dual min(4, 3) = 3 (dual clip)
    # token-mean: (-1 - 1.2 + 0.8 + 3) / 4 = 0.4
    loss, m = ppo_clip_loss(logp, old, adv, torch.ones(2, 2))
    torch.testing.assert_close(loss, torch.tensor(0.4))
    torch.testing.assert_close(m["actor/clip_frac"], torch.tensor(0.5))  # r=1.5 and r=0.5
    torch.testing.assert_close(m["actor/dual_clip_frac"], torch.tensor(0.25))  # r=4
    # without dual clip: (-1 - 1.2 + 0.8 + 4) / 4 = 0.65
    loss_nd, _ = ppo_clip_loss(logp, old, adv, torch.ones(2, 2), dual_clip=None)
    torch.testing.assert_close(loss_nd, torch.tensor(0.65))
    # normalizer 8: 1.6 / 8 = 0.2
    torch.testing.assert_close(ppo_clip_loss(logp, old, adv, torch.ones(2, 2), normalizer=8.0)[0], torch.tensor(0.2))
    # TIS weights [[2, 1], [0.5, 1]]: (-2 - 1.2 + 0.4 + 3) / 4 = 0.05
    w = torch.tensor([[2.0, 1.0], [0.5, 1.0]])
    torch.testing.assert_close(ppo_clip_loss(logp, old, adv, torch.ones(2, 2), is_weights_BT=w)[0], torch.tensor(0.05))


def test_ppo_clip_aggregations_golden():
    logp, old, adv = _ppo_case()
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    # token losses [[-1, -1.2], [0.8, (masked)]]
    # token-mean: (-1 - 1.2 + 0.8) / 3 = -0.466667
    torch.testing.assert_close(ppo_clip_loss(logp, old, adv, mask)[0], torch.tensor(-1.4 / 3))
    # seq-mean-token-mean: (mean(-1, -1.2) + 0.8) / 2 = (-1.1 + 0.8) / 2 = -0.15
    torch.testing.assert_close(ppo_clip_loss(logp, old, adv, mask, agg="seq-mean-token-mean")[0], torch.tensor(-0.15))
    # seq-mean-token-sum: (-2.2 + 0.8) / 2 = -0.7
    torch.testing.assert_close(ppo_clip_loss(logp, old, adv, mask, agg="seq-mean-token-sum")[0], torch.tensor(-0.7))


def test_ppo_gradient_golden_and_clipped_tokens_get_none():
    logp, old, adv = _ppo_case()
    loss, _ = ppo_clip_loss(logp, old, adv, torch.ones(2, 2))
    loss.backward()
    # d/dlogp of -A r / 4 = -A r / 4 on unclipped tokens; clipped (and dual-clipped) tokens: 0
    # r=1, A=1: -0.25 ; r=1.5 clipped: 0 ; r=0.5 clipped: 0 ; r=4 dual-clipped: 0
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.25, 0.0], [0.0, 0.0]]))


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_ppo_micro_batching_with_normalizer_matches_full_batch(agg):
    g = torch.Generator().manual_seed(0)
    old = torch.randn(6, 5, generator=g) * 0.1 - 1
    logp = (old + torch.randn(6, 5, generator=g) * 0.3).requires_grad_(True)
    adv = torch.randn(6, generator=g)
    mask = (torch.rand(6, 5, generator=g) > 0.3).float()
    full, _ = ppo_clip_loss(logp, old, adv, mask, agg=agg)
    (g_full,) = torch.autograd.grad(full, logp)
    norm = float(mask.sum()) if agg == "token-mean" else 6.0
    parts = [
        ppo_clip_loss(logp[s], old[s], adv[s], mask[s], agg=agg, normalizer=norm)[0] for s in (slice(0, 2), slice(2, 6))
    ]
    (g_parts,) = torch.autograd.grad(sum(parts), logp)
    torch.testing.assert_close(sum(parts), full)
    torch.testing.assert_close(g_parts, g_full)


def test_gspo_golden_and_per_token_gradient():
    old = torch.zeros(2, 2)
    # seq 0: log s = mean(0.1, 0.3) = 0.2, s = 1.221403 > 1.0004 -> A=+1 clipped: l = -1.0004
    # seq 1: one token, log s = -1e-4, s = 0.999900 within [0.9997, 1.0004] -> A=-1: l = s
    logp = torch.tensor([[0.1, 0.3], [-1e-4, 5.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = torch.tensor([1.0, -1.0])
    loss, m = gspo_loss(logp, old, adv, mask)
    # seq-mean-token-mean: (-1.0004 + exp(-1e-4)) / 2
    torch.testing.assert_close(loss, torch.tensor((-1.0004 + math.exp(-1e-4)) / 2))
    torch.testing.assert_close(m["actor/clip_frac"], torch.tensor(0.5))
    loss.backward()
    # clipped sequence: no gradient; seq 1 token 0: d(s)/dlogp = s, / (B=2 * n=1) -> 0.49995; masked: 0
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0], [math.exp(-1e-4) / 2, 0.0]]))


def test_gspo_gradient_flows_to_every_token_of_unclipped_sequence():
    # log s = mean(1e-4, -1e-4) = 0 -> s = 1; A = +1: l_t = -s_t; d/dlogp_t = -s / (B * n) = -1 / 4
    logp = torch.tensor([[1e-4, -1e-4], [0.0, 0.0]], requires_grad=True)
    loss, _ = gspo_loss(logp, torch.zeros(2, 2), torch.tensor([1.0, 0.0]), torch.ones(2, 2))
    loss.backward()
    torch.testing.assert_close(logp.grad[0], torch.tensor([-0.25, -0.25]))


def test_tis_weights_golden_and_detached():
    old = torch.zeros(1, 3, requires_grad=True)
    # old - rollout = [0, -ln 2, ln 4] -> exp = [1, 0.5, 4] -> capped at 2 -> mask [1, 1, 0] -> [1, 0.5, 0]
    rollout = torch.tensor([[0.0, math.log(2.0), -math.log(4.0)]])
    w = tis_weights(old, rollout, torch.tensor([[1.0, 1.0, 0.0]]), cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[1.0, 0.5, 0.0]]))
    assert not w.requires_grad
    w2 = tis_weights(old, rollout, torch.ones(1, 3), cap=2.0)
    torch.testing.assert_close(w2, torch.tensor([[1.0, 0.5, 2.0]]))
    # a masked garbage value (huge gap) gives 0, not nan
    assert tis_weights(torch.tensor([[100.0]]), torch.tensor([[-100.0]]), torch.zeros(1, 1)).item() == 0.0


def test_ppo_tis_weights_carry_no_gradient():
    logp, old, adv = _ppo_case()
    w = torch.tensor([[2.0, 1.0], [0.5, 1.0]], requires_grad=True)
    loss, _ = ppo_clip_loss(logp, old, adv, torch.ones(2, 2), is_weights_BT=w)
    loss.backward()
    assert w.grad is None
    assert logp.grad is not None


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        ppo_clip_loss(torch.zeros(2, 3), torch.zeros(2, 2), torch.zeros(2), torch.ones(2, 2))
    with pytest.raises(ValueError, match="B=3"):
        ppo_clip_loss(torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(3), torch.ones(2, 2))
