"""Launch specs of SGLang servers (SGLangRolloutConfig.server_launcher; run by slurm.servers).

Built against SGLang's documented server arguments (python/sglang/srt/server_args.py: `--model-path`,
`--tp-size`, `--base-gpu-id`, `--host`, `--port`, `--random-seed`, `--enable-return-routed-experts`,
`--quantization fp8`). It cannot run here (no GPU, no sglang): untested.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from r3.engines.base import Precision
from r3.engines.serving import launcher


def sglang_command(
    *,
    model_path: str,
    port: int,
    tp: int = 1,
    base_gpu_id: int = 0,
    host: str = "0.0.0.0",
    capture_routing: bool = True,
    precision: Precision = "bf16",
    seed: int = 0,
    python: str = sys.executable,
    extra: Sequence[str] = (),
) -> list[str]:
    """The `python -m sglang.launch_server` command line for one server (untested here)."""
    if precision == "fp32":
        raise ValueError("SGLang rollout precision must be bf16 or fp8, got fp32 (the fp32 side is the trainer)")
    cmd = [
        python, "-m", "sglang.launch_server",
        "--model-path", model_path,
        "--host", host, "--port", str(port),
        "--tp-size", str(tp), "--base-gpu-id", str(base_gpu_id),
        "--random-seed", str(seed),
        "--dtype", "bfloat16",
        # R3: record the top-k expert ids of every fed token (PAPER.md, "Engines' wire formats").
        *(["--enable-return-routed-experts"] if capture_routing else []),
        # FP8 rollout (an FP8 inference engine; not the paper's own setting): online weight quantisation.
        *(["--quantization", "fp8"] if precision == "fp8" else []),
        *extra,
    ]  # fmt: skip
    return cmd


specs = launcher(lambda i, port, *, tp, **kw: sglang_command(port=port, tp=tp, base_gpu_id=i * tp, **kw))
"""`servers` SGLang servers on this node: server i uses GPUs i*tp..i*tp+tp-1 (--base-gpu-id) and
port `port + i` (r3.engines.serving.launcher)."""
