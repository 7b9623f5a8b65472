"""CPU compatibility shims for megatron-core 0.16 (no GPU, no Transformer Engine, no Apex).

megatron-core is written for CUDA; on a CPU-only machine with gloo processes (one, or several
under torchrun: r3.engines.megatron.parallel) it runs after the few small shims below. Each shim
says what it works around and why. They are only installed when CUDA is absent
(`torch.cuda.is_available()` is False), touch megatron's own module namespaces except for the
scoped `cpu_device_scope` and `cuda_as_cpu` (restored on exit), and are idempotent. One shim is
installed with or without CUDA: the router's GEMM without Transformer Engine (`install_no_te_shims`).

Also here, for GPU jobs: `require_cuda_if_asked` (a job that asked for GPUs and sees none stops,
instead of training on gloo/CPU) and `set_local_device` (LOCAL_RANK's GPU, whether the site shows a
task all of the node's GPUs or binds one to it).

Not a shim, but needed by callers on CPU: pass an explicit causal attention mask to
`GPTModel.forward` (megatron's default causal mask is built with `device="cuda"`,
megatron/core/transformer/utils.py:get_default_causal_mask), and use the `allgather` token
dispatcher (`alltoall` creates a `torch.cuda.Stream` at construction).

Import this module only where megatron is wanted: it imports megatron.core.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist


def _cuda_absent() -> bool:
    return not torch.cuda.is_available()


def init_single_process_group() -> None:
    """Start torch.distributed as one gloo process (rank 0, world size 1) on a `HashStore`, which
    needs no port or environment variable. megatron-core reads every process group (TP/PP/EP/CP/DP)
    from `parallel_state`, even when each has one member, so a process group must exist. Used by
    r3.engines.megatron.parallel.init_parallel when the environment names no world (no WORLD_SIZE)."""
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo", store=dist.HashStore(), rank=0, world_size=1)


def install_no_te_shims() -> None:
    """Shim 1 (megatron without Transformer Engine, CPU or GPU; idempotent).

    Every router forward runs `Router.gating` -> `router_gating_linear` ->
    `RouterGatingLinearFunction.forward`, which tests `te_general_gemm is not None` (and its backward
    again; megatron-core 0.16.1, transformer/moe/router.py:100, moe_utils.py:1192 and :1225). The name
    is bound only inside moe_utils' `try: import transformer_engine ...` block (moe_utils.py:22-39), so
    without TE every MoE forward raises NameError; no config flag avoids the call. Binding it to None
    selects megatron's own fallback in the same function: `torch.mm` / `torch.addmm` in the router
    dtype. With TE installed the name is TE's GEMM and nothing changes."""
    from megatron.core.transformer.moe import moe_utils

    if not moe_utils.HAVE_TE and not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


REQUIRE_CUDA_ENV = "R3_REQUIRE_CUDA"
"""Set to 1 by slurm.job in a job that asked for GPUs (Resources.gpus_per_node > 0)."""


def cuda_asked() -> bool:
    """Whether this process belongs to a job that asked for GPUs: R3_REQUIRE_CUDA=1 (slurm.job), or
    Slurm's SLURM_GPUS_ON_NODE > 0 (set when the allocation holds GPUs, whoever submitted it)."""
    if os.environ.get(REQUIRE_CUDA_ENV, "") not in ("", "0"):
        return True
    try:
        return int(os.environ.get("SLURM_GPUS_ON_NODE") or 0) > 0
    except ValueError:  # a GRES string such as "gpu:a100:8": the node has GPUs
        return bool(os.environ.get("SLURM_GPUS_ON_NODE"))


def require_cuda_if_asked() -> bool:
    """Whether CUDA is used (True: NCCL and one GPU per rank). Raises when the job asked for GPUs and
    torch sees none: without this, every rank would fall back to gloo on the CPU and a 30B model would
    run out of host memory hours later, or train 1000x slower without a word."""
    if torch.cuda.is_available():
        return True
    if cuda_asked():
        raise RuntimeError(
            f"this job asked for GPUs ({REQUIRE_CUDA_ENV}={os.environ.get(REQUIRE_CUDA_ENV)!r}, "
            f"SLURM_GPUS_ON_NODE={os.environ.get('SLURM_GPUS_ON_NODE')!r}, "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}) but torch sees none "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); likely causes: a CPU-only torch "
            "wheel in the job's environment (e.g. pulled in by another package's pin), a driver older than "
            "that CUDA, or a node without GPUs. Refusing to fall back to gloo on the CPU (docs/cluster.md)"
        )
    return False


