"""Static training-inference mismatch of the zoo models (the paper's Figure-1-style measurement).

    python -m experiments.static_mismatch --out runs/demo [--precision bf16 fp8] [--zoo-dir runs/zoo]
    python -m experiments.static_mismatch --out runs/vllm --rollout-engine vllm --precision bf16 fp32

Inputs: the zoo's SFT MoE model and dense control (experiments.zoo). For each rollout precision
(`bf16`, the default engine; `fp8`, an FP8 inference engine: router weights quantised to float8
e4m3 with per-row scales, r3.engines.hf.fp8), the rollout engine samples `group_size` responses to
`n_prompts` held-out prompts (default: all 512) and reports its logprobs and routing; the fp32 train engine then
recomputes the logprobs of the same tokens
  - `moe`:    SFT MoE, the train engine's own routing (native);
  - `moe_r3`: SFT MoE, replaying the rollout routing (R3);
  - `dense`:  the dense control rolled out by the same engine (no router: routing fields null).
With `--rollout-engine vllm` the inference engine is vLLM (r3.engines.vllm, the CPU build in-process:
its own kernels, so the mismatch is between two real engines, the paper's Figure-1 setting); vLLM
takes bf16 and fp32, not fp8.
Output: <out>/static/<name>/static.json (docs/run_format.md) with <name> = `static_dir_name`: the
precision for the transformers engine (`bf16`), `<engine>-<precision>` for another rollout engine
(`vllm-bf16`), with `-<trainer>` appended for a trainer other than transformers; k3 KL, F(2), the F(tau)
curve, the log-ratio histogram and routing disagreement (per layer, pair, any-layer token) over
all fed tokens. Written last via a temporary file: an existing file is reused.

Departures from the paper: the paper compares SGLang inference with Megatron training of
Qwen3-30B-A3B (and a dense Qwen3-8B); here the mismatch comes from bf16 / FP8-weight rollout
numerics against an fp32 trainer on a 2M-parameter model. With the router-only FP8 engine the
dense control (no router) is rolled out in plain bf16, so its row is the same under both.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from experiments import rollout, task

TAUS = [float(x) for x in torch.logspace(0.005, 2, 30).tolist()]  # 1.01 .. 100
"""F(tau) grid for the extreme-token curve (log-spaced; F(2) is reported separately)."""


def static_dir_name(precision: str, rollout_engine: str = "hf", train_engine: str = "hf") -> str:
    """Directory of one static measurement under <out>/static/: `bf16` for the transformers rollout
    engine (the layout plots and Slurm expect), `vllm-bf16` for vLLM, `vllm-bf16-megatron` when
    megatron-core recomputes (so no engine pair overwrites another's tables)."""
    if rollout_engine == "hf":
        return precision
    return f"{rollout_engine}-{precision}" + ("" if train_engine == "hf" else f"-{train_engine}")


def _engine_pair(model_dir: Path, precision: str, seed: int, train_engine: str, rollout_engine: str = "hf"):
    from r3.engines import registry

    ro = registry.build_rollout_engine(
        registry.rollout_config(rollout_engine, model_path=str(model_dir), precision=precision, seed=seed)
    )
    # no step is taken; lr must be > 0
    tr = registry.build_train_engine(registry.train_config(train_engine, model_path=str(model_dir), lr=1e-6, seed=seed))
    return ro, tr


def _metrics(train_BT, infer_BT, mask_BT, rollout_ids, train_ids, fed_BT) -> dict:
    from r3.metrics import extreme_token_curve, log_ratio_histogram, mismatch_metrics, routing_disagreement

    mm = mismatch_metrics(train_BT, infer_BT, mask_BT, taus=(2.0,))
    taus, F = extreme_token_curve(train_BT, infer_BT, mask_BT, TAUS)
    edges, counts = log_ratio_histogram(train_BT, infer_BT, mask_BT)
    out = {
        "k3_kl": float(mm["mismatch/k3_kl"]),
        "extreme_frac@2": float(mm["mismatch/extreme_frac@2"]),
        "abs_log_ratio_mean": float(mm["mismatch/abs_log_ratio_mean"]),
        "abs_log_ratio_max": float(mm["mismatch/abs_log_ratio_max"]),
        "routing_pair_disagreement": None,
        "routing_token_disagreement": None,
        "per_layer_disagreement": None,
        "F_curve": {"tau": taus.tolist(), "F": F.tolist()},
        "log_ratio_hist": {"edges": edges.tolist(), "counts": counts.tolist()},
        "tokens": int(mask_BT.sum()),
    }
    if rollout_ids is not None and train_ids is not None:
        rd = routing_disagreement(rollout_ids[fed_BT], train_ids[fed_BT])
        out["routing_pair_disagreement"] = float(rd["routing/pair_disagreement"])
        out["routing_token_disagreement"] = float(rd["routing/token_disagreement"])
        out["per_layer_disagreement"] = rd["routing/per_layer"].tolist()
        out["fed_tokens"] = int(fed_BT.sum())
    return out


def _rollout_batch(
    model_dir: Path,
    precision: str,
    *,
    n_prompts: int,
    group_size: int,
    max_new_tokens: int,
    seed: int,
    difficulty: int,
    train_engine: str,
    rollout_engine: str = "hf",
):
    """Sample held-out prompts with the rollout engine; return (batch, train engine, is_moe)."""
    from transformers import AutoTokenizer

    from r3.engines.base import SamplingParams

    tok = AutoTokenizer.from_pretrained(model_dir)
    ro, tr = _engine_pair(model_dir, precision, seed, train_engine, rollout_engine)
    moe = ro.capabilities.captures_routing and tr.is_moe
    probs = task.heldout_problems(n_prompts, difficulty=difficulty)
    prompts = [tok(task.format_prompt(p.problem))["input_ids"] for p in probs for _ in range(group_size)]
    samples = ro.generate(
        prompts, SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, seed=seed), capture_routing=moe
    )
    if callable(close := getattr(ro, "close", None)):  # vLLM: release the engine (and its KV cache) now
        close()
    groups = [
        rollout.Group(problem=p, samples=samples[i * group_size : (i + 1) * group_size], rewards=[0.0] * group_size)
        for i, p in enumerate(probs)
    ]
    return rollout.build_batch(groups, pad_id=tok.pad_token_id, with_routing=moe), tr, moe


