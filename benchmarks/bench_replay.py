"""Benchmark: routing-replay overhead and routing-trace storage, measured side by side in one run.

Run:  python -m benchmarks.bench_replay [--repeats 21] [--threads 1]

Inputs: none (a tiny Qwen3-MoE built from config with a fixed seed; random traces).
Outputs (stdout):
  1. training forward+backward time of the transformers engine with replay over without
     (median and min of interleaved repeats; target ratio <= 1.05);
  2. bytes per token of each storage encoding against the floor L*K*ceil(log2 E)/8
     (target: bit-packed within 1.05x), for the tiny model and for Qwen3-30B-A3B's geometry;
  3. rollout generation time of HFRolloutEngine (128 sequences x 48 new tokens, bf16, routing
     captured) on the same tiny model;
  4. `bench_megatron()`: the megatron-core side (filled by the megatron helper; skipped with a
     message when r3.engines.megatron.train does not import).
Departures from the paper: the paper reports rollout latency overhead (< 3 %) on GPUs with
SGLang; here the measured cost is the training-side replay on CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from tqdm import tqdm
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from r3.engines.base import SamplingParams
from r3.engines.hf.replay import RoutingReplay
from r3.trace import RoutingSpec, RoutingTrace, encode


def tiny_moe(seed: int, experts_implementation: str = "eager") -> Qwen3MoeForCausalLM:
    """About 1.8M parameters: 4 layers, hidden 128, 8 experts, top-2."""
    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(
        vocab_size=128,
        hidden_size=128,
        intermediate_size=256,
        moe_intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
    )
    model = Qwen3MoeForCausalLM(cfg)
    model.set_experts_implementation(experts_implementation)
    return model.train()


def bench_train_replay(repeats: int, seed: int, impl: str) -> tuple[list[float], list[float]]:
    """Seconds of each fp32 forward+backward on [16, 128] tokens, without / with replay."""
    model = tiny_moe(seed, impl)
    rr = RoutingReplay(model)
    ids = torch.randint(2, 128, (16, 129), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad(), rr.recording():
        model(ids[:, :-1], use_cache=False)
    trace = rr.recorded_expert_ids()

    def step(replay: bool) -> float:
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        if replay:
            with rr.replaying(trace):
                model(ids[:, :-1], use_cache=False).logits.float().logsumexp(-1).mean().backward()
        else:
            model(ids[:, :-1], use_cache=False).logits.float().logsumexp(-1).mean().backward()
        return time.perf_counter() - t0

    step(False), step(True)  # warm-up
    off, on = [], []
    for i in tqdm(range(repeats), desc=f"train fwd+bwd ({impl})", leave=False):
        order = (False, True) if i % 2 == 0 else (True, False)  # interleave so drift hits both
        for replay in order:
            (on if replay else off).append(step(replay))
    return off, on


def bench_storage() -> list[tuple[str, str, float, float]]:
    """(geometry, encoding, bytes/token, ratio to the floor)."""
    rows = []
    for name, spec in [
        ("tiny L4 K2 E8", RoutingSpec(num_layers=4, top_k=2, num_experts=8)),
        ("Qwen3-30B-A3B L48 K8 E128", RoutingSpec(num_layers=48, top_k=8, num_experts=128)),
        ("E=300 L8 K4", RoutingSpec(num_layers=8, top_k=4, num_experts=300)),
    ]:
        T = 1000
        g = torch.Generator().manual_seed(0)
        ids = torch.rand(T * spec.num_layers, spec.num_experts, generator=g).argsort(-1)[:, : spec.top_k]
        trace = RoutingTrace(ids.view(T, spec.num_layers, spec.top_k), spec)
        floor = spec.num_layers * spec.top_k * spec.bits_per_id / 8
        for enc in ("uint8" if spec.num_experts <= 256 else "uint16", "bitpack"):
            per_tok = len(encode(trace, enc)) / T
            rows.append((name, enc, per_tok, per_tok / floor))
    return rows


def bench_rollout(seed: int) -> float:
    import tempfile

    from r3.engines import registry

    with tempfile.TemporaryDirectory() as d:  # engines are built from checkpoints, through the registry
        tiny_moe(seed).save_pretrained(d)
        eng = registry.build_rollout_engine(registry.rollout_config("hf", model_path=d, precision="bf16", seed=seed))
    g = torch.Generator().manual_seed(seed)
    prompts = [
        torch.randint(2, 128, (int(torch.randint(8, 24, (1,), generator=g)),), generator=g).tolist() for _ in range(128)
    ]
    params = SamplingParams(max_new_tokens=48, stop_token_ids=())
    eng.generate(prompts[:8], SamplingParams(max_new_tokens=4))
    t0 = time.perf_counter()
    eng.generate(prompts, params, capture_routing=True)
    return time.perf_counter() - t0


def bench_megatron(repeats: int, seed: int) -> None:
    """megatron-core GPTModel vs transformers Qwen3MoeForCausalLM, forward+backward, fp32 CPU:
    same weights (converted), same batch (B=32, S=80), interleaved repeats; megatron with native
    routing and with its own recorded routing replayed. Shapes: the brief's tiny model and the
    embedded zoo's `tiny` geometry. Prints min (least disturbed by other processes) and median."""
    try:
        import megatron.core  # noqa: F401  (lazy: megatron is optional)

        from r3.engines.megatron.compat import cpu_device_scope
        from r3.engines.megatron.model import build_gpt_model, gpt_logits, load_hf_weights
        from r3.engines.megatron.replay import MegatronRouterReplay
        from r3.replay import ReplayMode
    except Exception as exc:  # any import failure means: not available here
        print(
            f"[megatron] skipped: megatron-core / r3.engines.megatron.model do not import ({type(exc).__name__}: {exc})"
        )
        return
    shapes = {  # hidden, layers, heads, kv heads, head_dim, experts, top-k, expert width, vocab
        "brief-tiny": (32, 2, 4, 2, 8, 8, 2, 16, 64),
        "zoo-tiny": (128, 4, 4, 2, 32, 16, 4, 64, 128),
    }
    B, S = 32, 80
    for name, (h, nl, nh, nkv, hd, ne, k, fi, v) in shapes.items():
        torch.manual_seed(seed)
        cfg = Qwen3MoeConfig(
            vocab_size=v,
            hidden_size=h,
            num_hidden_layers=nl,
            num_attention_heads=nh,
            num_key_value_heads=nkv,
            head_dim=hd,
            num_experts=ne,
            num_experts_per_tok=k,
            moe_intermediate_size=fi,
            intermediate_size=k * fi,
            norm_topk_prob=True,
            max_position_embeddings=256,
        )
        hf = Qwen3MoeForCausalLM(cfg).train()
        mg = build_gpt_model(cfg)
        load_hf_weights(mg, hf.state_dict(), cfg)
        mg.train()
        replay = MegatronRouterReplay(mg, RoutingSpec.from_hf_config(cfg))
        ids = torch.randint(0, v, (B, S), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad(), replay.session(ReplayMode.RECORD, batch_size=B, seq_len=S) as sess:
            gpt_logits(mg, ids)
            sess.end_forward()
            trace_BTLK = sess.recorded_BTLK()

        def run_hf(impl):
            hf.set_experts_implementation(impl)
            hf.zero_grad(set_to_none=True)
            hf(ids).logits.float().logsumexp(-1).mean().backward()

        def run_mg(mode):
            mg.zero_grad(set_to_none=True)
            trace = trace_BTLK if mode is ReplayMode.REPLAY else None
            with cpu_device_scope(), replay.session(mode, batch_size=B, seq_len=S, expert_ids_BTLK=trace) as s:
                logits = gpt_logits(mg, ids)
                s.end_forward()
                logits.logsumexp(-1).mean().backward()

        cases = {
            "hf_eager": lambda: run_hf("eager"),
            "hf_grouped_mm": lambda: run_hf("grouped_mm"),
            "megatron": lambda: run_mg(ReplayMode.OFF),
            "megatron_replay": lambda: run_mg(ReplayMode.REPLAY),
        }
        times = {c: [] for c in cases}
        for fn in cases.values():
            fn()  # warm-up
        for _ in tqdm(range(repeats), desc=f"megatron {name}", leave=False):
            for c, fn in cases.items():
                t0 = time.perf_counter()
                fn()
                times[c].append(time.perf_counter() - t0)
        best = {c: min(t) for c, t in times.items()}
        med = {c: statistics.median(t) for c, t in times.items()}
        print(f"[megatron] fwd+bwd {name} (B={B}, S={S}, fp32), {repeats} interleaved repeats:")
        for c in cases:
            print(
                f"  {c:16s} min {1e3 * best[c]:8.1f} ms (x{best[c] / best['hf_eager']:.2f} of hf_eager)   "
                f"median {1e3 * med[c]:8.1f} ms (x{med[c] / med['hf_eager']:.2f})"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: least sensitive to other processes; 0: torch's default)",
    )
    ap.add_argument("--impls", default="eager,grouped_mm", help="experts implementations to time")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    print(f"torch threads: {torch.get_num_threads()}, cpus: {os.cpu_count()}, load average (1 min): {load:.1f}")
    if load > (os.cpu_count() or 1):
        print("WARNING: the machine is busy; absolute times are inflated (ratios measured side by side still hold)")
    print("\n== 1. training forward+backward, replay vs native (interleaved repeats) ==")
    for impl in args.impls.split(","):
        off, on = bench_train_replay(args.repeats, args.seed, impl)
        for stat in (statistics.median, min):
            a, b = stat(off), stat(on)
            print(
                f"{impl:12s} {stat.__name__:6s} native {a * 1e3:8.1f} ms   replay {b * 1e3:8.1f} ms   "
                f"ratio {b / a:.3f}  (target <= 1.05)"
            )
    print("\n== 2. routing storage, bytes per token (floor = L*K*ceil(log2 E)/8) ==")
    for name, enc, per_tok, ratio in bench_storage():
        print(f"{name:28s} {enc:8s} {per_tok:9.2f} B/token   {ratio:.3f}x floor")
    print("\n== 3. rollout: 128 sequences x 48 new tokens, bf16, routing captured ==")
    print(f"HFRolloutEngine.generate: {bench_rollout(args.seed):.2f} s")
    print("\n== 4. megatron-core ==")
    bench_megatron(args.repeats, args.seed)


if __name__ == "__main__":
    main()
