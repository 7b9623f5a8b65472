"""Training-inference mismatch metrics, routing disagreement and entropy (PAPER.md "Metrics").

All functions are pure, keep results on the input's device, and return 0-dim / small tensors
(STYLE.md rule 9: converted to Python numbers once, at logging time). Shapes: B batch, T tokens,
L MoE layers, K top-k, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from r3.losses import MAX_LOG_RATIO  # clamp on a log ratio before exp() (defined once, in losses)


def _log_ratio(train_logp: torch.Tensor, infer_logp: torch.Tensor, mask: torch.Tensor):
    if train_logp.shape != infer_logp.shape or train_logp.shape != mask.shape:
        raise ValueError(
            f"train_logp {tuple(train_logp.shape)}, infer_logp {tuple(infer_logp.shape)} and mask "
            f"{tuple(mask.shape)} must have the same shape"
        )
    m = mask.bool()
    log_r = (train_logp.float() - infer_logp.float())[m]
    return log_r.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)


def mismatch_metrics(
    train_logp_BT: torch.Tensor,
    infer_logp_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    taus: Sequence[float] = (2.0,),
) -> dict[str, torch.Tensor]:
    """Mismatch between the training engine's and the inference engine's token log-probs.

    rho_t = pi_train(y_t) / pi_infer(y_t) over masked tokens t:
      mismatch/k3_kl               = mean_t [rho_t - 1 - log rho_t]        (k3 estimator)
      mismatch/k3_kl_per_response  = mean over responses of the sum of k3 over its tokens (the
                                     dose a whole response carries: grows with its length)
      mismatch/extreme_frac@{tau}  = mean_t 1[max(rho_t, 1/rho_t) > tau]  = F(tau)
                                   = mean_t 1[|log rho_t| > log tau]
      mismatch/abs_log_ratio_mean  = mean_t |log rho_t|
      mismatch/abs_log_ratio_max   = max_t |log rho_t|
    With no masked token every value is 0. Computed with the mask as weights (no boolean
    indexing): no device-to-host sync, and any device works, `meta` included.
    """
    if train_logp_BT.shape != infer_logp_BT.shape or train_logp_BT.shape != mask_BT.shape:
        raise ValueError(
            f"train_logp {tuple(train_logp_BT.shape)}, infer_logp {tuple(infer_logp_BT.shape)} and mask "
            f"{tuple(mask_BT.shape)} must have the same shape"
        )
    m = mask_BT.float()
    n = m.sum().clamp(min=1.0)
    diff = train_logp_BT.float() - infer_logp_BT.float()
    log_r = torch.where(mask_BT.bool(), diff, torch.zeros_like(diff)).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    abs_lr = log_r.abs()  # 0 off the mask
    k3_sum = ((torch.exp(log_r) - 1.0 - log_r) * m).sum()
    responses = (m.sum(-1) > 0).float().sum().clamp(min=1.0)
    out: dict[str, torch.Tensor] = {"mismatch/k3_kl": k3_sum / n, "mismatch/k3_kl_per_response": k3_sum / responses}
    for tau in taus:
        if tau <= 1.0:
            raise ValueError(f"extreme-token threshold tau must be > 1, got {tau}")
        out[f"mismatch/extreme_frac@{tau:g}"] = ((abs_lr > math.log(tau)).float() * m).sum() / n
    out["mismatch/abs_log_ratio_mean"] = abs_lr.sum() / n
    out["mismatch/abs_log_ratio_max"] = abs_lr.amax() if abs_lr.numel() else abs_lr.sum()
    return out


def extreme_token_curve(
    train_logp: torch.Tensor, infer_logp: torch.Tensor, mask: torch.Tensor, taus: Sequence[float] | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """F(tau) = mean_t 1[max(rho_t, 1/rho_t) > tau] for each tau (the paper's CDF-style figure).

    Returns (taus float32 [n], F float32 [n]).
    """
    taus_n = torch.as_tensor(taus, dtype=torch.float32, device=train_logp.device).reshape(-1)
    if (taus_n <= 1.0).any():
        raise ValueError(f"every tau must be > 1, got min {taus_n.min().item():g}")
    abs_lr = _log_ratio(train_logp, infer_logp, mask).abs()
    if abs_lr.numel() == 0:
        return taus_n, torch.zeros_like(taus_n)
    f_n = (abs_lr[None, :] > torch.log(taus_n)[:, None]).float().mean(dim=1)
    return taus_n, f_n


def log_ratio_histogram(
    train_logp: torch.Tensor,
    infer_logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    bins: int = 81,
    limit: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Histogram of log rho_t over masked tokens on [-limit, limit]; outliers land in the end bins.

    Returns (edges float32 [bins + 1], counts int64 [bins]).
    """
    log_r = _log_ratio(train_logp, infer_logp, mask).clamp(-limit, limit).cpu()
    edges = torch.linspace(-limit, limit, bins + 1)
    counts = torch.histc(log_r, bins=bins, min=-limit, max=limit).to(torch.int64)
    return edges, counts


LOGITS_CHUNK_TOKENS = 1024
"""Tokens per chunk when a full-vocabulary fp32 temporary is computed from logits (entropy,
log-softmax): each chunk holds about 16 B x chunk x V (fp32 copy, log-softmax, exp, product), 2.5 GB
at Qwen3's 151,936 entries, where a whole 9,216-token sequence would hold 22 GB."""


def token_entropy(logits_BTV: torch.Tensor, *, chunk_tokens: int = 0, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of the predictive distribution softmax(logits / temperature), H = -sum_v p_v log p_v,
    in float32. Returns [B, T].

    chunk_tokens > 0: computed over slices of at most that many positions of one row at a time
    (views of the logits, no copy), so the fp32 temporaries are bounded by the chunk rather than
    the batch (LOGITS_CHUNK_TOKENS); the formula is row-wise, so the result equals the unchunked one
    bit for bit. 0: the whole tensor at once."""
    if chunk_tokens < 0:
        raise ValueError(f"chunk_tokens must be >= 0 (0: unchunked), got {chunk_tokens}")

    def entropy(x):  # fp32, then the temperature: one rounding, as the logprob path does
        logp = torch.log_softmax(x.float() if temperature == 1.0 else x.float() / temperature, dim=-1)
        return -(logp.exp() * logp).sum(dim=-1)

    B, T = logits_BTV.shape[:2]
    if not chunk_tokens or B * T <= chunk_tokens:
        return entropy(logits_BTV)
    out_BT = torch.empty(B, T, dtype=torch.float32, device=logits_BTV.device)
    for b in range(B):
        for t in range(0, T, chunk_tokens):
            out_BT[b, t : t + chunk_tokens] = entropy(logits_BTV[b, t : t + chunk_tokens])
    return out_BT


def routing_disagreement(
    ids_a_TLK: torch.Tensor, ids_b_TLK: torch.Tensor, mask_T: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Routing disagreement between two engines on the same tokens (top-k compared as SETS).

    Accepts [T, L, K] or [B, T, L, K] (mask then [B, T]).
      routing/pair_disagreement  = mean over (token, layer) of 1[set_a != set_b]
      routing/token_disagreement = mean over tokens of 1[any layer differs]
      routing/per_layer          = [L]: mean over tokens of 1[set_a != set_b] in that layer
    Sorting here is only for the set comparison; stored traces are never sorted.
    """
    if ids_a_TLK.shape != ids_b_TLK.shape or ids_a_TLK.ndim < 3:
        raise ValueError(
            f"routing traces must have the same [..., T, L, K] shape, got {tuple(ids_a_TLK.shape)} "
            f"and {tuple(ids_b_TLK.shape)}"
        )
    num_layers, top_k = ids_a_TLK.shape[-2:]
    a_NLK = ids_a_TLK.reshape(-1, num_layers, top_k).sort(dim=-1).values
    b_NLK = ids_b_TLK.reshape(-1, num_layers, top_k).sort(dim=-1).values
    differ_NL = (a_NLK != b_NLK).any(dim=-1)
    if mask_T is not None:
        if mask_T.shape != ids_a_TLK.shape[:-2]:
            raise ValueError(f"mask {tuple(mask_T.shape)} must match the token dims {tuple(ids_a_TLK.shape[:-2])}")
        differ_NL = differ_NL[mask_T.reshape(-1).bool()]
    if differ_NL.shape[0] == 0:
        zero = torch.zeros((), device=ids_a_TLK.device)
        return {
            "routing/pair_disagreement": zero,
            "routing/token_disagreement": zero,
            "routing/per_layer": torch.zeros(num_layers, device=ids_a_TLK.device),
        }
    differ_NL = differ_NL.float()
    return {
        "routing/pair_disagreement": differ_NL.mean(),
        "routing/token_disagreement": (differ_NL.amax(dim=1)).mean(),
        "routing/per_layer": differ_NL.mean(dim=0),
    }


def routing_differ_counts(
    ids_a_BTLK: torch.Tensor, ids_b_BTLK: torch.Tensor, mask_BT: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Sums behind routing_disagreement, mask-weighted (no boolean indexing, no host sync), so a
    batch can be compared in row chunks on any device and the chunks added:
      tokens        = sum_t m_t
      pairs_L       = [L]: sum_t m_t 1[set_a != set_b in layer l]
      tokens_differ = sum_t m_t 1[any layer differs]
    Top-k compared as sets (sorted copies; stored traces are never sorted)."""
    if ids_a_BTLK.shape != ids_b_BTLK.shape or ids_a_BTLK.shape[:-2] != mask_BT.shape:
        raise ValueError(
            f"routing traces {tuple(ids_a_BTLK.shape)} and {tuple(ids_b_BTLK.shape)} must be equal [B, T, L, K] "
            f"with mask [B, T] = {tuple(mask_BT.shape)}"
        )
    a = ids_a_BTLK.long().sort(dim=-1).values
    b = ids_b_BTLK.long().sort(dim=-1).values
    differ_BTL = (a != b).any(dim=-1).float() * mask_BT.float()[..., None]
    return {
        "tokens": mask_BT.float().sum(),
        "pairs_L": differ_BTL.sum(dim=(0, 1)),
        "tokens_differ": differ_BTL.amax(dim=-1).sum(),
    }
