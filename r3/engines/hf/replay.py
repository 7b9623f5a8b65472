"""Routing record/replay for transformers Qwen3-MoE models (transformers 5.x).

One `RoutingReplay` object per model, no globals or environment variables (STYLE.md rule 3).
It wraps the forward of each MoE block's router (`layer.mlp.gate`, a `Qwen3MoeTopKRouter`
returning (router_logits [N, E], weights [N, K], indices [N, K]) with rows batch-major,
N = B * S) through an instance attribute, plus forward hooks for the batch shape and the
per-forward bookkeeping. Because the experts module only consumes the router's (indices,
weights), replaying at the router works with every `experts_implementation` (eager,
batched_mm, grouped_mm) and keeps parameter names unchanged (weight sync stays simple).

RECORD: native routing; the selected experts of every call are kept (a `generate` with KV cache
makes one prefill call and then one call per decoded token; the calls are concatenated along
the sequence axis). A decode loop that drops finished rows from its batch says which rows of the
whole batch each later call feeds (`feed_rows`); rows a call did not feed stay unrecorded (-1),
and `recorded_traces` refuses a real token without a row.
REPLAY: the given experts are forced and the gate weights are recomputed from the LIVE router
logits (PAPER.md "The method"):
    g_i = I_i exp(s_i) / sum_j I_j exp(s_j)       (norm_topk_prob=True)
    g_i = I_i softmax(s)_i                        (norm_topk_prob=False, as the native router)
so the router keeps its gradient; gathering from already top-k-zeroed probabilities would not.
With the model's own routing this reproduces the native forward bit for bit (same ops).

Gradient checkpointing: the recompute runs during backward, after the forward ended; in
REPLAY mode it replays the same ids, so keep `backward()` inside the `replaying()` context.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Sequence

import torch
from torch import nn

from r3.replay import ConsumptionCheck, ReplayMode
from r3.trace import RoutingSpec, place_traces, validate_expert_ids


def find_moe_blocks(model: nn.Module) -> list[nn.Module]:
    """The MoE blocks (modules with a `.gate` router and `.experts`) of a transformers decoder, in layer order."""
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no `.model.layers`; expected a transformers decoder model")
    return [layer.mlp for layer in layers if hasattr(layer.mlp, "gate") and hasattr(layer.mlp, "experts")]


class RoutingReplay:
    """Record or replay the routing of every MoE layer of one transformers Qwen3-MoE model."""

    def __init__(self, model: nn.Module):
        blocks = find_moe_blocks(model)
        if not blocks:
            raise ValueError(f"{type(model).__name__} has no MoE layers; the dense control has no routing to replay")
        gate = blocks[0].gate
        self.spec = RoutingSpec(num_layers=len(blocks), top_k=gate.top_k, num_experts=gate.num_experts)
        self.norm_topk_prob = bool(gate.norm_topk_prob)
        self.mode = ReplayMode.OFF
        self._check = ConsumptionCheck(self.spec.num_layers)
        self._shape_BS: list[tuple[int, int] | None] = [None] * self.spec.num_layers
        # per layer, per recorded call: (rows of the whole batch it fed, or None for all; ids [B, S, K])
        self._records: list[list[tuple[torch.Tensor | None, torch.Tensor]]] = [[] for _ in range(self.spec.num_layers)]
        self._feed_rows: torch.Tensor | None = None
        self._whole_B: int | None = None
        self._replay_ids_L: list[torch.Tensor] | None = None
        self._replay_BT: tuple[int, int] | None = None
        base = getattr(model, "model", model)
        self._handles = [
            base.register_forward_pre_hook(self._begin_forward),
            base.register_forward_hook(self._end_forward),
        ]
        self._gates = [block.gate for block in blocks]
        for layer, block in enumerate(blocks):
            self._handles.append(block.register_forward_pre_hook(self._make_block_hook(layer)))
            # an instance attribute shadows the class's forward: parameter names stay unchanged, and
            # in REPLAY the native top-k is not computed at all
            block.gate.forward = self._make_gate_forward(layer, block.gate)

    # --- public API ---------------------------------------------------------------------------
    def remove(self) -> None:
        """Detach all hooks (the model then routes natively)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        for gate in self._gates:
            del gate.forward  # back to the class's forward
        self._gates = []

    @contextlib.contextmanager
    def recording(self):
        """Record the routing of every forward inside the block (records cleared at entry)."""
        self._set(ReplayMode.RECORD)
        self._records = [[] for _ in range(self.spec.num_layers)]
        self._feed_rows, self._whole_B = None, None
        try:
            yield self
        finally:
            self.mode = ReplayMode.OFF
            self._feed_rows = None

    def feed_rows(self, rows_A: torch.Tensor, whole_batch: int) -> None:
        """The next recorded forwards feed rows `rows_A` (int64 [A], ascending) of a batch of
        `whole_batch` rows: a decode loop that dropped its finished rows (r3.engines.hf.rollout)."""
        if self.mode is not ReplayMode.RECORD:
            raise RuntimeError("feed_rows is for recording (inside `with replay.recording():`)")
        self._feed_rows, self._whole_B = rows_A.detach().to(torch.int64).cpu(), whole_batch

    @contextlib.contextmanager
    def replaying(self, expert_ids_BTLK: torch.Tensor):
        """Force expert_ids_BTLK [B, T, L, K] in every forward (and recompute) inside the block.
        Each forward must feed exactly B x T tokens (n tokens have n-1 rows: feed input_ids[:, :-1])."""
        ids = torch.as_tensor(expert_ids_BTLK)
        L, K = self.spec.num_layers, self.spec.top_k
        if ids.ndim != 4 or ids.shape[2:] != (L, K):
            raise ValueError(
                f"replay expects expert_ids_BTLK [B, T, {L}, {K}] (num_layers={L}, topk={K}), got "
                f"{tuple(ids.shape)}; likely cause: a trace from another model or missing batch dimension"
            )
        validate_expert_ids(ids, self.spec)
        self._replay_ids_L = [ids[:, :, l].reshape(-1, K).to(torch.int64) for l in range(L)]  # moved on first use
        self._replay_BT = (ids.shape[0], ids.shape[1])
        self._set(ReplayMode.REPLAY)
        try:
            yield self
        finally:
            self.mode = ReplayMode.OFF
            self._replay_ids_L = None
            self._replay_BT = None

    def replaying_traces(self, traces: Sequence[torch.Tensor], fed_mask_BT: torch.Tensor):
        """`replaying` from per-sequence traces [T_b, L, K] placed on the real (mask 1) fed positions
        of a left- or right-padded batch; padding positions get distinct dummy experts."""
        return self.replaying(place_traces(traces, fed_mask_BT))

    def recorded_expert_ids(self) -> torch.Tensor:
        """All recorded calls concatenated along the sequence: int64 [B, S_fed, L, K]; -1 where a
        call did not feed the row (`feed_rows`)."""
        if not self._records[0]:
            raise RuntimeError("no routing recorded: run a forward inside `with replay.recording():` first")
        per_layer = []
        for l, calls in enumerate(self._records):
            if all(rows is None for rows, _ in calls):
                B = calls[0][1].shape[0]
                if any(c.shape[0] != B for _, c in calls):
                    raise RuntimeError(
                        f"layer {l}: recorded calls have batch sizes {[c.shape[0] for _, c in calls]}; record one "
                        "batch (one prefill + its decode steps) at a time, or declare the rows fed (feed_rows)"
                    )
                per_layer.append(torch.cat([c for _, c in calls], dim=1).to(torch.int64))
                continue
            S, K = sum(c.shape[1] for _, c in calls), calls[0][1].shape[2]
            out = torch.full((self._whole_B, S, K), -1, dtype=torch.int64, device=calls[0][1].device)
            off = 0
            for rows, c in calls:
                if rows is None and c.shape[0] != self._whole_B:
                    raise RuntimeError(f"layer {l}: a call fed {c.shape[0]} rows of a batch of {self._whole_B}")
                out[slice(None) if rows is None else rows.to(out.device), off : off + c.shape[1]] = c
                off += c.shape[1]
            per_layer.append(out)
        return torch.stack(per_layer, dim=2)

    def recorded_traces(self, token_mask_BS: torch.Tensor) -> list[torch.Tensor]:
        """Per-sequence traces for the real tokens only (left padding, early EOS).

        token_mask_BS: [B, S] with S = S_fed or S_fed + 1, 1 on real tokens. For sequence b with
        real positions p_0 < ... < p_{n-1} the trace is the rows at p_0..p_{n-2} ([n-1, L, K]):
        the last real token has no row (DESIGN.md invariant 1).
        """
        ids_BSLK = self.recorded_expert_ids()
        B, S_fed = ids_BSLK.shape[:2]
        if token_mask_BS.shape[0] != B or token_mask_BS.shape[1] not in (S_fed, S_fed + 1):
            raise ValueError(
                f"token mask {tuple(token_mask_BS.shape)} must be [B={B}, S_fed={S_fed}] or [B, S_fed + 1]: one "
                "column per fed token, plus optionally the final (never fed) token"
            )
        out = []
        for b in range(B):
            pos = token_mask_BS[b].nonzero().flatten()[:-1]
            if pos.numel() and int(pos[-1]) >= S_fed:
                raise ValueError(f"sequence {b}: real token at position {int(pos[-1])} was never fed (S_fed={S_fed})")
            trace = ids_BSLK[b, pos.to(ids_BSLK.device)]
            if bool((trace < 0).any()):
                missing = int((trace[:, 0, 0] < 0).sum())
                raise ValueError(
                    f"sequence {b}: {missing} of its {len(pos)} fed tokens have no recorded routing (got -1 rows, "
                    "expected a row per fed token); likely cause: the decode loop dropped the row before its last "
                    "token was fed (feed_rows)"
                )
            out.append(trace)
        return out

    # --- hooks --------------------------------------------------------------------------------
    def _set(self, mode: ReplayMode) -> None:
        if self.mode is not ReplayMode.OFF:
            raise RuntimeError(f"RoutingReplay is already in mode {self.mode.name}; nested record/replay blocks")
        self.mode = mode

    def _begin_forward(self, module, args):
        if self.mode is not ReplayMode.OFF:
            self._check.begin()

    def _end_forward(self, module, args, output):
        if self.mode is not ReplayMode.OFF and self._check.active:
            self._check.end()

    def _make_block_hook(self, layer: int):
        def hook(module, args):
            hidden = args[0]
            self._shape_BS[layer] = (hidden.shape[0], hidden.shape[1])

        return hook

    def _make_gate_forward(self, layer: int, gate: nn.Module):
        def forward(gate_self, hidden_states):
            native_forward = type(gate_self).forward.__get__(gate_self)
            if self.mode is ReplayMode.OFF or gate_self is not self._gates[layer]:
                # (a deep copy of the model carries this bound method to the copied router, which
                # must route natively with its own weights: attach a RoutingReplay to the copy)
                return native_forward(hidden_states)
            forward_phase = self._check.active  # False: gradient-checkpointing recompute in backward
            if forward_phase:
                self._check.consume(layer)
            B, S = self._shape_BS[layer]
            if self.mode is ReplayMode.RECORD:
                out = native_forward(hidden_states)
                if forward_phase:
                    self._records[layer].append((self._feed_rows, out[2].detach().view(B, S, -1)))
                return out
            rB, rT = self._replay_BT
            if (B, S) != (rB, rT):
                hint = ""
                if B == rB and S == rT + 1:
                    hint = " (off-by-one from the last token: n tokens have n-1 rows, feed input_ids[:, :-1])"
                elif B == rB and S == 1:
                    hint = " (a KV-cache decode step: replay covers whole-sequence forwards only)"
                raise ValueError(
                    f"replay trace does not match the batch at MoE layer {layer}: got trace [B={rB}, T={rT}], "
                    f"forward fed [B={B}, S={S}]{hint}"
                )
            # the router's own logits (Qwen3MoeTopKRouter.forward), then the replayed selection
            router_logits_NE = nn.functional.linear(hidden_states.reshape(-1, gate_self.hidden_dim), gate_self.weight)
            ids_NK = self._replay_ids_L[layer]
            if ids_NK.device != router_logits_NE.device:
                ids_NK = ids_NK.to(router_logits_NE.device)
                self._replay_ids_L[layer] = ids_NK
            return router_logits_NE, self.replay_weights(router_logits_NE, ids_NK), ids_NK

        return types.MethodType(forward, gate)

    def replay_weights(self, router_logits_NE: torch.Tensor, ids_NK: torch.Tensor) -> torch.Tensor:
        """Gate weights of the replayed experts from the live logits (same ops as Qwen3MoeTopKRouter):
        softmax in float32 over all E, gather the K replayed, renormalise if norm_topk_prob."""
        probs_NE = torch.softmax(router_logits_NE, dtype=torch.float, dim=-1)
        w_NK = probs_NE.gather(1, ids_NK)
        if self.norm_topk_prob:
            w_NK = w_NK / w_NK.sum(dim=-1, keepdim=True)
        return w_NK.to(router_logits_NE.dtype)