def set_local_device() -> int:
    """Make LOCAL_RANK's GPU this process's current device; returns its index.

    A site may show each task all of its node's GPUs (index LOCAL_RANK) or bind one GPU per task
    (`--gpu-bind=single:1`, per-task CUDA_VISIBLE_DEVICES: the task sees one device, index 0): the index
    is LOCAL_RANK modulo the visible device count. Any other count below LOCAL_WORLD_SIZE would put two
    ranks on one GPU, and is refused."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    count = torch.cuda.device_count()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)
    if count == 0:
        raise RuntimeError("set_local_device: torch sees no GPU (check require_cuda_if_asked first)")
    if count != 1 and local_world > count:
        raise RuntimeError(
            f"{local_world} ranks on this node (LOCAL_WORLD_SIZE) but each sees {count} GPUs "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}): two ranks would share a GPU; "
            "expected one GPU per task or all of the node's GPUs (>= the tasks per node); "
            "check --gpus-per-node and --ntasks-per-node"
        )
    index = local_rank % count
    torch.cuda.set_device(index)
    return index


_INSTALLED = False


def install_cpu_shims() -> None:
    """Install the module-level shims (once). No-op when CUDA is present."""
    global _INSTALLED
    install_no_te_shims()
    if _INSTALLED or not _cuda_absent():
        return
    from megatron.core.tensor_parallel import random as mg_random

    # Shim 2 (CUDA RNG tracker): attention and expert layers run inside
    # `get_cuda_rng_tracker().fork()`, which needs CUDA generator states
    # (model_parallel_cuda_manual_seed calls torch.cuda.manual_seed / get_rng_state). We use
    # megatron's own no-op tracker (`inference_rng_tracker=True`: fork is a nullcontext).
    # This is exact only because every dropout is 0 (checked in megatron_model.py): no random
    # numbers are drawn inside the model, so there is no RNG stream to track.
    mg_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)

    # Shim 3 (activation recompute): CheckpointFunction saves and restores the CUDA RNG state
    # around the recomputed forward (_get_all_rng_states -> torch.cuda.random.get_rng_state).
    # With no CUDA generator there is nothing to save: return an empty state and ignore it on
    # set. The CPU RNG state is still saved and restored by megatron itself.
    mg_random._get_cuda_rng_state = lambda *args, **kwargs: torch.empty(0, dtype=torch.uint8)
    mg_random._set_cuda_rng_state = lambda *args, **kwargs: None

    _INSTALLED = True


def _cpu_current_device() -> str:
    return "cpu"


@contextlib.contextmanager
def cpu_device_scope() -> Iterator[None]:
    """Shim 4 (scoped): `torch.cuda.current_device()` returns "cpu" inside the block.

    megatron moves tensors to `torch.cuda.current_device()` at run time: the router weight in
    `Router.gating` ("move weights to GPU"), RoPE's `inv_freq` in `RotaryEmbedding.get_emb`,
    expert buffers at construction. Without CUDA that call raises. Inside this block it names
    the CPU, so those moves are no-ops. Wrap model construction, forward AND backward (the
    activation-recompute forward runs inside backward). Restored on exit; nests; a no-op when
    CUDA is present.
    """
    if not _cuda_absent():
        yield
        return
    previous = torch.cuda.current_device
    torch.cuda.current_device = _cpu_current_device
    try:
        yield
    finally:
        torch.cuda.current_device = previous


_FACTORIES = ("tensor", "zeros", "empty", "ones", "full", "arange", "zeros_like", "empty_like", "ones_like")


def _cpu_device(device):
    if isinstance(device, int) or (isinstance(device, str) and device.startswith("cuda")):
        return "cpu"
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


@contextlib.contextmanager
def cuda_as_cpu() -> Iterator[None]:
    """Shim 5 (scoped, for megatron's DDP and optimizers: bf16 training on CPU, tests only):
    megatron's mixed-precision optimizers hard-code CUDA in three ways, and each is redirected to
    the CPU inside this block:
    - tensors created with `device='cuda'` or `torch.cuda.current_device()` (found_inf, the loss
      scale, grad-norm buffers in optimizer.py and clip_grads.py): the torch factory functions
      named in _FACTORIES get device "cpu" instead;
    - tensor type checks such as `param.type() in ['torch.cuda.BFloat16Tensor', ...]`
      (Float16OptimizerWithFloat16Params, DistributedOptimizer): `Tensor.type()` without
      arguments answers the CUDA type name of a CPU tensor;
    - `torch.cuda.current_device()` names the CPU (as cpu_device_scope).
    Global while active (single-threaded training code only), restored on exit; a no-op with CUDA.
    """
    if not _cuda_absent():
        yield
        return
    tensor_type = torch.Tensor.type

    def cuda_type_name(self, *args, **kwargs):
        out = tensor_type(self, *args, **kwargs)
        if not args and not kwargs and isinstance(out, str) and out.startswith("torch.") and ".cuda." not in out:
            return "torch.cuda." + out[len("torch.") :]
        return out

    try:
        torch.Tensor.type = cuda_type_name
        with _factories_on_cpu(), cpu_device_scope():
            yield
    finally:
        torch.Tensor.type = tensor_type


@contextlib.contextmanager
def _factories_on_cpu() -> Iterator[None]:
    """The torch factory functions of _FACTORIES create on the CPU what they are asked to create with
    `device='cuda'` (or a CUDA index / torch.device); restored on exit."""
    saved = {name: getattr(torch, name) for name in _FACTORIES}

    def redirect(factory):
        def wrapper(*args, **kwargs):
            if "device" in kwargs:
                kwargs["device"] = _cpu_device(kwargs["device"])
            return factory(*args, **kwargs)

        return wrapper

    try:
        for name, factory in saved.items():
            setattr(torch, name, redirect(factory))
        yield
    finally:
        for name, factory in saved.items():
            setattr(torch, name, factory)


@contextlib.contextmanager
def cpu_pipeline_schedule() -> Iterator[None]:
    """Shim 8 (scoped, CPU only: megatron's pipeline schedule, PP > 1, on gloo ranks). Wrap the call of
    `get_forward_backward_func()(...)` (all of its forwards and backwards run inside). The schedule and
    its P2PCommunicator (megatron/core/pipeline_parallel/schedules.py, p2p_communication.py) assume
    CUDA in three ways, each redirected here:
    - `total_num_tokens = torch.zeros([], device="cuda")` (the token counter of every schedule): the
      factory functions create on the CPU (as in cuda_as_cpu);
    - receive buffers and the shape tensors of `variable_seq_lengths` are allocated on
      `torch.cuda.current_device()`: it names the CPU (cpu_device_scope);
    - `torch.cuda.synchronize()` after `batch_isend_irecv` ("to protect against race condition"): a
      no-op; gloo's point-to-point requests are waited for by the communicator itself.
    The sends and receives are torch.distributed's own (batch_isend_irecv works on gloo). Global while
    active (single-threaded training code only), restored on exit; a no-op with CUDA."""
    if not _cuda_absent():
        yield
        return
    synchronize = torch.cuda.synchronize
    try:
        torch.cuda.synchronize = lambda *args, **kwargs: None
        with _factories_on_cpu(), cpu_device_scope():
            yield
    finally:
        torch.cuda.synchronize = synchronize


_SP_NORM_INSTALLED = False


def allow_sequence_parallel_torch_norm() -> None:
    """Shim 6 (local layer spec + sequence parallelism, CPU and GPU): megatron's `WrappedTorchNorm`
    (the torch RMSNorm of the TE-free spec) asserts `not config.sequence_parallel`, although a norm
    is per token and needs nothing from its neighbours. With SP the norm is built as without it and
    its parameters are marked `sequence_parallel = True`, as megatron's TE norms mark theirs: each TP
    rank then sees only its sequence slice, so their gradients are partial and are summed over the
    TP group (r3.engines.megatron.parallel.allreduce_sequence_parallel_grads, or megatron's
    finalize_model_grads). Installed once; a norm built without SP is unchanged."""
    global _SP_NORM_INSTALLED
    if _SP_NORM_INSTALLED:
        return
    import dataclasses

    from megatron.core.transformer import torch_norm

    original = torch_norm.WrappedTorchNorm.__new__

    def new(cls, config, hidden_size, eps=1e-5, **kwargs):
        if not config.sequence_parallel:
            return original(cls, config, hidden_size, eps, **kwargs)
        norm = original(cls, dataclasses.replace(config, sequence_parallel=False), hidden_size, eps, **kwargs)
        for p in norm.parameters():
            p.sequence_parallel = True
        return norm

    torch_norm.WrappedTorchNorm.__new__ = new
    _SP_NORM_INSTALLED = True


_ALLTOALL_INSTALLED = False


def install_cpu_alltoall_dispatcher() -> None:
    """Shim 7 (CPU only, the `alltoall` token dispatcher, megatron's default on GPU): the dispatcher
    creates a `torch.cuda.Stream` at construction and copies its split sizes device-to-host on that
    stream (`_maybe_dtoh_and_synchronize`), leaving them as tensors when they are already on the
    CPU. Here the stream is never created and the split sizes become numpy arrays at the same point,
    as megatron's own CUDA path leaves them. No-op with CUDA; installed once."""
    global _ALLTOALL_INSTALLED
    if _ALLTOALL_INSTALLED or not _cuda_absent():
        return
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = "cpu: no stream"  # not None: construction skips creating one

    def dtoh(self, point, tokens_per_expert=None):
        if not self.drop_and_pad and point == self.cuda_dtoh_point:
            for name in ("input_splits", "output_splits", "output_splits_tp"):
                value = getattr(self, name, None)
                if torch.is_tensor(value):
                    setattr(self, name, value.numpy())
        return tokens_per_expert

    MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize = dtoh
    _ALLTOALL_INSTALLED = True
