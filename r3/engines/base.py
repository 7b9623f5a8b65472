"""The engine Protocols: what the RL loop needs from a rollout engine and a train engine.

The loop "does not need to know how or where generation runs" (torchtitan rollout/types.py).
Engines are built by `r3.engines.registry` from frozen per-engine configs and describe what
they can do through `capabilities` (never probed by attribute). Implementations, one package
or module each: `hf` (transformers rollout and training), `megatron` (megatron-core training),
`sglang` (HTTP client of SGLang servers), `vllm` (vLLM in-process or over HTTP). Heavy imports
(transformers, megatron, vllm) happen inside those packages only.

Token/routing alignment (DESIGN.md invariant 1): a sequence of n tokens has n-1 routing
rows, one per *fed* token; the last token is never fed. Shapes use STYLE.md suffixes:
B batch, S sequence, T tokens, L MoE layers, K top-k, E experts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Literal, Protocol, runtime_checkable

import torch

from r3.replay import ReplayMode

Precision = Literal["fp32", "bf16", "fp8"]
"""Rollout numerics: fp32, bf16, or an FP8 inference engine (e4m3 weights). The trainer is fp32,
so bf16 and fp8 rollouts are a real training-inference mismatch (PAPER.md)."""
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp8")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RolloutCapabilities:
    """What a built rollout engine can do; the run loop checks these at start (DESIGN.md
    invariant 3), it never guesses from attributes."""

    captures_routing: bool
    """generate(..., capture_routing=True) returns every fed token's experts (an MoE model and an
    engine that exposes its routing)."""
    weight_sync: bool
    """sync_weights() loads new policy weights (False: the engine serves fixed weights)."""
    prefix_cache: bool = False
    """The engine reuses the KV (and routing rows) of a prompt prefix it computed before (vLLM's prefix
    caching, SGLang's radix cache): a repeated prompt must still get every prompt row (r3.conformance)."""
    sync_reference: bool = False
    """set_sync_reference(reference) takes a reference forward (r3.engines.sync_check.SyncReference: the
    trainer's) for the post-sync probe, instead of building the model in this process (server mode)."""
    prefix_cached_routing: bool = False
    """The engine can return routing from a given prompt position on, so the routing of a prefix
    the caller already holds (multi-turn, r3.prefix_cache) is neither recomputed nor transferred."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to sample one batch of responses."""

    max_new_tokens: int
    """Maximum response length in tokens."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    seed: int | None = None
    """Seed for this call's sampling; None draws from the engine's generator."""
    stop_token_ids: tuple[int, ...] = ()
    """Extra stop tokens besides the tokenizer's EOS."""


@dataclasses.dataclass(kw_only=True)
class RolloutSample:
    """One sampled response with everything the trainer needs from the inference engine."""

    prompt_ids: list[int]
    response_ids: list[int]
    logprobs_R: torch.Tensor
    """float32 [R]: the inference engine's log-probability of each response token (after
    temperature), R = len(response_ids)."""
    expert_ids_TLK: torch.Tensor | None = None
    """Routing trace, int [T, L, K] with T = len(prompt_ids) + len(response_ids) - 1, rows in
    token order, top-k in the engine's order (never sorted). None if not captured."""
    finish_reason: str = "length"
    """"stop" (EOS / stop token) or "length"."""


@runtime_checkable
class RolloutEngine(Protocol):
    """Generates responses and (optionally) records the routing of every fed token."""

    capabilities: RolloutCapabilities

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        *,
        capture_routing: bool = False,
    ) -> list[RolloutSample]:
        """One sample per prompt (repeat a prompt G times for a group)."""
        ...

    def sync_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load new policy weights (transformers Qwen3-MoE parameter names) from the trainer."""
        ...


@dataclasses.dataclass(kw_only=True)
class TrainBatch:
    """Full sequences (prompt + response), right-padded, for the training engine."""

    input_ids_BS: torch.Tensor
    """int64 [B, S]."""
    attention_mask_BS: torch.Tensor
    """int64/bool [B, S]: 1 on real tokens."""
    loss_mask_BT: torch.Tensor
    """float32 [B, T], T = S - 1: 1 where target token t+1 is a response token."""
    expert_ids_BTLK: torch.Tensor | None = None
    """Rollout routing to replay, int [B, T, L, K]; padding rows hold distinct dummy experts."""
    temperature: float = 1.0
    """The sampler's temperature: the trainer scores every token under softmax(logits / temperature),
    the distribution it was sampled from (DESIGN.md invariant 6; verl and TRL divide the training
    logits the same way), so pi_old, pi and pi_infer of the mismatch metrics and the importance
    ratio are one distribution."""

    def __post_init__(self) -> None:
        if not self.temperature > 0:  # also NaN
            raise ValueError(
                f"TrainBatch.temperature must be > 0 (the sampler's temperature), got {self.temperature}; "
                "a greedy (temperature 0) rollout has no distribution to score"
            )

    def rows(self, rows: Rows) -> TrainBatch:
        """Rows `rows` (a slice or an index tensor) of every [B, ...] tensor; same temperature."""
        ids = self.expert_ids_BTLK
        return dataclasses.replace(
            self,
            input_ids_BS=self.input_ids_BS[rows],
            attention_mask_BS=self.attention_mask_BS[rows],
            loss_mask_BT=self.loss_mask_BT[rows],
            expert_ids_BTLK=None if ids is None else ids[rows],
        )


@dataclasses.dataclass(kw_only=True)
class LogprobResult:
    logp_BT: torch.Tensor
    """float32 [B, T]: log p(input_ids[:, t+1] | input_ids[:, :t+1])."""
    entropy_BT: torch.Tensor | None = None
    """float32 [B, T]: entropy of the predictive distribution at t (when asked)."""
    expert_ids_BTLK: torch.Tensor | None = None
    """The training engine's own routing (when asked to record), int [B, T, L, K]."""


