"""Process model of the megatron train engine: torch.distributed from the environment, megatron's
parallel state (TP / PP / EP, DP derived), and the data-parallel plumbing the engine needs.

    layout = init_parallel(tp=1, pp=1, ep=2, seed=0)   # reads RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*

- With WORLD_SIZE in the environment (torchrun, or slurm.topology's exports inside a Slurm job)
  the process group is initialised from it (`env://`): NCCL on GPU, gloo on CPU; the device is
  cuda:LOCAL_RANK. Without it, one gloo process on a HashStore (r3.engines.megatron.compat).
- `initialize_model_parallel(TP, PP, expert_model_parallel_size=EP)`; the layout is validated
  against the world size first, with the numbers in the message (megatron's own assertion does
  not say which flag to change).
- On GPU, megatron's CUDA RNG tracker is seeded (`model_parallel_cuda_manual_seed`): without it
  the first attention forward raises "cuda rng state model-parallel-rng is not added". On CPU the
  no-op tracker shim of compat.py is used (every dropout is 0).

Data parallelism, as the engine runs it: every rank receives the same global mini-batch (the
driver broadcasts it); rank r of the DP group takes the r-th of `dp` near-equal contiguous row
slices (`dp_slice`), padded to the largest slice with copies of its first row so that every rank
runs forwards of one shape (the allgather token dispatcher gathers equal-sized token blocks across
the EP group, and every rank must run the same number of micro-batches). Per-row results are
all-gathered and the padding dropped (`gather_rows`); gradients are summed over the DP group
(dense parameters) or the expert-DP group (experts, `param.allreduce == False`), because the loss
is already normalised by the whole mini-batch (r3.engines.base.LossFn).

Pipeline parallelism: `stage_layer_counts` splits the decoder layers into contiguous stages; results
of the last stage reach the others by broadcast over the PP group (`broadcast_from_last_stage`,
`broadcast_metrics_from_last_stage`), recordings are concatenated over the stages
(`gather_stage_tensors`), the stages' weights gathered to the first stage (`gather_stages`); the
gradient norm sums the stages' squared norms over the PP group (`clip_grad_norm`).
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
"""torch.distributed's env:// rendezvous variables (torchrun and slurm.topology export them)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Layout:
    """How `world_size` ranks split one model: TP x PP model-parallel groups, DP = the rest; the
    experts of each MoE layer split EP ways and are never TP-sharded (expert TP = 1: under TP with
    sequence parallelism each TP rank routes its own sequence slice through whole experts)."""

    world_size: int
    tp: int = 1
    pp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        errors = []
        for name in ("world_size", "tp", "pp", "ep"):
            if getattr(self, name) < 1:
                errors.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if not errors and self.world_size % (self.tp * self.pp):
            errors.append(
                f"world size {self.world_size} is not divisible by TP x PP = {self.tp} x {self.pp} = "
                f"{self.tp * self.pp}: data parallelism needs whole model replicas"
            )
        if not errors and self.world_size % (self.ep * self.pp):
            errors.append(
                f"world size {self.world_size} is not divisible by EP x PP = {self.ep} x {self.pp} = "
                f"{self.ep * self.pp}: every expert shard needs whole replicas"
            )
        if errors:
            raise ValueError(
                "invalid parallel layout: " + "; ".join(errors) + "; change tensor_parallel / "
                "pipeline_parallel / expert_parallel or the number of training ranks"
            )

    @property
    def dp(self) -> int:
        """Data-parallel size of the dense parameters (attention, router, embeddings)."""
        return self.world_size // (self.tp * self.pp)

    @property
    def expert_dp(self) -> int:
        """Data-parallel size of the expert parameters (replicas of one expert shard)."""
        return self.world_size // (self.pp * self.ep)

    def check_experts(self, num_experts: int) -> None:
        if num_experts and num_experts % self.ep:
            raise ValueError(
                f"{num_experts} experts cannot be split over EP = {self.ep} ranks evenly; "
                f"choose expert_parallel dividing {num_experts}"
            )

    def describe(self) -> str:
        return (
            f"world {self.world_size} = TP {self.tp} x PP {self.pp} x DP {self.dp} "
            f"(experts: EP {self.ep} x expert-DP {self.expert_dp})"
        )


