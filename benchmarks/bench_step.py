"""Time per global step of the RL loop, split by phase, without and with R3, side by side.

    python -m benchmarks.bench_step [--zoo-dir runs/zoo] [--steps 8] [--precision fp8] [--train-engine hf|megatron]
                                    [--max-tokens-per-micro-batch 1024] [--zoo-size study --max-new-tokens 256]

Two loops (R3 off / on) with identical settings run interleaved step by step in one process
(so machine load affects both alike) on the zoo's SFT model: prompts_per_step x group_size
samples, no dynamic sampling (equal work per step), the zoo's task level, at most --max-new-tokens
new tokens. Printed per phase: median seconds of
  rollout       generation with routing capture + grading (experiments.rollout.collect)
  old_logprob   the train engine's no-grad pi_old forward; 0 with R3, where the single mini-step
                takes pi_old from its own forward (r3.algorithm.policy_update); without R3 this
                forward also records the engine's native routing (the disagreement metric)
  routing_probe with R3 only: a no-grad native-routing forward for the disagreement metric
                (RunConfig.routing_probe; on here, as in the RL loop by default)
  train         forward + backward + optimizer step (replaying when R3 is on)
  sync          weight sync train -> rollout engine
  total         the sum
and the ratio R3 / no-R3. The replay cost itself is the train row (same forward and backward,
replaying or not); the totals also differ by which metric forward each loop runs.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

PHASES = ("rollout", "old_logprob", "routing_probe", "train", "sync")


def timed_step(loop, step: int) -> tuple[dict[str, float], object]:
    """One global step of the RL loop itself (experiments.step.global_step: rollout with capture +
    grading, the algorithm step, weight sync). Returns (seconds per phase, the step's training
    batch). Phases the config skips are 0: old_logprob when pi_old comes from the update's own
    forward (single mini-step with R3), routing_probe without R3 or with cfg.routing_probe off."""
    from experiments.step import global_step

    rec = global_step(loop, step)
    row = {k: float(rec.get(f"time/{k}", 0.0)) for k in PHASES}
    return row, loop.last_batch


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--zoo-dir", type=Path, default=None)
    ap.add_argument("--zoo-size", default="tiny", choices=["tiny", "micro", "study"])
    ap.add_argument("--max-new-tokens", type=int, default=48, help="the study zoo's cells use 256")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--precision", default="fp8", choices=["bf16", "fp8"])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--max-tokens-per-micro-batch", type=int, default=1024, help="hf trainer length-grouped micro-batches (0: off)"
    )
    ap.add_argument(
        "--train-engine",
        default="hf",
        choices=["hf", "megatron", "both"],
        help="both: four interleaved loops, also printing megatron / transformers per phase",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers

    transformers.utils.logging.disable_progress_bar()

    from eval import grader
    from experiments import zoo
    from experiments.config import RunConfig
    from experiments.step import build_loop
    from r3.engines import registry

    zoo_dir = Path(args.zoo_dir or zoo.default_zoo_dir())
    zoo_cfg = zoo.build_zoo(zoo_dir, size=args.zoo_size)["config"]
    model_dir = zoo.model_dir("sft", zoo_dir)
    engines = ("hf", "megatron") if args.train_engine == "both" else (args.train_engine,)
    phases = (*PHASES, "total")
    with grader.make_pool(workers=2) as pool:

        def reward(texts, golds):
            return [float(c) for c in grader.grade_many(list(zip(texts, golds)), pool=pool)]

        loops = {}
        for engine in engines:
            for replay in (False, True):
                cfg = RunConfig(
                    name=f"bench-{engine}-r3={replay}",
                    replay=replay,
                    rollout_precision=args.precision,
                    lr=1e-5,
                    train_engine=engine,
                    prompts_per_step=args.prompts,
                    group_size=args.group_size,
                    task_difficulty=zoo_cfg["difficulty"],
                    max_new_tokens=args.max_new_tokens,
                    dynamic_sampling=False,  # equal work per step
                    max_sampling_rounds=1,
                    # the tiny preset's length-grouped micro-batches, where the trainer has that setting
                    train_max_tokens_per_micro_batch=args.max_tokens_per_micro_batch
                    if registry.train_config_has(engine, "max_tokens_per_micro_batch")
                    else 0,
                )
                loops[engine, replay] = build_loop(cfg, model_dir, Path(args.zoo_dir or "."), reward_fn=reward)
        times = {key: {k: [] for k in phases} for key in loops}
        for step in range(1, args.steps + 2):  # step 1 is a warm-up, not recorded
            for key, loop in loops.items():
                row, _ = timed_step(loop, step)
                if step == 1:
                    continue
                row["total"] = sum(row.values())
                for k, v in row.items():
                    times[key][k].append(v)
    med = {key: {k: statistics.median(v) for k, v in t.items()} for key, t in times.items()}
    print(
        f"bench_step: {args.steps} steps per loop, interleaved; {args.prompts} prompts x {args.group_size} "
        f"samples, {zoo_cfg['size']} zoo, {args.precision} rollout, {args.threads} torch thread(s); median seconds"
    )
    for engine in engines:
        print(f"[{engine} trainer]\n{'phase':<12} {'no R3':>9} {'R3':>9} {'R3/no-R3':>9}")
        for k in phases:
            a, b = med[engine, False][k], med[engine, True][k]
            print(f"{k:<12} {a:9.4f} {b:9.4f} {b / a if a > 0 else float('nan'):9.3f}")
    if len(engines) == 2:
        print(f"[megatron / transformers, no R3]\n{'phase':<12} {'hf':>9} {'megatron':>9} {'ratio':>9}")
        for k in ("old_logprob", "train", "total"):
            a, b = med["hf", False][k], med["megatron", False][k]
            print(f"{k:<12} {a:9.4f} {b:9.4f} {b / a if a > 0 else float('nan'):9.3f}")


if __name__ == "__main__":
    main()