Rows = slice | torch.Tensor
"""The rows of a mini-batch that one micro-batch holds: a slice, or an int64 index tensor (an
engine that groups rows of similar length); either indexes [B, ...] tensors the same way."""


def config_kwargs(cfg, **changes) -> dict:
    """An engine config's fields as the keyword arguments of the engine's constructor (one name per
    setting from config to engine), without `model_path` (the constructor's first argument), with
    `changes` applied."""
    out = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "model_path"}
    return {**out, **changes}


def request_seed(base: int, i: int) -> int:
    """The sampling seed of request `i` of a call seeded `base`: the call's base scattered by a 64-bit
    mix (splitmix64's finaliser) into [0, 2^31), then + i. Requests of one call get consecutive,
    distinct seeds; two calls overlap only if their scattered bases fall within a call's size of each
    other (about n / 2^31 per pair), where `base + i` overlapped whenever two calls' bases were closer
    than their request counts (steps 101 apart by construction). Below 2^31: a value every engine's
    seed type takes (the previous scheme's seeds stayed small too)."""
    x = (int(base) * 0x9E3779B97F4A7C15 + 1) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return ((x ^ (x >> 31)) + int(i)) % 2**31


def row_count(rows: Rows) -> int:
    """Number of rows in `rows` (a slice with explicit start/stop, or an index tensor)."""
    return rows.stop - rows.start if isinstance(rows, slice) else int(rows.numel())


LossFn = Callable[[torch.Tensor, torch.Tensor | None, Rows], tuple[torch.Tensor, dict]]
"""loss_fn(logp_BT, entropy_BT, rows) -> (loss, metrics) for the micro-batch `rows` of the
mini-batch (`Rows`); logp_BT and entropy_BT are [len(rows), T] with the mini-batch's T, on the
engine's device. The engine backpropagates each micro-batch loss as returned and sums the
gradients, so loss_fn normalises by the whole mini-batch (then micro-batching does not change the
gradient). Metrics are normalised the same way: the engine SUMS each metric over micro-batches (and
data-parallel ranks), and the sum is the mini-batch's value (a token mean stays a token mean however
the rows are grouped). `rows` may be empty (a data-parallel rank left without rows runs padding):
loss_fn then returns a zero loss and zero metrics under its usual keys."""


@runtime_checkable
class TrainEngine(Protocol):
    """Computes log-probabilities (with or without routing replay) and takes optimizer steps.

    `routing` is the typed replay mode of the call: OFF routes natively, RECORD routes natively
    and returns the engine's own routing, REPLAY forces batch.expert_ids_BTLK in every MoE layer.
    """

    is_moe: bool
    """The model has routed experts (REPLAY / RECORD are refused otherwise)."""
    device: torch.device
    """Where the engine's tensors live: compute_logprobs returns its results there, loss_fn gets its
    logprobs there, and r3.algorithm.policy_update moves what the loss needs there once per step
    (DESIGN.md invariant 7)."""
    train_step_sees_whole_batch: bool
    """train_step calls loss_fn on every row of the batch in this process (False under data
    parallelism: each rank sees its rows). Lets a single-mini-step update take pi_old from its
    own forward (r3.algorithm.policy_update)."""

    def compute_logprobs(
        self, batch: TrainBatch, *, routing: ReplayMode = ReplayMode.OFF, with_entropy: bool = False
    ) -> LogprobResult:
        """No-grad forward under `routing`, scored at batch.temperature; results on `device`;
        expert_ids_BTLK of the result is set for RECORD."""
        ...

    def train_step(self, batch: TrainBatch, loss_fn: LossFn, *, routing: ReplayMode = ReplayMode.OFF) -> dict:
        """One optimizer step on this mini-batch: forward (OFF or REPLAY), loss_fn, backward,
        gradient clipping, step. Returns metrics (tensors or floats), at least `actor/grad_norm`."""
        ...

    def rollout_state_dict(self) -> dict[str, torch.Tensor]:
        """Current weights in transformers Qwen3-MoE naming, for weight sync."""
        ...

    def save(self, path: str) -> None: ...

    def load(self, path: str) -> None: ...
