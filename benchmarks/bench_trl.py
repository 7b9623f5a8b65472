"""Our global step (routing capture + R3 on) against Hugging Face TRL's GRPOTrainer, side by side.

    python -m benchmarks.bench_trl [--zoo-dir runs/zoo] [--steps 6] [--rollout-engine vllm|hf]
                                   [--precision bf16] [--threads 1]

Both loops run in one process on the zoo's SFT model with the same settings: `--prompts` prompts x
`--group-size` samples per step (16 x 8 = 128 completions), at most `--max-new-tokens` (48) new
tokens, temperature 1, the same grader (eval.grader in worker processes) as the reward, one
optimizer step per generation batch, no dynamic sampling, the same number of torch threads.
They are interleaved step by step: a TrainerCallback runs one step of ours right after each TRL
step ends, so machine load hits both alike (these machines are shared). Printed: median seconds
per global step of each, the ratio TRL / ours (issue 12's target: >= 1.5), and for ours the
phases (rollout = generation + capture + grading, old_logprob, train, sync).

What differs, and why it is still the fair comparison for a user choosing a trainer: TRL
generates with the training model itself (fp32 here, `model.generate`), captures no routing and
replays nothing; ours generates with the rollout engine named (`vllm`: vLLM's CPU build; `hf`:
the transformers engine in bf16) and records routing for every token, and its trainer replays
that routing (R3). TRL is a benchmark-only dependency (`pip install trl`), never a runtime one.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--zoo-dir", type=Path, default=None)
    ap.add_argument("--zoo-size", default="tiny", choices=["tiny", "micro"])
    ap.add_argument("--steps", type=int, default=6, help="measured steps per trainer (after one warm-up)")
    ap.add_argument("--rollout-engine", default="vllm", help="our rollout engine (a registry name)")
    ap.add_argument("--precision", default="bf16", help="our rollout engine's numerics")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
        from trl import GRPOConfig, GRPOTrainer
    except ImportError as e:
        raise SystemExit(f"bench_trl needs TRL (a benchmark-only dependency): pip install trl ({e})") from None
    import transformers

    transformers.utils.logging.set_verbosity_error()
    from benchmarks.bench_step import timed_step
    from eval import grader
    from experiments import task, zoo
    from experiments.config import RunConfig
    from experiments.run import engine_configs
    from r3.engines.registry import build_rollout_engine, build_train_engine

    zoo_dir = Path(args.zoo_dir or zoo.default_zoo_dir())
    zoo.build_zoo(zoo_dir, size=args.zoo_size)
    model_dir = zoo.model_dir("sft", zoo_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    pool = grader.make_pool(workers=2)

    def reward(texts, golds):
        return [float(c) for c in grader.grade_many(list(zip(texts, golds)), pool=pool)]

    # --- ours: capture + R3, the loop's own pieces ---------------------------------------------------
    cfg = RunConfig(
        name="bench-ours",
        replay=True,
        rollout_engine=args.rollout_engine,
        rollout_precision=args.precision,
        lr=1e-5,
        prompts_per_step=args.prompts,
        group_size=args.group_size,
        max_new_tokens=args.max_new_tokens,
        dynamic_sampling=False,
    )
    scratch = Path(tempfile.mkdtemp(prefix="bench_trl_"))
    ro_cfg, tr_cfg = engine_configs(cfg, model_dir, scratch)
    ro_eng, tr_eng = build_rollout_engine(ro_cfg), build_train_engine(tr_cfg)
    stream = task.TrainStream(seed=0, difficulty=2)
    ours: list[dict[str, float]] = []

    def our_step(step: int) -> None:
        row = timed_step(cfg, ro_eng, tr_eng, stream, tok, reward, step)
        row["total"] = sum(row.values())  # the R3 disagreement probe (a metric) is excluded
        ours.append(row)

    # --- TRL's GRPOTrainer on the same model and batch ----------------------------------------------
    problems = task.TrainStream(seed=1, difficulty=2).take(args.prompts * (args.steps + 2))
    data = Dataset.from_list([{"prompt": task.format_prompt(p.problem), "answer": p.answer} for p in problems])

    def trl_reward(prompts, completions, answer, **kw):
        return reward(completions, answer)

    n = args.prompts * args.group_size
    trl_cfg = GRPOConfig(
        output_dir=str(scratch / "trl"),
        per_device_train_batch_size=n,
        num_generations=args.group_size,
        steps_per_generation=1,
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        learning_rate=1e-5,
        beta=0.0,
        num_iterations=1,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1000,
        max_steps=args.steps + 1,
        disable_tqdm=True,
        shuffle_dataset=False,
        seed=0,
    )
    trl_times: list[float] = []

    class Interleave(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            trl_times.append(time.perf_counter() - self.t0)
            our_step(state.global_step)  # ours right after, outside TRL's timing

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=trl_reward,
        args=trl_cfg,
        train_dataset=data,
        processing_class=tok,
        callbacks=[Interleave()],
    )
    try:
        trainer.train()
    finally:
        pool.close()
    trl_med = statistics.median(trl_times[1:])  # step 1 is a warm-up in both
    our_med = {k: statistics.median(r[k] for r in ours[1:]) for k in ours[0]}
    print(
        f"bench_trl: {len(trl_times) - 1} measured steps each, interleaved; {args.prompts} prompts x "
        f"{args.group_size} samples, <= {args.max_new_tokens} new tokens, {args.threads} torch thread(s)"
    )
    print(
        f"ours: rollout {args.rollout_engine}/{args.precision} with routing capture, trainer "
        f"{cfg.train_engine} fp32 with R3 replay; median seconds per global step"
    )
    for k, v in our_med.items():
        print(f"  {k:<12} {v:8.3f}")
    print(f"TRL GRPOTrainer {__import__('trl').__version__} (generation + training): {trl_med:8.3f}")
    print(f"speed-up, TRL / ours: {trl_med / our_med['total']:.2f}x (target >= 1.5)")


if __name__ == "__main__":
    main()