def env_world() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) from the environment, or None when WORLD_SIZE is absent."""
    if "WORLD_SIZE" not in os.environ:
        return None
    missing = [k for k in ENV_KEYS if k not in os.environ and not (k == "LOCAL_RANK")]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE is set but {missing} are not: the env:// rendezvous needs all of "
            f"{list(ENV_KEYS)} (torchrun and slurm.topology export them)"
        )
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))


def device() -> torch.device:
    """This rank's device: the current GPU (LOCAL_RANK's, set by init_parallel), else cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_parallel(*, tp: int = 1, pp: int = 1, ep: int = 1, seed: int = 0) -> Layout:
    """Start torch.distributed (from the environment when it names a world, else one gloo process)
    and megatron's parallel state with these sizes; idempotent for the same sizes."""
    from megatron.core import parallel_state

    from r3.engines.megatron import compat

    env = env_world()
    if not dist.is_initialized():
        if env is None:
            compat.init_single_process_group()
        else:
            rank, world, _ = env
            cuda = compat.require_cuda_if_asked()  # a GPU job seeing no GPU stops here, not on gloo
            if cuda:
                compat.set_local_device()  # before any allocation: else every rank uses cuda:0
            backend = "nccl" if cuda else "gloo"
            dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world)
    elif torch.cuda.is_available():
        compat.set_local_device()  # torch.distributed started elsewhere (experiments.distributed): same GPU
    compat.install_no_te_shims()  # the router's GEMM without Transformer Engine, on CPU and GPU
    layout = Layout(world_size=dist.get_world_size(), tp=tp, pp=pp, ep=ep)
    if parallel_state.model_parallel_is_initialized():
        have = (
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_expert_model_parallel_world_size(),
        )
        if have != (tp, pp, ep):
            raise RuntimeError(
                f"megatron's parallel state is already initialised with (TP, PP, EP) = {have}, "
                f"asked for {(tp, pp, ep)}; one layout per process"
            )
    else:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            expert_model_parallel_size=ep,
            expert_tensor_parallel_size=1,
        )
    if torch.cuda.is_available():
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)
    else:
        compat.install_cpu_shims()
    return layout


# --- data parallelism ----------------------------------------------------------------------------
def dp_group():
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_group()


def dp_rank_size() -> tuple[int, int]:
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()


def dp_slice(batch_size: int, dp_size: int, dp_rank: int) -> tuple[slice, int]:
    """(this rank's rows of the global batch, padded rows per rank). Rows split into dp_size
    contiguous slices whose sizes differ by at most one; every rank pads to max(1, ceil(B / dp)).
    A batch of fewer rows than ranks (the 1-row post-sync probe, a dynamic-sampling step that kept
    few groups) leaves some ranks an empty slice: they run padding rows with no loss, so every
    rank still joins the collectives."""
    if batch_size < 1:
        raise ValueError(f"a mini-batch needs at least one sequence, got {batch_size}")
    base, extra = divmod(batch_size, dp_size)
    start = dp_rank * base + min(dp_rank, extra)
    size = base + (dp_rank < extra)
    return slice(start, start + size), base + (extra > 0)


def gather_rows(x_N: torch.Tensor, real: int, batch_size: int, dp_size: int) -> torch.Tensor:
    """All-gather each DP rank's padded per-row tensor [n, ...] and drop the padding -> [B, ...]."""
    if dp_size == 1:
        return x_N[:real]
    parts = [torch.empty_like(x_N) for _ in range(dp_size)]
    dist.all_gather(parts, x_N.contiguous(), group=dp_group())
    base, extra = divmod(batch_size, dp_size)
    return torch.cat([p[: base + (r < extra)] for r, p in enumerate(parts)])


def allreduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Sum gradients over the replicas of each parameter: dense ones over the DP group, experts over
    the expert-DP group (megatron marks expert weights `allreduce = False`). Missing grads count as 0."""
    from megatron.core import parallel_state

    groups = (
        (True, parallel_state.get_data_parallel_group(), parallel_state.get_data_parallel_world_size()),
        (False, parallel_state.get_expert_data_parallel_group(), parallel_state.get_expert_data_parallel_world_size()),
    )
    for dense, group, size in groups:
        if size == 1:
            continue
        ps = [p for p in params if getattr(p, "allreduce", True) == dense]
        for p in ps:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if ps:  # one flat buffer: one collective instead of one per tensor
            flat = torch.cat([p.grad.reshape(-1) for p in ps])
            dist.all_reduce(flat, group=group)
            off = 0
            for p in ps:
                n = p.grad.numel()
                p.grad.copy_(flat[off : off + n].view_as(p.grad))
                off += n


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Global L2 norm of the gradients (after allreduce_grads) and clipping to max_norm, as
    torch.nn.utils.clip_grad_norm_ does on one rank (coef = max_norm / (norm + 1e-6), at most 1).
    Replicated dense gradients are equal on every rank after the all-reduces; TP-sharded ones
    (`tensor_model_parallel`) differ across the TP group and expert gradients across the EP group,
    so their squared norms are summed over those groups; under pipeline parallelism every stage holds
    its own parameters, so the total is summed over the PP group (as megatron's get_grad_norm_fp32
    does over its model-parallel group)."""
    from megatron.core import parallel_state

    with_grad = [p for p in params if p.grad is not None]
    dev = with_grad[0].grad.device if with_grad else device()

    def sq(keep) -> torch.Tensor:
        return sum((p.grad.float().pow(2).sum() for p in with_grad if keep(p)), torch.zeros((), device=dev))

    expert = lambda p: not getattr(p, "allreduce", True)  # noqa: E731
    tp_sharded = lambda p: not expert(p) and getattr(p, "tensor_model_parallel", False)  # noqa: E731
    replicated_sq = sq(lambda p: not expert(p) and not tp_sharded(p))  # equal on every rank
    sharded_sq, expert_sq = sq(tp_sharded), sq(expert)
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(sharded_sq, group=parallel_state.get_tensor_model_parallel_group())
    if parallel_state.get_expert_model_parallel_world_size() > 1:
        dist.all_reduce(expert_sq, group=parallel_state.get_expert_model_parallel_group())
    total_sq = replicated_sq + sharded_sq + expert_sq
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:  # each stage holds other parameters
        dist.all_reduce(total_sq, group=parallel_state.get_pipeline_model_parallel_group())
    norm = total_sq.sqrt()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for p in with_grad:
        p.grad.mul_(coef.to(p.grad.dtype))
    return norm


def allreduce_sum(values: dict[str, torch.Tensor], group=None) -> dict[str, torch.Tensor]:
    """Sum a dict of scalar tensors over the DP group in one collective (keys in sorted order)."""
    keys = sorted(values)
    dev = device()  # the backend's device (NCCL takes CUDA tensors only); floats join there
    flat = torch.stack([torch.as_tensor(values[k], dtype=torch.float32, device=dev).reshape(()) for k in keys])
    dist.all_reduce(flat, group=group if group is not None else dp_group())
    return {k: flat[i] for i, k in enumerate(keys)}


# --- experts across the EP group ---------------------------------------------------------------------
def ep_rank_size() -> tuple[int, int]:
    from megatron.core import parallel_state

    return parallel_state.get_expert_model_parallel_rank(), parallel_state.get_expert_model_parallel_world_size()


