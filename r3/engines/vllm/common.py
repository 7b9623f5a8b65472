"""What the in-process vLLM engine and the server client share (light: torch + transformers'
config only): the model's routing spec, the readback checker of a config, the prefix-cache reset check."""

from __future__ import annotations

from pathlib import Path

import torch

from r3.engines.sync_check import SyncCheckError
from r3.engines.vllm.config import VLLMRolloutConfig
from r3.engines.weight_check import ReadbackChecker
from r3.trace import RoutingSpec

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def model_routing(model_path: str | Path):
    """(transformers config, RoutingSpec or None for a model without routed experts, EOS ids)."""
    from transformers import AutoConfig

    hf_cfg = AutoConfig.from_pretrained(str(model_path))
    spec = RoutingSpec.from_hf_config(hf_cfg) if getattr(hf_cfg, "num_experts", None) else None
    eos = hf_cfg.eos_token_id
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
    return hf_cfg, spec, eos_ids


def readback_checker(cfg: VLLMRolloutConfig) -> ReadbackChecker | None:
    """The readback of held weights after each sync (None when verify_sync or verify_readback is off)."""
    if not (cfg.verify_sync and cfg.verify_readback):
        return None
    return ReadbackChecker(
        engine_dtype=TORCH_DTYPES[cfg.precision],
        experts_per_layer=cfg.readback_experts_per_layer,
        elements=cfg.readback_elements,
    )


def check_prefix_cache_reset(ok: object, *, version: int, where: str) -> None:
    """vLLM's reset_prefix_cache returns False when blocks are still held (vllm/v1/core/sched/scheduler.py:
    running requests or in-flight KV transfers); the cache then still serves KV (and routing rows)
    computed under the old weights."""
    if ok is not True:
        raise SyncCheckError(
            f"after weight sync v{version}: {where} reset_prefix_cache returned {ok!r}, expected True. Likely cause: "
            "requests were still running (or KV transfers in flight) during the sync, so vLLM kept prefix-cache "
            "blocks computed under the previous weights; later prompts sharing a prefix would reuse stale KV. "
            "Sync only between generate calls"
        )
