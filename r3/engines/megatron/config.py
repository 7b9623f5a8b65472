"""Frozen config of the megatron-core training engine (light: importable without megatron)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal


@dataclasses.dataclass(frozen=True, kw_only=True)
class MegatronTrainConfig:
    """megatron-core GPTModel built from a transformers Qwen3-MoE checkpoint, with RouterReplay."""

    name: ClassVar[str] = "megatron"
    multi_rank: ClassVar[bool] = True
    """Trains on N ranks (TP/PP/EP/DP from the torch.distributed environment)."""
    model_path: str
    """transformers checkpoint directory to start from (converted to megatron's layout)."""
    lr: float
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Global gradient-norm clip."""
    micro_batch: int = 0
    """Sequences per forward/backward (0: the whole mini-batch)."""
    seed: int = 0
    """torch seed at construction."""
    recompute: bool = False
    """Full activation recompute; replay then runs in REPLAY_BACKWARD for the recompute."""
    tensor_parallel: int = 1
    """TP size (megatron `tensor_model_parallel_size`), with sequence parallelism when > 1; experts
    are not TP-sharded (expert TP = 1)."""
    pipeline_parallel: int = 1
    """PP size: decoder layers split into PP contiguous stages (evenly; the first stage takes the
    remainder), run by megatron's 1F1B schedule; each stage replays its own MoE layers' routing.
    Needs untied embeddings and at least one layer per stage."""
    expert_parallel: int = 1
    """EP size: the experts of every MoE layer split over this many ranks (allgather dispatcher on
    CPU, alltoall on GPU). Data parallelism is the rest: DP = world size / (TP x PP)."""

    precision: Literal["fp32", "bf16"] = "fp32"
    """fp32: fp32 parameters, torch AdamW replicated on DP ranks (the embedded default). bf16: bf16
    parameters, fp32 main gradients and megatron's distributed optimizer (fp32 master weights and
    Adam state sharded over DP): what a 30B model needs on 80 GB GPUs (r3.engines.megatron.optim)."""

    token_dispatcher: Literal["auto", "allgather", "alltoall"] = "auto"
    """megatron's MoE token dispatcher: auto = alltoall on GPU, allgather on CPU."""

    context_parallel: int = 1
    """CP size: each sequence split over this many ranks in megatron's load-balanced chunks. Needs
    Transformer Engine's attention: refused by the engine (r3.engines.megatron.token_order holds the
    replay-row mapping, tested against megatron's own split)."""
    packed_sequences: bool = False
    """Train on packed (THD) sequences instead of padded batches. Needs Transformer Engine's attention:
    refused by the engine, like context_parallel > 1."""

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"MegatronTrainConfig.precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.lr <= 0 or self.grad_clip <= 0 or self.micro_batch < 0:
            raise ValueError(
                f"MegatronTrainConfig needs lr > 0, grad_clip > 0, micro_batch >= 0; got lr={self.lr}, "
                f"grad_clip={self.grad_clip}, micro_batch={self.micro_batch}"
            )
        sizes = (self.tensor_parallel, self.pipeline_parallel, self.expert_parallel, self.context_parallel)
        if min(sizes) < 1:
            raise ValueError(
                f"parallel sizes must be >= 1, got tensor_parallel={sizes[0]}, "
                f"pipeline_parallel={sizes[1]}, expert_parallel={sizes[2]}, context_parallel={sizes[3]}"
            )