def gather_experts(mg_sd: dict[str, torch.Tensor], num_experts: int) -> dict[str, torch.Tensor] | None:
    """A local-spec megatron state dict with this rank's experts (`local_experts.{i}`, i < E / EP)
    -> on the first rank of the EP group of expert-DP rank 0 (with PP, one per stage; rank 0's own),
    the same with all E experts under their global index, every tensor moved to the CPU as soon as it
    arrives (so the full model never sits on one GPU); None on every other rank. Collective: every
    rank of the EP group must call it. With EP = 1 every rank gets its (complete) state dict on the
    CPU."""
    import re

    from megatron.core import parallel_state

    ep_rank, ep = ep_rank_size()
    keep = {k: v for k, v in mg_sd.items() if not k.endswith("_extra_state")}  # TE fp8 metadata: not weights
    if ep == 1:
        return {k: v.detach().to("cpu", copy=True) for k, v in keep.items()}
    if parallel_state.get_expert_data_parallel_rank() != 0:
        # Another replica of these experts: the EP group of expert-DP rank 0 (global rank 0's, the
        # driver that syncs) gathers them; every member of an EP group has the same expert-DP rank
        # (megatron's expert RankGenerator, order tp-ep-dp-pp), so the whole group skips together
        # rather than building a full expert set that would be discarded (rank 8 of the paper's 16)
        return None
    n_local = num_experts // ep
    pat = re.compile(r"^(.*\.local_experts\.)(\d+)(\..*)$")
    out, local = {}, []
    for k, v in keep.items():
        m = pat.match(k)
        if m is None:
            if ep_rank == 0:
                out[k] = v.detach().to("cpu", copy=True)
        else:
            local.append((m, v))
    group = parallel_state.get_expert_model_parallel_group()
    for m, v in sorted(local, key=lambda mv: mv[0].group(0)):  # same order on every rank
        parts = [torch.empty_like(v) for _ in range(ep)] if ep_rank == 0 else None
        dist.gather(v.detach().contiguous(), parts, group=group, group_dst=0)
        if ep_rank == 0:
            for r, part in enumerate(parts):
                out[f"{m.group(1)}{r * n_local + int(m.group(2))}{m.group(3)}"] = part.to("cpu")
    return out if ep_rank == 0 else None


# --- tensor parallelism ------------------------------------------------------------------------------
def tp_rank_size() -> tuple[int, int]:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()


def tp_group():
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def allreduce_sequence_parallel_grads(params: list[torch.nn.Parameter]) -> None:
    """Under sequence parallelism each TP rank saw its own sequence slice, so the gradients of the
    parameters replicated across TP (norms, routers: megatron marks them `sequence_parallel`) are
    partial sums: add them up over the TP group (megatron's finalize_model_grads does the same)."""
    _, tp = tp_rank_size()
    ps = [p for p in params if getattr(p, "sequence_parallel", False) and p.grad is not None]
    if tp == 1 or not ps:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in ps])
    dist.all_reduce(flat, group=tp_group())
    off = 0
    for p in ps:
        n = p.grad.numel()
        p.grad.copy_(flat[off : off + n].view_as(p.grad))
        off += n


# --- pipeline parallelism ----------------------------------------------------------------------------
def stage_layer_counts(num_layers: int, pp: int) -> list[int]:
    """Decoder layers per pipeline stage: an even split when PP divides the layers, else every stage
    holds floor(layers / PP) and the first stage also the remainder (megatron's
    `num_layers_in_first_pipeline_stage`, the one uneven split it builds without a custom layout).
    Each stage holds a contiguous block; stage r starts at sum(counts[:r]) (megatron's
    get_transformer_layer_offset, checked against the built model by the engine)."""
    if pp < 1 or num_layers < pp:
        raise ValueError(
            f"{num_layers} decoder layers cannot fill {pp} pipeline stages (each needs at least one "
            f"layer); choose pipeline_parallel <= {num_layers}"
        )
    base, extra = divmod(num_layers, pp)
    return [base + extra] + [base] * (pp - 1)


def pp_rank_size() -> tuple[int, int]:
    from megatron.core import parallel_state

    return parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_world_size()


