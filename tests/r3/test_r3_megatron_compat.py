"""megatron-core without Transformer Engine on a CUDA machine: the router's GEMM (megatron's
RouterGatingLinearFunction tests a name bound only when TE imports) runs megatron's torch fallback.
Run in a fresh interpreter that believes CUDA is present (torch.cuda.is_available patched to True, the
CUDA calls of init_parallel stubbed), so no shim of an earlier test in this process is inherited."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.megatron

CHILD = """
import torch
torch.cuda.is_available = lambda: True  # a GPU machine ...
torch.cuda.device_count = lambda: 1
torch.cuda.set_device = lambda index: None
torch.cuda.current_device = lambda: 0
from megatron.core.tensor_parallel import random as mg_random
mg_random.model_parallel_cuda_manual_seed = lambda seed, **kw: None  # (its CUDA RNG setup)
from megatron.core.transformer.moe import moe_utils
assert not moe_utils.HAVE_TE, "this test needs megatron-core without Transformer Engine"  # ... without TE
from r3.engines.megatron.parallel import init_parallel
init_parallel()
torch.manual_seed(0)
x = torch.randn(2, 3, 8, requires_grad=True)
w = torch.randn(4, 8, requires_grad=True)
logits = moe_utils.router_gating_linear(x, w, None, torch.float32)  # what Router.gating calls
logits.square().sum().backward()
ref_x, ref_w = x.detach().requires_grad_(), w.detach().requires_grad_()
(ref_x @ ref_w.t()).square().sum().backward()
assert torch.allclose(logits, ref_x @ ref_w.t())
assert torch.allclose(x.grad, ref_x.grad) and torch.allclose(w.grad, ref_w.grad)
print("router gemm ok")
"""


def test_router_gemm_runs_without_transformer_engine_when_cuda_is_present():
    pytest.importorskip("megatron.core")
    p = subprocess.run(
        [sys.executable, "-c", CHILD], cwd=REPO, capture_output=True, text=True, timeout=180,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert p.returncode == 0 and "router gemm ok" in p.stdout, p.stderr[-3000:]
