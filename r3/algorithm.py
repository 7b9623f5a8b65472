"""The algorithm step of one global step, as the paper describes it (PAPER.md "The method").

    metrics = policy_update(settings, train_engine, batch)

Given a rollout batch (tokens, the inference engine's logprobs, its routing, rewards):
  1. old logprobs pi_old: a no-grad forward of the training engine, replaying the rollout
     routing when R3 is on (the paper's Eq. for R3: the training router's top-k is replaced by
     the rollout mask, gates stay the softmax of the training logits over it);
  2. mismatch metrics of pi_old against pi_infer: k3 KL and F(2) (r3.metrics), and the routing
     disagreement of the training engine's own routing against the rollout's;
  3. GRPO group advantages (r3.losses.group_advantages); TIS weights min(pi_old / pi_infer, C)
     when asked (r3.losses.tis_weights);
  4. `mini_steps` mini-batches of whole groups, one optimizer step each, with the GRPO (PPO clip,
     dual clip) or GSPO loss, under the same routing mode.
Metrics stay tensors until the runner logs them (STYLE.md rule 9); `to_host` converts them.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Protocol

import torch

from r3.engines.base import Rows, TrainBatch, TrainEngine
from r3.losses import LossAgg, group_advantages, gspo_loss, ppo_clip_loss, tis_weights
from r3.metrics import mismatch_metrics, routing_differ_counts
from r3.replay import ReplayMode


class AlgorithmSettings(Protocol):
    """The fields of a run's config that the step reads (experiments.config.RunConfig has them)."""

    algorithm: str  # "grpo" | "gspo"
    replay: bool
    routing_probe: bool
    tis: bool
    tis_cap: float
    mini_steps: int
    group_size: int
    std_normalize: bool
    clip_low: float
    clip_high: float
    dual_clip: float | None
    gspo_clip_low: float
    gspo_clip_high: float
    loss_agg: LossAgg
    lr: float
    temperature: float
    top_p: float


@dataclasses.dataclass(kw_only=True)
class Batch:
    """A global step's kept groups as training tensors."""

    train: TrainBatch
    infer_logp_BT: torch.Tensor
    """float32 [B, T]: the inference engine's logprobs at the response positions (0 elsewhere)."""
    rewards_B: torch.Tensor
    """float32 [B]; groups are contiguous runs of group_size rows."""


def slice_batch(batch: TrainBatch, rows: slice) -> TrainBatch:
    """Rows `rows` of a TrainBatch (a mini-batch of whole groups)."""
    return batch.rows(rows)


def mini_batch_slices(n_groups: int, group_size: int, mini_steps: int) -> list[slice]:
    """Row slices of `mini_steps` mini-batches of whole groups, sizes as even as possible
    (a step short of groups after dynamic sampling gets fewer mini-batches, never empty ones)."""
    if n_groups < 1:
        return []
    m = min(mini_steps, n_groups)
    base, extra = divmod(n_groups, m)
    out, start = [], 0
    for i in range(m):
        n = base + (i < extra)
        out.append(slice(start * group_size, (start + n) * group_size))
        start += n
    return out


STEP_TAUS = (2.0, 5.0, 10.0)
"""Thresholds of the per-step F(tau) metrics (mismatch/extreme_frac@tau): the paper's F(2), and the
tail at 5 and 10 where heavy-tailed ratios would show first."""
ROUTING_METRIC_CHUNK_ROWS = 64
"""Rows of the rollout trace moved to the engine's device at a time for the routing-disagreement
metric, so the whole trace (GBs at the paper's lengths) never sits on the device at once."""


def _loss_fn(
    s: AlgorithmSettings, old_BT, adv_B, mask_BT, tis_BT, n_tok: torch.Tensor, n_seq: torch.Tensor, fused: _Fused | None
):
    """The LossFn (r3.engines.base) of one mini-batch: every tensor it closes over is already on the
    engine's device. Loss and metrics are normalised by the whole mini-batch (the engine sums them
    over micro-batches): token-level metrics weighted by the micro-batch's share of response tokens,
    GSPO's sequence-level ones by its share of sequences with tokens. With `fused`, pi_old of each
    micro-batch is its own logp (detached) and the TIS weights come from it."""

    def loss_fn(logp_BT, entropy_BT, rows):
        old_rows = old_BT[rows] if fused is None else fused.take(logp_BT, entropy_BT, rows)
        mask_rows = mask_BT[rows]
        tis_rows = None if tis_BT is None else tis_BT[rows]
        if fused is not None and s.tis:
            tis_rows = tis_weights(old_rows, fused.infer_logp_BT[rows], mask_rows, cap=s.tis_cap)
        if s.algorithm == "gspo":  # GSPO + TIS is refused by the run config (no published form here)
            loss, metrics = gspo_loss(
                logp_BT,
                old_rows,
                adv_B[rows],
                mask_rows,
                clip_low=s.gspo_clip_low,
                clip_high=s.gspo_clip_high,
                normalizer=n_seq,
            )
            share = (mask_rows.sum(dim=1) > 0).sum() / n_seq.clamp(min=1)
        else:
            loss, metrics = ppo_clip_loss(
                logp_BT,
                old_rows,
                adv_B[rows],
                mask_rows,
                clip_low=s.clip_low,
                clip_high=s.clip_high,
                dual_clip=s.dual_clip,
                is_weights_BT=tis_rows,
                agg=s.loss_agg,
                normalizer=n_tok if s.loss_agg == "token-mean" else n_seq,
            )
            share = mask_rows.sum() / n_tok
        return loss, {k: v * share for k, v in metrics.items()}

    return loss_fn


