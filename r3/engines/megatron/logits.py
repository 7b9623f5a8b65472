"""Token logprobs and entropy from [B, S, V] logits with bounded full-vocabulary temporaries.

    logp_BT, entropy_BT = token_logprobs(logits_BSV, input_ids_BS, with_entropy=True, chunk_tokens=1024)

The direct form, `log_softmax(logits.float()).gather(ids)`, keeps an fp32 copy of the logits and the
fp32 log-softmax (8 B per vocabulary entry per token: 11 GB for one 9,216-token sequence at Qwen3's
151,936 entries) alive until backward, and the entropy adds ~16 B per entry of temporaries.
`ChunkedLogprob` computes logp = x[target] - logsumexp(x) over slices of at most `chunk_tokens`
positions of one row (views: no copy of the logits) and saves only the logits (already alive: they
are the output layer's result) and the fp32 logsumexp per token; its backward writes
grad_x = g * (onehot(target) - softmax(x)) chunk by chunk into one gradient of the logits' dtype.
Values equal the direct form within float rounding (tests/r3/test_r3_megatron_logits.py).
"""

from __future__ import annotations

import torch

from r3.metrics import token_entropy


def _chunks(B: int, T: int, chunk: int):
    for b in range(B):
        for t in range(0, T, chunk):
            yield b, slice(t, min(t + chunk, T))


def _scaled(x_CV: torch.Tensor, temperature: float, *, copy: bool = False) -> torch.Tensor:
    """x / temperature in fp32 (no division, hence no second temporary, at temperature 1); copy: a
    new tensor even when x is fp32 already (the caller writes it in place)."""
    x_CV = x_CV.to(torch.float32, copy=copy)
    return x_CV if temperature == 1.0 else x_CV.div_(temperature) if copy else x_CV / temperature


class ChunkedLogprob(torch.autograd.Function):
    """logp_BT[b, t] = log softmax(logits_BSV[b, t])[target_BT[b, t]] for t < T = S - 1, in float32,
    chunked (module docstring). Takes the whole [B, S, V] logits rather than their [:, :-1] view, so
    that backward writes one gradient of the logits' shape (last position zero) instead of a gradient
    of the view plus the slice's backward copy into a second [B, S, V] tensor."""

    @staticmethod
    def forward(ctx, logits_BSV: torch.Tensor, target_BT: torch.Tensor, chunk: int, temperature: float):
        B, T = target_BT.shape
        lse_BT = torch.empty(B, T, dtype=torch.float32, device=logits_BSV.device)
        picked_BT = torch.empty(B, T, dtype=torch.float32, device=logits_BSV.device)
        for b, t in _chunks(B, T, chunk):
            x_CV = _scaled(logits_BSV[b, t], temperature)
            lse_BT[b, t] = torch.logsumexp(x_CV, dim=-1)
            picked_BT[b, t] = x_CV.gather(-1, target_BT[b, t].unsqueeze(-1)).squeeze(-1)
        ctx.save_for_backward(logits_BSV, target_BT, lse_BT)
        ctx.chunk, ctx.temperature = chunk, temperature
        return picked_BT - lse_BT

    @staticmethod
    def backward(ctx, grad_BT: torch.Tensor):
        logits_BSV, target_BT, lse_BT = ctx.saved_tensors
        B, T = target_BT.shape
        grad_BSV = torch.empty_like(logits_BSV, memory_format=torch.contiguous_format)
        grad_BSV[:, T:] = 0  # positions without a target
        tau = ctx.temperature
        for b, t in _chunks(B, T, ctx.chunk):
            g_C = grad_BT[b, t].float() / tau  # d(x / tau) / dx
            # d logp / d x_v = onehot_v - softmax_v (the log-softmax backward: aten's
            # _log_softmax_backward_data computes grad - exp(out) * sum(grad), the same expression)
            # one fp32 temporary per chunk: a copy of the chunk, turned into the gradient in place
            g_CV = _scaled(logits_BSV[b, t], tau, copy=True).sub_(lse_BT[b, t].unsqueeze(-1)).exp_()
            g_CV.mul_(-g_C.unsqueeze(-1)).scatter_add_(-1, target_BT[b, t].unsqueeze(-1), g_C.unsqueeze(-1))
            grad_BSV[b, t] = g_CV
            del g_CV
        return grad_BSV, None, None, None


def token_logprobs(
    logits_BSV: torch.Tensor,
    input_ids_BS: torch.Tensor,
    *,
    with_entropy: bool,
    temperature: float = 1.0,
    chunk_tokens: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logp_BT[b, t] = log p(input_ids[b, t+1] | prefix) under softmax(logits / temperature) and
    (optionally, without gradient) its predictive entropy at t (r3.metrics.token_entropy), T = S - 1;
    float32. chunk_tokens > 0: the chunked forms (module docstring: the temperature is applied per
    chunk in fp32, no scaled copy of the logits); 0: the direct form (whole tensor at once)."""
    logits_BTV = logits_BSV[:, :-1]
    target_BT = input_ids_BS[:, 1:]
    if chunk_tokens:
        logp_BT = ChunkedLogprob.apply(logits_BSV, target_BT, chunk_tokens, float(temperature))
        entropy_BT = None
        if with_entropy:
            with torch.no_grad():
                entropy_BT = token_entropy(logits_BTV, chunk_tokens=chunk_tokens, temperature=temperature)
        return logp_BT, entropy_BT
    if temperature != 1.0:
        logits_BTV = logits_BTV / temperature
    logp_BT = torch.log_softmax(logits_BTV.float(), dim=-1).gather(-1, target_BT.unsqueeze(-1)).squeeze(-1)
    entropy_BT = None
    if with_entropy:
        with torch.no_grad():
            entropy_BT = token_entropy(logits_BTV)
    return logp_BT, entropy_BT
