"""Why TRL's GRPOTrainer runs slower in the project's venv than in a clean one, measured side by side.

    python -m benchmarks.bench_trl_env [--steps 6] [--clean-python /tmp/trl-clean/bin/python]
                                       [--settings block,default,import+freeze,clean]

Each setting is TRL's GRPOTrainer in its own child process (benchmarks/trl_worker.py) on the
shipped tiny zoo's SFT model, 16 prompts x 8 samples, <= 48 new tokens, MoE aux loss off, one
torch thread; the children step in turn (one optimizer step each, round robin), so machine load
hits all alike. Settings:
  block          project venv, vllm import blocked (sys.modules["vllm"] = None: TRL's
                 is_vllm_available() is False)
  default        project venv as a TRL user runs it: TRL imports vllm because it is installed
  import+freeze  project venv, vllm imported, then gc.freeze() after start-up
  clean          a venv with only torch 2.13 (CPU) + trl 1.16.0 + math-verify (--clean-python)
Printed per setting: median s/step, the ratio to `block`, the number of objects the garbage
collector tracks and the modules loaded after start-up. Our own hf-only loop never imports vllm
(benchmarks.bench_trl prints sys.modules' verdict for its own process).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from benchmarks.trl_worker import TRLChild


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--model-dir", type=Path, default=Path("experiments/shipped_zoo/tiny/sft"))
    ap.add_argument("--clean-python", default=None, help="python of a clean venv with trl (setting `clean`)")
    ap.add_argument("--settings", default="block,default,import+freeze,clean")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    args = ap.parse_args(argv)
    opts = {
        "block": (sys.executable, {"vllm": "block"}),
        "default": (sys.executable, {"vllm": "default"}),
        "import+freeze": (sys.executable, {"vllm": "import", "gc_freeze": True}),
        "clean": (args.clean_python, {"vllm": "default"}),
    }
    names = [s for s in args.settings.split(",") if s != "clean" or args.clean_python]
    children = {}
    for name in names:
        python, o = opts[name]
        children[name] = TRLChild(python, args.model_dir, steps=args.steps, max_new_tokens=args.max_new_tokens, **o)
    for _ in range(args.steps + 1):
        for child in children.values():
            child.step()
    for child in children.values():
        child.finish()
    base = statistics.median(children[names[0]].times[1:])
    print(f"bench_trl_env: {args.steps} steps per setting after a warm-up, round robin; median s/step")
    print(f"{'setting':<15} {'s/step':>7} {'/ ' + names[0]:>9} {'vllm':>5} {'gc objects':>11} {'modules':>8}  python")
    for name, c in children.items():
        med = statistics.median(c.times[1:])
        i = c.info
        print(
            f"{name:<15} {med:7.3f} {med / base:9.3f} {str(i['vllm_imported']):>5} {i['gc_objects']:>11} "
            f"{i['modules']:>8}  {i['python']} (trl {i['trl']}, transformers {i['transformers']})"
        )


if __name__ == "__main__":
    main()
