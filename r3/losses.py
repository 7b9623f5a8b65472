"""Policy losses as pure tensor functions, each returning (loss, metrics).

GRPO advantages, the PPO token clip with dual clip, the GSPO sequence-ratio clip and
truncated importance sampling (TIS) weights. Defaults follow PAPER.md "Setup" (the paper does
not publish its clip ranges or TIS cap; these are the common choices it lists).

Shapes (STYLE.md rule 2): B sequences, T tokens, N rollouts. Metric values are 0-dim tensors,
detached, turned into floats at logging time (STYLE.md rule 9).
"""

from __future__ import annotations

from typing import Literal

import torch

LossAgg = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]

MAX_LOG_RATIO = 20.0
"""Clamp on log(pi / pi_old) before exp(), so a large mismatch cannot overflow exp()."""
GSPO_MAX_LOG_RATIO = 10.0
"""Clamp on GSPO's per-token log ratio (as verl's compute_policy_loss_gspo does)."""


def group_advantages(
    rewards_N: torch.Tensor, group_size: int, *, std_normalize: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO advantages; groups are `group_size` contiguous rollouts of one prompt.

    A = (r - mean_g) / (std_g + eps) with the unbiased std (a group of one gets 0);
    std_normalize=False gives r - mean_g (Dr. GRPO style).

    rewards_N: float [N], N divisible by group_size. Returns float32 [N].
    """
    if rewards_N.ndim != 1:
        raise ValueError(f"rewards_N must be 1-D [N], got shape {tuple(rewards_N.shape)}")
    if group_size < 1 or rewards_N.numel() % group_size:
        raise ValueError(
            f"rewards ({rewards_N.numel()}) must split into whole groups of group_size={group_size}; "
            "likely cause: a group was cut by dynamic sampling or mini-batching"
        )
    r_GS = rewards_N.float().view(-1, group_size)
    centred_GS = r_GS - r_GS.mean(dim=1, keepdim=True)
    if not std_normalize:
        return centred_GS.reshape(-1)
    if group_size == 1:
        return torch.zeros_like(centred_GS).reshape(-1)
    std_G1 = r_GS.std(dim=1, unbiased=True, keepdim=True)
    return (centred_GS / (std_G1 + eps)).reshape(-1)


def _aggregate(loss_BT: torch.Tensor, mask_BT: torch.Tensor, agg: LossAgg, normalizer: float | None) -> torch.Tensor:
    """Reduce per-token losses to a scalar.

    token-mean:          sum_{b,t} m l / sum_{b,t} m            (or / normalizer)
    seq-mean-token-mean: sum_b [sum_t m l / sum_t m] / B         (or / normalizer)
    seq-mean-token-sum:  sum_b [sum_t m l] / B                   (or / normalizer)
    A normalizer computed over the whole mini-batch makes micro-batching not change the gradient.
    """
    masked_BT = loss_BT * mask_BT
    if agg == "token-mean":
        denom = mask_BT.sum().clamp(min=1.0) if normalizer is None else normalizer
        return masked_BT.sum() / denom
    if agg == "seq-mean-token-mean":
        per_seq_B = masked_BT.sum(dim=1) / mask_BT.sum(dim=1).clamp(min=1.0)
    elif agg == "seq-mean-token-sum":
        per_seq_B = masked_BT.sum(dim=1)
    else:
        raise ValueError(f"unknown loss aggregation {agg!r}; expected one of {LossAgg.__args__}")
    denom = per_seq_B.numel() if normalizer is None else normalizer
    return per_seq_B.sum() / denom


def _masked_mean(x_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    return (x_BT * mask_BT).sum() / mask_BT.sum().clamp(min=1.0)


def _check_shapes(logp_BT, old_logp_BT, mask_BT, adv) -> torch.Tensor:
    if logp_BT.shape != old_logp_BT.shape or logp_BT.shape != mask_BT.shape or logp_BT.ndim != 2:
        raise ValueError(
            f"logp {tuple(logp_BT.shape)}, old_logp {tuple(old_logp_BT.shape)} and mask "
            f"{tuple(mask_BT.shape)} must all be the same [B, T]"
        )
    if adv.ndim == 1:
        if adv.shape[0] != logp_BT.shape[0]:
            raise ValueError(f"advantages [B] has B={adv.shape[0]}, logp has B={logp_BT.shape[0]}")
        return adv[:, None]
    if adv.shape != logp_BT.shape:
        raise ValueError(f"advantages must be [B] or [B, T]={tuple(logp_BT.shape)}, got {tuple(adv.shape)}")
    return adv


def ppo_clip_loss(
    logp_BT: torch.Tensor,
    old_logp_BT: torch.Tensor,
    adv: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = 3.0,
    is_weights_BT: torch.Tensor | None = None,
    agg: LossAgg = "token-mean",
    normalizer: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO token-level clipped surrogate (GRPO) with dual clip and optional TIS weights.

    logp_BT: float [B, T] current policy log-probs (requires grad).
    old_logp_BT: float [B, T] behaviour log-probs pi_old (no grad).
    adv: float [B] (broadcast over tokens) or [B, T].
    mask_BT: float [B, T], 1 on response tokens.
    is_weights_BT: float [B, T] detached TIS weights multiplying each token's loss.

    Per token: r = exp(clamp(logp - old, -20, 20));
               l = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high));
               where A < 0: l = min(l, -A c)   (dual clip, Ye et al. 2020; c = dual_clip);
               l *= is_weights.
    Returns (loss, metrics) with metrics actor/clip_frac (tokens where the clipped branch is
    taken), actor/dual_clip_frac, actor/ratio_mean, actor/approx_kl (masked mean of old - logp).
    """
    adv_BT = _check_shapes(logp_BT, old_logp_BT, mask_BT, adv).to(logp_BT.dtype)
    mask_BT = mask_BT.to(logp_BT.dtype)
    log_ratio_BT = (logp_BT - old_logp_BT).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    ratio_BT = torch.exp(log_ratio_BT)
    unclipped_BT = -adv_BT * ratio_BT
    clipped_BT = -adv_BT * ratio_BT.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss_BT = torch.maximum(unclipped_BT, clipped_BT)
    clip_taken_BT = (clipped_BT > unclipped_BT).to(logp_BT.dtype)
    dual_taken_BT = torch.zeros_like(loss_BT)
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1 (common value 3), got {dual_clip}")
        bound_BT = -adv_BT * dual_clip
        dual_BT = torch.minimum(loss_BT, bound_BT)
        negative_BT = adv_BT < 0
        dual_taken_BT = (negative_BT & (bound_BT < loss_BT)).to(logp_BT.dtype)
        loss_BT = torch.where(negative_BT, dual_BT, loss_BT)
    if is_weights_BT is not None:
        if is_weights_BT.shape != logp_BT.shape:
            raise ValueError(f"is_weights {tuple(is_weights_BT.shape)} must match logp {tuple(logp_BT.shape)}")
        loss_BT = loss_BT * is_weights_BT.detach()
    loss = _aggregate(loss_BT, mask_BT, agg, normalizer)
    with torch.no_grad():
        metrics = {
            "actor/clip_frac": _masked_mean(clip_taken_BT, mask_BT),
            "actor/dual_clip_frac": _masked_mean(dual_taken_BT, mask_BT),
            "actor/ratio_mean": _masked_mean(ratio_BT, mask_BT),
            "actor/approx_kl": _masked_mean(-log_ratio_BT, mask_BT),
        }
    return loss, metrics


def gspo_loss(
    logp_BT: torch.Tensor,
    old_logp_BT: torch.Tensor,
    adv_B: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
    normalizer: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO (Zheng et al. 2025): clip the length-normalised sequence ratio.

    log s_i = sum_t m (logp - old) / sum_t m                       (sequence, [B])
    per token: s_it = exp(logp - sg(logp) + sg(log s_i)), log clamped at 10, so its value is
    s_i while its gradient is s_i * grad logp_t (GSPO-token form; gradient flows per token);
    l = max(-A s, -A clip(s, 1 - clip_low, 1 + clip_high)); aggregated seq-mean-token-mean.

    adv_B: float [B]. Other shapes as in ppo_clip_loss. Returns (loss, metrics) with
    actor/clip_frac (fraction of sequences clipped) and actor/seq_ratio_mean.
    """
    adv_B1 = _check_shapes(logp_BT, old_logp_BT, mask_BT, adv_B)
    if adv_B1.shape[1] != 1:
        raise ValueError(f"GSPO takes sequence advantages [B], got {tuple(adv_B.shape)}")
    adv_B1 = adv_B1.to(logp_BT.dtype)
    mask_BT = mask_BT.to(logp_BT.dtype)
    ntok_B = mask_BT.sum(dim=1).clamp(min=1.0)
    log_s_B = ((logp_BT - old_logp_BT) * mask_BT).sum(dim=1) / ntok_B
    log_s_BT = (logp_BT - logp_BT.detach() + log_s_B.detach()[:, None]).clamp(max=GSPO_MAX_LOG_RATIO)
    s_BT = torch.exp(log_s_BT)
    unclipped_BT = -adv_B1 * s_BT
    clipped_BT = -adv_B1 * s_BT.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss_BT = torch.maximum(unclipped_BT, clipped_BT)
    loss = _aggregate(loss_BT, mask_BT, "seq-mean-token-mean", normalizer)
    with torch.no_grad():
        seq_s_B = torch.exp(log_s_B.clamp(max=GSPO_MAX_LOG_RATIO))
        clipped_B = (-adv_B1[:, 0] * seq_s_B.clamp(1.0 - clip_low, 1.0 + clip_high)) > (-adv_B1[:, 0] * seq_s_B)
        has_tok_B = mask_BT.sum(dim=1) > 0
        n_seq = has_tok_B.sum().clamp(min=1)
        metrics = {
            "actor/clip_frac": (clipped_B & has_tok_B).sum() / n_seq,
            "actor/seq_ratio_mean": (seq_s_B * has_tok_B).sum() / n_seq,
        }
    return loss, metrics


def tis_weights(
    old_logp_BT: torch.Tensor, rollout_logp_BT: torch.Tensor, mask_BT: torch.Tensor, *, cap: float = 2.0
) -> torch.Tensor:
    """Truncated importance sampling weights on pi_old / pi_infer (Yao et al. 2025).

    w = min(exp(old - rollout), cap), detached, 0 where mask is 0. Returns float32 [B, T].
    """
    if old_logp_BT.shape != rollout_logp_BT.shape or old_logp_BT.shape != mask_BT.shape:
        raise ValueError(
            f"old_logp {tuple(old_logp_BT.shape)}, rollout_logp {tuple(rollout_logp_BT.shape)} and mask "
            f"{tuple(mask_BT.shape)} must be the same [B, T]"
        )
    if cap <= 0:
        raise ValueError(f"TIS cap must be > 0 (common value 2), got {cap}")
    with torch.no_grad():
        log_w_BT = (old_logp_BT.float() - rollout_logp_BT.float()).clamp(max=MAX_LOG_RATIO)
        w_BT = torch.exp(log_w_BT).clamp(max=cap)
        return torch.where(mask_BT.bool(), w_BT, torch.zeros_like(w_BT))
