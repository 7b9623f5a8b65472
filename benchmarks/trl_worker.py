"""TRL's GRPOTrainer as a child process of benchmarks.bench_trl, stepping in lockstep with its parent.

    python benchmarks/trl_worker.py --model-dir DIR [--steps 6] [--prompts 16] [--group-size 8]
        [--max-new-tokens 48] [--difficulty 2] [--fixed-length] [--aux off|on] [--gc off|on]
        [--vllm block|import|default]
        [--threads 1] [--gc-freeze] [--lockstep]

Runs on any Python that has TRL (the project's venv, or a clean venv with only torch + TRL +
math-verify: the repository root is put on sys.path for the grader and the task). Trains the
given model on the task's training stream (seed 0, --difficulty: the prompts our loop takes, in
the same order), 16 prompts x 8 samples per step, one optimizer step per generation batch, the
eval grader (2 worker processes) as reward, temperature 1.

  --aux off|on       TRL's MoE load-balancing loss (GRPOConfig.router_aux_loss_coef): off = 0.0
                     (the paper trains without it, as ours does); on = None, i.e. the model config's
                     router_aux_loss_coef (0.01 for the zoo), which is what a TRL user gets by default.
  --gc off|on        gradient checkpointing: GRPOConfig defaults it to on, which recomputes every
                     activation in the backward; off = equal work (ours does not recompute by default).
  --vllm             block: `sys.modules["vllm"] = None` before TRL is imported, so TRL's
                     is_vllm_available() (importlib.util.find_spec) is False and vllm is never
                     imported; import: `import vllm` first; default: TRL decides (it imports vllm
                     whenever it is installed: trl/generation/vllm_generation.py).
  --gc-freeze        gc.freeze() after the imports (moves every object allocated so far out of the
                     collector's generations, as vLLM's engine does after its start-up).
  --fixed-length     every completion is exactly --max-new-tokens long (generation_kwargs
                     min_new_tokens: EOS is suppressed until then), the study's response lengths.
  --lockstep         after each step print a line and wait for one on stdin (the parent runs its
                     own step meanwhile, so the two never share the cores).

Protocol on stdout (other lines are TRL's own output): `@@trl ready {json}` after start-up,
`@@trl step {json}` after each optimizer step with the step's seconds (from the end of the previous
step's wait, or the start of training, to this step's end: generation, reward, loss, backward,
optimizer, TRL's logging), `@@trl done {json}` at the end.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def emit(kind: str, payload: dict) -> None:
    print(f"@@trl {kind} {json.dumps(payload)}", flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=6, help="measured steps (one warm-up step is added)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--difficulty", type=int, default=2, help="task level of the prompts (the zoo's)")
    ap.add_argument("--fixed-length", action="store_true")
    ap.add_argument("--aux", choices=["off", "on"], default="off")
    ap.add_argument("--gc", choices=["off", "on"], default="off", help="gradient checkpointing (TRL's default: on)")
    ap.add_argument("--vllm", choices=["block", "import", "default"], default="block")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--gc-freeze", action="store_true")
    ap.add_argument("--lockstep", action="store_true")
    args = ap.parse_args(argv)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    if args.vllm == "block":
        sys.modules["vllm"] = None  # find_spec("vllm") -> None: TRL sees no vllm and never imports it
    elif args.vllm == "import":
        import vllm  # noqa: F401
    import torch

    torch.set_num_threads(args.threads)
    import transformers
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from eval import grader
    from experiments import task

    transformers.utils.logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    pool = grader.make_pool(workers=2)
    problems = task.TrainStream(seed=0, difficulty=args.difficulty).take(args.prompts * (args.steps + 2))
    data = Dataset.from_list([{"prompt": task.format_prompt(p.problem), "answer": p.answer} for p in problems])

    def reward(prompts, completions, answer, **kw):
        return [float(c) for c in grader.grade_many(list(zip(completions, answer)), pool=pool)]

    n = args.prompts * args.group_size
    gen_kwargs = {"min_new_tokens": args.max_new_tokens} if args.fixed_length else None
    cfg = GRPOConfig(
        output_dir=str(Path("/tmp") / f"trl_worker_{id(args)}"),
        per_device_train_batch_size=n,
        num_generations=args.group_size,
        steps_per_generation=1,
        max_completion_length=args.max_new_tokens,
        generation_kwargs=gen_kwargs,
        temperature=1.0,
        learning_rate=1e-5,
        beta=0.0,
        num_iterations=1,
        router_aux_loss_coef=0.0 if args.aux == "off" else None,
        gradient_checkpointing=args.gc == "on",  # GRPOConfig's default is True: a recompute ours does not do
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1000,
        max_steps=args.steps + 1,
        disable_tqdm=True,
        shuffle_dataset=False,
        seed=0,
    )

    class Lockstep(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            dt = time.perf_counter() - self.t0
            logs = getattr(trainer, "_metrics", {}).get("train", {})
            mean_len = logs.get("completions/mean_length", [float("nan")])[-1:]
            emit("step", {"step": state.global_step, "s": dt, "mean_len": mean_len[0] if mean_len else None})
            if args.lockstep:
                if not sys.stdin.readline():
                    raise SystemExit("trl_worker: parent closed the lockstep pipe")
            self.t0 = time.perf_counter()

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    trainer = GRPOTrainer(
        model=model, reward_funcs=reward, args=cfg, train_dataset=data, processing_class=tok, callbacks=[Lockstep()]
    )
    if args.gc_freeze:
        gc.collect()
        gc.freeze()
    import trl

    emit(
        "ready",
        {
            "trl": trl.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "python": sys.executable,
            "vllm_imported": "vllm" in sys.modules and sys.modules["vllm"] is not None,
            "aux_loss_enabled": bool(trainer.aux_loss_enabled),
            "router_aux_loss_coef": float(trainer.router_aux_loss_coef),
            "threads": torch.get_num_threads(),
            "gc_objects": len(gc.get_objects()),
            "modules": len(sys.modules),
        },
    )
    if args.lockstep and not sys.stdin.readline():
        raise SystemExit("trl_worker: parent closed the lockstep pipe")
    try:
        trainer.train()
    finally:
        pool.close()
    emit("done", {})


if __name__ == "__main__":
    main()


class TRLChild:
    """Parent side: start a trl_worker process in lockstep and step it one optimizer step at a time."""

    def __init__(self, python: str, model_dir: Path, **opts):
        import subprocess

        cmd = [python, str(Path(__file__).resolve()), "--model-dir", str(model_dir), "--lockstep"]
        for k, v in opts.items():
            if v is True:
                cmd.append(f"--{k.replace('_', '-')}")
            elif v not in (False, None):
                cmd += [f"--{k.replace('_', '-')}", str(v)]
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=str(ROOT))
        self.info = self._read("ready")
        self.times: list[float] = []
        self.lens: list[float] = []

    def _read(self, kind: str) -> dict:
        for line in self.proc.stdout:
            if line.startswith("@@trl "):
                _, got, payload = line.rstrip("\n").split(" ", 2)
                if got != kind:
                    raise RuntimeError(f"trl_worker sent {got!r}, expected {kind!r}: {line.strip()}")
                return json.loads(payload)
        raise RuntimeError(f"trl_worker exited (code {self.proc.wait()}) before {kind!r}: {' '.join(self.cmd)}")

    def step(self) -> float:
        """Let the child run one step; returns its seconds (it then waits for the next call)."""
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        row = self._read("step")
        self.times.append(row["s"])
        self.lens.append(row["mean_len"])
        return row["s"]

    def finish(self) -> None:
        """Release the child after its last step and wait for it to exit."""
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        self._read("done")
        self.proc.stdin.close()
        self.proc.wait(timeout=120)
