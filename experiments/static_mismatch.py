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

User checkpoints (the paper preset's static cell, `run_static_checkpoints`, run by slurm.job): the
same measurement on the MoE and dense checkpoints a StaticCell (experiments.grid) names, with any
registered engines (sglang servers or vllm for rollout, megatron or hf recomputing) on held-out
prompts (`checkpoint_problems`: the paper's evaluation sets by default); written to
<runs>/static/<precision>/static.json with the same fields plus `models`, `prompts`, `template`.

Departures from the paper: the paper compares SGLang inference with Megatron training of
Qwen3-30B-A3B (and a dense Qwen3-8B); here the mismatch comes from bf16 / FP8-weight rollout
numerics against an fp32 trainer on a 2M-parameter model. With the router-only FP8 engine the
dense control (no router) is rolled out in plain bf16, so its row is the same under both.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from experiments import rollout, task
from experiments.grid import StaticCell
from r3 import rundir

TAUS = [float(x) for x in torch.logspace(0.005, 2, 30).tolist()]  # 1.01 .. 100
"""F(tau) grid for the extreme-token curve (log-spaced; F(2) is reported separately)."""


def static_dir_name(precision: str, rollout_engine: str = "hf", train_engine: str = "hf") -> str:
    """Directory of one static measurement under <out>/static/: `bf16` for the default engines (the
    layout plots and Slurm expect), `vllm-bf16` for another rollout engine, `vllm-bf16-megatron` when
    another trainer recomputes (so no engine pair overwrites another's tables)."""
    from r3.engines.registry import DEFAULT_ROLLOUT, DEFAULT_TRAIN

    if rollout_engine == DEFAULT_ROLLOUT:
        return precision
    return f"{rollout_engine}-{precision}" + ("" if train_engine == DEFAULT_TRAIN else f"-{train_engine}")


def _engine_pair(
    model_dir: Path, precision: str, seed: int, train_engine: str, rollout_engine: str = "hf", progress: bool = True
):
    from r3.engines import registry

    settings = registry.RolloutSettings(
        model_path=str(model_dir),
        precision=precision,
        seed=seed,
        options={} if progress else {"progress_min_prompts": 0},  # 0: no progress bar (a worker process)
    )
    ro = registry.build_rollout_engine(registry.rollout_config_for(rollout_engine, settings))
    # no step is taken; lr must be > 0
    tr = registry.build_train_engine(
        registry.train_config_for(train_engine, registry.TrainSettings(model_path=str(model_dir), lr=1e-6, seed=seed))
    )
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


def _engines_for(model_dir: Path, precision: str, *, seed: int, train_engine: str, rollout_engine: str = "hf",
                 engines=None, progress: bool = True):  # fmt: skip
    """(rollout engine, train engine) of one model: `engines(model_dir)` when given (a checkpoint
    measurement), else the zoo's `_engine_pair`."""
    if engines is None:
        return _engine_pair(model_dir, precision, seed, train_engine, rollout_engine, progress)
    return engines(model_dir)


def _sample_batch(ro, tok, probs, *, group_size: int, max_new_tokens: int, seed: int, moe: bool, encode=None,
                  stop_ids: tuple[int, ...] = ()):  # fmt: skip
    """Sample `group_size` responses to each of `probs` with the rollout engine; the batch
    (experiments.rollout.build_batch), with routing when `moe`. encode(tokenizer, text) -> ids (None:
    the embedded task's prompt format)."""
    from r3.engines.base import SamplingParams

    if encode is None:
        prompts = [tok(task.format_prompt(p.problem))["input_ids"] for p in probs for _ in range(group_size)]
    else:
        prompts = [ids for p in probs for ids in [encode(tok, p.problem)] * group_size]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, seed=seed, stop_token_ids=stop_ids)
    samples = ro.generate(prompts, params, capture_routing=moe)
    groups = [
        rollout.Group(problem=p, samples=samples[i * group_size : (i + 1) * group_size], rewards=[0.0] * group_size)
        for i, p in enumerate(probs)
    ]
    return rollout.build_batch(groups, pad_id=tok.pad_token_id, with_routing=moe)


def _close(engine) -> None:
    """Release what an engine holds (vLLM's engine and KV cache, a driver proxy's followers), if it can."""
    if callable(close := getattr(engine, "close", None)):
        close()


def _release(engine) -> None:
    """_close(engine); the caller then drops its references, and gc (megatron's modules hold reference
    cycles) plus the CUDA cache return the memory, so the next model's engines are built after this
    one's memory is free."""
    import gc

    _close(engine)
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class _Accumulator:
    """Per-token results of several batches for `_metrics`: train and inference logprobs at the
    loss-mask positions kept as flat tensors (floats: small), routing disagreement averaged per fed
    token batch by batch (the [tokens, L, K] traces are not kept). One batch: `_metrics` of its own
    tensors, exactly as before batching existed."""

    def __init__(self):
        self.parts: list[tuple] = []

    def add(self, train_BT, infer_BT, mask_BT, rollout_ids=None, train_ids=None, fed_BT=None):
        if len(self.parts) == 1:  # a second batch: keep only what the metrics read of the first
            self.parts[0] = self._compact(*self.parts[0])
        part = (train_BT, infer_BT, mask_BT, rollout_ids, train_ids, fed_BT)
        self.parts.append(part if not self.parts else self._compact(*part))

    @staticmethod
    def _compact(train_BT, infer_BT, mask_BT, rollout_ids, train_ids, fed_BT):
        from r3.metrics import routing_disagreement

        m = mask_BT.bool()
        routing = None
        if rollout_ids is not None and train_ids is not None:
            rd = routing_disagreement(rollout_ids[fed_BT], train_ids[fed_BT])
            routing = (int(fed_BT.sum()), rd)
        return ("flat", train_BT[m], infer_BT[m], routing)

    def metrics(self) -> dict:
        if len(self.parts) == 1:
            return _metrics(*self.parts[0])
        train = torch.cat([p[1] for p in self.parts]).unsqueeze(0)
        infer = torch.cat([p[2] for p in self.parts]).unsqueeze(0)
        out = _metrics(train, infer, torch.ones_like(train), None, None, None)
        routed = [p[3] for p in self.parts if p[3] is not None]
        if routed:  # means over fed tokens: each batch's mean weighted by its fed tokens
            n = sum(f for f, _ in routed)

            def mean(key):
                return sum(rd[key].double() * f for f, rd in routed) / n

            out["routing_pair_disagreement"] = float(mean("routing/pair_disagreement"))
            out["routing_token_disagreement"] = float(mean("routing/token_disagreement"))
            out["per_layer_disagreement"] = mean("routing/per_layer").float().tolist()
            out["fed_tokens"] = n
        return out


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
    engines=None,
    problems=None,
    encode=None,
    stop_ids: tuple[int, ...] = (),
    progress: bool = True,
    on_phase=None,
    batch_prompts: int = 0,
) -> dict:
    """The static.json record of one rollout precision. engines(model_dir) -> (rollout, train engine),
    problems() -> [task.Problem], encode(tokenizer, text) -> ids, stop_ids: a checkpoint measurement's
    (None: the zoo's engines, held-out problems and prompt format); engines() is called once per model,
    MoE first, and the MoE model's engines are released (closed, dropped, memory freed) before the
    dense model's are built. batch_prompts > 0: prompts are rolled out and recomputed that many at a
    time (batch_prompts x group_size rows per train-engine call, so a batch, its routing trace and the
    driver's broadcast of it stay bounded), metrics over all of them; 0: one batch.
    progress: the zoo engines' progress bar over decode steps (off in a worker process).
    on_phase(fraction): called after each phase of each batch with the share of the work done
    (`PHASE_SHARES`; with one batch exactly those five), for a progress bar in another process."""
    report = on_phase or (lambda fraction: None)
    from transformers import AutoTokenizer

    from r3.replay import ReplayMode

    out: dict = {
        "precision": precision,
        "rollout_engine": rollout_engine,
        "train_engine": train_engine,
        "n_prompts": n_prompts,
        "group_size": group_size,
        "fp8_scope": "router" if precision == "fp8" else None,
    }
    probs = task.heldout_problems(n_prompts, difficulty=difficulty) if problems is None else problems()
    step = batch_prompts or len(probs)
    chunks = [probs[i : i + step] for i in range(0, len(probs), step)]
    sample = dict(group_size=group_size, max_new_tokens=max_new_tokens, seed=seed, encode=encode, stop_ids=stop_ids)
    eng = dict(seed=seed, train_engine=train_engine, rollout_engine=rollout_engine, engines=engines, progress=progress)
    P = PHASE_SHARES

    def share(i: int, k: int) -> float:  # phase k of batch i: MoE phases 0-2, dense phases 3-4
        lo, hi = (0.0, P[2]) if k <= 2 else (P[2], 1.0)
        return lo + (hi - lo) * (i + (P[k] - lo) / (hi - lo)) / len(chunks)

    tok = AutoTokenizer.from_pretrained(moe_dir)
    ro, tr = _engines_for(moe_dir, precision, **eng)
    if not (ro.capabilities.captures_routing and tr.is_moe):
        raise ValueError(f"{moe_dir} is not an MoE model (no router found); the static measurement needs one")
    native_acc, r3_acc = _Accumulator(), _Accumulator()
    for i, chunk in enumerate(chunks):
        batch = _sample_batch(ro, tok, chunk, moe=True, **sample)
        if i == len(chunks) - 1:
            _close(ro)  # vLLM: release the engine (and its KV cache) before the last recompute
        report(share(i, 0))
        tb, mask, fed = batch.train, batch.train.loss_mask_BT, batch.train.attention_mask_BS[:, 1:].bool()
        native = tr.compute_logprobs(tb, routing=ReplayMode.RECORD)
        native_acc.add(native.logp_BT, batch.infer_logp_BT, mask, tb.expert_ids_BTLK, native.expert_ids_BTLK, fed)
        del native
        report(share(i, 1))
        # Under replay every MoE layer uses the rollout's experts (the engines' consumed-once check
        # stops the forward otherwise), so the routing fields are left empty rather than filled with a
        # disagreement of 0 that would be true by construction.
        r3_acc.add(tr.compute_logprobs(tb, routing=ReplayMode.REPLAY).logp_BT, batch.infer_logp_BT, mask)
        del batch, tb
        report(share(i, 2))
    out["moe"], out["moe_r3"] = native_acc.metrics(), r3_acc.metrics()
    del native_acc, r3_acc
    _release(tr)
    del ro, tr  # the MoE engines' memory is free before the dense model's engines are built
    tok = AutoTokenizer.from_pretrained(dense_dir)
    ro, tr = _engines_for(dense_dir, precision, **eng)
    dense_acc = _Accumulator()
    for i, chunk in enumerate(chunks):
        batch = _sample_batch(ro, tok, chunk, moe=False, **sample)
        if i == len(chunks) - 1:
            _close(ro)
        report(share(i, 3))
        dense_acc.add(tr.compute_logprobs(batch.train).logp_BT, batch.infer_logp_BT, batch.train.loss_mask_BT)
        del batch
        report(share(i, 4))
    _release(tr)
    del ro, tr
    out["dense"] = dense_acc.metrics()
    out["tokens"] = out["moe"]["tokens"]
    return out