class _Fused:
    """pi_old taken from the single mini-step's own forward: collects each micro-batch's detached
    logp and entropy (on the engine's device) as train_step calls the loss, so the metrics can be
    computed after it. Which rows arrived is kept on the host (no device sync)."""

    def __init__(self, infer_logp_BT: torch.Tensor) -> None:
        self.infer_logp_BT = infer_logp_BT
        self.old_BT = torch.zeros_like(infer_logp_BT)
        self.entropy_BT = torch.zeros_like(infer_logp_BT)
        self.seen_B = torch.zeros(infer_logp_BT.shape[0], dtype=torch.bool)

    def take(self, logp_BT: torch.Tensor, entropy_BT: torch.Tensor | None, rows: Rows) -> torch.Tensor:
        old = logp_BT.detach()
        self.old_BT[rows] = old
        if entropy_BT is not None:
            self.entropy_BT[rows] = entropy_BT.detach()
        self.seen_B[rows.cpu() if isinstance(rows, torch.Tensor) else rows] = True
        return old

    def check_complete(self) -> None:
        missing = (~self.seen_B).nonzero().flatten().tolist()
        if missing:  # an engine that skipped rows would leave zeros as pi_old: refuse
            raise RuntimeError(
                f"fused pi_old: the training step's loss never saw rows {missing[:10]} of {len(self.seen_B)} "
                f"(it saw {int(self.seen_B.sum())} distinct rows, expected all); an engine whose train_step "
                "sees only some rows must set train_step_sees_whole_batch = False"
            )


