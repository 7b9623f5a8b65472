"""Golden-number tests for r3.metrics (arithmetic in the comments)."""

import math

import pytest
import torch

from r3.metrics import extreme_token_curve, log_ratio_histogram, mismatch_metrics, routing_disagreement, token_entropy


def _case():
    # rho = [1, 2.5, 0.25] on masked tokens; the 4th token (huge gap) is masked out
    train = torch.tensor([[0.0, math.log(2.5), -math.log(4.0), 30.0]])
    infer = torch.zeros(1, 4)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    return train, infer, mask


def test_mismatch_metrics_golden():
    m = mismatch_metrics(*_case(), taus=(2.0, 3.0))
    # k3 = rho - 1 - log rho: 0 ; 1.5 - 0.916291 = 0.583709 ; -0.75 + 1.386294 = 0.636294 -> mean 0.406668
    torch.testing.assert_close(m["mismatch/k3_kl"], torch.tensor(0.406668), atol=1e-5, rtol=0)
    # max(rho, 1/rho) = [1, 2.5, 4]: > 2 -> 2 of 3 ; > 3 -> 1 of 3
    torch.testing.assert_close(m["mismatch/extreme_frac@2"], torch.tensor(2 / 3))
    torch.testing.assert_close(m["mismatch/extreme_frac@3"], torch.tensor(1 / 3))
    # |log rho| = [0, 0.916291, 1.386294]: mean 0.767528, max 1.386294
    torch.testing.assert_close(m["mismatch/abs_log_ratio_mean"], torch.tensor(0.767528), atol=1e-5, rtol=0)
    torch.testing.assert_close(m["mismatch/abs_log_ratio_max"], torch.tensor(1.386294), atol=1e-5, rtol=0)
    assert all(v.ndim == 0 for v in m.values())


def test_k3_per_response_sums_tokens_and_averages_responses_that_have_tokens():
    train, infer, mask = _case()
    # rows: the golden row (k3 sum 1.220003 over 3 tokens), a row with one token of rho = 2.5, an empty row
    train = torch.cat([train, torch.tensor([[math.log(2.5), 0.0, 0.0, 0.0], [5.0, 5.0, 5.0, 5.0]])])
    infer, mask = torch.zeros(3, 4), torch.cat([mask, torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0]])])
    m = mismatch_metrics(train, infer, mask)
    torch.testing.assert_close(m["mismatch/k3_kl_per_response"], torch.tensor((1.220003 + 0.583709) / 2))
    torch.testing.assert_close(m["mismatch/k3_kl"], torch.tensor((1.220003 + 0.583709) / 4))


def test_mismatch_metrics_identical_is_zero_and_empty_mask():
    x = torch.randn(3, 5)
    m = mismatch_metrics(x, x, torch.ones(3, 5))
    assert m["mismatch/k3_kl"].item() == 0.0 and m["mismatch/extreme_frac@2"].item() == 0.0
    assert mismatch_metrics(x, x + 1, torch.zeros(3, 5))["mismatch/k3_kl"].item() == 0.0


def test_extreme_token_curve_and_histogram():
    taus, f = extreme_token_curve(*_case(), [1.5, 3.0, 5.0])
    # max(rho, 1/rho) = [1, 2.5, 4]: > 1.5 -> 2/3, > 3 -> 1/3, > 5 -> 0
    torch.testing.assert_close(f, torch.tensor([2 / 3, 1 / 3, 0.0]))
    edges, counts = log_ratio_histogram(*_case(), bins=4, limit=2.0)
    # bins [-2,-1), [-1,0), [0,1), [1,2]: log rho = 0 -> bin 2, 0.916 -> bin 2, -1.386 -> bin 0
    assert edges.tolist() == [-2.0, -1.0, 0.0, 1.0, 2.0]
    assert counts.tolist() == [1, 0, 2, 0]


def test_token_entropy():
    # uniform over 4 -> ln 4 ; one-hot (very peaked) -> ~0
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]]])
    torch.testing.assert_close(token_entropy(logits), torch.tensor([[math.log(4.0), 0.0]]), atol=1e-6, rtol=0)


def test_routing_disagreement_golden():
    a = torch.tensor([[[0, 1], [2, 3]], [[4, 5], [6, 7]], [[0, 1], [2, 3]]])
    b = torch.tensor(
        [
            [[1, 0], [2, 3]],  # same sets, other order: agree
            [[4, 6], [6, 7]],  # layer 0 differs
            [[0, 2], [3, 1]],
        ]
    )  # both layers differ
    d = routing_disagreement(a, b)
    torch.testing.assert_close(d["routing/pair_disagreement"], torch.tensor(3 / 6))
    torch.testing.assert_close(d["routing/token_disagreement"], torch.tensor(2 / 3))
    torch.testing.assert_close(d["routing/per_layer"], torch.tensor([2 / 3, 1 / 3]))
    dm = routing_disagreement(a, b, torch.tensor([1, 1, 0]))
    torch.testing.assert_close(dm["routing/pair_disagreement"], torch.tensor(1 / 4))
    torch.testing.assert_close(dm["routing/token_disagreement"], torch.tensor(1 / 2))
    torch.testing.assert_close(dm["routing/per_layer"], torch.tensor([0.5, 0.0]))
    # batched [B, T, L, K] with a [B, T] mask gives the same
    db = routing_disagreement(a[None], b[None], torch.tensor([[1, 1, 0]]))
    torch.testing.assert_close(db["routing/pair_disagreement"], torch.tensor(1 / 4))
    with pytest.raises(ValueError, match="same"):
        routing_disagreement(a, b[:2])
