"""Our global step (routing capture + R3 on) against Hugging Face TRL's GRPOTrainer at equal work.

    python -m benchmarks.bench_trl [--steps 6] [--rollout-engines hf,vllm] [--max-new-tokens 48]
                                   [--fixed-length] [--trl-aux off,on] [--trl-gc off] [--trl-python PY]
                                   [--model runs/study/<cell>/checkpoints/step_50/train]
                                   [--trl-vllm block]
                                   [--zoo-dir experiments/shipped_zoo/tiny] [--precision bf16] [--threads 1]
                                   [--doses router-10x]
                                   [--max-tokens-per-micro-batch 1024]

Equal work, on the zoo's SFT model (default: the shipped tiny zoo): `--prompts` prompts x
`--group-size` samples per step (16 x 8 = 128 completions), the same prompts in the same order
(the task's training stream, seed 0), at most `--max-new-tokens` new tokens, temperature 1, the
same reward (the eval grader in 2 worker processes), one optimizer step per generation batch with
pi_old from that step's own forward (TRL: num_iterations=1; ours: R3's fused pi_old), no KL term,
no dynamic sampling, the same number of torch threads. Our side is the RL loop's own step
(experiments.step.global_step: rollout with routing capture + grading, the update replaying the
captured routing, the weight sync) with `routing_probe=False` (the native-routing forward that
only feeds the routing-disagreement metric; TRL has no such metric, bench_step prints its cost).

TRL runs in a child process (benchmarks/trl_worker.py), one per `--trl-aux` setting, so that its
environment is its own: `--trl-vllm block` (default) keeps vllm from being imported there (TRL
imports vllm whenever it is installed, and ours needs it installed for its vLLM engine); `--trl-python`
runs TRL on another interpreter, e.g. a clean venv with only torch + trl + math-verify. The MoE
load-balancing loss: `--trl-aux off` is equal work (router_aux_loss_coef=0.0; the paper and ours
train without it); `on` is what a TRL user gets by default (TRL takes the model config's
router_aux_loss_coef, 0.01 for the zoo, and asks the model for its router logits). `--trl-gc off`
(default) is equal work too: GRPOConfig turns gradient checkpointing on by default, recomputing every
activation in the backward; ours does not (RunConfig.train_recompute=False); `on` measures TRL's default.

Numerics: TRL generates and trains in fp32. Our trainer is fp32; our rollout runs at `--precision`,
bf16 by default (the demo's mismatch source; torch's bf16 CPU kernels are slower than fp32 ones at
these shapes, docs/embedded.md). `--doses` adds one loop per named dose of the zoo's calibrated ladder
(experiments.doses; e.g. router-10x: an fp32 transformers rollout with noise on its router logits),
which is the study's regime: the mismatch the study needs at fp32 speed.

Everything steps in turn, one optimizer step each (each TRL child, then each of our loops), so
machine load hits all alike (these machines are shared); the children wait while ours runs.
Seconds per step are wall time: ours from before its rollout to after its weight sync, TRL's from
the end of its previous step to the end of this one. Step 1 is a warm-up. `--fixed-length`: every
completion is exactly --max-new-tokens long, as the study's long responses will be (the model is
copied with no EOS in its config and 512 positions for ours; TRL gets min_new_tokens), so the work
per step does not depend on when the small model happens to stop.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.trl_worker import TRLChild
from experiments import doses

SHIPPED_TINY = Path(__file__).resolve().parents[1] / "experiments" / "shipped_zoo" / "tiny"


def checkpoint_with_tokenizer(checkpoint: Path, sft_dir: Path, out: Path) -> Path:
    """A copy of a training checkpoint's weights with the zoo's tokenizer files beside them (a run's
    checkpoints hold weights and config only), so both trainers load it as a model directory."""
    if not (checkpoint / "config.json").exists():
        raise SystemExit(f"--model {checkpoint}: expected a model directory with config.json, found none")
    shutil.copytree(checkpoint, out, ignore=shutil.ignore_patterns("train_state.pt"))
    for f in sft_dir.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, out / f.name)
    return out


def fixed_length_copy(model_dir: Path, out: Path, positions: int = 512) -> Path:
    """A copy of the model that never stops (no EOS in config.json or generation_config.json) and
    takes `positions` positions (the tiny zoo declares 256; its default RoPE works at any position)."""
    shutil.copytree(model_dir, out)
    for name in ("config.json", "generation_config.json"):
        path = out / name
        if path.exists():
            cfg = json.loads(path.read_text())
            cfg["eos_token_id"] = None
            if name == "config.json":
                cfg["max_position_embeddings"] = max(positions, int(cfg.get("max_position_embeddings", 0)))
            path.write_text(json.dumps(cfg, indent=2))
    return out


def our_rollouts(engines: list[str], precision: str, dose_names: list[str], zoo_size: str) -> dict[str, dict]:
    """Our loops, label -> their RunConfig rollout fields: one per engine at `precision`, then one per
    named dose of the zoo's calibrated ladder (experiments.doses), e.g. "hf, router-10x"."""
    ladder = doses.ladder(zoo_size)
    unknown = [d for d in dose_names if d not in ladder]
    if unknown:
        raise SystemExit(
            f"--doses {','.join(unknown)}: not in the {zoo_size} zoo's ladder; expected some of {sorted(ladder)}"
        )
    rollouts = {f"{e} rollout": {"rollout_engine": e, "rollout_precision": precision} for e in engines}
    rollouts |= {f"{ladder[d].engine}, {d}": ladder[d].run_fields() for d in dose_names}
    return rollouts


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--zoo-dir", type=Path, default=SHIPPED_TINY)
    ap.add_argument("--steps", type=int, default=6, help="measured steps per trainer (after one warm-up)")
    ap.add_argument("--rollout-engines", default="hf", help="our rollout engines, comma-separated (hf, vllm)")
    ap.add_argument("--precision", default="bf16", help="our rollout engines' numerics (--rollout-engines)")
    ap.add_argument(
        "--doses",
        default="",
        help="more loops of ours, one per dose of the zoo's ladder, comma-separated (e.g. router-10x: the study's "
        "regime, an fp32 rollout with router noise; `python -m experiments.study calibrate` lists them)",
    )
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--fixed-length", action="store_true", help="every completion exactly --max-new-tokens")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--max-tokens-per-micro-batch",
        type=int,
        default=1024,
        help="our trainer's length-grouped micro-batches (RunConfig.train_max_tokens_per_micro_batch; 0: off)",
    )
    ap.add_argument("--trl-aux", default="off,on", help="TRL MoE aux-loss settings, comma-separated (off, on)")
    ap.add_argument(
        "--trl-gc",
        default="off",
        choices=["off", "on"],
        help="TRL's gradient checkpointing: off (equal work, the default here) or on (GRPOConfig's own default)",
    )
    ap.add_argument(
        "--model",
        type=Path,
        default=None,
        help="weights to start from instead of the zoo's SFT model, e.g. a study cell's final checkpoint "
        "(runs/study/<cell>/checkpoints/step_50/train): the post-RL shape, every answer a worked chain",
    )
    ap.add_argument("--trl-python", default=sys.executable, help="interpreter for TRL (e.g. a clean venv's)")
    ap.add_argument("--trl-vllm", default="block", choices=["block", "import", "default"])
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from benchmarks.bench_step import timed_step
    from eval import grader
    from experiments import zoo
    from experiments.config import RunConfig
    from experiments.step import build_loop
    from r3.engines import registry
    from r3.engines.base import SamplingParams

    manifest = zoo.load_manifest(args.zoo_dir)
    named = [d for d in args.doses.split(",") if d]
    engines = [e for e in args.rollout_engines.split(",") if e]
    rollouts = our_rollouts(engines, args.precision, named, manifest["config"]["size"])
    scratch = Path(tempfile.mkdtemp(prefix="bench_trl_"))
    model_dir = zoo.model_dir("sft", args.zoo_dir)
    if args.model is not None:
        model_dir = checkpoint_with_tokenizer(args.model, model_dir, scratch / "model")
    if args.fixed_length:
        model_dir = fixed_length_copy(model_dir, scratch / "sft-no-eos")
    difficulty = manifest["config"]["difficulty"]  # the zoo's task level, both sides
    trl_opts = dict(
        difficulty=difficulty,
        gc=args.trl_gc,
        steps=args.steps,
        prompts=args.prompts,
        group_size=args.group_size,
        max_new_tokens=args.max_new_tokens,
        fixed_length=args.fixed_length,
        vllm=args.trl_vllm,
        threads=args.threads,
    )
    trls = {aux: TRLChild(args.trl_python, model_dir, aux=aux, **trl_opts) for aux in args.trl_aux.split(",") if aux}
    pool = grader.make_pool(workers=2)

    def reward(texts, golds):
        return [float(c) for c in grader.grade_many(list(zip(texts, golds)), pool=pool)]

    loops = {}
    for i, (label, fields) in enumerate(rollouts.items()):
        engine = fields["rollout_engine"]
        cfg = RunConfig(
            name=f"bench-ours-{i}",
            replay=True,
            **fields,
            lr=1e-5,
            prompts_per_step=args.prompts,
            group_size=args.group_size,
            max_new_tokens=args.max_new_tokens,
            task_difficulty=difficulty,
            dynamic_sampling=False,
            routing_probe=False,
            train_max_tokens_per_micro_batch=args.max_tokens_per_micro_batch,
            # the faster bf16 attention (HFRolloutConfig.fp32_attention), where the engine has that setting
            rollout_fp32_attention=registry.rollout_config_has(engine, "fp32_attention"),
        )
        loop = build_loop(cfg, model_dir, scratch / f"ours-{i}", reward_fn=reward, log=lambda *a, **k: None)
        if args.fixed_length:
            loop.params = SamplingParams(max_new_tokens=args.max_new_tokens)  # the copy has no EOS
        loops[label] = loop
    ours = {e: [] for e in loops}
    lens = {e: [] for e in loops}
    try:
        for step in range(1, args.steps + 2):  # step 1 is a warm-up
            for child in trls.values():
                child.step()
            for label, loop in loops.items():
                t0 = time.perf_counter()
                row, batch = timed_step(loop, step)
                row["total"] = time.perf_counter() - t0
                ours[label].append(row)
                mask = batch.train.loss_mask_BT
                lens[label].append(float(mask.sum()) / mask.shape[0])
        for child in trls.values():
            child.finish()
    finally:
        pool.close()
        shutil.rmtree(scratch, ignore_errors=True)
    med = statistics.median
    shape = f"exactly {args.max_new_tokens}" if args.fixed_length else f"<= {args.max_new_tokens}"
    print(
        f"bench_trl: {args.steps} measured steps each after a warm-up, in turn; {args.prompts} prompts x "
        f"{args.group_size} samples, {shape} new tokens, {args.threads} torch thread(s); median s/step"
    )
    print(f"ours: trainer fp32 with R3 replay, rollout with routing capture ({args.precision} unless a dose is named)")
    ladder = doses.ladder(manifest["config"]["size"])
    for d in named:
        print(f"  dose {d}: {ladder[d].note} ({ladder[d].precision} rollout)")
    print(f"{'trainer':<34} {'s/step':>7} {'resp len':>8}  phases (s)")
    for label in loops:
        rows = ours[label][1:]
        phases = ", ".join(f"{k} {med(r[k] for r in rows):.3f}" for k in rows[0] if k != "total" and rows[0][k] > 0)
        total, length = med(r["total"] for r in rows), med(lens[label][1:])
        print(f"{'ours, ' + label:<34} {total:7.3f} {length:8.1f}  {phases}")
    for aux, child in trls.items():
        i = child.info
        name = f"TRL {i['trl']}, aux {aux}, grad ckpt {args.trl_gc}"
        print(
            f"{name:<34} {med(child.times[1:]):7.3f} {med(child.lens[1:]):8.1f}  aux coef "
            f"{i['router_aux_loss_coef']}, vllm imported: {i['vllm_imported']}, {i['python']}"
        )
    print("speed-up, TRL / ours (target >= 1.5 at equal work, aux off):")
    for aux, child in trls.items():
        for label in loops:
            r = med(child.times[1:]) / med(r["total"] for r in ours[label][1:])
            print(f"  TRL aux {aux:<3} / ours, {label:<18} {r:6.2f}x")
    if "vllm" not in {loop.cfg.rollout_engine for loop in loops.values()}:
        print(f"vllm in this process's sys.modules (ours, hf only): {'vllm' in sys.modules}")


if __name__ == "__main__":
    main()
