"""Routing replay bridge for megatron-core's RouterReplay (megatron.core.transformer.moe.router_replay).

megatron keeps one `RouterReplay` per MoE layer in a static registry
(`RouterReplay.global_router_replay_instances`) driven by static methods
(`set_replay_data`, `set_global_router_replay_action`, ...). Two models in one process would
share that registry. `MegatronRouterReplay` instead claims the instances of ONE model (found
through its routers, in layer order), removes them from the static registry and drives them per
instance: two engines in one process cannot clash, and claiming a model twice is refused.

Layouts. The batch trace is expert_ids_BTLK, batch-major, one row per fed token (T = S - 1 for
S tokens: the last token is never fed, DESIGN.md invariant 1). Inside megatron the hidden states
are [S, B, H] and the router sees S*B seq-major rows (row = s * B + b), so each layer gets an
[S*B, K] tensor; the last position of every sequence, which has no trace row, gets the distinct
dummy experts 0..K-1 (r3.trace.dummy_rows).

Actions (megatron RouterReplayAction): RECORD routes natively and stores top-k indices;
REPLAY_FORWARD gathers the live scores at the given experts (gate = softmax over the replayed
experts' logits when moe_router_pre_softmax=False: the paper's g_replay, gradients reach the
router); REPLAY_BACKWARD pops the queued indices when activation recompute runs the router again
inside backward -- megatron does not switch to it by itself, the caller must (verl does the same).

Sequence parallelism (TP > 1): the router of TP rank r sees only rows [r * S*B / TP, (r + 1) *
S*B / TP) of that seq-major order (its sequence slice); a session hands each rank those rows, and a
recording is all-gathered over the TP group. Context parallelism and packed (THD) batches change
which token rows a rank's router sees (r3.engines.megatron.token_order: CP's load-balanced chunks,
packed positions); replay hands each rank those rows, but neither runs without Transformer Engine,
so the engine refuses both (token_order.require_transformer_engine) and CP is always 1 here.

Dense layers have no router and no trace layer: the trace's layer l is the l-th MoE layer.

Pipeline parallelism (PP > 1): a stage's model holds a contiguous block of decoder layers, so its
routers are some of the MoE layers only. Each router's global MoE-layer index comes from its global
decoder layer number (megatron numbers layers globally: `layer_number` = index within the stage + 1
+ the stage's `get_transformer_layer_offset`) and the model's MoE pattern (`moe_layer_freq`: dense
layers count as decoder layers but have no trace rows); a stage replays the trace's rows of THOSE
layers and records only those (`layers`; the engine concatenates the stages' parts in stage order).
`check_pipeline_layers()` checks over the PP group that the stages own every trace layer once. Under
megatron's 1F1B schedule the forward of micro-batch i+1 may run before the backward of micro-batch
i: `pipeline_session` keeps each micro-batch's rows queued for its recompute backward.

Every router call is counted: a forward in RECORD/REPLAY mode must consume each of this stage's
layers exactly once (r3.replay.ConsumptionCheck), and with recompute the backward must pop each
layer's queue exactly once per micro-batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from r3.engines.megatron import parallel, token_order
from r3.engines.megatron.token_order import PackedLayout
from r3.replay import ConsumptionCheck, ReplayMode
from r3.trace import RoutingSpec, dummy_rows, validate_expert_ids


def to_megatron_layout(expert_ids_BTLK: torch.Tensor, *, seq_len: int, spec: RoutingSpec) -> list[torch.Tensor]:
    """Batch trace -> per-layer megatron rows.

    expert_ids_BTLK: int [B, T, L, K] with T = seq_len - 1 (one row per fed token).
    Returns L tensors int64 [S*B, K], seq-major (row s*B + b), position S-1 = dummy 0..K-1.
    """
    ids = torch.as_tensor(expert_ids_BTLK)
    B = ids.shape[0] if ids.ndim == 4 else "?"
    expected = (B, seq_len - 1, spec.num_layers, spec.top_k)
    if ids.ndim != 4 or tuple(ids.shape[1:]) != expected[1:]:
        got = tuple(ids.shape)
        if ids.ndim == 4 and ids.shape[1] == seq_len and tuple(ids.shape[2:]) == expected[2:]:
            cause = (
                f"T = S = {seq_len}: the trace has a row for the last token, which is never fed "
                f"(n tokens have n-1 rows); drop its last row"
            )
        elif ids.ndim == 4 and tuple(ids.shape[2:]) == expected[2:]:
            cause = (
                f"the trace was padded to a different length than input_ids (S = {seq_len}); pad "
                f"traces to S - 1 rows with r3.trace.pad_traces"
            )
        elif ids.ndim == 4 and ids.shape[2] != spec.num_layers:
            cause = (
                f"the trace has {ids.shape[2]} layers but the model has {spec.num_layers} MoE layers "
                f"(dense layers have no rows; or a different model)"
            )
        else:
            cause = "a trace from a model with a different top-k, or not batched as [B, T, L, K]"
        raise ValueError(
            f"routing trace shape does not match the batch: got {got}, expected {expected} "
            f"([B, T = S - 1, L, K] for input_ids of length S = {seq_len}); likely cause: {cause}"
        )
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"routing ids must be integers, got dtype {ids.dtype}")
    validate_expert_ids(ids, spec)
    B = ids.shape[0]
    pad_B1LK = dummy_rows(B, spec.num_layers, spec.top_k).view(B, 1, spec.num_layers, spec.top_k)
    full_BSLK = torch.cat([ids.to(torch.int64), pad_B1LK.to(ids.device)], dim=1)
    full_LSBK = full_BSLK.permute(2, 1, 0, 3)
    return [full_LSBK[l].reshape(seq_len * B, spec.top_k).contiguous() for l in range(spec.num_layers)]


def from_megatron_layout(per_layer_NK: list[torch.Tensor], *, batch_size: int, seq_len: int) -> torch.Tensor:
    """Per-layer megatron rows ([S*B, K] seq-major) -> int64 expert_ids_BTLK [B, S-1, L, K]
    (the last position, whose token is never fed in the rollout convention, is dropped)."""
    L = len(per_layer_NK)
    ids_LNK = torch.stack([x.to(torch.int64) for x in per_layer_NK])
    K = ids_LNK.shape[-1]
    if ids_LNK.shape[1] != seq_len * batch_size:
        raise ValueError(
            f"recorded routing has {ids_LNK.shape[1]} rows per layer, expected S*B = "
            f"{seq_len}*{batch_size}; likely cause: sequence packing or context parallelism"
        )
    return ids_LNK.view(L, seq_len, batch_size, K).permute(2, 1, 0, 3)[:, : seq_len - 1].contiguous()


def _gather_tp(rows_NK: torch.Tensor, tp_size: int) -> torch.Tensor:
    """A TP rank's recorded rows (its sequence slice) -> all ranks' rows in order (collective)."""
    if tp_size == 1:
        return rows_NK
    import torch.distributed as dist
    from megatron.core import parallel_state

    parts = [torch.empty_like(rows_NK) for _ in range(tp_size)]
    dist.all_gather(parts, rows_NK.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(parts)


def moe_layer_index(config, layer_number: int) -> int:
    """The trace layer (global MoE-layer index) of the decoder layer `layer_number` (megatron's global,
    1-based numbering): the number of MoE layers before it in the model's pattern (`moe_layer_freq`:
    a 0/1 list per decoder layer, or an int f meaning every layer i with i % f == 0)."""
    freq, n = config.moe_layer_freq, config.num_layers
    pattern = list(freq) if isinstance(freq, (list, tuple)) else [int(i % freq == 0) for i in range(n)]
    i = layer_number - 1
    if not (0 <= i < len(pattern)) or not pattern[i]:
        raise ValueError(f"decoder layer {i} is not a MoE layer of the pattern {pattern}")
    return sum(pattern[:i])


class _NoLayers:
    """The consumption check of a pipeline stage without MoE layers: nothing to consume."""

    active = False
    counts: tuple[int, ...] = ()

    def begin(self) -> None:
        pass

    def consume(self, layer: int) -> None:
        raise IndexError(f"MoE layer {layer} on a pipeline stage without MoE layers")

    def end(self) -> None:
        pass


class MegatronRouterReplay:
    """The RouterReplay instances of one megatron model (under PP: one pipeline stage), with a typed
    mode and consumption checks. `layers`: the global MoE-layer (trace layer) index of each of this
    model's routers, in layer order."""

    def __init__(self, model, spec: RoutingSpec):
        from megatron.core import parallel_state
        from megatron.core.transformer.moe.router import TopKRouter
        from megatron.core.transformer.moe.router_replay import RouterReplay

        routers = [m for m in model.modules() if isinstance(m, TopKRouter)]
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        if pp == 1 and len(routers) != spec.num_layers:
            raise ValueError(f"model has {len(routers)} MoE routers, routing spec says {spec.num_layers} layers")
        self.layers = [moe_layer_index(r.config, r.layer_number) for r in routers]
        first = self.layers[0] if self.layers else 0
        if self.layers != list(range(first, first + len(self.layers))) or first + len(self.layers) > spec.num_layers:
            raise ValueError(
                f"this stage's routers map to trace layers {self.layers}, expected a contiguous block of "
                f"[0, {spec.num_layers}); likely cause: a model whose MoE pattern differs from the routing spec"
            )
        if any(r.config.moe_router_fusion for r in routers):
            raise ValueError(
                "moe_router_fusion=True: megatron's fused top-k kernel bypasses RouterReplay, so the "
                "replayed routing would be silently ignored; build the model with router_fusion=False"
            )
        instances = [r.router_replay for r in routers]
        if any(inst is None for inst in instances):
            raise ValueError("model built without moe_enable_routing_replay=True: no RouterReplay to drive")
        for inst in instances:
            owner = getattr(inst, "_r3_owner", None)
            if owner is not None:
                raise RuntimeError(
                    "this model's RouterReplay instances are already claimed by another "
                    f"MegatronRouterReplay (id {owner}); one replay handle per model (per engine)"
                )
        registry = RouterReplay.global_router_replay_instances
        registry[:] = [r for r in registry if not any(r is inst for inst in instances)]
        self.spec = spec
        self._instances = instances
        # Sequence parallelism (TP > 1): the router of TP rank r sees only its sequence slice, the
        # contiguous seq-major rows [r * S*B / TP, (r + 1) * S*B / TP) (megatron scatters the
        # embedding output along the sequence dimension); replay hands each rank those rows and a
        # recording is all-gathered over the TP group in rank order.
        self.sp = bool(routers[0].config.sequence_parallel) if routers else False
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank() if self.sp else 0
        self.tp_size = parallel_state.get_tensor_model_parallel_world_size() if self.sp else 1
        # Context parallelism: this CP rank's load-balanced chunks of every sequence (token_order); the
        # engine refuses CP > 1 without Transformer Engine, so here it is always 1
        self.cp_rank = parallel_state.get_context_parallel_rank()
        self.cp_size = parallel_state.get_context_parallel_world_size()
        n = len(instances)
        self._forward = ConsumptionCheck(n) if n else _NoLayers()
        self._backward = ConsumptionCheck(n) if n else _NoLayers()
        self.mode = ReplayMode.OFF
        for layer, inst in enumerate(instances):
            inst._r3_owner = id(self)
            inst.get_replay_topk = self._counted(layer, inst.get_replay_topk)

    def _counted(self, layer: int, get_replay_topk):
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        def wrapper(scores, topk, *args, **kwargs):
            inst = self._instances[layer]
            action = inst.router_replay_action
            if action == RouterReplayAction.REPLAY_BACKWARD:
                self._backward.consume(layer)
                if not inst.replay_backward_list:
                    raise RuntimeError(
                        f"MoE layer {self.layers[layer]}: the recompute in backward finds no queued routing; "
                        f"likely cause: more backward recomputes than replayed forwards"
                    )
                rows = inst.replay_backward_list[0].shape[0]
            elif action is not None:
                self._forward.consume(layer)
                rows = None if inst.target_topk_idx is None else inst.target_topk_idx.shape[0]
            if action in (RouterReplayAction.REPLAY_FORWARD, RouterReplayAction.REPLAY_BACKWARD):
                if scores.shape[0] != rows or topk != self.spec.top_k:
                    raise ValueError(
                        f"MoE layer {self.layers[layer]}: router sees {scores.shape[0]} token rows with top-k "
                        f"{topk}, replay data has {rows} rows with top-k {self.spec.top_k}; likely cause: "
                        f"the forward's batch differs from the one passed to the replay session"
                    )
            return get_replay_topk(scores, topk, *args, **kwargs)

        return wrapper

    def _set_action(self, action) -> None:
        for inst in self._instances:
            if action is None:
                inst.clear_router_replay_action()
            else:
                inst.set_router_replay_action(action)

    def _reset(self) -> None:
        for inst in self._instances:
            inst.clear_indices()
        self._set_action(None)
        self.mode = ReplayMode.OFF
        self._forward.active = self._backward.active = False

    def _load_rows(
        self, expert_ids_BTLK: torch.Tensor, *, batch_size: int, seq_len: int, packed: PackedLayout | None = None
    ) -> None:
        """Validate the whole trace [B, S-1, L, K] and hand each of this stage's routers the rows of its
        global MoE layer, in the token order its rank's router sees (r3.engines.megatron.token_order):
        padded batches seq-major, or `packed` (THD) positions; under CP this rank's load-balanced chunks;
        under SP this TP rank's slice. set_target_indices also queues them for REPLAY_BACKWARD."""
        if packed is None:
            per_layer = to_megatron_layout(expert_ids_BTLK, seq_len=seq_len, spec=self.spec)
            index = token_order.bshd_index(batch_size, seq_len, self.cp_size, self.cp_rank)
        else:
            validate_expert_ids(torch.as_tensor(expert_ids_BTLK), self.spec)
            per_layer = packed.pack_routing(torch.as_tensor(expert_ids_BTLK), self.spec)
            index = token_order.thd_index(packed, self.cp_size, self.cp_rank)
        for inst, layer in zip(self._instances, self.layers):
            rows = token_order.router_rows(per_layer[layer], index, tp_size=self.tp_size, tp_rank=self.tp_rank)
            inst.set_target_indices(rows)

    def check_pipeline_layers(self) -> list[list[int]]:
        """Collective over the PP group: the trace layers of every stage, in stage order; raises unless
        they are disjoint, in order and cover 0..L-1 (a stage replaying another stage's rows would
        mean the layer offset were wrong). Returns [self.layers] with PP = 1."""
        import torch.distributed as dist
        from megatron.core import parallel_state

        pp = parallel_state.get_pipeline_model_parallel_world_size()
        if pp == 1:
            return [list(self.layers)]
        owned: list = [None] * pp
        dist.all_gather_object(owned, list(self.layers), group=parallel_state.get_pipeline_model_parallel_group())
        if [layer for stage in owned for layer in stage] != list(range(self.spec.num_layers)):
            raise RuntimeError(
                f"pipeline stages own trace layers {owned}, expected each of 0..{self.spec.num_layers - 1} "
                f"exactly once in stage order; likely cause: a stage's layer offset differs from megatron's"
            )
        return owned

    @contextlib.contextmanager
    def pipeline_session(self, mode: ReplayMode, *, recompute: bool = False) -> Iterator["PipelineSession"]:
        """The routing of all micro-batches of one pipeline schedule (megatron's 1F1B, where the forward
        of micro-batch i+1 may run before the backward of micro-batch i). `sess.forward(batch_size=,
        seq_len=, expert_ids_BTLK=)` wraps one micro-batch's forward (the schedule's forward_step_func):
        REPLAY hands this stage's routers their layers' rows, RECORD records them; on its exit each of
        this stage's layers must have consumed its routing once. With recompute (REPLAY) the rows stay
        queued and the routers switch to REPLAY_BACKWARD after each forward: the recompute inside each
        backward pops the oldest queued rows, and 1F1B runs the backwards in forward order. On exit each
        layer must have been popped once per micro-batch, with nothing left. State is cleared on exit."""
        if self.mode is not ReplayMode.OFF or self._forward.active:
            raise RuntimeError("a replay session is already open on this model (sessions do not nest)")
        self.mode = mode
        sess = PipelineSession(self, mode, recompute and mode is ReplayMode.REPLAY)
        self._backward.begin()
        try:
            yield sess
            if sess.recompute:
                self._backward.active = False
                counts, left = self._backward.counts, [len(inst.replay_backward_list) for inst in self._instances]
                if any(c != sess.forwards for c in counts) or any(left):
                    raise RuntimeError(
                        f"recompute backward popped {list(counts)} routings per MoE layer (trace layers "
                        f"{self.layers}), expected {sess.forwards} (one per micro-batch), {left} left queued"
                    )
        finally:
            self._reset()

    @contextlib.contextmanager
    def session(
        self,
        mode: ReplayMode,
        *,
        batch_size: int,
        seq_len: int,
        expert_ids_BTLK: torch.Tensor | None = None,
        recompute: bool = False,
        packed: PackedLayout | None = None,
    ) -> Iterator["ReplaySession"]:
        """One forward (and optionally its backward) in `mode`.

        OFF: native routing, no checks. RECORD: native routing, recorded -> session.recorded_BTLK()
        after the forward. REPLAY: expert_ids_BTLK [B, S-1, L, K] forced in every MoE layer; with
        `packed`, for a forward of the packed (THD) batch (token_order.PackedLayout; REPLAY only).
        Call session.end_forward() after the forward; with recompute=True (REPLAY) the session
        then switches to REPLAY_BACKWARD for the recompute inside backward, and checks on exit
        that each layer's queued indices were popped exactly once. State is cleared on exit.
        """
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        if self.mode is not ReplayMode.OFF or self._forward.active:
            raise RuntimeError("a replay session is already open on this model (sessions do not nest)")
        if packed is not None and mode is not ReplayMode.REPLAY:
            raise NotImplementedError(
                f"routing={mode.name} with a packed (THD) batch: only REPLAY maps rows to packed positions; "
                f"a recording would need unpacking (token_order.restore_full_order + PackedLayout), not built"
            )
        if mode is ReplayMode.REPLAY:
            if expert_ids_BTLK is None:
                raise ValueError("ReplayMode.REPLAY needs expert_ids_BTLK (the rollout routing)")
            self._load_rows(expert_ids_BTLK, batch_size=batch_size, seq_len=seq_len, packed=packed)
            self._set_action(RouterReplayAction.REPLAY_FORWARD)
        elif mode is ReplayMode.RECORD:
            self._set_action(RouterReplayAction.RECORD)
        self.mode = mode
        sess = ReplaySession(self, mode, batch_size, seq_len, recompute and mode is ReplayMode.REPLAY)
        if mode is not ReplayMode.OFF:
            self._forward.begin()
        try:
            yield sess
            if not sess.forward_ended:
                sess.end_forward()
            if sess.recompute:
                self._backward.end()
                left = [len(inst.replay_backward_list) for inst in self._instances]
                if any(left):
                    raise RuntimeError(f"REPLAY_BACKWARD queues not drained after backward: {left} entries per layer")
        finally:
            self._reset()


