"""transformers training engine (embedded mode): fp32 forward/backward, AdamW, routing replay.

Implements `r3.engines.base.TrainEngine`. It plays the paper's training engine (Megatron): its
fp32 numerics differ from the bf16/fp8 rollout engine, so without replay its routing disagrees
with the rollout's on some (token, layer) pairs. With `routing=ReplayMode.REPLAY` every forward (old-logprob
recompute, policy forward, and the activation recompute under gradient checkpointing) uses the
rollout routing via `r3.engines.hf.replay.RoutingReplay` (PAPER.md "The method").

Forwards feed input_ids[:, :-1] (T = S - 1 tokens): one routing row per fed token, so the
rollout trace [B, T, L, K] lines up with no off-by-one (DESIGN.md invariant 1), and logits at t
predict token t + 1. Position ids come from the attention mask (left or right padding).

Checkpoints (`save`/`load`) hold the model in transformers format (usable by eval and by the
rollout engine) plus the AdamW state and the torch RNG state, so a resumed run continues
bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from pathlib import Path

import torch
from torch import nn

from r3.engines.base import LogprobResult, LossFn, Rows, TrainBatch, config_kwargs
from r3.engines.hf.config import HFTrainConfig
from r3.engines.hf.replay import RoutingReplay, find_moe_blocks
from r3.engines.hf.rollout import load_causal_lm
from r3.metrics import LOGITS_CHUNK_TOKENS, token_entropy
from r3.replay import ReplayMode
from r3.trace import dummy_rows

TRAIN_STATE = "train_state.pt"


class HFTrainEngine:
    """fp32 transformers policy with AdamW; replays rollout routing when asked."""

    def __init__(
        self,
        model_or_path: str | Path | nn.Module,
        *,
        lr: float,
        weight_decay: float = 0.0,
        grad_clip: float = 1.0,
        micro_batch: int = 0,
        max_tokens_per_micro_batch: int = 0,
        seed: int = 0,
        gradient_checkpointing: bool = False,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ):
        if lr <= 0 or grad_clip <= 0 or micro_batch < 0 or max_tokens_per_micro_batch < 0:
            raise ValueError(
                f"need lr > 0, grad_clip > 0, micro_batch >= 0, max_tokens_per_micro_batch >= 0; got {lr}, "
                f"{grad_clip}, {micro_batch}, {max_tokens_per_micro_batch}"
            )
        torch.manual_seed(seed)
        self.model = load_causal_lm(model_or_path).train()
        if gradient_checkpointing:
            self.model.activation_checkpointing_enable()
        self.replay = RoutingReplay(self.model) if find_moe_blocks(self.model) else None
        self.grad_clip = grad_clip
        self.micro_batch = micro_batch
        self.max_tokens_per_micro_batch = max_tokens_per_micro_batch
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=lr, weight_decay=weight_decay, betas=betas, eps=eps
        )

    @classmethod
    def from_config(cls, cfg: HFTrainConfig) -> "HFTrainEngine":
        """The registry's constructor (r3.engines.registry)."""
        return cls(cfg.model_path, **config_kwargs(cfg))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # --- forward ------------------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.replay is not None

    train_step_sees_whole_batch = True  # one process: the loss sees every row (r3.algorithm fuses pi_old)

    def _routing_ctx(self, batch: TrainBatch, rows: slice, routing: ReplayMode):
        if routing is ReplayMode.OFF:
            return contextlib.nullcontext()
        if self.replay is None:
            raise ValueError(
                f"routing={routing.name} but the model has no MoE layers (the dense control has no routing)"
            )
        if routing is ReplayMode.RECORD:
            return self.replay.recording()
        ids = batch.expert_ids_BTLK
        B, S = batch.input_ids_BS.shape
        if ids is None:
            raise ValueError(
                "routing=REPLAY but batch.expert_ids_BTLK is None; the rollout engine must capture routing"
            )
        if ids.shape[:2] != (B, S - 1):
            raise ValueError(
                f"batch routing has [B, T] = {tuple(ids.shape[:2])}, expected [{B}, {S - 1}] for input_ids "
                f"[{B}, {S}] (one row per fed token; the last token has none)"
            )
        return self.replay.replaying(ids[rows])

    def _forward(self, batch: TrainBatch, rows: slice) -> torch.Tensor:
        """logits_BTV / batch.temperature of rows, from feeding input_ids[:, :-1]: the distribution the
        rollout sampled from (DESIGN.md invariant 6)."""
        dev = self.device
        ids_BS = batch.input_ids_BS[rows].to(dev)
        mask_BT = batch.attention_mask_BS[rows, :-1].to(dev).long()
        pos_BT = (mask_BT.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids_BS[:, :-1], attention_mask=mask_BT, position_ids=pos_BT, use_cache=False)
        logits = out.logits
        return logits if batch.temperature == 1.0 else logits / batch.temperature

    @staticmethod
    def _token_logp(logits_BTV: torch.Tensor, input_ids_BS: torch.Tensor) -> torch.Tensor:
        """log p(input_ids[:, t+1] | prefix) in float32, [B, T]."""
        logp_BTV = torch.log_softmax(logits_BTV.float(), dim=-1)
        return logp_BTV.gather(-1, input_ids_BS[:, 1:, None].to(logits_BTV.device))[..., 0]

    def _parts(self, batch: TrainBatch) -> list[tuple[Rows, TrainBatch]]:
        """The micro-batches: (rows of the batch, those rows as a batch). Fixed-size slices
        (`micro_batch`), length-grouped rows trimmed to their longest (`max_tokens_per_micro_batch`),
        or the whole batch."""
        B = batch.input_ids_BS.shape[0]
        if self.max_tokens_per_micro_batch:
            return [
                (rows, _take_rows(batch, rows))
                for rows in length_grouped_rows(batch.attention_mask_BS, self.max_tokens_per_micro_batch)
            ]
        mb = self.micro_batch or B
        return [(rows, _take_rows(batch, rows)) for rows in (slice(i, min(i + mb, B)) for i in range(0, B, mb))]

    @torch.no_grad()
    def compute_logprobs(
        self, batch: TrainBatch, *, routing: ReplayMode = ReplayMode.OFF, with_entropy: bool = False
    ) -> LogprobResult:
        """No-grad forward under `routing` at batch.temperature; results on the engine's device; RECORD
        returns this engine's own routing."""
        B, T = batch.loss_mask_BT.shape
        dev = self.device
        logp_BT = torch.zeros(B, T, device=dev)
        ent_BT = torch.zeros(B, T, device=dev) if with_entropy else None
        ids_BTLK = None
        for rows, part in self._parts(batch):
            with self._routing_ctx(part, slice(None), routing):
                logits_BTV = self._forward(part, slice(None))
                if routing is ReplayMode.RECORD:
                    rec = self.replay.recorded_expert_ids()
                    if ids_BTLK is None:  # columns a trimmed micro-batch did not feed: padding rows
                        L, K = rec.shape[2:]
                        ids_BTLK = dummy_rows(B * T, L, K).view(B, T, L, K).to(rec.device, rec.dtype)
                    ids_BTLK[rows, : rec.shape[1]] = rec
            logp_BT[rows] = _pad_T(self._token_logp(logits_BTV, part.input_ids_BS), T)
            if with_entropy:
                ent_BT[rows] = _pad_T(token_entropy(logits_BTV, chunk_tokens=LOGITS_CHUNK_TOKENS), T)
        return LogprobResult(logp_BT=logp_BT, entropy_BT=ent_BT, expert_ids_BTLK=ids_BTLK)

    # --- optimisation -------------------------------------------------------------------------
    def train_step(self, batch: TrainBatch, loss_fn: LossFn, *, routing: ReplayMode = ReplayMode.OFF) -> dict:
        """One optimizer step; each micro-batch's loss is backpropagated as returned (loss_fn
        normalises by the whole mini-batch). The replay context stays open through backward so a
        gradient-checkpointing recompute replays too."""
        if routing is ReplayMode.RECORD:
            raise ValueError("train_step takes routing OFF or REPLAY (record with compute_logprobs)")
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        B, T = batch.loss_mask_BT.shape
        total_loss = torch.zeros((), device=self.device)
        sums: dict[str, torch.Tensor] = {}
        for rows, part in self._parts(batch):
            with self._routing_ctx(part, slice(None), routing):
                logits_BTV = self._forward(part, slice(None))
                logp_BT = _pad_T(self._token_logp(logits_BTV, part.input_ids_BS), T)
                with torch.no_grad():
                    ent_BT = _pad_T(token_entropy(logits_BTV, chunk_tokens=LOGITS_CHUNK_TOKENS), T)
                loss, metrics = loss_fn(logp_BT, ent_BT, rows)
                loss.backward()
            total_loss = total_loss + loss.detach()
            for k, v in metrics.items():  # summed: loss_fn normalises by the mini-batch (LossFn); on device
                sums[k] = sums.get(k, 0.0) + torch.as_tensor(v).detach()
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm_t = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        grad_norm = float(grad_norm_t)  # one sync: the skip decision needs it on the host
        out = dict(sums)
        if math.isfinite(grad_norm):
            self.optimizer.step()
            out["actor/skipped_step"] = 0.0
        else:  # a non-finite gradient would poison AdamW's moments: skip this step, say so
            out["actor/skipped_step"] = 1.0
        self.optimizer.zero_grad(set_to_none=True)
        out.update(
            {
                "actor/grad_norm": grad_norm_t.detach(),
                "actor/loss": total_loss,
                "actor/lr": float(self.optimizer.param_groups[0]["lr"]),
            }
        )
        return out

    def rollout_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.model.state_dict().items()}

    # --- checkpoints --------------------------------------------------------------------------
    def save(self, path: str) -> None:
        """`path` is a directory: transformers weights + config, and train_state.pt (AdamW, RNG)."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out)
        torch.save({"optimizer": self.optimizer.state_dict(), "torch_rng": torch.get_rng_state()}, out / TRAIN_STATE)

    def load(self, path: str) -> None:
        src = Path(path)
        if not (src / TRAIN_STATE).exists():
            raise FileNotFoundError(f"{src} has no {TRAIN_STATE}; not a checkpoint written by HFTrainEngine.save")
        self.model.load_state_dict(load_causal_lm(src).state_dict(), strict=True)
        state = torch.load(src / TRAIN_STATE, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])


def length_grouped_rows(attention_mask_BS: torch.Tensor, max_tokens: int) -> list[torch.Tensor]:
    """Rows grouped by length for micro-batches: sorted by length (stable), packed greedily while
    rows x longest row <= max_tokens (a row longer than that gets a micro-batch of its own). Each
    group is an ascending int64 index tensor. Length = position of the last real token + 1."""
    B, S = attention_mask_BS.shape
    length_B = ((attention_mask_BS != 0) * torch.arange(1, S + 1)).amax(dim=-1)
    groups, cur, cur_max = [], [], 0
    for b in torch.argsort(length_B, stable=True).tolist():
        L = int(length_B[b])
        if cur and (len(cur) + 1) * max(cur_max, L) > max_tokens:
            groups.append(cur)
            cur, cur_max = [], 0
        cur.append(b)
        cur_max = max(cur_max, L)
    groups.append(cur)
    return [torch.tensor(sorted(g), dtype=torch.long) for g in groups if g]


def _take_rows(batch: TrainBatch, rows: Rows) -> TrainBatch:
    """Rows `rows` of a batch, trimmed to their longest row (columns past it are padding in all of them)."""
    mask_BS = batch.attention_mask_BS[rows]
    S = int(((mask_BS != 0) * torch.arange(1, mask_BS.shape[1] + 1)).amax()) if mask_BS.numel() else 1
    S = max(S, 2)  # one fed token at least
    ids = batch.expert_ids_BTLK
    return dataclasses.replace(
        batch,
        input_ids_BS=batch.input_ids_BS[rows, :S],
        attention_mask_BS=mask_BS[:, :S],
        loss_mask_BT=batch.loss_mask_BT[rows, : S - 1],
        expert_ids_BTLK=None if ids is None else ids[rows, : S - 1],
    )


def _pad_T(x_BT: torch.Tensor, T: int) -> torch.Tensor:
    """Right-pad the token axis with zeros back to the mini-batch's T (a trimmed micro-batch)."""
    return x_BT if x_BT.shape[1] == T else nn.functional.pad(x_BT, (0, T - x_BT.shape[1]))
