"""Helpers of the multi-rank tests: launch a worker script under torch.distributed.run (gloo)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "r3"))  # r3_tiny_models


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, script: Path, *args: str, timeout: float = 240.0, env: dict | None = None) -> str:
    """Run `script` on `nproc` local gloo ranks; returns stdout+stderr, raises with its tail on failure."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(script), *args]
    full_env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                "OMP_NUM_THREADS": "1", **(env or {})}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(k, None) if k not in (env or {}) else None
    p = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    out = p.stdout + p.stderr
    if p.returncode:
        lines = [ln for ln in out.splitlines() if "Warning" not in ln and "warn(" not in ln]
        raise AssertionError(f"torchrun {nproc} x {script.name} {' '.join(args)} exited {p.returncode}:\n"
                             + "\n".join(lines[-60:]))
    return out


@pytest.fixture(scope="session")
def tiny_moe_dir(tmp_path_factory) -> Path:
    """A tiny Qwen3-MoE (hidden 32, 8 experts, top-2) of 3 layers whose middle layer is dense
    (`mlp_only_layers=[1]`: no router, no routing rows), saved in transformers format."""
    pytest.importorskip("megatron.core")
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, max_position_embeddings=256, decoder_sparse_step=1, mlp_only_layers=[1],
        tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    model = Qwen3MoeForCausalLM(config)
    with torch.no_grad():  # spread router logits so that top-2 choices are well separated
        for i in (0, 2):
            model.model.layers[i].mlp.gate.weight.normal_(0.0, 0.5)
    d = tmp_path_factory.mktemp("tiny_moe")
    model.save_pretrained(d)
    return d
