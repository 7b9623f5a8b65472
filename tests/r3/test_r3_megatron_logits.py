"""Chunked token logprobs and entropy (r3.engines.megatron.logits, r3.metrics.token_entropy) equal
the direct full-vocabulary forms: values, entropy and the gradient reaching the logits."""

from __future__ import annotations

import pytest
import torch

from r3.engines.megatron.logits import token_logprobs
from r3.metrics import token_entropy


def _logits(B=3, S=13, V=50, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(B, S, V, generator=g)).to(dtype).requires_grad_(True)
    ids = torch.randint(0, V, (B, S), generator=g)
    return logits, ids


@pytest.mark.parametrize("chunk", [1, 4, 5, 100])
def test_chunked_entropy_equals_unchunked_bit_for_bit(chunk):
    logits, _ = _logits()
    with torch.no_grad():
        assert torch.equal(token_entropy(logits, chunk_tokens=chunk), token_entropy(logits))
        hot = token_entropy(logits, chunk_tokens=chunk, temperature=0.6)
        assert torch.allclose(hot, token_entropy(logits / 0.6), atol=1e-6, rtol=0)


def test_entropy_refuses_a_negative_chunk():
    with pytest.raises(ValueError, match="chunk_tokens must be >= 0"):
        token_entropy(torch.zeros(1, 2, 3), chunk_tokens=-1)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunked_logprobs_and_gradient_equal_the_direct_form_fp32(chunk, temperature):
    logits, ids = _logits()
    weights = torch.randn(3, 12, generator=torch.Generator().manual_seed(1))
    ref_lp, ref_ent = token_logprobs(logits, ids, with_entropy=True, temperature=temperature, chunk_tokens=0)
    (ref_grad,) = torch.autograd.grad((ref_lp * weights).sum(), logits)
    lp, ent = token_logprobs(logits, ids, with_entropy=True, temperature=temperature, chunk_tokens=chunk)
    (grad,) = torch.autograd.grad((lp * weights).sum(), logits)
    assert lp.dtype == torch.float32 and lp.shape == (3, 12)
    assert (lp - ref_lp).abs().max() < 2e-6
    assert (ent - ref_ent).abs().max() < 2e-6
    assert (grad - ref_grad).abs().max() < 1e-6 * ref_grad.abs().max()  # float rounding of the same sums
    assert grad[:, -1].abs().max() == 0  # the last position has no target: no gradient


def test_chunked_logprobs_bf16_logits_within_bf16_rounding_of_the_direct_form():
    logits, ids = _logits(dtype=torch.bfloat16)
    ref_lp, _ = token_logprobs(logits, ids, with_entropy=False, chunk_tokens=0)
    (ref_grad,) = torch.autograd.grad(ref_lp.sum(), logits)
    lp, _ = token_logprobs(logits, ids, with_entropy=False, chunk_tokens=4)
    (grad,) = torch.autograd.grad(lp.sum(), logits)
    assert grad.dtype == torch.bfloat16
    assert (lp - ref_lp).abs().max() < 1e-5  # both fp32 from the same bf16 values
    assert (grad.float() - ref_grad.float()).abs().max() <= 2**-8  # one bf16 rounding of values <= 1
