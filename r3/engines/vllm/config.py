"""Frozen config of the vLLM rollout engine (light: importable without vllm)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

VLLMPrecision = Literal["fp32", "bf16"]

_DEFAULT_SYNC_ATOL = {"fp32": 1e-3, "bf16": 0.25}
"""Largest median |logprob difference| per probe token between the engine and an fp32 transformers
forward of the synced weights. Measured on the tiny zoo's SFT model (docs/vllm.md): a correct fp32
engine 1.9e-6, a correct bf16 engine 0.020 (mean 0.058: kernel-level differences and near-tie
routing flips give a heavy tail, hence the median); a reload that skipped the CPU MoE prepack 2.5-3.1
in both precisions. So each bound is >= 10x above correct engines and >= 10x below the bug."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class VLLMRolloutConfig:
    """vLLM rollout: one in-process `vllm.LLM` (no urls) or a client of vLLM servers (urls)."""

    name: ClassVar[str] = "vllm"
    static_precisions: ClassVar[tuple[str, ...]] = ("bf16", "fp32")
    server_launcher: ClassVar[str] = "r3.engines.vllm.servers:specs"
    """On a cluster the job launches vLLM servers (in-process without urls, as in the embedded mode)."""
    capture_hint: ClassVar[str] = (
        "serve an MoE model with routed-experts capture (capture_routing=True; servers: --enable-return-routed-experts)"
    )
    model_path: str
    """transformers checkpoint directory (config.json + safetensors); servers must serve this model."""
    precision: VLLMPrecision = "bf16"
    """Numerics of the inference engine (vLLM `dtype`); the trainer is fp32, so bf16 is a real
    kernel-level mismatch. fp8 is refused (see __post_init__)."""
    seed: int = 0
    """Base of the per-request sampling seeds when a call's SamplingParams.seed is None."""
    max_model_len: int | None = None
    """Longest prompt + response in tokens (vLLM `max_model_len`); None: the model's max_position_embeddings."""
    max_num_seqs: int = 256
    """Sequences decoded together (vLLM `max_num_seqs`)."""
    cpu_kvcache_space_gb: int = 1
    """CPU build: KV-cache size in GiB (env VLLM_CPU_KVCACHE_SPACE); 1 GiB holds about 2M tokens of the
    tiny zoo model."""
    gpu_memory_utilization: float = 0.5
    """GPU build only: fraction of GPU memory vLLM may take (the trainer shares the GPU in colocated runs)."""
    enforce_eager: bool = True
    """No torch.compile / CUDA graphs: start-up in seconds; on CPU the compiled path gains little for tiny models."""
    max_num_batched_tokens: int | None = None
    """Tokens scheduled per engine step (vLLM `max_num_batched_tokens`); a prompt longer than this is
    prefilled in chunks (vLLM's chunked prefill, on by default for this model class:
    vllm/engine/arg_utils.py `_set_default_chunked_prefill_and_prefix_caching_args`). None: vLLM's
    default. Must be >= max_num_seqs (vllm/config/scheduler.py). r3.conformance sets it small to check
    that chunked prefill keeps every prompt row."""
    enable_prefix_caching: bool = True
    """Reuse KV (and routing rows) of shared prompt prefixes; reset after every weight sync."""
    progress_min_prompts: int = 1024
    """A generate call with at least this many prompts shows vLLM's progress bar (requests done,
    ETA); smaller calls (RL steps, evaluations) stay quiet. 0: never."""
    capture_routing: bool = True
    """In-process engine: start vLLM with routed-experts capture (`enable_return_routed_experts`) for
    MoE models (a server captures per its own flag). False:
    an engine that cannot capture (benchmarks.bench_trl times capture's overhead against it; the
    RL loop refuses it for R3 runs through `capabilities.captures_routing`)."""
    urls: tuple[str, ...] = ()
    """Server mode: base URLs of `python -m vllm.entrypoints.openai.api_server ... --enable-return-routed-experts`
    servers (r3.engines.vllm.client). Empty: in-process engine."""
    weight_sync_dir: str | None = None
    """Where sync_weights writes each weight version (server mode: a directory the servers can read;
    in-process: None means a temporary directory removed when the engine is closed)."""
    verify_sync: bool = True
    """After every sync, check the engine (SyncCheckError when it fails): the weight version it reports,
    a readback of held weights (verify_readback), and its logprobs of a fixed probe sequence against a
    reference (in-process: an fp32 transformers forward of the new weights; server mode: the trainer's
    forward when `set_sync_reference` gave one, else no probe). Catches reloads that leave stale or
    mis-laid-out weights, e.g. the CPU MoE prepack bug or skipped experts."""
    verify_readback: bool = True
    """With verify_sync: read back sampled elements of every tensor kind (each MoE layer's experts,
    router, attention, embeddings, lm_head, norms) from the engine and require them equal to the
    trainer's synced values cast to the engine's dtype (r3.engines.weight_check). One rank per engine
    only (tensor parallel size 1): turn off for TP > 1 servers, which the readback refuses."""
    readback_experts_per_layer: int = 4
    """Experts per MoE layer whose gate/up/down tensors are read back (the same ones every sync)."""
    readback_elements: int = 16
    """Elements read back per tensor (positions from a generator seeded by the tensor's name)."""
    sync_atol: float | None = None
    """Tolerance of that check (median |logprob difference| per probe token); None: 1e-3 for fp32, 0.25 for bf16."""
    request_timeout_s: float = 3600.0
    """Server mode: seconds before one HTTP request is abandoned."""

    def __post_init__(self) -> None:
        if self.precision == "fp8":
            raise ValueError(
                "VLLMRolloutConfig.precision='fp8' is not supported: vLLM's CPU build has no FP8 path for "
                "unquantized Qwen3-MoE checkpoints that this harness tests, and an untested GPU-only setting "
                "would be a silent difference; use precision='bf16' (the paper's setting) or the hf engine's "
                "fp8 (rollout_engine='hf', rollout_precision='fp8')"
            )
        if self.precision not in _DEFAULT_SYNC_ATOL:
            raise ValueError(f"VLLMRolloutConfig.precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if (
            (self.max_model_len is not None and self.max_model_len < 2)
            or self.max_num_seqs < 1
            or self.cpu_kvcache_space_gb < 1
            or (self.max_num_batched_tokens is not None and self.max_num_batched_tokens < self.max_num_seqs)
        ):
            raise ValueError(
                f"VLLMRolloutConfig needs max_model_len >= 2, max_num_seqs >= 1, cpu_kvcache_space_gb "
                f">= 1, max_num_batched_tokens >= max_num_seqs (vLLM refuses less); got {self.max_model_len}, "
                f"{self.max_num_seqs}, {self.cpu_kvcache_space_gb}, {self.max_num_batched_tokens}"
            )
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        bad = [u for u in self.urls if not u.startswith(("http://", "https://"))]
        if bad:
            raise ValueError(f"VLLMRolloutConfig.urls must start with http:// or https://, got {bad}")
        if self.readback_experts_per_layer < 1 or self.readback_elements < 1:
            raise ValueError(
                f"readback_experts_per_layer and readback_elements must be >= 1, got "
                f"{self.readback_experts_per_layer}, {self.readback_elements} (verify_readback=False turns it off)"
            )
        if self.sync_atol is not None and self.sync_atol <= 0:
            raise ValueError(f"sync_atol must be > 0 (or None for the precision's default), got {self.sync_atol}")

    @property
    def sync_tolerance(self) -> float:
        return self.sync_atol if self.sync_atol is not None else _DEFAULT_SYNC_ATOL[self.precision]
