"""Routing capture's overhead on generation, paired and interleaved: with capture / without, per engine.

    python -m benchmarks.bench_capture [--pairs 24] [--engines hf vllm] [--precision bf16]
                                       [--max-new-tokens 48] [--prompts 16 --group-size 8] [--threads 1]

On the shipped tiny zoo's SFT model and the task's training prompts (16 x 8 = 128 samples,
temperature 1). Each pair generates the same prompts with the same seed twice, once with routing
capture and once without, in alternating order (on first in even pairs); the pair's ratio is
seconds per generated token, on / off. transformers: one engine, `capture_routing` on / off (its
recording hooks stay attached either way; off skips the recording and the trace assembly). vLLM:
an engine started with routed-experts capture and a twin started without it (capture is an engine
start-up option there), both given the same weights. One warm-up pair per engine is not counted.
Printed: median ratio, interquartile range and range over the pairs (the issue's target: <= 1.03).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch

SHIPPED_TINY = Path(__file__).resolve().parents[1] / "experiments" / "shipped_zoo" / "tiny"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--zoo-dir", type=Path, default=SHIPPED_TINY)
    ap.add_argument("--pairs", type=int, default=24)
    ap.add_argument("--engines", nargs="+", default=["hf", "vllm"], choices=["hf", "vllm"])
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)  # before vLLM replaces torch.set_num_threads in-process
    import transformers

    transformers.utils.logging.disable_progress_bar()
    from transformers import AutoTokenizer

    from experiments import task, zoo
    from r3.engines.base import SamplingParams
    from r3.engines.registry import build_rollout_engine, rollout_config

    model_dir = zoo.model_dir("sft", args.zoo_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    probs = task.TrainStream(seed=0, difficulty=2).take(args.prompts)
    prompts = [tok(task.format_prompt(p.problem))["input_ids"] for p in probs for _ in range(args.group_size)]
    twins = {}
    for name in args.engines:
        cfg = rollout_config(name, model_path=str(model_dir), precision=args.precision)
        on = build_rollout_engine(cfg)
        off = on if name == "hf" else build_rollout_engine(dataclasses.replace(cfg, capture_routing=False))
        twins[name] = (on, off)
    ratios: dict[str, list[float]] = {n: [] for n in twins}
    for pair in range(-1, args.pairs):  # -1: warm-up
        for name, (on, off) in twins.items():
            params = SamplingParams(max_new_tokens=args.max_new_tokens, seed=pair + 1)
            per_token = {}
            for capture in (True, False) if pair % 2 == 0 else (False, True):
                t0 = time.perf_counter()
                out = (on if capture else off).generate(prompts, params, capture_routing=capture)
                per_token[capture] = (time.perf_counter() - t0) / sum(len(s.response_ids) for s in out)
            if pair >= 0:
                ratios[name].append(per_token[True] / per_token[False])
    print(
        f"bench_capture: {args.pairs} pairs per engine, interleaved, alternating order; {len(prompts)} samples, "
        f"<= {args.max_new_tokens} new tokens, {args.precision}, {args.threads} torch thread(s)"
    )
    print("capture overhead, s per generated token with / without (target <= 1.03):")
    for name, r in ratios.items():
        q = statistics.quantiles(r, n=4)
        print(
            f"  {name:<5} median {statistics.median(r):.3f}  IQR {q[0]:.3f}-{q[2]:.3f}  range {min(r):.3f}-{max(r):.3f}"
        )
    for on, off in twins.values():
        for e in {id(on): on, id(off): off}.values():
            if callable(close := getattr(e, "close", None)):
                close()


if __name__ == "__main__":
    main()
