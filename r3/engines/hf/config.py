"""Frozen configs of the transformers engines (light: importable without transformers)."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Literal

from r3.engines.base import PRECISIONS, Precision

Fp8Scope = Literal["router", "all", "w8a8"]
"""What the FP8 engine quantises (r3.engines.hf.fp8): `router` and `all` weights only (e4m3, one scale
per output channel); `w8a8` the weights of every linear layer but the routers and the output head,
plus each such layer's input activations with a dynamic per-token scale, as FP8 serving does."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class HFRolloutConfig:
    """In-process transformers rollout engine (embedded mode)."""

    name: ClassVar[str] = "hf"
    static_precisions: ClassVar[tuple[str, ...]] = ("bf16", "fp8")
    model_path: str
    """transformers checkpoint directory (config.json + weights)."""
    precision: Precision = "bf16"
    """Numerics of the inference engine; the trainer is fp32, so bf16/fp8 is a real mismatch."""
    fp8_scope: Fp8Scope = "router"
    """With precision fp8: which weights are quantised: the MoE routers only, or `all` linear layers
    (attention, experts per expert and output channel, routers; embeddings, norms, lm_head stay bf16),
    or `w8a8` (attention and expert weights and their input activations, per token; routers and
    lm_head stay bf16: r3.engines.hf.fp8)."""
    router_noise: float = 0.0
    """Mismatch dose (r3.engines.hf.noise): std of seeded Gaussian noise added to every MoE router's
    logits before its top-k (gate weights stay those of the clean logits): changes routing only, so
    R3 removes it. 0: off."""
    logit_noise: float = 0.0
    """Mismatch dose (r3.engines.hf.noise): std of seeded Gaussian noise added to the output logits;
    the rollout samples from and reports the noisy distribution: a non-routing mismatch R3 cannot
    remove. 0: off."""
    device: str = "cpu"
    """torch device."""
    seed: int = 0
    """Seed of the engine's sampling generator (a call's SamplingParams.seed overrides it)."""
    fp32_attention: bool = False
    """bf16 / fp8 engines: attention on fp32 copies of the bf16 q/k/v, output rounded to bf16 (softmax and
    products accumulate in fp32, as GPU serving kernels do; r3.engines.hf.rollout._sdpa_fp32). Faster on
    this CPU than torch's bf16 kernel at decode (0.75x time per token) but not torch's bf16 numerics, so
    off by default: the embedded measurements (docs/embedded.md) use torch's bf16 attention."""
    progress_min_prompts: int = 1024
    """A generate call with at least this many prompts shows a progress bar over its decode steps,
    with an ETA (the static measurement's 4096 samples take minutes; RL steps and evaluations
    stay quiet). 0: never."""

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"HFRolloutConfig.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.fp8_scope not in Fp8Scope.__args__:
            raise ValueError(
                f"HFRolloutConfig.fp8_scope must be one of {Fp8Scope.__args__} (router weights only, every "
                f"linear layer's weights, or W8A8 serving numerics: r3.engines.hf.fp8), got {self.fp8_scope!r}"
            )
        for name in ("router_noise", "logit_noise"):
            std = getattr(self, name)
            if not (math.isfinite(std) and std >= 0):
                raise ValueError(f"HFRolloutConfig.{name} must be a finite std >= 0 in logit units (0: off), got {std}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class HFTrainConfig:
    """transformers fp32 training engine with AdamW."""

    name: ClassVar[str] = "hf"
    model_path: str
    """transformers checkpoint directory to start from."""
    lr: float
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Global gradient-norm clip."""
    micro_batch: int = 0
    """Sequences per forward/backward (0: the whole mini-batch)."""
    max_tokens_per_micro_batch: int = 0
    """Length-grouped micro-batches (0: off): rows sorted by length and packed so that rows x
    longest row <= this many tokens, each micro-batch trimmed to its longest row, so padding costs
    little (verl's dynamic batch size, `ppo_max_token_len_per_gpu`). Excludes micro_batch."""
    seed: int = 0
    """torch seed at construction."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (replay stays active through the recompute)."""

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.grad_clip <= 0 or self.micro_batch < 0 or self.max_tokens_per_micro_batch < 0:
            raise ValueError(
                f"HFTrainConfig needs lr > 0, grad_clip > 0, micro_batch >= 0, max_tokens_per_micro_batch >= 0; "
                f"got lr={self.lr}, grad_clip={self.grad_clip}, micro_batch={self.micro_batch}, "
                f"max_tokens_per_micro_batch={self.max_tokens_per_micro_batch}"
            )
        if self.micro_batch and self.max_tokens_per_micro_batch:
            raise ValueError(
                "HFTrainConfig: set micro_batch (fixed rows per micro-batch) or max_tokens_per_micro_batch "
                f"(length-grouped), not both; got {self.micro_batch} and {self.max_tokens_per_micro_batch}"
            )
