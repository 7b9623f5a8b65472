"""The embedded loop's batch shapes, side by side: what each batching lever saves.

    python -m benchmarks.bench_batching [--zoo-dir runs/zoo] [--repeats 5] [--precision fp8] [--threads 1]

On the zoo's SFT model with the transformers engines (one torch thread), each repeat times, in turn:
  decode     one generate of 16 prompts x 8 samples (48 new tokens at most), finished rows kept in
             the batch (`_COMPACT_BELOW` = 0: no compaction) / dropped (the engine's default)
  rounds     the same 384 samples as three rounds of 16 prompts (dynamic sampling without oversampling)
             / one round of 48 prompts (the tiny preset's gen_prompts_per_round), compaction on
  eval       the 512 held-out prompts in batches of 64 (eval.run's default) / one batch of 512
             (the tiny preset's eval_batch_size)
  train      one train_step (R3 replay) on a 128-sample batch: whole batch padded to its longest /
             length-grouped micro-batches of <= 1024 padded tokens (train_max_tokens_per_micro_batch)
Printed: median seconds of each side and the ratio new / old (below 1: the lever saves time).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--zoo-dir", type=Path, default=None)
    ap.add_argument("--zoo-size", default="tiny", choices=["tiny", "micro"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--precision", default="fp8", choices=["fp8", "bf16", "fp32"])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from transformers import AutoTokenizer

    import r3.engines.hf.rollout as hf_rollout
    from benchmarks.bench_trl import _fixed_loss
    from experiments import rollout, task, zoo
    from r3.engines.base import SamplingParams
    from r3.engines.registry import build_rollout_engine, build_train_engine, rollout_config, train_config
    from r3.replay import ReplayMode

    zoo_dir = Path(args.zoo_dir or zoo.default_zoo_dir())
    zoo.build_zoo(zoo_dir, size=args.zoo_size)
    model_dir = str(zoo.model_dir("sft", zoo_dir))
    tok = AutoTokenizer.from_pretrained(model_dir)
    ro = build_rollout_engine(rollout_config("hf", model_path=model_dir, precision=args.precision))
    trainers = {
        m: build_train_engine(train_config("hf", model_path=model_dir, lr=1e-6, max_tokens_per_micro_batch=m))
        for m in (0, 1024)
    }

    def encode(problems, group=8):
        return [tok(task.format_prompt(p.problem))["input_ids"] for p in problems for _ in range(group)]

    train_probs = task.TrainStream(seed=0, difficulty=2).take(48)
    heldout = encode(task.heldout_problems(), group=1)

    def generate(prompts, seed, compact=True, chunk=None):
        old = hf_rollout._COMPACT_BELOW
        hf_rollout._COMPACT_BELOW = old if compact else 0.0
        try:
            chunk = chunk or len(prompts)
            for i in range(0, len(prompts), chunk):
                ro.generate(prompts[i : i + chunk], SamplingParams(max_new_tokens=48, seed=seed), capture_routing=True)
        finally:
            hf_rollout._COMPACT_BELOW = old

    samples = ro.generate(encode(train_probs[:16]), SamplingParams(max_new_tokens=48, seed=0), capture_routing=True)
    groups = [
        rollout.Group(problem=p, samples=samples[i * 8 : (i + 1) * 8], rewards=[float(j % 2) for j in range(8)])
        for i, p in enumerate(train_probs[:16])
    ]
    batch = rollout.build_batch(groups, pad_id=tok.pad_token_id, with_routing=True).train

    def train(max_tokens):
        trainers[max_tokens].train_step(batch, _fixed_loss(batch), routing=ReplayMode.REPLAY)

    cases = {
        "decode": (lambda s: generate(encode(train_probs[:16]), s, compact=False),
                   lambda s: generate(encode(train_probs[:16]), s)),
        "rounds": (lambda s: generate(encode(train_probs), s, chunk=128), lambda s: generate(encode(train_probs), s)),
        "eval": (lambda s: generate(heldout, s, chunk=64), lambda s: generate(heldout, s, chunk=512)),
        "train": (lambda s: train(0), lambda s: train(1024)),
    }  # fmt: skip
    times = {k: ([], []) for k in cases}
    for rep in range(args.repeats + 1):  # repeat 0 warms up
        for name, (old_fn, new_fn) in cases.items():
            for side, fn in ((0, old_fn), (1, new_fn)) if rep % 2 else ((1, new_fn), (0, old_fn)):
                t0 = time.perf_counter()
                fn(rep)
                if rep:
                    times[name][side].append(time.perf_counter() - t0)
    print(
        f"bench_batching: {args.repeats} repeats, {args.precision} rollout, {args.threads} torch thread(s); "
        "median seconds"
    )
    print(f"{'lever':<8} {'before':>9} {'after':>9} {'after/before':>13}")
    for name, (a, b) in times.items():
        ma, mb = statistics.median(a), statistics.median(b)
        print(f"{name:<8} {ma:9.3f} {mb:9.3f} {mb / ma:13.3f}")


if __name__ == "__main__":
    main()