def policy_update(s: AlgorithmSettings, engine: TrainEngine, batch: Batch) -> dict[str, torch.Tensor | float]:
    """Old logprobs, mismatch and routing metrics, advantages, TIS, and the mini-step updates of
    one global step. Routing is REPLAY in every forward when s.replay (R3), OFF otherwise.
    Returns metrics: tensors (on the engine's device) and floats; `to_host` them.

    Devices (DESIGN.md invariant 7): the engine computes on `engine.device` and returns its results
    there; what the loss closes over (mask, advantages, inference logprobs, TIS weights) is moved
    there once, here; nothing inside the step is copied back to the host.
    Temperature (invariant 6): the batch is scored at the sampler's temperature `s.temperature`.

    pi_old: a separate no-grad forward, except in a single-mini-step update (`_fuses_old`), where
    the policy has not moved before its one optimizer step, so pi_old is that step's own forward,
    detached (ratio exactly 1; TRL's GRPOTrainer does the same with num_iterations=1): one forward
    fewer. Routing disagreement: without R3 the pi_old forward records the engine's own routing
    (so a non-R3 MoE run keeps the separate forward); with R3, when s.routing_probe, one extra
    no-grad forward routes natively (metrics only)."""
    if s.top_p < 1.0:  # the trainers score the untruncated tempered distribution
        raise ValueError(
            f"top_p={s.top_p} < 1: the rollout samples from a truncated distribution that the trainer does not "
            "apply, so pi_old / pi_infer (mismatch metrics, TIS, the ratio) would compare different "
            "distributions; use top_p=1 for training rollouts (evaluation may truncate)"
        )
    tb = dataclasses.replace(batch.train, temperature=s.temperature)
    dev = engine.device
    mask_BT = tb.loss_mask_BT.to(dev, torch.float32)
    infer_BT = batch.infer_logp_BT.to(dev, torch.float32)
    moe = engine.is_moe and tb.expert_ids_BTLK is not None
    if s.replay and not moe:
        raise ValueError(
            "replay is on but the batch has no rollout routing or the model has no experts; "
            "the rollout engine must capture routing (DESIGN.md invariant 3)"
        )
    m: dict[str, torch.Tensor | float] = {}
    fused = _Fused(infer_BT) if _fuses_old(s, engine, moe) else None
    own_routing = None
    old_BT = entropy_BT = None
    if fused is None:
        t0 = time.time()
        routing = ReplayMode.REPLAY if s.replay else (ReplayMode.RECORD if moe else ReplayMode.OFF)
        old = engine.compute_logprobs(tb, routing=routing, with_entropy=True)
        old_BT, entropy_BT, own_routing = old.logp_BT.detach(), old.entropy_BT, old.expert_ids_BTLK
        m["time/old_logprob"] = time.time() - t0
    if s.replay and s.routing_probe:  # the train engine's own routing, for the disagreement metric only
        t0 = time.time()
        own_routing = engine.compute_logprobs(tb, routing=ReplayMode.RECORD).expert_ids_BTLK
        m["time/routing_probe"] = time.time() - t0
    if own_routing is not None:
        m.update(_routing_metrics(tb, own_routing, dev))

    adv_B = group_advantages(batch.rewards_B.to(dev), s.group_size, std_normalize=s.std_normalize)
    tis_BT = None
    if s.tis and fused is None:
        tis_BT = tis_weights(old_BT, infer_BT, mask_BT, cap=s.tis_cap)

    t0 = time.time()
    per_step: dict[str, list] = {}
    update_routing = ReplayMode.REPLAY if s.replay else ReplayMode.OFF
    for rows in mini_batch_slices(len(batch.rewards_B) // s.group_size, s.group_size, s.mini_steps):
        mb_mask = mask_BT[rows]
        n_seq = (mb_mask.sum(dim=1) > 0).sum() if s.algorithm == "gspo" else mb_mask.new_full((), mb_mask.shape[0])
        loss_fn = _loss_fn(
            s,
            None if old_BT is None else old_BT[rows],
            adv_B[rows],
            mb_mask,
            None if tis_BT is None else tis_BT[rows],
            mb_mask.sum().clamp(min=1),
            n_seq.float(),
            fused,
        )
        out = engine.train_step(tb.rows(rows), loss_fn, routing=update_routing)
        for k, v in out.items():
            per_step.setdefault(k, []).append(torch.as_tensor(v, dtype=torch.float32))
    m["time/train"] = time.time() - t0
    if fused is not None:
        fused.check_complete()
        old_BT, entropy_BT = fused.old_BT, fused.entropy_BT
        if s.tis:
            tis_BT = tis_weights(old_BT, infer_BT, mask_BT, cap=s.tis_cap)
    m.update(mismatch_metrics(old_BT, infer_BT, mask_BT, taus=STEP_TAUS))
    ntok = mask_BT.sum().clamp(min=1)
    m["actor/entropy"] = (entropy_BT * mask_BT).sum() / ntok if entropy_BT is not None else float("nan")
    if tis_BT is not None:
        m["actor/tis_weight_mean"] = (tis_BT * mask_BT).sum() / ntok
    for k, vs in per_step.items():
        m[k] = torch.stack([v.to(dev) for v in vs]).mean()
    m["actor/mini_steps"] = float(len(per_step.get("actor/grad_norm", [])))
    m["actor/lr"] = s.lr
    m["actor/fused_old_logprob"] = float(fused is not None)
    return m


def _routing_metrics(tb: TrainBatch, own_BTLK: torch.Tensor, dev: torch.device) -> dict[str, torch.Tensor]:
    """Disagreement of the training engine's own routing (`own_BTLK`, on `dev`) with the rollout's
    (tb.expert_ids_BTLK, on the host), on fed tokens only: with right padding, position t is a fed
    token of the trace iff token t+1 is real (n tokens, n-1 rows). The rollout trace goes to the
    device ROUTING_METRIC_CHUNK_ROWS rows at a time; the sums are added there (no host sync)."""
    B = tb.expert_ids_BTLK.shape[0]
    fed_BT = tb.attention_mask_BS[:, 1:].bool()
    acc: dict[str, torch.Tensor] = {}
    for i in range(0, B, ROUTING_METRIC_CHUNK_ROWS):
        rows = slice(i, min(i + ROUTING_METRIC_CHUNK_ROWS, B))
        c = routing_differ_counts(tb.expert_ids_BTLK[rows].to(dev), own_BTLK[rows], fed_BT[rows].to(dev))
        acc = {k: acc[k] + v if k in acc else v for k, v in c.items()}
    n = acc["tokens"].clamp(min=1)
    out = {
        "routing/pair_disagreement": acc["pairs_L"].sum() / (n * acc["pairs_L"].numel()),
        "routing/token_disagreement": acc["tokens_differ"] / n,
    }
    for layer in range(acc["pairs_L"].numel()):  # grows with depth? (routing flips compound over layers)
        out[f"routing/layer{layer}_disagreement"] = acc["pairs_L"][layer] / n
    return out


def _fuses_old(s: AlgorithmSettings, engine: TrainEngine, moe: bool) -> bool:
    """Take pi_old from the update's own forward: one mini-step (the policy has not moved), the
    engine's loss sees every row here, and no separate forward is needed anyway to record the
    engine's native routing (a non-R3 MoE run records it in the pi_old forward)."""
    return s.mini_steps == 1 and engine.train_step_sees_whole_batch and (s.replay or not moe)


def to_host(metrics: dict) -> dict[str, float]:
    """Metrics as Python floats: the one device sync of a step's metrics, at logging time."""
    return {k: float(v) for k, v in metrics.items()}
