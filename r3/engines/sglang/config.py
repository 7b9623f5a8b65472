"""Frozen config of the SGLang rollout engine (light: no sglang import; the engine is
r3.engines.sglang.engine)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

_DEFAULT_SYNC_ATOL = {"bf16": 0.25, "fp8": 0.5}
"""Largest median |logprob difference| per probe token between a server and the reference. bf16: the
bound measured for vLLM (r3.engines.vllm.config._DEFAULT_SYNC_ATOL: a correct bf16 engine is 0.016-0.020
from an fp32 forward, stale/mis-laid-out weights 2.5-3.1); SGLang's bf16 kernels are not measured here
(no GPU). Against a bf16 megatron reference both sides carry bf16 error, so expect up to about twice
that: 0.25 is still >= 6x above it. fp8 (`--quantization fp8`, all linear weights in e4m3): NOT
measured; 0.5 is a guess at 2x the bf16 bound (set sync_atol after measuring a correct server).
Sensitivity: a server that skips the expert tensors on load (keeps its old experts) is off by a
median 0.68 nats per token when the tiny zoo's Base is served and its SFT weights synced, 0.023 in
the micro zoo, 0.004 between two random-init tiny models (measured with the test double of
tests/r3/test_r3_sglang_sync_check.py): stale experts are seen once they differ from the synced
ones by more than the tolerance, not after one small RL step (docs/cluster.md)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SGLangRolloutConfig:
    """Client of SGLang servers (cluster mode)."""

    name: ClassVar[str] = "sglang"
    static_precisions: ClassVar[tuple[str, ...]] = ("bf16", "fp8")
    servers_only: ClassVar[bool] = True
    server_launcher: ClassVar[str] = "r3.engines.sglang.servers:specs"
    capture_hint: ClassVar[str] = "start the SGLang servers with --enable-return-routed-experts and serve an MoE model"
    urls: tuple[str, ...]
    """Server base URLs (http://host:port)."""
    model_path: str
    """The served checkpoint (transformers format): the routing spec (L, K, E) is read from its
    config.json, and its config/tokenizer files are copied beside every synced weight version."""
    weight_sync_dir: str | None = None
    """Directory on a file system the servers can read, where sync_weights writes each version
    (None: the engine serves fixed weights and sync_weights refuses)."""
    batch_size: int = 64
    """Prompts per /generate request."""
    in_flight_per_server: int = 2
    """Concurrent requests per server."""
    request_timeout_s: float = 3600.0
    """Seconds before one request is abandoned."""
    retries: int = 5
    """Retries on connection errors and 502/503/504."""
    send_seeds: bool = True
    """Pass SamplingParams.seed as per-prompt `sampling_seed`."""
    max_response_mb: float = 256.0
    """Upper bound on one /generate response's estimated JSON size; larger batches are split."""
    check_server_flags: bool = True
    """Before the first /generate, refuse servers without --enable-return-routed-experts when
    routing is captured, and warn when seeds are sent to servers without deterministic inference."""
    precision: Literal["bf16", "fp8"] = "bf16"
    """The servers' numerics (slurm.servers: `--dtype bfloat16`, plus `--quantization fp8` for fp8);
    chooses the default tolerance of the sync check."""
    verify_sync: bool = True
    """After every sync, score a fixed probe sequence on every server (teacher-forced logprobs) and
    compare with a reference of the synced weights; raise SyncCheckError when they disagree."""
    sync_atol: float | None = None
    """Tolerance of that check (median |logprob difference| per probe token); None: 0.25 for bf16,
    0.5 for fp8 (_DEFAULT_SYNC_ATOL)."""
    verify_readback: bool = True
    """After every sync, read back the first `readback_rows` rows of a sample of tensors (every MoE
    layer's experts, router, attention, embeddings, lm_head, norms) through /get_weights_by_name and
    require them equal to the trainer's values in the served dtype (r3.engines.weight_check). bf16 only:
    off for fp8 (quantised weights need their scales; a warning says so)."""
    readback_rows: int = 1
    """Rows per tensor returned by /get_weights_by_name (its `truncate_size`)."""
    readback_experts_per_layer: int = 4
    """Experts per MoE layer whose gate/up/down tensors are read back (the same ones every sync)."""
    reference_max_params: int = 2_000_000_000
    """Without a reference set by the caller (`set_sync_reference`), the engine computes one with an
    fp32 transformers forward of the synced state dict in this process when it has at most this
    many parameters (8 GB of fp32); above it the sync is not verified (a warning says so)."""

    def __post_init__(self) -> None:
        if self.precision not in _DEFAULT_SYNC_ATOL:
            raise ValueError(f"SGLangRolloutConfig.precision must be 'bf16' or 'fp8', got {self.precision!r}")
        if self.sync_atol is not None and self.sync_atol <= 0:
            raise ValueError(f"sync_atol must be > 0 (or None for the precision's default), got {self.sync_atol}")
        if self.readback_rows < 1 or self.readback_experts_per_layer < 1:
            raise ValueError(
                f"readback_rows and readback_experts_per_layer must be >= 1, got {self.readback_rows}, "
                f"{self.readback_experts_per_layer} (verify_readback=False turns the readback off)"
            )
        if self.precision == "fp8" and self.verify_readback:
            import warnings

            warnings.warn(
                "SGLang fp8 servers hold e4m3 weights with block scales: the exact readback of the synced weights "
                "does not apply and is off; syncs are checked by weight version and the probe only",
                stacklevel=3,
            )

    @property
    def sync_tolerance(self) -> float:
        return self.sync_atol if self.sync_atol is not None else _DEFAULT_SYNC_ATOL[self.precision]