class ReplaySession:
    """Handle returned by MegatronRouterReplay.session (see there)."""

    def __init__(self, owner: MegatronRouterReplay, mode: ReplayMode, batch_size: int, seq_len: int, recompute: bool):
        self._owner, self.mode, self.recompute = owner, mode, recompute
        self.batch_size, self.seq_len = batch_size, seq_len
        self.forward_ended = False
        self._recorded: list[torch.Tensor] | None = None

    def end_forward(self) -> None:
        """Check that every layer consumed its routing once; prepare the recompute backward."""
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        if self.forward_ended:
            raise RuntimeError("end_forward called twice in one replay session")
        self.forward_ended = True
        o = self._owner
        if self.mode is ReplayMode.OFF:
            return
        o._forward.end()
        if self.mode is ReplayMode.RECORD:
            self._recorded = [_gather_tp(inst.get_recorded_indices(), o.tp_size) for inst in o._instances]
        if self.recompute:
            o._set_action(RouterReplayAction.REPLAY_BACKWARD)
            o._backward.begin()
        else:
            o._set_action(None)

    def recorded_BTLK(self) -> torch.Tensor:
        """The routing recorded in this session's forward, int64 [B, S-1, L, K] (RECORD mode); under
        pipeline parallelism L = this stage's MoE layers (MegatronRouterReplay.layers), possibly 0."""
        if self._recorded is None:
            raise RuntimeError(f"no recorded routing: session mode {self.mode}, forward ended {self.forward_ended}")
        if not self._recorded:
            shape = (self.batch_size, self.seq_len - 1, 0, self._owner.spec.top_k)
            return torch.zeros(shape, dtype=torch.int64, device=parallel.device())
        return from_megatron_layout(self._recorded, batch_size=self.batch_size, seq_len=self.seq_len)