PHASE_SHARES = (0.15, 0.40, 0.65, 0.85, 1.0)
"""Share of a zoo measurement's time done after: the MoE rollout, its native recompute, its R3
recompute, the dense rollout, the dense recompute (profiled on 1,024 FP8 samples: the fp32
recomputes of whole sequences cost more than the KV-cached rollouts)."""


def run_static(out_root: Path, precision: str, *, zoo_dir: Path | None = None, force: bool = False, **kw) -> dict:
    """Measure (or reuse) <out_root>/static/<static_dir_name(...)>/static.json."""
    from experiments import zoo

    name = static_dir_name(precision, kw.get("rollout_engine", "hf"), kw.get("train_engine", "hf"))
    path = Path(out_root) / rundir.STATIC_DIR / name / rundir.STATIC
    if path.exists() and not force:
        return json.loads(path.read_text())
    zoo_dir = Path(zoo_dir or zoo.default_zoo_dir())
    manifest = zoo.load_manifest(zoo_dir) or zoo.build_zoo(zoo_dir)
    kw.setdefault("difficulty", manifest["config"]["difficulty"])
    t0 = time.time()
    rec = measure(zoo.model_dir("sft", zoo_dir), zoo.model_dir("dense", zoo_dir), precision, **kw)
    rec["seconds"] = round(time.time() - t0, 1)
    rundir.write_text_atomic(path, json.dumps(rec) + "\n")
    return rec


