"""MegatronTrainEngine: the TrainEngine protocol (r3.engines.base) on a megatron-core GPTModel.

The model is built from a transformers Qwen3-MoE (or dense Qwen3) model or checkpoint directory
(r3.engines.megatron.model, r3.engines.megatron.hf_io); routing replay drives megatron's own
RouterReplay through a per-engine handle (r3.engines.megatron.replay).

Numerics and optimizer (r3.engines.megatron.optim), chosen by `precision`:
- "fp32" (the embedded default): fp32 parameters, `torch.optim.AdamW` replicated on every DP
  rank, gradients summed over replicas and clipped by their global norm here;
- "bf16": bf16 parameters, megatron's DDP with fp32 main gradients and megatron's distributed
  optimizer (fp32 master weights + Adam state sharded over DP), megatron's clipping.
A step whose gradient norm is not finite is skipped (megatron's optimizer skips on found_inf).

Process model (r3.engines.megatron.parallel): one process, or N ranks from the environment
(torchrun / Slurm) with TP, EP and DP; every rank receives the same global mini-batch and trains on
its DP slice; per-row results are all-gathered, gradients summed over replicas, metrics summed
over the DP group, so every rank returns what one rank would. TP > 1 runs with sequence
parallelism (sequences right-padded to a multiple of TP; norm/router gradients summed over TP;
experts whole on every TP rank, reduced over their expert-DP group). PP > 1 runs megatron's own
1F1B schedule (`get_forward_backward_func`; on CPU gloo ranks inside compat.cpu_pipeline_schedule):
each stage holds a contiguous block of decoder layers (parallel.stage_layer_counts, checked against
megatron's get_transformer_layer_offset), its routers replay the trace's rows of THEIR global MoE
layers (replay.MegatronRouterReplay.layers), the last stage computes logprobs, loss and metrics, which
are broadcast over the PP group (every rank returns the whole [B, T] result, as with PP = 1), the
gradient norm sums every stage's parameters, and rollout_state_dict gathers the stages to the first.

Departures from a full Megatron training stack:
- Checkpoints are one file per rank (model shard, optimizer state, RNG), resumable with the same
  layout only; megatron's resharding distributed checkpoints are not used.
- The local (TE-free) layer spec; under PP no virtual (interleaved) stages, untied embeddings only,
  micro-batches padded to one shape (copies of a row, without loss). Context parallelism and packed
  (THD) sequences need Transformer Engine's attention and are refused (`context_parallel`,
  `packed_sequences`: r3.engines.megatron.token_order.require_transformer_engine); replay's row
  mapping for them is built (token_order, used by replay.MegatronRouterReplay) and tested.
- Entropy in train_step is computed without gradient (a metric, not a loss term).
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import torch

from r3.engines.base import LogprobResult, LossFn, TrainBatch, config_kwargs
from r3.engines.megatron import parallel
from r3.engines.megatron.compat import cpu_device_scope
from r3.engines.megatron.config import MegatronTrainConfig
from r3.engines.megatron.logits import token_logprobs as chunked_token_logprobs
from r3.engines.megatron.model import (
    build_gpt_model,
    gpt_logits,
    load_hf_weights,
    megatron_to_hf,
    stage_layers,
    to_global_layer_names,
)
from r3.engines.megatron.optim import Fp32AdamW, MegatronMixedPrecision
from r3.engines.megatron.replay import MegatronRouterReplay, to_megatron_layout
from r3.engines.megatron.token_order import require_transformer_engine
from r3.metrics import LOGITS_CHUNK_TOKENS
from r3.replay import ReplayMode
from r3.trace import RoutingSpec, trace_dtype

CHECKPOINT_FILE = "megatron_train_engine.pt"
"""File written inside the directory passed to save()/load() (one process; with N ranks each rank
writes `megatron_train_engine.rank<r>-of-<N>.pt`, see `checkpoint_file`)."""
_SHAPE_KEYS = ("model_type", "num_hidden_layers", "hidden_size", "vocab_size", "num_experts", "num_experts_per_tok")


def token_logprobs(
    logits_BSV: torch.Tensor,
    input_ids_BS: torch.Tensor,
    *,
    with_entropy: bool,
    temperature: float = 1.0,
    chunk_tokens: int = LOGITS_CHUNK_TOKENS,
):
    """logp_BT[b, t] = log p(input_ids[b, t+1] | prefix) under softmax(logits / temperature) (the
    sampler's distribution, DESIGN.md invariant 6) and (optionally, without gradient) its
    predictive entropy at t (r3.metrics.token_entropy), T = S - 1. Returns (logp_BT, entropy_BT or
    None), float32. Computed `chunk_tokens` positions at a time (r3.engines.megatron.logits: the
    full-vocabulary fp32 temporaries of a 9k-token sequence would be ~11-22 GB); 0: all at once."""
    return chunked_token_logprobs(
        logits_BSV, input_ids_BS, with_entropy=with_entropy, temperature=temperature, chunk_tokens=chunk_tokens
    )


def _pad_cols(x_BT: torch.Tensor, width: int) -> torch.Tensor:
    """x_BT right-padded with zeros to `width` columns (positions a trimmed micro-batch did not feed:
    masked out of every loss and metric); differentiable."""
    return x_BT if x_BT.shape[1] == width else torch.nn.functional.pad(x_BT, (0, width - x_BT.shape[1]))


def _pad_record(rec_BTLK: torch.Tensor, width: int) -> torch.Tensor:
    """A recording of a trimmed micro-batch padded to `width` positions with the distinct dummy experts
    of padding rows (r3.trace.dummy_rows), so the whole batch's recording stays replayable."""
    from r3.trace import dummy_rows

    b, t, L, K = rec_BTLK.shape
    if t == width:
        return rec_BTLK
    pad = dummy_rows(b * (width - t), L, K).view(b, width - t, L, K).to(rec_BTLK.device, rec_BTLK.dtype)
    return torch.cat([rec_BTLK, pad], dim=1)


class MegatronTrainEngine:
    """See the module docstring. `hf_model_or_path`: a transformers Qwen3MoeForCausalLM /
    Qwen3ForCausalLM, or its checkpoint directory (safetensors, read lazily in fp32 by
    r3.engines.megatron.hf_io: each rank reads the dense weights and only its own experts)."""

    def __init__(
        self,
        hf_model_or_path,
        *,
        lr: float,
        weight_decay: float = 0.0,
        grad_clip: float = 1.0,
        micro_batch: int = 0,
        seed: int = 0,
        recompute: bool = False,
        tensor_parallel: int = 1,
        pipeline_parallel: int = 1,
        expert_parallel: int = 1,
        precision: str = "fp32",
        token_dispatcher: str | None = None,
        context_parallel: int = 1,
        packed_sequences: bool = False,
        attention: str = "sdpa",
    ):
        # before anything is built: CP and packed (THD) batches need Transformer Engine's attention
        require_transformer_engine(context_parallel=context_parallel, packed_sequences=packed_sequences)
        if isinstance(hf_model_or_path, (str, Path)):  # read lazily: each rank only the tensors it keeps
            from transformers import AutoConfig

            from r3.engines.megatron.hf_io import LazyHFStateDict

            self.hf_config = AutoConfig.from_pretrained(str(hf_model_or_path))
            hf_sd = LazyHFStateDict(hf_model_or_path)
        else:
            self.hf_config, hf_sd = hf_model_or_path.config, hf_model_or_path.state_dict()
        if micro_batch < 0:
            raise ValueError(f"micro_batch must be >= 0 (0: whole mini-batch), got {micro_batch}")
        self.micro_batch, self.grad_clip, self.recompute = micro_batch, grad_clip, recompute
        torch.manual_seed(seed)
        self.is_moe = self.hf_config.model_type == "qwen3_moe"
        self.layout = parallel.init_parallel(tp=tensor_parallel, pp=pipeline_parallel, ep=expert_parallel, seed=seed)
        self.precision = precision
        self.model = build_gpt_model(
            self.hf_config,
            routing_replay=self.is_moe,
            recompute=recompute,
            tp=tensor_parallel,
            pp=pipeline_parallel,
            ep=expert_parallel,
            precision=precision,
            attention=attention,  # r3.engines.megatron.model.ATTENTION_KINDS
            **({"token_dispatcher": token_dispatcher} if self.is_moe else {}),
        )
        ep_rank, ep_size = parallel.ep_rank_size()
        self.tp_rank, self.tp_size = parallel.tp_rank_size()
        self.pp_rank, self.pp_size = parallel.pp_rank_size()
        self.stage_layers = stage_layers(self.model)  # global decoder-layer indices of this stage
        counts = parallel.stage_layer_counts(self.hf_config.num_hidden_layers, self.pp_size)
        expected = range(sum(counts[: self.pp_rank]), sum(counts[: self.pp_rank + 1]))
        if self.stage_layers != expected:  # megatron's get_transformer_layer_offset vs our split
            raise RuntimeError(
                f"pipeline stage {self.pp_rank} of {self.pp_size} holds decoder layers {self.stage_layers}, "
                f"expected {expected} (split {counts}, r3.engines.megatron.parallel.stage_layer_counts)"
            )
        load_hf_weights(
            self.model,
            hf_sd,
            self.hf_config,
            ep_rank=ep_rank,
            ep_size=ep_size,
            tp_rank=self.tp_rank,
            tp_size=self.tp_size,
        )
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        from r3.engines.megatron.model import is_tp_sharded

        for name, p in self.model.named_parameters():
            if self.tp_size > 1 and is_tp_sharded(name):
                # megatron sets these in its weight initialisation, which is skipped here (weights are
                # loaded): without them its grad norm takes TP shards for duplicates
                row_parallel = name.endswith(("linear_proj.weight", "linear_fc2.weight"))
                set_tensor_model_parallel_attributes(p, True, 1 if row_parallel else 0, 1)
            if ".local_experts." in name:
                # Experts are reduced over their expert-DP group, which under TP with sequence
                # parallelism also holds the TP ranks (each routed its own sequence slice through
                # whole experts: expert TP = 1). megatron marks experts this way only when EP > 1.
                p.allreduce = False
        self.dp_rank, self.dp_size = parallel.dp_rank_size()
        # under DP each rank's loss sees its own rows; under PP only the last stage computes the loss
        self.train_step_sees_whole_batch = self.dp_size == 1 and self.pp_size == 1
        self.spec = RoutingSpec.from_hf_config(self.hf_config) if self.is_moe else None
        self.replay = MegatronRouterReplay(self.model, self.spec) if self.is_moe else None
        self._trace_dtype = trace_dtype(self.spec.num_experts) if self.is_moe else torch.int64
        # trace layers (MoE layers) of every pipeline stage; collective over the PP group, checks
        # that the stages own each trace layer once, in order
        self.stage_moe_layers = self.replay.check_pipeline_layers() if self.is_moe else None
        if precision == "bf16":
            self.optim = MegatronMixedPrecision(self.model, lr=lr, weight_decay=weight_decay, grad_clip=grad_clip)
        else:
            self.optim = Fp32AdamW(
                self.model, lr=lr, weight_decay=weight_decay, grad_clip=grad_clip, world_size=self.layout.world_size
            )
        self.device = next(self.model.parameters()).device
        self.steps = 0

    @classmethod
    def from_config(cls, cfg: MegatronTrainConfig) -> "MegatronTrainEngine":
        """The registry's constructor (r3.engines.registry)."""
        dispatcher = None if cfg.token_dispatcher == "auto" else cfg.token_dispatcher
        return cls(cfg.model_path, **config_kwargs(cfg, token_dispatcher=dispatcher))

    # --- batch handling ---------------------------------------------------------------------
    def _check_batch(self, batch: TrainBatch, routing: ReplayMode) -> None:
        ids, am = batch.input_ids_BS, batch.attention_mask_BS
        if ids.ndim != 2 or am.shape != ids.shape:
            raise ValueError(
                f"input_ids_BS {tuple(ids.shape)} and attention_mask_BS {tuple(am.shape)} must be equal [B, S]"
            )
        B, S = ids.shape
        if S < 2:
            raise ValueError(f"sequences need >= 2 tokens to have a target, got S={S}")
        if batch.loss_mask_BT.shape != (B, S - 1):
            raise ValueError(
                f"loss_mask_BT has shape {tuple(batch.loss_mask_BT.shape)}, expected ({B}, {S - 1}) = [B, S-1]"
            )
        am = am.bool()
        if (am[:, 1:] & ~am[:, :-1]).any():
            raise ValueError(
                "attention_mask_BS is not right-padded (a real token follows padding); "
                "the megatron engine uses causal masking only: right-pad the batch"
            )
        if routing is not ReplayMode.OFF and not self.is_moe:
            raise ValueError(f"routing={routing.name} but the model is dense: it has no router to replay or record")
        if routing is ReplayMode.REPLAY and batch.expert_ids_BTLK is None:
            raise ValueError("routing=REPLAY but batch.expert_ids_BTLK is None: the rollout did not capture routing")

    def _local(self, batch: TrainBatch) -> tuple[TrainBatch, int, int]:
        """(this DP rank's rows padded to ceil(B / DP) with copies of its first row, first global row,
        number of real rows); the whole batch with one DP rank (parallel.dp_slice). Under sequence
        parallelism the sequence is right-padded to a multiple of TP (pad token 0, masked, dummy
        routing rows); callers drop the padded positions (`[:, : S - 1]`) from the results."""
        B = batch.input_ids_BS.shape[0]
        start, real = 0, B
        if self.dp_size > 1:
            rows, n = parallel.dp_slice(B, self.dp_size, self.dp_rank)
            idx = torch.arange(rows.start, rows.stop)
            # padding rows (no loss, dropped from results): copies of this rank's first row, or of the
            # batch's row 0 on a rank left without rows (a mini-batch of fewer rows than DP ranks)
            fill = idx[:1] if len(idx) else torch.zeros(1, dtype=torch.long)
            batch = batch.rows(torch.cat([idx, fill.expand(n - len(idx))]))
            start, real = rows.start, rows.stop - rows.start
        pad = -batch.input_ids_BS.shape[1] % self.tp_size
        if pad:  # right padding: causal attention keeps every real position's numbers unchanged
            from r3.trace import dummy_rows

            n = batch.input_ids_BS.shape[0]
            ids = batch.expert_ids_BTLK
            if ids is not None:
                dummy = dummy_rows(n * pad, ids.shape[2], ids.shape[3]).view(n, pad, ids.shape[2], ids.shape[3])
                ids = torch.cat([ids, dummy.to(ids.dtype)], dim=1)
            batch = dataclasses.replace(
                batch,
                input_ids_BS=torch.nn.functional.pad(batch.input_ids_BS, (0, pad)),
                attention_mask_BS=torch.nn.functional.pad(batch.attention_mask_BS, (0, pad)),
                loss_mask_BT=torch.nn.functional.pad(batch.loss_mask_BT, (0, pad)),
                expert_ids_BTLK=ids,
            )
        return batch, start, real

    def _row_slices(self, B: int) -> list[slice]:
        n = self.micro_batch or B
        return [slice(i, min(i + n, B)) for i in range(0, B, n)]

    def _trimmed(self, batch: TrainBatch, rows: slice) -> TrainBatch:
        """Rows `rows` of `batch` cut to their own longest real row (rounded up to a multiple of TP,
        at least 2 tokens) instead of the whole batch's: a micro-batch of short rows does not pay for
        the mini-batch's longest row (attention, logits and their fp32 temporaries grow with it).
        Right padding only, so the cut drops padding positions alone; callers pad results back to the
        batch's width (_pad_cols, _pad_record). Under DP the length is the longest over the DP ranks'
        micro-batches of this index (one all-reduce): megatron's allgather token dispatcher gathers
        equal shapes over the EP group, whose ranks are DP replicas of the dense part."""
        am = batch.attention_mask_BS[rows]
        S = am.shape[1]
        s = int((am.bool() * torch.arange(1, S + 1, device=am.device)).amax()) if am.numel() else S
        if self.dp_size > 1:
            import torch.distributed as dist

            t = torch.tensor([s], device=parallel.device())
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=parallel.dp_group())
            s = int(t.item())
        s = min(S, -(-max(s, 2) // self.tp_size) * self.tp_size)
        ids = batch.expert_ids_BTLK
        return dataclasses.replace(
            batch,
            input_ids_BS=batch.input_ids_BS[rows, :s],
            attention_mask_BS=am[:, :s],
            loss_mask_BT=batch.loss_mask_BT[rows, : s - 1],
            expert_ids_BTLK=None if ids is None else ids[rows, : s - 1],
        )

    def _session(self, mode: ReplayMode, batch: TrainBatch, rows: slice, *, recompute: bool):
        b, s = batch.input_ids_BS[rows].shape
        ids = batch.expert_ids_BTLK[rows] if mode is ReplayMode.REPLAY else None
        return self.replay.session(mode, batch_size=b, seq_len=s, expert_ids_BTLK=ids, recompute=recompute)

    # --- TrainEngine protocol -----------------------------------------------------------------
    @torch.no_grad()
    def compute_logprobs(
        self, batch: TrainBatch, *, routing: ReplayMode = ReplayMode.OFF, with_entropy: bool = False
    ) -> LogprobResult:
        self._check_batch(batch, routing)
        self.model.eval()
        mode = routing
        B, T = batch.loss_mask_BT.shape
        batch, start, real = self._local(batch)

        def gather(x):  # every DP rank returns the whole batch's rows (without SP padding positions)
            return parallel.gather_rows(x[:, :T], real, B, self.dp_size)

        if self.pp_size > 1:
            logp, ent, rec = self._schedule(batch, mode, with_entropy=with_entropy, start=start, real=real, T=T)
            return LogprobResult(
                logp_BT=gather(logp),
                entropy_BT=gather(ent) if with_entropy else None,
                expert_ids_BTLK=gather(rec.to(self._trace_dtype)) if mode is ReplayMode.RECORD else None,
            )
        logps, ents, recs = [], [], []
        W = batch.input_ids_BS.shape[1] - 1  # each micro-batch is trimmed (_trimmed); results padded to W
        for rows in self._row_slices(batch.input_ids_BS.shape[0]):
            part = self._trimmed(batch, rows)
            ids_BS = part.input_ids_BS.to(self.device)
            if self.is_moe:
                with self._session(mode, part, slice(None), recompute=False) as sess:
                    logits = gpt_logits(self.model, ids_BS)
                    sess.end_forward()
                    if mode is ReplayMode.RECORD:
                        recs.append(_pad_record(sess.recorded_BTLK(), W))
            else:
                logits = gpt_logits(self.model, ids_BS)
            logp_BT, ent_BT = token_logprobs(logits, ids_BS, with_entropy=with_entropy, temperature=batch.temperature)
            logps.append(_pad_cols(logp_BT, W))  # on the engine's device: the DP all-gather runs there
            ents.append(_pad_cols(ent_BT, W) if with_entropy else None)

        # recordings travel and stay compact (uint8 for E <= 256, r3.trace.trace_dtype)
        expert_ids = gather(torch.cat(recs).to(self._trace_dtype)) if mode is ReplayMode.RECORD else None
        return LogprobResult(
            logp_BT=gather(torch.cat(logps)),
            entropy_BT=gather(torch.cat(ents)) if with_entropy else None,
            expert_ids_BTLK=expert_ids,
        )

    def train_step(self, batch: TrainBatch, loss_fn: LossFn, *, routing: ReplayMode = ReplayMode.OFF) -> dict:
        """Forward (replaying when asked; with recompute the router replays again in backward via
        REPLAY_BACKWARD), loss_fn per micro-batch, backward (gradients summed over micro-batches),
        clip, AdamW step. Metrics: loss_fn's metrics summed over micro-batches and DP ranks (LossFn
        normalises them by the mini-batch), `actor/loss` = sum of micro-batch losses,
        `actor/grad_norm` (before clipping), `actor/lr`, `actor/skipped_step`."""
        if routing is ReplayMode.RECORD:
            raise ValueError("train_step takes routing OFF or REPLAY (record with compute_logprobs)")
        self._check_batch(batch, routing)
        self.model.train()
        self.optim.zero_grad()
        B, T = batch.loss_mask_BT.shape
        mode = routing
        batch, start, real = self._local(batch)
        # PP > 1: megatron's pipeline schedule, loss and metrics from the last stage on every stage
        run = self._schedule if self.pp_size > 1 else self._micro_steps
        totals = run(batch, mode, loss_fn=loss_fn, start=start, real=real, T=T)
        loss_total = totals.pop("actor/loss")
        if self.dp_size > 1:  # sums over DP ranks = the one-rank values (LossFn metrics are mini-batch shares)
            totals["actor/loss"] = loss_total
            totals = parallel.allreduce_sum(totals)
            loss_total = totals.pop("actor/loss")
        grad_norm_t, skipped = self.optim.step()  # sum over replicas, clip, step (skipped if not finite)
        if not skipped:
            self.steps += 1
        totals.update(
            {
                "actor/loss": loss_total,
                "actor/grad_norm": grad_norm_t,
                "actor/lr": self.optim.lr,
                "actor/skipped_step": float(skipped),
            }
        )
        return totals

    def _micro_steps(
        self, batch: TrainBatch, mode: ReplayMode, *, loss_fn: LossFn, start: int, real: int, T: int
    ) -> dict[str, torch.Tensor]:
        """PP = 1: forward, loss_fn and backward of each micro-batch of this DP rank's rows (`batch`
        from _local: rows [start, start + real) of the global batch; T = S - 1 before SP padding).
        Returns {"actor/loss", loss_fn's metrics summed over micro-batches}, not yet summed over DP."""
        totals: dict[str, torch.Tensor] = {}
        loss_total = torch.zeros((), device=self.device)
        W = batch.input_ids_BS.shape[1] - 1  # each micro-batch is trimmed (_trimmed); results padded to W
        for rows in self._row_slices(batch.input_ids_BS.shape[0]):
            part = self._trimmed(batch, rows)
            ids_BS = part.input_ids_BS.to(self.device)
            k = max(0, min(rows.stop, real) - rows.start)  # real (not DP-padding) rows of this micro-batch
            global_rows = slice(start + rows.start, start + rows.start + k)
            with cpu_device_scope():  # the activation-recompute forward runs inside backward
                with (
                    self._session(mode, part, slice(None), recompute=self.recompute)
                    if self.is_moe
                    else contextlib.nullcontext()
                ) as sess:
                    logits = gpt_logits(self.optim.module, ids_BS)
                    if sess is not None:
                        sess.end_forward()
                    logp_BT, ent_BT = token_logprobs(logits, ids_BS, with_entropy=True, temperature=batch.temperature)
                    logp_BT, ent_BT = _pad_cols(logp_BT, W)[:, :T], _pad_cols(ent_BT, W)[:, :T]  # no SP padding
                    # k = 0 (padding only: a DP rank left without rows): loss_fn on no rows gives zero
                    # loss and zero metrics under the same keys as every other rank (their DP sum lines
                    # up), and the zero term still runs the backward's collectives (EP)
                    loss, metrics = loss_fn(logp_BT[:k], ent_BT[:k], global_rows)
                    if not k:
                        loss = loss + logp_BT.sum() * 0.0
                    loss.backward()
            loss_total = loss_total + loss.detach()
            for key, v in metrics.items():  # summed (LossFn normalises by the mini-batch); on device (rule 9)
                totals[key] = totals.get(key, 0.0) + torch.as_tensor(v).detach()
        return {**totals, "actor/loss": loss_total}

    def _schedule(
        self,
        batch: TrainBatch,
        mode: ReplayMode,
        *,
        start: int,
        real: int,
        T: int,
        loss_fn: LossFn | None = None,
        with_entropy: bool = False,
    ):
        """PP > 1: this DP rank's micro-batches (`batch` from _local, n rows of S tokens, rows
        [start, start + real) of the global batch, T = its S - 1 before SP padding) through
        megatron's pipeline schedule (1F1B: megatron.core.pipeline_parallel.get_forward_backward_func;
        CPU shims in compat.cpu_pipeline_schedule). Every stage runs the forward of every micro-batch
        (its routers replay or record their own trace layers: MegatronRouterReplay.pipeline_session);
        the last stage turns logits into logprobs, and, when training, into loss_fn's loss, whose
        backward the schedule runs through all stages. The rows are padded to a multiple of the
        micro-batch (copies of row 0, outside `real`: no loss, dropped from the results) because the
        stages send and receive activations of one shape.

        Forward only (loss_fn None): returns (logp_NT, entropy_NT or None, recorded expert ids
        [n, S-1, L, K] or None) on every stage: the logprobs broadcast from the last stage over the PP
        group, the recording concatenated over the stages' trace layers. Training: returns
        {"actor/loss", loss_fn's metrics (summed over micro-batches)} on every stage (broadcast from the
        last stage), not yet summed over DP."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from r3.engines.megatron.compat import cpu_pipeline_schedule

        forward_only = loss_fn is None
        n, S = batch.input_ids_BS.shape
        pad = -n % (self.micro_batch or n)
        if pad:  # one shape for every micro-batch (the stages' send/receive buffers): copies of row 0,
            idx = torch.cat([torch.arange(n), torch.zeros(pad, dtype=torch.long)])  # beyond `real`: no loss
            batch = batch.rows(idx)
        slices = self._row_slices(n + pad)
        if mode is ReplayMode.REPLAY:  # validate on every stage before the schedule: a stage that raised
            to_megatron_layout(batch.expert_ids_BTLK, seq_len=S, spec=self.spec)  # inside would hang the rest
        recs: list[torch.Tensor] = []

        def loss_func(rows: slice, ids_BS: torch.Tensor, logits_BSV: torch.Tensor):
            logp_BT, ent_BT = token_logprobs(
                logits_BSV, ids_BS, with_entropy=with_entropy or not forward_only, temperature=batch.temperature
            )
            if forward_only:  # nothing to differentiate: a zero "loss" and the per-row results
                return torch.zeros((), device=logits_BSV.device), {"logp": logp_BT, "entropy": ent_BT}
            k = max(0, min(rows.stop, real) - rows.start)  # real (not DP-padding) rows of this micro-batch
            global_rows = slice(start + rows.start, start + rows.start + k)
            loss, metrics = loss_fn(logp_BT[:k, :T], ent_BT[:k, :T], global_rows)  # k = 0: as in _micro_steps
            if not k:
                loss = loss + logp_BT.sum() * 0.0
            # the schedule divides the returned loss by the number of micro-batches (megatron's
            # "legacy loss averaging"); loss_fn already normalises by the whole mini-batch (LossFn)
            return loss * len(slices), {"loss": loss.detach(), "metrics": metrics}

        def forward_step(data_iterator, model):
            rows = next(data_iterator)
            ids_BS = batch.input_ids_BS[rows].to(self.device)
            b, s = ids_BS.shape
            ids = batch.expert_ids_BTLK[rows] if mode is ReplayMode.REPLAY else None
            with sess.forward(batch_size=b, seq_len=s, expert_ids_BTLK=ids) if sess else contextlib.nullcontext() as h:
                out = gpt_logits(model, ids_BS)
            if mode is ReplayMode.RECORD:
                recs.append(h.recorded_BTLK())
            return out, lambda logits, _rows=rows, _ids=ids_BS: loss_func(_rows, _ids, logits)

        model = self.model if forward_only else self.optim.module
        recompute = self.recompute and not forward_only
        with (
            self.replay.pipeline_session(mode, recompute=recompute) if self.is_moe else contextlib.nullcontext()
        ) as sess:
            with cpu_pipeline_schedule():
                store = get_forward_backward_func()(
                    forward_step_func=forward_step,
                    data_iterator=iter(slices),
                    model=[model],
                    num_microbatches=len(slices),
                    seq_length=S,
                    micro_batch_size=slices[0].stop - slices[0].start,
                    forward_only=forward_only,
                )
        last = self.pp_rank == self.pp_size - 1
        if not forward_only:
            totals: dict[str, torch.Tensor] = {}
            loss_total = torch.zeros((), device=self.device)
            for out in store if last else []:  # metrics summed over micro-batches, as with PP = 1
                loss_total = loss_total + out["loss"]
                for key, v in out["metrics"].items():
                    totals[key] = totals.get(key, 0.0) + torch.as_tensor(v).detach()
            return parallel.broadcast_metrics_from_last_stage({**totals, "actor/loss": loss_total})
        shape = (n + pad, S - 1)
        logp = torch.cat([o["logp"] for o in store]) if last else torch.zeros(shape, device=self.device)
        logp = parallel.broadcast_from_last_stage(logp.float())[:n]
        ent = None
        if with_entropy:
            ent = torch.cat([o["entropy"] for o in store]) if last else torch.zeros(shape, device=self.device)
            ent = parallel.broadcast_from_last_stage(ent.float())[:n]
        rec = parallel.gather_stage_tensors(torch.cat(recs)[:n], dim=2) if mode is ReplayMode.RECORD else None
        return logp, ent, rec  # on the engine's device

    def rollout_state_dict(self) -> dict[str, torch.Tensor]:
        """Current weights in transformers naming, copied to the CPU (safe to hand to another engine).
        With EP > 1 the experts are gathered to the first rank of each EP group, and with PP > 1 the
        stages' layers to the first stage (global rank 0 among them, the driver): a collective, every
        rank must call it; ranks that do not hold the whole model get an empty dict (only the driver
        syncs weights to the rollout engine)."""
        n_exp = getattr(self.hf_config, "num_experts", 0) if self.is_moe else 0
        sd = self.model.state_dict()
        if self.tp_size > 1:  # whole tensors from every TP rank's shard (collective over the TP group)
            import torch.distributed as dist

            from r3.engines.megatron.model import is_tp_sharded, tp_unshard

            full = {}
            for k, v in sd.items():
                if k.endswith("_extra_state") or not is_tp_sharded(k):
                    full[k] = v
                    continue
                parts = [torch.empty_like(v) for _ in range(self.tp_size)]
                dist.all_gather(parts, v.detach().contiguous(), group=parallel.tp_group())
                full[k] = tp_unshard(k, parts)
            sd = full
        sd = to_global_layer_names(sd, self.stage_layers.start)  # a pipeline stage names its layers locally
        sd = parallel.gather_experts(sd, n_exp)
        sd = parallel.gather_stages(sd)  # every stage's layers on the first stage (PP > 1)
        if sd is None:
            return {}
        # one copy of the model at a time on the syncing rank's host: the conversion frees each layer's
        # gathered experts as it stacks them (consume), and each tensor is cloned (no storage shared
        # with the model or between views) as its view is dropped
        hf = megatron_to_hf(sd, self.hf_config, consume=True)
        del sd
        return {k: hf.pop(k).clone() for k in list(hf)}

    def export_hf(self, path: str, *, dtype: torch.dtype | None = None) -> Path | None:
        """Write the current weights as a transformers checkpoint directory (config.json +
        model.safetensors under the on-disk names SGLang, vLLM and transformers load:
        r3.engines.hf_checkpoint.to_checkpoint_names), in `dtype` (default: the config's). A collective
        (rollout_state_dict); the driver (global rank 0) writes and returns the path, others None."""
        from r3.engines.hf_checkpoint import write_checkpoint

        sd = self.rollout_state_dict()
        if not sd:
            return None
        dtype = dtype or getattr(self.hf_config, "dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        tied = bool(getattr(self.hf_config, "tie_word_embeddings", False))
        out = write_checkpoint(path, sd, base_model_path=None, dtype=dtype, tie_word_embeddings=tied)
        self.hf_config.save_pretrained(out)
        return out

    def checkpoint_file(self, path: str, rank: int | None = None) -> Path:
        """The checkpoint file of `rank` (default: this rank) in `path`: the weights that rank owns
        (_weight_owners), its optimizer state and RNG. One file per rank keeps save/load free of
        collectives."""
        world = self.layout.world_size
        if world == 1:
            return Path(path) / CHECKPOINT_FILE
        import torch.distributed as dist

        rank = dist.get_rank() if rank is None else rank
        return Path(path) / f"megatron_train_engine.rank{rank:05d}-of-{world:05d}.pt"

    def _weight_owners(self) -> tuple[int, int]:
        """(global rank whose checkpoint file holds this rank's dense weights, ... its experts): the
        first rank of its data-parallel group, over which the dense weights are identical copies, and
        of its expert-data-parallel group, over which its experts are (megatron's parallel_state
        groups). Without this, every rank would write the same dense weights: 16 copies per paper
        checkpoint. One process: itself."""
        if self.layout.world_size == 1:
            return 0, 0
        import torch.distributed as dist
        from megatron.core import parallel_state

        dense = dist.get_process_group_ranks(parallel_state.get_data_parallel_group())[0]
        expert = dist.get_process_group_ranks(parallel_state.get_expert_data_parallel_group())[0]
        return dense, expert

    def _owned(self, key: str, rank: int) -> bool:
        dense, expert = self._weight_owners()
        return (expert if ".local_experts." in key else dense) == rank

    def _rank(self) -> int:
        if self.layout.world_size == 1:
            return 0
        import torch.distributed as dist

        return dist.get_rank()

    def save(self, path: str) -> None:
        """Model, optimizer and step count in `checkpoint_file(path)` (directory created); every rank
        writes its own file (the caller barriers before marking the checkpoint complete)."""
        d = Path(path)
        d.mkdir(parents=True, exist_ok=True)
        state = {
            # tensors only: megatron's `_extra_state` entries (TE fp8 metadata; None/BytesIO without
            # TE) would need pickle to load, so they are dropped and the load is weights_only
            # and only the weights this rank owns (_weight_owners): load reads the rest from their owners
            "model": {
                k: v
                for k, v in self.model.state_dict().items()
                if isinstance(v, torch.Tensor) and self._owned(k, self._rank())
            },
            "optimizer": self.optim.state_dict(),
            "precision": self.precision,
            "steps": self.steps,
            "torch_rng": torch.get_rng_state(),
            "shape": {k: getattr(self.hf_config, k, None) for k in _SHAPE_KEYS},
        }
        final = self.checkpoint_file(path)
        tmp = final.with_name(final.name + ".tmp")
        torch.save(state, tmp)
        tmp.replace(final)

    def load(self, path: str) -> None:
        f = self.checkpoint_file(path)
        if not f.is_file():
            raise FileNotFoundError(
                f"no megatron train-engine checkpoint at {f} (written by MegatronTrainEngine.save "
                f"with {self.layout.describe()}; a different layout writes other files)"
            )
        # weights_only: a run directory's file must not be able to run code (pickle)
        state = torch.load(f, map_location="cpu", weights_only=True)
        for key in _SHAPE_KEYS:
            saved, now = state["shape"].get(key), getattr(self.hf_config, key, None)
            if saved != now:
                raise ValueError(f"checkpoint {f} has {key}={saved}, this engine's model has {now}")
        model = dict(state["model"])
        peers: dict[int, dict] = {}
        for k in self.model.state_dict():  # weights another rank owns: from its file, mapped, not read whole
            if k.endswith("_extra_state") or k in model:
                continue
            dense, expert = self._weight_owners()
            owner = expert if ".local_experts." in k else dense
            if owner == self._rank():
                continue  # reported as missing below
            if owner not in peers:
                peer = self.checkpoint_file(path, owner)
                if not peer.is_file():
                    raise FileNotFoundError(
                        f"{f} leaves {k} to rank {owner}'s file, which is missing: {peer} (a checkpoint is "
                        f"complete only with every rank's file)"
                    )
                peers[owner] = torch.load(peer, map_location="cpu", weights_only=True, mmap=True)["model"]
            if k in peers[owner]:
                model[k] = peers[owner][k]
        missing, unexpected = self.model.load_state_dict(model, strict=False)
        del peers
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise ValueError(
                f"checkpoint {f} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        if state.get("precision", "fp32") != self.precision:
            raise ValueError(
                f"checkpoint {f} was written with precision {state.get('precision', 'fp32')!r}, this "
                f"engine runs {self.precision!r}"
            )
        self.optim.load_state_dict(state["optimizer"])
        self.steps = state["steps"]
        torch.set_rng_state(state["torch_rng"])
