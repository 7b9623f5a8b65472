"""Frozen config of the megatron-core training engine (light: importable without megatron)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar


@dataclasses.dataclass(frozen=True, kw_only=True)
class MegatronTrainConfig:
    """megatron-core GPTModel built from a transformers Qwen3-MoE checkpoint, with RouterReplay."""

    name: ClassVar[str] = "megatron"
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

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.grad_clip <= 0 or self.micro_batch < 0:
            raise ValueError(f"MegatronTrainConfig needs lr > 0, grad_clip > 0, micro_batch >= 0; got lr={self.lr}, "
                             f"grad_clip={self.grad_clip}, micro_batch={self.micro_batch}")