# --- user checkpoints with any registered engines (the paper's job: SGLang vs megatron) ----------------
def checkpoint_problems(prompts: str, n_prompts: int, *, difficulty: int = 2) -> list[task.Problem]:
    """The prompts of a checkpoint measurement, in a fixed order; n_prompts 0: all.

    `benchmarks`: the paper's evaluation sets (eval.benchmarks.PAPER_BENCHMARKS: AIME24, AIME25, AMC23,
    MATH500 with its level-5 subset), each problem once (MATH500-L5 lies inside MATH500): held out from
    training by the data pipeline's decontamination. `synthetic`: the embedded task's held-out split.
    Anything else: a benchmark name or file eval.benchmarks.load reads (e.g. a data_prep table of the
    training pool: then the prompts are not held out)."""
    from eval import benchmarks

    if prompts == "synthetic":
        return task.heldout_problems(n_prompts or task.HELDOUT_N, difficulty=difficulty)
    names = benchmarks.PAPER_BENCHMARKS if prompts == "benchmarks" else (prompts,)
    out, seen = [], set()
    for name in names:
        for r in benchmarks.load(name):
            if r["problem"] not in seen:
                seen.add(r["problem"])
                out.append(
                    task.Problem(id=str(r["id"]), problem=str(r["problem"]), answer=str(r["answer"]), solution="")
                )
    if not out:
        raise ValueError(f"static prompts {prompts!r}: no problems loaded")
    return out[:n_prompts] if n_prompts else out


