"""Seeded mismatch doses of the transformers rollout engine: Gaussian noise on router or output logits.

Two calibrated, rollout-only doses of training-inference mismatch (docs/study.md, "Doses"); the
trainer never sees them (they live on the rollout engine's own model copy, r3.engines.hf.rollout):

- router noise, std `router_std` (logit units): each MoE router picks its top-k experts from
  s + eps, eps ~ N(0, router_std^2) per (token, expert), while the gate weights of the picked
  experts come from the clean logits s, exactly as replay computes them (PAPER.md "The method"):
      I = topk(s + eps),   g_i = I_i exp(s_i) / sum_j I_j exp(s_j)      (norm_topk_prob=True)
  So the dose changes routing *selection* only: the analogue of two engines' kernels disagreeing
  on near-tied router logits, and exactly what R3 removes (replaying I in the trainer gives the
  trainer the rollout's forward up to the engines' own numerics).
- logit noise, std `logit_std`: the output head's logits become z + eps, eps ~ N(0, logit_std^2)
  per (token, vocabulary entry), before temperature. The rollout samples from, and reports the
  logprobs of, that noisy distribution (the engine's sampler reads the hooked logits), so the
  trainer's ratio pi_train / pi_infer sees a non-routing mismatch that R3 cannot remove. For small
  noise KL(pi_infer || pi_train) ~ logit_std^2 / 2 * (1 - sum_v p_v^2) per token.

Seeding: each dose draws from its own torch.Generator (not the sampler's, so a dose leaves the
sampler's random stream alone), seeded from the engine's seed at construction and re-seeded from
each call's SamplingParams.seed (`reseed`), so a step's noise is reproducible per (seed, step) like
its samples. Implementation: forward hooks on the routers (`layer.mlp.gate`) and on the output
head. The router hook overwrites the router's outputs (weights, indices) in place: the routing
recorder (r3.engines.hf.replay) keeps a view of the indices the router returned, so the recorded
trace is the noisy selection the experts consumed (tests/r3/test_r3_noise.py checks both).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from r3.engines.hf.replay import find_moe_blocks

ROUTER_STREAM = 1
"""Stream index of the router noise in `stream_seed(seed, stream)`."""
LOGIT_STREAM = 2
"""Stream index of the output-logit noise."""


def stream_seed(seed: int, stream: int) -> int:
    """The seed of noise stream `stream` for a call seeded `seed`: a 64-bit mix of both (splitmix64's
    finaliser), so the two doses and the sampler (seeded with `seed` itself) draw unrelated streams.
    Kept here, not shared with the engines' request seeds, so a dose's draws (and the calibrated
    numbers of docs/study.md "Doses") do not move when those change."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(stream) + 1) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) >> 1


def noisy_topk_routing(
    router_logits_NE: torch.Tensor,
    noise_NE: torch.Tensor,
    top_k: int,
    norm_topk_prob: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing selected from noisy logits, weighted from the clean ones.

    router_logits_NE: [N, E] the router's logits s; noise_NE: [N, E] eps (already scaled by the std).
    Returns (weights [N, K] in router_logits_NE's dtype, ids [N, K] int64): ids = topk(s + eps) in
    descending order of s + eps; weights = softmax(s) in float32 gathered at ids, renormalised over
    the K when norm_topk_prob (the ops of Qwen3MoeTopKRouter and of replay's gate weights)."""
    ids_NK = (router_logits_NE.float() + noise_NE.float()).topk(top_k, dim=-1).indices
    w_NK = torch.softmax(router_logits_NE, dtype=torch.float, dim=-1).gather(1, ids_NK)
    if norm_topk_prob:
        w_NK = w_NK / w_NK.sum(dim=-1, keepdim=True)
    return w_NK.to(router_logits_NE.dtype), ids_NK


class RolloutNoise:
    """Router-logit and output-logit noise hooks on one (rollout engine's) transformers model."""

    def __init__(self, model: nn.Module, *, router_std: float = 0.0, logit_std: float = 0.0, seed: int = 0):
        for name, std in (("router_std", router_std), ("logit_std", logit_std)):
            if not (math.isfinite(std) and std >= 0):
                raise ValueError(f"RolloutNoise.{name} must be a finite std >= 0 (logit units), got {std}")
        self.router_std, self.logit_std = float(router_std), float(logit_std)
        device = next(model.parameters()).device
        self._router_gen = torch.Generator(device=device)
        self._logit_gen = torch.Generator(device=device)
        self.reseed(seed)
        self._handles = []
        if self.router_std > 0:
            blocks = find_moe_blocks(model)
            if not blocks:
                raise ValueError(
                    f"router noise {router_std} needs an MoE model (routers at layer.mlp.gate); "
                    f"{type(model).__name__} has none; likely cause: the dense control with a routing dose"
                )
            self._handles += [b.gate.register_forward_hook(self._router_hook) for b in blocks]
        if self.logit_std > 0:
            head = model.get_output_embeddings()
            if head is None:
                raise ValueError(f"logit noise needs an output head; {type(model).__name__} has none")
            self._handles.append(head.register_forward_hook(self._logit_hook))

    @classmethod
    def attach(cls, model: nn.Module, *, router_std: float, logit_std: float, seed: int) -> RolloutNoise | None:
        """The noise of a rollout engine's model, or None when both doses are 0 (no hooks at all)."""
        if router_std == 0 and logit_std == 0:
            return None
        return cls(model, router_std=router_std, logit_std=logit_std, seed=seed)

    def reseed(self, seed: int | None) -> None:
        """Restart both noise streams from `seed` (a generate call's SamplingParams.seed); None: continue."""
        if seed is None:
            return
        self._router_gen.manual_seed(stream_seed(seed, ROUTER_STREAM))
        self._logit_gen.manual_seed(stream_seed(seed, LOGIT_STREAM))

    def remove(self) -> None:
        """Detach every hook (the model is then noise-free)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    # --- hooks --------------------------------------------------------------------------------
    @torch.no_grad()
    def _router_hook(self, gate: nn.Module, args, output):
        logits_NE, weights_NK, ids_NK = output
        eps_NE = torch.randn(logits_NE.shape, generator=self._router_gen, device=logits_NE.device, dtype=torch.float32)
        w_NK, new_ids_NK = noisy_topk_routing(logits_NE, self.router_std * eps_NE, gate.top_k, gate.norm_topk_prob)
        # in place: the routing recorder holds a view of ids_NK, so it records what the experts use
        weights_NK.copy_(w_NK)
        ids_NK.copy_(new_ids_NK)
        return None

    @torch.no_grad()
    def _logit_hook(self, head: nn.Module, args, logits):
        eps = torch.randn(logits.shape, generator=self._logit_gen, device=logits.device, dtype=torch.float32)
        return (logits.float() + self.logit_std * eps).to(logits.dtype)
