"""Rollout throughput: the vLLM engine beside the transformers engine, bf16 and fp32, capture on/off.

    python -m benchmarks.bench_rollout [--zoo-dir runs/zoo] [--repeats 5] [--prompts 16 --group-size 8]
                                       [--max-new-tokens 48] [--precision bf16 fp32] [--threads 1]

Inputs: the zoo's SFT model (built when missing) and held-out prompts of the synthetic task. Every
(engine, precision) pair is built once in this process (start-up times are printed); then each
repeat times one `generate` of prompts x group_size samples (temperature 1, the repeat's seed) for
every (engine, precision, capture) combination in turn, so machine load affects them alike. One
warm-up call per combination is not timed. Printed: median generated tokens/s per combination, and
the ratios vLLM / transformers and capture on / off. Generated tokens are counted (prompt
tokens are processed but not counted). Output: stdout, and --json PATH for the raw numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--zoo-dir", type=Path, default=None)
    ap.add_argument("--zoo-size", default="tiny", choices=["tiny", "micro"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--precision", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    ap.add_argument("--engines", nargs="+", default=["hf", "vllm"], choices=["hf", "vllm"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)  # before vLLM replaces torch.set_num_threads in-process
    import transformers

    transformers.utils.logging.disable_progress_bar()
    from transformers import AutoTokenizer

    from experiments import task, zoo
    from r3.engines.base import SamplingParams
    from r3.engines.registry import build_rollout_engine, rollout_config

    zoo_dir = Path(args.zoo_dir or zoo.default_zoo_dir())
    manifest = zoo.build_zoo(zoo_dir, size=args.zoo_size)
    model_dir = zoo.model_dir("sft", zoo_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    probs = task.heldout_problems(args.prompts, difficulty=manifest["config"]["difficulty"])
    prompts = [tok(task.format_prompt(p.problem))["input_ids"] for p in probs for _ in range(args.group_size)]

    engines, startup = {}, {}
    for name in args.engines:
        for prec in args.precision:
            t0 = time.time()
            engines[name, prec] = build_rollout_engine(rollout_config(name, model_path=str(model_dir), precision=prec))
            startup[f"{name}/{prec}"] = round(time.time() - t0, 2)
    combos = [(n, p, c) for (n, p) in engines for c in (False, True)]
    tps: dict[tuple, list[float]] = {c: [] for c in combos}
    for r in range(-1, args.repeats):  # r = -1: warm-up
        for n, p, cap in combos:
            params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=1.0, seed=1000 + max(r, 0))
            t0 = time.perf_counter()
            out = engines[n, p].generate(prompts, params, capture_routing=cap)
            dt = time.perf_counter() - t0
            if r >= 0:
                tps[n, p, cap].append(sum(len(s.response_ids) for s in out) / dt)

    med = {c: statistics.median(v) for c, v in tps.items()}
    print(
        f"rollout: {len(prompts)} samples ({args.prompts} prompts x {args.group_size}), max {args.max_new_tokens} "
        f"new tokens, {args.threads} torch thread(s), median of {args.repeats}; start-up s: {startup}"
    )
    print(f"{'engine':<8}{'precision':<11}{'capture':<9}{'tokens/s':>10}")
    for (n, p, cap), v in med.items():
        print(f"{n:<8}{p:<11}{'on' if cap else 'off':<9}{v:>10.0f}")
    ratios = {}
    if {"hf", "vllm"} <= set(args.engines):
        for p in args.precision:
            for cap in (False, True):
                ratios[f"vllm/hf {p} capture {'on' if cap else 'off'}"] = med["vllm", p, cap] / med["hf", p, cap]
    for n, p in engines:
        ratios[f"{n} {p} capture on/off"] = med[n, p, True] / med[n, p, False]
    for k, v in ratios.items():
        print(f"{k:<34}{v:6.2f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                    "startup_s": startup,
                    "ratios": ratios,
                    "tokens_per_s": {f"{n}/{p}/capture={'on' if c else 'off'}": v for (n, p, c), v in tps.items()},
                },
                indent=1,
            )
            + "\n"
        )
    for e in engines.values():
        if callable(close := getattr(e, "close", None)):
            close()


if __name__ == "__main__":
    main()