def checkpoint_engine_configs(cell: StaticCell, model_dir: str, urls: tuple[str, ...]) -> tuple[object, object]:
    """(rollout config, train config) of r3.engines.registry for one model of a StaticCell.
    urls: the servers of this model (slurm.job fills rollout_urls / rollout_urls_dense; an engine that
    runs on servers only refuses none, one that also runs in process takes none as in-process)."""
    from r3.engines import registry

    ro = registry.rollout_config_for(
        cell.rollout_engine,
        registry.RolloutSettings(model_path=model_dir, precision=cell.precision, seed=cell.seed, urls=tuple(urls)),
    )
    train_options = {
        f.name.removeprefix("train_"): getattr(cell, f.name)
        for f in dataclasses.fields(cell)
        if f.name.startswith("train_") and f.name != "train_engine"
    }
    # no step is taken; lr must be > 0
    tr = registry.train_config_for(
        cell.train_engine,
        registry.TrainSettings(model_path=model_dir, lr=1e-6, seed=cell.seed, options=train_options),
    )
    return ro, tr


CHECKPOINT_BATCH_PROMPTS = 8
"""Prompts per rollout-and-recompute batch of a checkpoint measurement (x group_size 8 = 64 rows): the
paper preset's 600 prompts x 8 samples of up to 9,216 tokens in one batch would carry a 136 GB int64
routing trace through the driver's broadcast to every rank; 64 rows carry 1.8 GB."""