def pp_group():
    from megatron.core import parallel_state

    return parallel_state.get_pipeline_model_parallel_group()


def pp_global_rank(stage: int) -> int:
    """The global rank of pipeline stage `stage` in this rank's PP group."""
    return dist.get_global_rank(pp_group(), stage)


def broadcast_from_last_stage(x: torch.Tensor) -> torch.Tensor:
    """`x` of the last pipeline stage on every stage of the PP group (collective; the other stages
    pass a tensor of the same shape and dtype, which is overwritten). Identity with PP = 1."""
    rank, pp = pp_rank_size()
    if pp == 1:
        return x
    x = x.contiguous()
    dist.broadcast(x, src=pp_global_rank(pp - 1), group=pp_group())
    return x


def broadcast_metrics_from_last_stage(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A dict of scalar tensors computed on the last pipeline stage (loss, loss_fn metrics) on every
    stage: the keys travel as one object, the values as one float32 tensor. Identity with PP = 1."""
    rank, pp = pp_rank_size()
    if pp == 1:
        return values
    src = pp_global_rank(pp - 1)
    keys = [sorted(values) if rank == pp - 1 else None]
    dist.broadcast_object_list(keys, src=src, group=pp_group())
    keys = keys[0]
    dev = device()
    flat = (
        torch.stack([torch.as_tensor(values[k], dtype=torch.float32, device=dev).reshape(()) for k in keys])
        if rank == pp - 1
        else torch.zeros(len(keys), dtype=torch.float32, device=dev)
    )
    if keys:
        dist.broadcast(flat, src=src, group=pp_group())
    return {k: flat[i] for i, k in enumerate(keys)}


def gather_stage_tensors(x_BTLK: torch.Tensor, dim: int) -> torch.Tensor:
    """Concatenate each pipeline stage's part of a tensor along `dim`, in stage order, on every stage
    (parts may differ in size along `dim`, e.g. a stage's MoE layers of a recorded routing trace; a
    stage without MoE layers passes a size-0 part). Identity with PP = 1."""
    _, pp = pp_rank_size()
    if pp == 1:
        return x_BTLK
    parts = [None] * pp
    dist.all_gather_object(parts, x_BTLK.detach().to("cpu"), group=pp_group())
    return torch.cat(parts, dim=dim).to(x_BTLK.device)


def gather_stages(sd: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    """Each pipeline stage's (CPU) state dict under global layer names -> their union on stage 0,
    None on the other stages. Collective over the PP group; a PP group whose members hold no state
    dict (None: not the first rank of their EP group, r3.engines.megatron.parallel.gather_experts)
    passes None on every stage and gets None. Tensors travel one by one (names, shapes and dtypes
    first, as one object), on this rank's device, and land on stage 0's CPU. Identity with PP = 1."""
    rank, pp = pp_rank_size()
    if pp == 1:
        return sd
    group, dev = pp_group(), device()
    metas = [None] * pp
    meta = None if sd is None else [(k, tuple(v.shape), v.dtype) for k, v in sd.items()]
    dist.all_gather_object(metas, meta, group=group)
    if any(m is None for m in metas):
        if any(m is not None for m in metas):
            raise RuntimeError(
                f"pipeline stages disagree on who holds the gathered experts: {[m is not None for m in metas]}; "
                f"likely cause: EP groups that do not line up across stages"
            )
        return None
    out = dict(sd) if rank == 0 else None
    for stage in range(1, pp):
        src = pp_global_rank(stage)
        for k, shape, dtype in metas[stage]:
            if rank == stage:
                dist.send(sd[k].to(dev).contiguous(), dst=pp_global_rank(0), group=group)
            elif rank == 0:
                buf = torch.empty(shape, dtype=dtype, device=dev)
                dist.recv(buf, src=src, group=group)
                if k in out:
                    raise RuntimeError(f"pipeline stage {stage} sends {k!r}, which stage 0 already holds")
                out[k] = buf.to("cpu")
    return out