def measure(
    moe_dir: Path,
    dense_dir: Path,
    precision: str,
    *,
    n_prompts: int = task.HELDOUT_N,
    group_size: int = 8,
    max_new_tokens: int = 48,
    seed: int = 0,
    difficulty: int = 2,
    train_engine: str = "hf",
    rollout_engine: str = "hf",
) -> dict:
    """The static.json record of one rollout precision."""
    from r3.replay import ReplayMode

    kw = dict(
        n_prompts=n_prompts,
        group_size=group_size,
        max_new_tokens=max_new_tokens,
        seed=seed,
        difficulty=difficulty,
        train_engine=train_engine,
        rollout_engine=rollout_engine,
    )
    out: dict = {
        "precision": precision,
        "rollout_engine": rollout_engine,
        "train_engine": train_engine,
        "n_prompts": n_prompts,
        "group_size": group_size,
        "fp8_scope": "router" if precision == "fp8" else None,
    }
    batch, tr, moe = _rollout_batch(moe_dir, precision, **kw)
    if not moe:
        raise ValueError(f"{moe_dir} is not an MoE model (no router found); the static measurement needs one")
    tb, mask, fed = batch.train, batch.train.loss_mask_BT, batch.train.attention_mask_BS[:, 1:].bool()
    native = tr.compute_logprobs(tb, routing=ReplayMode.RECORD)
    out["moe"] = _metrics(native.logp_BT, batch.infer_logp_BT, mask, tb.expert_ids_BTLK, native.expert_ids_BTLK, fed)
    r3 = tr.compute_logprobs(tb, routing=ReplayMode.REPLAY)
    # Under replay every MoE layer uses the rollout's experts (the engines' consumed-once check
    # stops the forward otherwise), so the routing fields are left empty rather than filled with a
    # disagreement of 0 that would be true by construction.
    out["moe_r3"] = _metrics(r3.logp_BT, batch.infer_logp_BT, mask, None, None, None)
    batch, tr, _ = _rollout_batch(dense_dir, precision, **kw)
    dense = tr.compute_logprobs(batch.train)
    out["dense"] = _metrics(dense.logp_BT, batch.infer_logp_BT, batch.train.loss_mask_BT, None, None, None)
    out["tokens"] = out["moe"]["tokens"]
    return out


def run_static(out_root: Path, precision: str, *, zoo_dir: Path | None = None, force: bool = False, **kw) -> dict:
    """Measure (or reuse) <out_root>/static/<static_dir_name(...)>/static.json."""
    from experiments import zoo

    name = static_dir_name(precision, kw.get("rollout_engine", "hf"), kw.get("train_engine", "hf"))
    path = Path(out_root) / "static" / name / "static.json"
    if path.exists() and not force:
        return json.loads(path.read_text())
    zoo_dir = Path(zoo_dir or zoo.default_zoo_dir())
    manifest = zoo.load_manifest(zoo_dir) or zoo.build_zoo(zoo_dir)
    kw.setdefault("difficulty", manifest["config"]["difficulty"])
    t0 = time.time()
    rec = measure(zoo.model_dir("sft", zoo_dir), zoo.model_dir("dense", zoo_dir), precision, **kw)
    rec["seconds"] = round(time.time() - t0, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rec) + "\n")
    tmp.replace(path)
    return rec


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Static training-inference mismatch of the zoo models.")
    ap.add_argument("--out", type=Path, default=Path("runs/demo"))
    ap.add_argument(
        "--precision",
        nargs="+",
        default=None,
        choices=["bf16", "fp8", "fp32"],
        help="rollout precisions (default: bf16 fp8 for hf, bf16 fp32 for vllm)",
    )
    ap.add_argument("--zoo-dir", type=Path, default=None)
    ap.add_argument("--n-prompts", type=int, default=task.HELDOUT_N)
    ap.add_argument("--group-size", type=int, default=8)
    from r3.engines.registry import rollout_engine_names, train_engine_names

    ap.add_argument("--train-engine", choices=train_engine_names(), default="hf")
    ap.add_argument(
        "--rollout-engine",
        choices=rollout_engine_names(),
        default="hf",
        help="the inference engine (an in-process one: hf, or vllm when installed)",
    )
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)
    if args.precision is None:
        args.precision = ["bf16", "fp32"] if args.rollout_engine == "vllm" else ["bf16", "fp8"]
    for prec in tqdm(args.precision, desc="static mismatch"):
        rec = run_static(
            args.out,
            prec,
            zoo_dir=args.zoo_dir,
            force=args.force,
            n_prompts=args.n_prompts,
            group_size=args.group_size,
            train_engine=args.train_engine,
            rollout_engine=args.rollout_engine,
        )
        print(
            prec,
            {
                k: {m: rec[k][m] for m in ("k3_kl", "extreme_frac@2", "routing_pair_disagreement")}
                for k in ("moe", "moe_r3", "dense")
            },
        )


if __name__ == "__main__":
    main()