def measure_checkpoints(cell: StaticCell, *, progress: bool = True) -> dict:
    """The static.json record of a StaticCell (experiments.grid) naming its checkpoints:
    cell.model_moe, cell.model_dense, engines by registry name, server URLs in
    cell.rollout_urls (MoE) and cell.rollout_urls_dense. Same measurement as the zoo's (`measure`):
    MoE native, MoE + R3, dense control on held-out prompts (`checkpoint_problems`).

    Several training ranks (WORLD_SIZE > 1, megatron): rank 0 measures and its train engine is a
    driver proxy (experiments.distributed.DriverEngine) whose calls the other ranks follow; they
    return None."""
    from eval import templates
    from r3.engines.registry import build_rollout_engine, build_train_engine

    for key in ("model_moe", "model_dense"):
        if not getattr(cell, key) or not (Path(getattr(cell, key)) / "config.json").exists():
            raise FileNotFoundError(
                f"static cell {cell.name}: {key}={getattr(cell, key)!r} is not a transformers checkpoint directory "
                "(config.json); pass --model-sft / --model-dense"
            )
    urls = {
        cell.model_moe: tuple(cell.rollout_urls),
        cell.model_dense: tuple(cell.rollout_urls_dense),
    }
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        from experiments import distributed
        from r3.engines import registry

        if not registry.multi_rank(cell.train_engine):
            raise ValueError(
                f"static cell {cell.name}: {world} training ranks need a multi-rank train engine, "
                f"got train_engine={cell.train_engine!r}"
            )
        distributed._init_process_group()
        if torch.distributed.get_rank() != 0:  # follow the driver's train engine, MoE then dense
            for model in (cell.model_moe, cell.model_dense):
                engine = build_train_engine(checkpoint_engine_configs(cell, model, ())[1])
                distributed.follow(engine)
                _release(engine)  # freed before the next model's engine is built, as on the driver
                del engine
            distributed._shutdown()
            return None

    def engines(model_dir: Path):
        ro_cfg, tr_cfg = checkpoint_engine_configs(cell, str(model_dir), urls[str(model_dir)])
        tr = build_train_engine(tr_cfg)  # collective under several ranks: before the rollout engine
        if world > 1:
            from experiments.distributed import DriverEngine

            tr = DriverEngine(tr)
        return build_rollout_engine(ro_cfg), tr

    template = templates.get(cell.template or "qwen-math-boxed")
    problems = checkpoint_problems(cell.prompts, cell.n_prompts)
    from transformers import AutoTokenizer

    stop_ids = template.stop_token_ids(AutoTokenizer.from_pretrained(cell.model_moe))
    rec = measure(
        Path(cell.model_moe),
        Path(cell.model_dense),
        cell.precision,
        n_prompts=len(problems),
        group_size=cell.group_size,
        max_new_tokens=cell.max_new_tokens,
        seed=cell.seed,
        train_engine=cell.train_engine,
        rollout_engine=cell.rollout_engine,
        engines=engines,
        problems=lambda: problems,
        encode=lambda tok, text: template.encode(text, tok),
        stop_ids=stop_ids,
        batch_prompts=CHECKPOINT_BATCH_PROMPTS,
    )
    rec["models"] = {"moe": cell.model_moe, "dense": cell.model_dense}
    rec["prompts"] = cell.prompts
    rec["template"] = template.name
    if world > 1:
        from experiments import distributed

        distributed._shutdown()
    return rec


def run_static_checkpoints(cell: StaticCell, out_dir: Path, *, force: bool = False) -> dict | None:
    """Measure (or reuse) <out_dir>/static.json for a StaticCell naming its checkpoints; written last via a
    temporary file, by rank 0 only (None on the other ranks)."""
    path = Path(out_dir) / rundir.STATIC
    if path.exists() and not force:
        return json.loads(path.read_text())
    t0 = time.time()
    rec = measure_checkpoints(cell)
    if rec is None:
        return None
    rec["seconds"] = round(time.time() - t0, 1)
    rundir.write_text_atomic(path, json.dumps(rec) + "\n")
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
    from r3.engines import registry

    ap.add_argument("--train-engine", choices=registry.train_engine_names(), default=registry.DEFAULT_TRAIN)
    ap.add_argument(
        "--rollout-engine",
        choices=registry.rollout_engine_names(),
        default=registry.DEFAULT_ROLLOUT,
        help="the inference engine (an in-process one: hf, or vllm when installed)",
    )
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)
    if args.precision is None:
        args.precision = list(registry.static_precisions(args.rollout_engine))
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
