"""The RL loop: one grid cell -> one run directory (docs/run_format.md).

    python -m experiments.run --config CONFIG.json --run-dir runs/demo/<cell>
    python -m experiments.run --cell sft-single-grpo-r3 --preset tiny --runs runs/demo

Inputs: a RunConfig (experiments.config); the starting model (RunConfig.model_path, or the
embedded zoo's model of kind `model`, built when missing); training prompts (the synthetic task,
or a data_prep table). Outputs in the run directory: config.json, metrics.jsonl (one line per
global step), eval.jsonl + eval/step_<N>.jsonl (step 0 and every eval_every steps),
checkpoints/step_<N>/, log.txt, and manifest.json written last.

Per global step (PAPER.md "The method", "Setup"):
  1. rollout: prompts_per_step prompts x group_size samples from the rollout engine (bf16 or an
     FP8 inference engine), routing captured for MoE models; rewards from the eval grader
     (worker processes); dynamic sampling drops all-right / all-wrong groups (experiments.rollout);
  2. old logprobs: the train engine's no-grad forward, replaying the rollout routing when R3 is on;
     mismatch metrics (k3 KL, F(2)) of these vs the rollout logprobs; routing disagreement of the
     train engine's own routing (a forward without replay) vs the rollout routing;
  3. GRPO advantages; GRPO (PPO clip, dual clip, optional TIS on pi_old/pi_infer) or GSPO loss;
     the batch split into `mini_steps` mini-batches of whole groups, one optimizer step each;
  4. weight sync train -> rollout engine; metrics line; eval every `eval_every`; checkpoint.

Resume: a run directory holding checkpoints restarts from the newest complete one; lines of
metrics.jsonl / eval.jsonl after it are dropped first, so the files never hold a gap or a repeat.
Sampling is seeded per (seed, step, round), so a resumed run reproduces an uninterrupted one.

Departures from the paper: scale (tiny model, 60 steps, synthetic task); the mismatch in the
embedded mode comes from bf16 or FP8-weight rollout numerics against an fp32 trainer, not from
SGLang vs Megatron kernels.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from experiments import checkpoint, rollout, task
from experiments.collapse import collapse_step
from experiments.config import RunConfig
from r3.engines.base import SamplingParams, TrainBatch

SIGNIFICANT_KEYS = ("mismatch/k3_kl", "actor/loss", "actor/grad_norm")
"""Metrics that stop the run when NaN/inf (after a checkpoint is written)."""


class NonFiniteError(FloatingPointError):
    """A NaN or inf loss / gradient: the run stops (after writing a checkpoint)."""


# --- engines -----------------------------------------------------------------------------------
def resolve_model_dir(cfg: RunConfig) -> Path:
    """RunConfig.model_path, or the embedded zoo's model of kind cfg.model (building the zoo)."""
    if cfg.model_path:
        p = Path(cfg.model_path)
        if not (p / "config.json").exists():
            raise FileNotFoundError(f"model_path {p} holds no config.json (a transformers checkpoint directory)")
        return p
    from experiments import zoo

    zoo_dir = Path(cfg.zoo_dir or zoo.default_zoo_dir())
    if zoo.load_manifest(zoo_dir) is None:
        zoo.build_zoo(zoo_dir, size="tiny")
    return zoo.model_dir(cfg.model, zoo_dir)


def make_train_engine(cfg: RunConfig, model_dir: Path):
    kw = dict(lr=cfg.lr, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip,
              micro_batch=cfg.train_micro_batch, seed=cfg.seed)
    if cfg.train_engine == "hf":
        from r3.engines.hf_train import HFTrainEngine

        return HFTrainEngine(str(model_dir), **kw)
    from r3.engines.megatron_train import MegatronTrainEngine

    return MegatronTrainEngine(str(model_dir), **kw)