class PipelineSession:
    """Handle returned by MegatronRouterReplay.pipeline_session (see there)."""

    def __init__(self, owner: MegatronRouterReplay, mode: ReplayMode, recompute: bool):
        self._owner, self.mode, self.recompute = owner, mode, recompute
        self.forwards = 0

    @contextlib.contextmanager
    def forward(
        self, *, batch_size: int, seq_len: int, expert_ids_BTLK: torch.Tensor | None = None
    ) -> Iterator[ReplaySession]:
        """One micro-batch's forward; the yielded handle's recorded_BTLK() holds its recording (RECORD)
        after the block."""
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        o = self._owner
        handle = ReplaySession(o, self.mode, batch_size, seq_len, recompute=False)
        if self.mode is ReplayMode.OFF:
            yield handle
            return
        if self.mode is ReplayMode.REPLAY:
            if expert_ids_BTLK is None:
                raise ValueError("ReplayMode.REPLAY needs expert_ids_BTLK (the rollout routing)")
            o._load_rows(expert_ids_BTLK, batch_size=batch_size, seq_len=seq_len)
        replay = self.mode is ReplayMode.REPLAY
        o._set_action(RouterReplayAction.REPLAY_FORWARD if replay else RouterReplayAction.RECORD)
        o._forward.begin()
        yield handle
        handle.forward_ended = True
        o._forward.end()
        self.forwards += 1
        if self.mode is ReplayMode.RECORD:
            handle._recorded = [_gather_tp(inst.get_recorded_indices(), o.tp_size) for inst in o._instances]
            for inst in o._instances:
                inst.recorded_topk_idx = None
        if self.recompute:  # any backward that runs before the next forward recomputes with queued rows
            o._set_action(RouterReplayAction.REPLAY_BACKWARD)
        else:
            o._set_action(None)
            for inst in o._instances:  # no recompute: nothing pops the queue
                inst.replay_backward_list.clear()
