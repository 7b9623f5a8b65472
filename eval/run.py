"""Evaluate a checkpoint: K samples per problem, graded, avg@K and pass@K per benchmark.

    python -m eval.run --model PATH --engine hf|vllm|sglang --benchmarks aime24,aime25,amc23,math500 \
        --n-samples K --temperature T --out DIR [--rollout-url URL ...] [--max-new-tokens N]

Inputs: a transformers checkpoint directory (engine `hf`: generated in-process by
r3.engines.hf.rollout.HFRolloutEngine) or the same path for its tokenizer plus running SGLang
servers (engine `sglang`: r3.engines.sglang.engine.SGLangRolloutEngine); benchmark names as in
eval.benchmarks.load (registered names, local files, hub datasets).
Outputs in DIR: `samples.jsonl`, one record per (benchmark, problem, sample): problem id, sample
index, response, extracted answer, gold, correct, timeout flag, token counts, finish reason and
the sampling settings; then `summary.json` (written last) with, per benchmark, avg@K (mean
accuracy over all samples: the paper's score), pass@K (unbiased estimator) and counts, and the
average over benchmarks. Resumable: records already in samples.jsonl are kept and their samples
not regenerated (a rerun with different sampling settings is refused).

The RL loop's evaluation hook (eval.hook) runs the same `evaluate` function.
Departures from the paper: the paper does not publish its evaluation sampling settings
(temperature, K, max length); they are arguments here and written into every record.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from eval import benchmarks as bench_mod
from eval import grader, templates
from r3 import rundir
from r3.engines.base import PRECISIONS, RolloutEngine, SamplingParams

_SETTING_KEYS = ("template", "temperature", "top_p", "max_new_tokens", "seed")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021, "Evaluating LLMs trained on code", eq. 1):
    1 - C(n-c, k) / C(n, k), computed as 1 - prod_{i=n-c+1..n} (1 - k/i) for stability."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def summarize(records: Sequence[dict], *, benchmarks: Sequence[str], n_samples: int, template: str) -> dict:
    """Per-benchmark avg@K / pass@K and counts from per-sample records.

    avg@K   = mean over problems of (correct samples / K)  (= mean over all samples, the paper's score)
    pass@K  = mean over problems of pass_at_k(K, correct, K)
    avg     = mean of avg@K over the benchmarks
    """
    out: dict[str, Any] = {
        "scores": {},
        "pass": {},
        "problems": {},
        "timeouts": {},
        "no_answer": {},
        "response_len_mean": {},
        "truncated_frac": {},
    }
    for b in benchmarks:
        rs = [r for r in records if r["benchmark"] == b]
        if not rs:
            raise ValueError(f"no records for benchmark {b!r}")
        by_problem: dict[str, list[bool]] = {}
        for r in rs:
            by_problem.setdefault(r["problem_id"], []).append(bool(r["correct"]))
        bad = {p: len(v) for p, v in by_problem.items() if len(v) != n_samples}
        if bad:
            raise ValueError(f"{b}: expected {n_samples} samples per problem, got {dict(list(bad.items())[:3])}")
        out["scores"][b] = sum(sum(v) / n_samples for v in by_problem.values()) / len(by_problem)
        out["pass"][b] = sum(pass_at_k(n_samples, sum(v), n_samples) for v in by_problem.values()) / len(by_problem)
        out["problems"][b] = len(by_problem)
        out["timeouts"][b] = sum(bool(r["timeout"]) for r in rs)
        out["no_answer"][b] = sum(r["extracted"] is None for r in rs)
        out["response_len_mean"][b] = sum(r["response_tokens"] for r in rs) / len(rs)
        out["truncated_frac"][b] = sum(r["finish_reason"] == "length" for r in rs) / len(rs)
    out["avg"] = sum(out["scores"].values()) / len(out["scores"])
    out["n_samples"] = n_samples
    out["template"] = template
    return out


def _read_records(path: Path) -> list[dict]:
    """Valid records of a per-sample file (r3.rundir's reader); a torn last line (killed
    mid-write) is cut from the file, so later appends start on a clean line."""
    rundir.drop_torn_tail(path)
    return rundir.read_jsonl(path)


def _batch_seed(seed: int, benchmark: str, batch_index: int) -> int:
    # Stable across processes (unlike hash()), and independent of which other benchmarks run.
    return zlib.crc32(f"{seed}:{benchmark}:{batch_index}".encode()) & 0x7FFFFFFF


_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
"""owner/name: a hub repo id (a missing local path of this shape is passed on as a hub name)."""


def check_model_path(model: str, *, served: bool) -> None:
    """Refuse a --model that can be neither loaded nor downloaded, in one line, before any engine
    or tokenizer is built (transformers would otherwise end in a traceback about repo ids).

    A local directory must hold config.json (an in-process engine loads the weights from it) or, when
    servers serve the model (`served`: the path only supplies the tokenizer), config.json or a
    tokenizer file. A path
    that does not exist is refused unless it has the shape of a hub id `owner/name` whose `owner`
    is not a local directory."""
    p = Path(model).expanduser()
    if p.is_dir():
        need = ("config.json", *_TOKENIZER_FILES) if served else ("config.json",)
        if not any((p / f).is_file() for f in need):
            found = sorted(x.name for x in p.iterdir())[:8]
            raise SystemExit(
                f"eval.run: --model {model}: expected a checkpoint directory with {' or '.join(need)}, found "
                f"{found or 'an empty directory'}; point --model at the directory written by save_pretrained"
            )
        return
    if p.exists():
        raise SystemExit(
            f"eval.run: --model {model}: expected a checkpoint directory, got a file; "
            "point --model at the directory that holds config.json"
        )
    if _HUB_ID.fullmatch(model) and not Path(model.split("/")[0]).is_dir():
        return  # a hub name, resolved by transformers
    raise SystemExit(
        f"eval.run: --model {model}: no such directory (expected a checkpoint directory with "
        "config.json, or a hub name owner/name); check the path"
    )


def evaluate(
    engine: RolloutEngine,
    tokenizer: Any,
    benchmarks: Sequence[str],
    *,
    samples_path: Path,
    n_samples: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 1024,
    template: str = "qwen-math-boxed",
    max_problems: int = 0,
    seed: int = 0,
    batch_size: int = 64,
    grader_workers: int = 2,
    grader_pool: grader.WorkerPool | None = None,
    grade_timeout_s: float = grader.DEFAULT_TIMEOUT_S,
    progress: bool = True,
) -> dict:
    """Generate, grade and record n_samples per problem; return the summary (see `summarize`).

    Samples already recorded in samples_path are not regenerated. Batches are formed per
    benchmark in a fixed order and seeded from (seed, benchmark, batch index), so a resumed run
    regenerates a missing batch with the same seed as an uninterrupted one would.
    """
    if n_samples < 1 or max_new_tokens < 1 or batch_size < 1:
        raise ValueError(
            f"n_samples, max_new_tokens and batch_size must be >= 1, got {n_samples}, {max_new_tokens}, {batch_size}"
        )
    if not benchmarks:
        raise ValueError("no benchmarks given")
    keys = [bench_mod.short_name(b) for b in benchmarks]  # file paths are keyed by their stem
    if len(set(keys)) != len(keys):
        raise ValueError(f"benchmark names {list(benchmarks)} collide as keys {keys}; rename a file")
    tpl = templates.get(template)
    settings = {
        "template": template,
        "temperature": temperature,
        "top_p": top_p,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
    }
    samples_path = Path(samples_path)
    samples_path.parent.mkdir(parents=True, exist_ok=True)
    records = _read_records(samples_path)
    for r in records:
        old = {k: r.get(k) for k in _SETTING_KEYS}
        if old != settings:
            raise ValueError(
                f"{samples_path} holds samples made with {old}, this run asks for {settings}; "
                "use another output directory (or delete the file) to evaluate new settings"
            )
    done = {(r["benchmark"], r["problem_id"], r["sample"]) for r in records}

    # Jobs: (benchmark, row, sample index), batched per benchmark.
    batches: list[tuple[str, int, list[tuple[dict, int]]]] = []
    for name, b in zip(benchmarks, keys):
        rows = bench_mod.load(name, limit=max_problems)
        jobs = [(row, s) for row in rows for s in range(n_samples)]
        for bi, start in enumerate(range(0, len(jobs), batch_size)):
            batches.append((b, bi, jobs[start : start + batch_size]))
    todo = [bt for bt in batches if any((bt[0], row["id"], s) not in done for row, s in bt[2])]

    own_pool = grader_pool is None and bool(todo)
    pool = grader.make_pool(workers=grader_workers, timeout_s=grade_timeout_s) if own_pool else grader_pool
    prompt_cache: dict[tuple[str, str], list[int]] = {}
    try:
        with samples_path.open("a", encoding="utf-8") as out:
            for b, bi, jobs in tqdm(todo, desc="eval batches", disable=not progress):
                prompts = []
                for row, _ in jobs:
                    key = (b, row["id"])
                    if key not in prompt_cache:
                        prompt_cache[key] = tpl.encode(row["problem"], tokenizer)
                    prompts.append(prompt_cache[key])
                params = SamplingParams(
                    max_new_tokens=max_new_tokens,
                    temperature=temperature,
                    top_p=top_p,
                    seed=_batch_seed(seed, b, bi),
                    stop_token_ids=tpl.stop_token_ids(tokenizer),
                )
                samples = engine.generate(prompts, params, capture_routing=False)
                if len(samples) != len(prompts):
                    raise RuntimeError(f"engine returned {len(samples)} samples for {len(prompts)} prompts")
                responses = [tokenizer.decode(s.response_ids, skip_special_tokens=True) for s in samples]
                graded = grader.grade_detailed(
                    [(resp, row["answer"]) for resp, (row, _) in zip(responses, jobs)], pool=pool
                )
                for (row, s_idx), sample, resp, g in zip(jobs, samples, responses, graded):
                    if (b, row["id"], s_idx) in done:
                        continue
                    rec = {
                        "benchmark": b,
                        "problem_id": row["id"],
                        "sample": s_idx,
                        "response": resp,
                        "extracted": g.extracted,
                        "gold": row["answer"],
                        "correct": g.correct,
                        "timeout": g.timed_out,
                        "prompt_tokens": len(sample.prompt_ids),
                        "response_tokens": len(sample.response_ids),
                        "finish_reason": sample.finish_reason,
                        **settings,
                    }
                    out.write(json.dumps(rec) + "\n")
                    records.append(rec)
                    done.add((b, row["id"], s_idx))
                out.flush()
    finally:
        if own_pool:
            pool.close()
    wanted = {(b, row["id"], s) for b, _, jobs in batches for row, s in jobs}
    return summarize(
        [r for r in records if (r["benchmark"], r["problem_id"], r["sample"]) in wanted],
        benchmarks=keys,
        n_samples=n_samples,
        template=template,
    )


def registry_names() -> tuple[str, ...]:
    from r3.engines.registry import rollout_engine_names

    return rollout_engine_names()


def _build_engine(args) -> RolloutEngine:
    """Through the engine registry (r3.engines.registry), like every other stage."""
    from r3.engines import registry

    urls = tuple(u for spec in args.rollout_url for u in spec.split(",") if u)
    settings = registry.RolloutSettings(
        model_path=args.model, precision=args.precision, seed=args.seed, urls=urls, options={"device": args.device}
    )
    try:
        cfg = registry.rollout_config_for(args.engine, settings)
    except ValueError as e:
        raise SystemExit(
            f"--engine {args.engine}: {e} (servers: --rollout-url http://HOST:PORT, one per server)"
        ) from e
    try:
        return registry.build_rollout_engine(cfg)
    except ImportError as e:
        raise SystemExit(f"--engine {args.engine} cannot be built here ({e}); install its extra (see README)") from e


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m eval.run", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="checkpoint directory or hub name (weights for hf; tokenizer always)")
    p.add_argument("--engine", choices=registry_names(), default="hf", help="a rollout engine of r3.engines.registry")
    p.add_argument("--benchmarks", default="aime24,aime25,amc23,math500", help="comma-separated names or paths")
    p.add_argument("--n-samples", type=int, default=1, help="K samples per problem (avg@K, pass@K)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=4096)
    p.add_argument("--template", default="qwen-math-boxed", help=f"one of {templates.available()}")
    p.add_argument("--max-problems", type=int, default=0, help="first N problems per benchmark (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64, help="prompts per engine call")
    p.add_argument("--grader-workers", type=int, default=2)
    p.add_argument("--precision", choices=PRECISIONS, default="bf16", help="in-process engine numerics (hf, vllm)")
    p.add_argument("--device", default="cpu", help="hf engine device")
    p.add_argument(
        "--rollout-url",
        "--sglang-url",
        dest="rollout_url",
        action="append",
        default=[],
        help="server URL of a server-backed engine (repeat or comma-separate); none: the engine runs in process",
    )
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)
    from r3.engines import registry

    served = bool(args.rollout_url) or registry.server_only(args.engine)
    check_model_path(args.model, served=served)  # before any engine, tokenizer or output directory

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    engine = _build_engine(args)
    names = [b.strip() for b in args.benchmarks.split(",") if b.strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    summary = evaluate(
        engine,
        tokenizer,
        names,
        samples_path=args.out / "samples.jsonl",
        n_samples=args.n_samples,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        template=args.template,
        max_problems=args.max_problems,
        seed=args.seed,
        batch_size=args.batch_size,
        grader_workers=args.grader_workers,
    )
    summary.update(
        model=args.model,
        engine=args.engine,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        seconds=time.time() - t0,
    )
    tmp = args.out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, args.out / "summary.json")
    k = args.n_samples
    print(f"{'benchmark':<14}{'problems':>9}{f'avg@{k}':>9}{f'pass@{k}':>9}{'timeouts':>9}")
    for b in map(bench_mod.short_name, names):
        print(
            f"{b:<14}{summary['problems'][b]:>9}{100 * summary['scores'][b]:>9.2f}"
            f"{100 * summary['pass'][b]:>9.2f}{summary['timeouts'][b]:>9}"
        )
    print(f"{'average':<14}{'':>9}{100 * summary['avg']:>9.2f}")
    return summary


if __name__ == "__main__":
    main()