def make_rollout_engine(cfg: RunConfig, model_dir: Path, tokenizer):
    if cfg.rollout_engine == "hf":
        from r3.engines.hf_rollout import HFRolloutEngine

        return HFRolloutEngine(str(model_dir), precision=cfg.rollout_precision, seed=cfg.seed)
    from transformers import AutoConfig

    from r3.engines.sglang import SGLangRolloutEngine
    from r3.trace import RoutingSpec

    hf_cfg = AutoConfig.from_pretrained(model_dir)
    spec = RoutingSpec.from_hf_config(hf_cfg) if hasattr(hf_cfg, "num_experts") else None
    return SGLangRolloutEngine(cfg.sglang_urls, tokenizer_or_none=tokenizer, routing_spec=spec,
                               base_model_path=model_dir)


def captures_routing(engine) -> bool:
    """Can this rollout engine return the routing of every fed token?"""
    if hasattr(engine, "routing_spec"):  # SGLang client: needs the served model's (L, K, E)
        return engine.routing_spec is not None
    return getattr(engine, "replay", None) is not None  # HFRolloutEngine: an MoE model to record


def check_replay_capture(cfg: RunConfig, engine) -> None:
    """DESIGN.md invariant 3: replay requires a rollout engine that captures routing."""
    if cfg.replay and not captures_routing(engine):
        hint = ("start the SGLang servers with --enable-return-routed-experts and give the engine a "
                "routing_spec (an MoE model)" if cfg.rollout_engine == "sglang" else
                "use an MoE model (model='base'/'sft' or an MoE model_path)")
        raise ValueError(
            f"cell {cfg.name!r}: RunConfig.replay=True but the {cfg.rollout_engine!r} rollout engine "
            f"({type(engine).__name__}) does not capture routing; set replay=False, or {hint}"
        )


