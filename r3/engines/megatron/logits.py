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


class ChunkedLogprob(torch.autograd.Function):
    """logp_BT[b, t] = log softmax(logits_BTV[b, t])[target_BT[b, t]] in float32, chunked (module
    docstring). logits_BTV may be a non-contiguous view ([:, :-1] of [B, S, V])."""

    @staticmethod
    def forward(ctx, logits_BTV: torch.Tensor, target_BT: torch.Tensor, chunk: int, temperature: float):
        B, T, _ = logits_BTV.shape
        lse_BT = torch.empty(B, T, dtype=torch.float32, device=logits_BTV.device)
        picked_BT = torch.empty(B, T, dtype=torch.float32, device=logits_BTV.device)
        for b, t in _chunks(B, T, chunk):
            x_CV = logits_BTV[b, t].float() / temperature
            lse_BT[b, t] = torch.logsumexp(x_CV, dim=-1)
            picked_BT[b, t] = x_CV.gather(-1, target_BT[b, t].unsqueeze(-1)).squeeze(-1)
        ctx.save_for_backward(logits_BTV, target_BT, lse_BT)
        ctx.chunk, ctx.temperature = chunk, temperature
        return picked_BT - lse_BT

    @staticmethod
    def backward(ctx, grad_BT: torch.Tensor):
        logits_BTV, target_BT, lse_BT = ctx.saved_tensors
        B, T, _ = logits_BTV.shape
        grad_BTV = torch.empty_like(logits_BTV, memory_format=torch.contiguous_format)
        tau = ctx.temperature
        for b, t in _chunks(B, T, ctx.chunk):
            g_C = grad_BT[b, t].float() / tau  # d(x / tau) / dx
            # d logp / d x_v = onehot_v - softmax_v (the log-softmax backward: aten's
            # _log_softmax_backward_data computes grad - exp(out) * sum(grad), the same expression)
            x_CV = logits_BTV[b, t].float() / tau
            g_CV = torch.exp(x_CV.sub_(lse_BT[b, t].unsqueeze(-1))).mul_(-g_C.unsqueeze(-1))
            g_CV.scatter_add_(-1, target_BT[b, t].unsqueeze(-1), g_C.unsqueeze(-1))
            grad_BTV[b, t] = g_CV.to(grad_BTV.dtype)
        return grad_BTV, None, None, None


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
        logp_BT = ChunkedLogprob.apply(logits_BTV, target_BT, chunk_tokens, float(temperature))
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