# --- run directory -------------------------------------------------------------------------------
def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL run file (missing file: none; a line torn by a kill: skipped)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line torn by a kill mid-write
    return out


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep lines with step <= last_step (and only whole lines)."""
    if path.exists():
        keep = [r for r in read_jsonl(path) if r.get("step", 0) <= last_step]
        path.write_text("".join(json.dumps(r) + "\n" for r in keep))


def _append_jsonl(path: Path, rec: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(rec) + "\n")


def _versions() -> dict[str, str]:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


# --- one global step -------------------------------------------------------------------------------
def _loss_fn_for(cfg: RunConfig, old_BT, adv_B, mask_BT, tis_BT, n_tok: float, n_seq: int):
    """The LossFn (r3.engines.base) of one mini-batch; normalised by the whole mini-batch."""
    from r3.losses import gspo_loss, ppo_clip_loss

    def loss_fn(logp_BT, entropy_BT, rows):
        if cfg.algorithm == "gspo":
            return gspo_loss(logp_BT, old_BT[rows], adv_B[rows], mask_BT[rows], clip_low=cfg.gspo_clip_low,
                             clip_high=cfg.gspo_clip_high, normalizer=n_seq)
        norm = n_tok if cfg.loss_agg == "token-mean" else n_seq
        return ppo_clip_loss(
            logp_BT, old_BT[rows], adv_B[rows], mask_BT[rows], clip_low=cfg.clip_low, clip_high=cfg.clip_high,
            dual_clip=cfg.dual_clip, is_weights_BT=None if tis_BT is None else tis_BT[rows], agg=cfg.loss_agg,
            normalizer=norm,
        )

    return loss_fn


def train_on(cfg: RunConfig, train_engine, batch: rollout.Batch, *, moe: bool) -> dict[str, float]:
    """Old logprobs, mismatch/routing metrics, and the mini-step updates of one global step."""
    from r3.losses import group_advantages, tis_weights
    from r3.metrics import mismatch_metrics, routing_disagreement

    tb: TrainBatch = batch.train
    mask_BT = tb.loss_mask_BT
    m: dict[str, float] = {}
    t0 = time.time()
    old = train_engine.compute_logprobs(tb, replay=cfg.replay, record_routing=moe and not cfg.replay,
                                        with_entropy=True)
    old_BT = old.logp_BT.detach()
    own_routing = old.expert_ids_BTLK
    m["time/old_logprob"] = time.time() - t0
    if moe and cfg.replay:  # the train engine's own routing, for the disagreement metric only
        t0 = time.time()
        own_routing = train_engine.compute_logprobs(tb, replay=False, record_routing=True).expert_ids_BTLK
        m["time/routing_probe"] = time.time() - t0
    for k, v in mismatch_metrics(old_BT, batch.infer_logp_BT, mask_BT, taus=(2.0,)).items():
        m[k] = float(v)
    ntok = mask_BT.sum().clamp(min=1)
    m["actor/entropy"] = float((old.entropy_BT * mask_BT).sum() / ntok) if old.entropy_BT is not None else float("nan")
    if moe and own_routing is not None and tb.expert_ids_BTLK is not None:
        # right padding: position t is a fed token of the trace iff token t+1 is real (n tokens, n-1 rows)
        fed_BT = tb.attention_mask_BS[:, 1:].bool()
        rd = routing_disagreement(tb.expert_ids_BTLK[fed_BT], own_routing[fed_BT])
        m["routing/pair_disagreement"] = float(rd["routing/pair_disagreement"])
        m["routing/token_disagreement"] = float(rd["routing/token_disagreement"])

    G = cfg.group_size
    adv_B = group_advantages(batch.rewards_B, G, std_normalize=cfg.std_normalize)
    tis_BT = None
    if cfg.tis:
        tis_BT = tis_weights(old_BT, batch.infer_logp_BT, mask_BT, cap=cfg.tis_cap)
        m["actor/tis_weight_mean"] = float((tis_BT * mask_BT).sum() / ntok)

    t0 = time.time()
    agg: dict[str, list[float]] = {}
    for rows in rollout.mini_batch_slices(len(batch.rewards_B) // G, G, cfg.mini_steps):
        mb = rollout.slice_batch(tb, rows)
        mb_mask = mask_BT[rows]
        loss_fn = _loss_fn_for(cfg, old_BT[rows], adv_B[rows], mb_mask, None if tis_BT is None else tis_BT[rows],
                               float(mb_mask.sum().clamp(min=1)), mb_mask.shape[0])
        out = train_engine.train_step(mb, loss_fn, replay=cfg.replay)
        for k, v in out.items():
            agg.setdefault(k, []).append(float(v))
    m["time/train"] = time.time() - t0
    for k, vs in agg.items():
        m[k] = sum(vs) / len(vs)
    m["actor/mini_steps"] = float(len(agg.get("actor/grad_norm", [])))
    m["actor/lr"] = cfg.lr
    return m


# --- the run ---------------------------------------------------------------------------------------
def run_cell(cfg: RunConfig, run_dir: Path, *, progress: bool = True,
             reward_fn: rollout.RewardFn | None = None) -> dict:
    """Run (or resume, or skip when complete) one cell in `run_dir`; returns the manifest.

    reward_fn: replaces the grader-based reward (a test seam; evaluation always uses the grader).
    """
    from transformers import AutoTokenizer

    from eval import grader, templates
    from eval.hook import evaluate_step

    run_dir = Path(run_dir)
    manifest_path = run_dir / "manifest.json"
    if manifest_path.exists():
        return json.loads(manifest_path.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = run_dir / "config.json"
    if cfg_path.exists():
        old = RunConfig.load(cfg_path).to_dict()  # through RunConfig: JSON lists become tuples again
        if old != cfg.to_dict():
            diff = sorted(k for k in set(old) | set(cfg.to_dict()) if old.get(k) != cfg.to_dict().get(k))
            raise ValueError(f"{run_dir} holds a run of a different config (fields differ: {diff}); "
                             "use another run directory or delete it")
    else:
        cfg.save(cfg_path)
    log_f = (run_dir / "log.txt").open("a")

    def log(msg: str) -> None:
        log_f.write(f"[{time.strftime('%H:%M:%S')}] {msg}\n")
        log_f.flush()

    model_dir = resolve_model_dir(cfg)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    synthetic = cfg.train_data == "synthetic"
    if synthetic:
        task.register_benchmark(seed=0, difficulty=cfg.task_difficulty)
    template = templates.get("arith" if synthetic else "qwen-math-boxed")
    rollout_engine = make_rollout_engine(cfg, model_dir, tokenizer)
    check_replay_capture(cfg, rollout_engine)
    train_engine = make_train_engine(cfg, model_dir)
    moe = captures_routing(rollout_engine)
    log(f"start {cfg.name}: model {model_dir}, rollout {cfg.rollout_engine}/{cfg.rollout_precision}, "
        f"train {cfg.train_engine}, replay={cfg.replay}")

    state = checkpoint.load_latest(run_dir, train_engine, log=log)
    start = 0 if state is None else state["step"]
    stream = (task.TrainStream(seed=cfg.seed, difficulty=cfg.task_difficulty) if synthetic
              else rollout.TableStream(cfg.train_data, seed=cfg.seed))
    if state is not None:
        stream.position = state["stream_position"]
        rollout_engine.sync_weights(train_engine.rollout_state_dict())
        log(f"resumed from checkpoint step {start}")
    for name in ("metrics.jsonl", "eval.jsonl"):
        _truncate_jsonl(run_dir / name, start)
    for p in (run_dir / "eval").glob("step_*.jsonl"):
        if int(p.stem.split("_")[1]) > start:
            p.unlink()

    pool = grader.make_pool(workers=2)
    stop_ids = template.stop_token_ids(tokenizer)
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            stop_token_ids=stop_ids)

    def grader_reward(texts, golds):
        return [float(c) for c in grader.grade_many(list(zip(texts, golds)), pool=pool)]

    def encode(problem: str) -> list[int]:
        return template.encode(problem, tokenizer)

    def decode(ids):
        return tokenizer.batch_decode(ids, skip_special_tokens=True)

    def evaluate(step: int) -> None:
        evaluate_step(rollout_engine, tokenizer, cfg.eval_benchmarks, step=step, run_dir=run_dir,
                      n_samples=cfg.eval_samples, temperature=cfg.eval_temperature,
                      max_new_tokens=cfg.max_new_tokens, max_problems=cfg.eval_max_problems, seed=cfg.seed,
                      template=template.name, grader_pool=pool, progress=False)

    def save_ckpt(step: int) -> None:
        checkpoint.save(run_dir, step, train_engine, {"stream_position": stream.position},
                        keep=cfg.keep_checkpoints)

    try:
        if start == 0:
            evaluate(0)
        bar = tqdm(range(start + 1, cfg.global_steps + 1), desc=cfg.name, unit="step", disable=not progress,
                   initial=start, total=cfg.global_steps)
        for step in bar:
            t_step = time.time()
            t0 = time.time()
            ro = rollout.collect(
                rollout_engine, encode, decode, stream, prompts_per_step=cfg.prompts_per_step,
                group_size=cfg.group_size, params=params, dynamic=cfg.dynamic_sampling,
                max_rounds=cfg.max_sampling_rounds, capture_routing=moe, run_seed=cfg.seed, step=step,
                reward_fn=reward_fn or grader_reward,
            )
            rec: dict = {"step": step, "time/rollout": time.time() - t0,
                         "rollout/reward_mean": ro.reward_mean, "rollout/response_len_mean": ro.response_len_mean,
                         "rollout/stop_frac": ro.stop_frac, "rollout/kept_groups": float(len(ro.kept)),
                         "rollout/sampled_groups": float(ro.sampled_groups),
                         "rollout/sampling_rounds": float(ro.rounds)}
            if ro.kept:
                batch = rollout.build_batch(ro.kept, pad_id=tokenizer.pad_token_id, with_routing=moe)
                rec.update(train_on(cfg, train_engine, batch, moe=moe))
                bad = [k for k in SIGNIFICANT_KEYS if k in rec and not _finite(rec[k])]
                if bad:
                    save_ckpt(step)
                    log(f"non-finite {bad} at step {step}; checkpoint written, run stopped")
                    raise NonFiniteError(
                        f"cell {cfg.name!r}: non-finite {', '.join(f'{k}={rec[k]}' for k in bad)} at global step "
                        f"{step}; a checkpoint of this step was written to {run_dir / 'checkpoints'}; likely "
                        f"cause: lr {cfg.lr} too high or a broken batch"
                    )
                t0 = time.time()
                rollout_engine.sync_weights(train_engine.rollout_state_dict())
                rec["time/sync"] = time.time() - t0
            rec["time/step"] = time.time() - t_step
            rec["time"] = time.time()
            _append_jsonl(run_dir / "metrics.jsonl", rec)
            bar.set_postfix(reward=f"{ro.reward_mean:.2f}", kl=f"{rec.get('mismatch/k3_kl', float('nan')):.1e}")
            if step % cfg.eval_every == 0 or step == cfg.global_steps:
                evaluate(step)
            if step % cfg.checkpoint_every == 0 or step == cfg.global_steps:
                save_ckpt(step)
            if cfg.stop_on_collapse and (collapsed := _collapse(cfg, run_dir)) is not None:
                log(f"collapsed at step {collapsed}; stopping (stop_on_collapse)")
                save_ckpt(step)
                break
    finally:
        pool.close()
        log_f.close()
    return _write_manifest(cfg, run_dir)


def _collapse(cfg: RunConfig, run_dir: Path) -> int | None:
    ev = read_jsonl(run_dir / "eval.jsonl")
    return collapse_step([e["step"] for e in ev], [e["avg"] for e in ev], frac=cfg.collapse_frac,
                         patience=cfg.collapse_patience)


def _write_manifest(cfg: RunConfig, run_dir: Path) -> dict:
    ev = read_jsonl(run_dir / "eval.jsonl")
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    best = max(ev, key=lambda e: (e["avg"], -e["step"])) if ev else None
    manifest = {
        "name": cfg.name, "status": "complete", "steps": metrics[-1]["step"] if metrics else 0,
        "best_step": best["step"] if best else None, "best_score": best["avg"] if best else None,
        "initial_score": ev[0]["avg"] if ev else None, "final_score": ev[-1]["avg"] if ev else None,
        "collapse_step": _collapse(cfg, run_dir), "finished": time.time(), "versions": _versions(),
    }
    tmp = run_dir / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(run_dir / "manifest.json")  # written last, atomically
    return manifest


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Run one RL grid cell (resumable).")
    ap.add_argument("--config", type=Path, help="a RunConfig JSON (config.json of a run directory)")
    ap.add_argument("--cell", help="a cell name of experiments.grid (with --preset)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--runs", type=Path, default=Path("runs/demo"), help="runs root (with --cell)")
    ap.add_argument("--run-dir", type=Path, help="run directory (default: <runs>/<cell name>)")
    args = ap.parse_args(argv)
    if args.config:
        cfg = RunConfig.load(args.config)
    elif args.cell:
        from experiments import grid

        cells = grid.cells(args.preset)
        if args.cell not in cells:
            raise SystemExit(f"unknown cell {args.cell!r} in preset {args.preset!r}; known: {sorted(cells)}")
        cfg = cells[args.cell]
    else:
        raise SystemExit("give --config or --cell")
    print(json.dumps(run_cell(cfg, args.run_dir or args.runs / cfg.name), indent=2))


if __name__ == "__main__":
    main()
