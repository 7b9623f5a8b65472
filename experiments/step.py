"""One global step of the RL loop, as a function of a set-up `Loop` (PAPER.md "The method").

    loop = build_loop(cfg, model_dir, run_dir, reward_fn=..., grader_pool=...)
    rec = global_step(loop, step)        # the metrics line of `step`

A step: rollout of prompts_per_step x group_size samples with routing capture and dynamic sampling
(experiments.rollout.collect), rewards from the grader, the algorithm step (r3.algorithm.policy_update:
pi_old, mismatch metrics, advantages, TIS, mini-batch updates), the NaN/inf check, and the weight sync
train -> rollout. experiments.run.run_cell schedules steps, evaluation and checkpoints around it;
benchmarks.bench_step times the same function.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from experiments import rollout, task
from experiments.config import RunConfig
from r3.algorithm import policy_update, to_host
from r3.engines.base import RolloutEngine, SamplingParams, TrainEngine

SIGNIFICANT_KEYS = ("mismatch/k3_kl", "actor/loss", "actor/grad_norm")
"""Metrics that stop the run when NaN/inf (the failing step is not checkpointed)."""


class NonFiniteError(FloatingPointError):
    """A NaN or inf loss / gradient: the run stops; its last checkpoint is the last good step."""


@dataclasses.dataclass(kw_only=True)
class Loop:
    """Everything a global step needs, built once per run (`build_loop`)."""

    cfg: RunConfig
    rollout_engine: RolloutEngine
    train_engine: TrainEngine
    stream: Any
    """The prompt stream (experiments.task.TrainStream or experiments.rollout.TableStream); its
    `position` is checkpointed."""
    tokenizer: Any
    template: Any
    """eval.templates entry: problem -> prompt ids, stop tokens."""
    reward_fn: rollout.RewardFn
    params: SamplingParams
    log: Callable[[str], None] = print
    last_batch: Any = None
    """The training batch of the last global step (r3.algorithm.Batch; None when no group was kept):
    for benchmarks that replay the same work elsewhere."""

    @property
    def capture_routing(self) -> bool:
        """Routing is captured (and replayable) when the rollout engine can and the trainer has experts."""
        return self.rollout_engine.capabilities.captures_routing and self.train_engine.is_moe

    def encode(self, problem: str) -> list[int]:
        return self.template.encode(problem, self.tokenizer)

    def decode(self, ids) -> list[str]:
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)


def engine_configs(cfg: RunConfig, model_dir: Path, run_dir: Path) -> tuple[object, object]:
    """(rollout config, train config) of r3.engines.registry for this cell: the one place where a
    RunConfig becomes engine settings; each engine's config takes the fields it has (the registry maps
    them by name, so no engine is named here)."""
    from r3.engines import registry

    rollout = registry.RolloutSettings(
        model_path=str(model_dir),
        precision=cfg.rollout_precision,
        seed=cfg.seed,
        urls=tuple(cfg.rollout_urls),
        weight_sync_dir=str(run_dir / "weight_sync"),
        options=_options(cfg, "rollout_", ("rollout_engine", "rollout_precision", "rollout_urls")),
    )
    train = registry.TrainSettings(
        model_path=str(model_dir),
        lr=cfg.lr,
        seed=cfg.seed,
        options={
            "weight_decay": cfg.weight_decay,
            "grad_clip": cfg.grad_clip,
            **_options(cfg, "train_", ("train_engine", "train_data")),
        },
    )
    return registry.rollout_config_for(cfg.rollout_engine, rollout), registry.train_config_for(cfg.train_engine, train)


def _options(cfg: RunConfig, prefix: str, exclude: tuple[str, ...]) -> dict:
    """RunConfig's `<prefix><name>` settings that differ from their default, as engine config fields
    `<name>` (a setting at its default leaves the engine's own default; RunConfig refuses a changed
    setting the chosen engine's config has no field for)."""
    return {
        f.name.removeprefix(prefix): getattr(cfg, f.name)
        for f in dataclasses.fields(cfg)
        if f.name.startswith(prefix) and f.name not in exclude and getattr(cfg, f.name) != f.default
    }


def check_engines(cfg: RunConfig, rollout_engine, train_engine) -> None:
    """DESIGN.md invariant 3, from the engines' declared capabilities: replay requires a rollout
    engine that captures routing; training requires one that takes weight syncs."""
    from r3.engines import registry

    caps = rollout_engine.capabilities
    if cfg.replay and not caps.captures_routing:
        raise ValueError(
            f"cell {cfg.name!r}: RunConfig.replay=True but the {cfg.rollout_engine!r} rollout engine "
            f"({type(rollout_engine).__name__}) does not capture routing; set replay=False, or "
            f"{registry.capture_hint(cfg.rollout_engine)}"
        )
    if cfg.replay and not train_engine.is_moe:
        raise ValueError(f"cell {cfg.name!r}: RunConfig.replay=True but the training model has no routed experts")
    if not caps.weight_sync:
        raise ValueError(
            f"cell {cfg.name!r}: the {cfg.rollout_engine!r} rollout engine cannot take weight syncs, "
            "so rollout would keep the initial policy while training moves on"
        )


def build_loop(
    cfg: RunConfig,
    model_dir: Path,
    run_dir: Path,
    *,
    reward_fn: rollout.RewardFn,
    train_engine: TrainEngine | None = None,
    log: Callable[[str], None] = print,
) -> Loop:
    """Engines (r3.engines.registry, through `engine_configs`), tokenizer, prompt
    template and stream of a cell; `train_engine` given: a multi-rank driver's proxy."""
    from transformers import AutoTokenizer

    from eval import templates
    from r3.engines.registry import build_rollout_engine, build_train_engine

    synthetic = cfg.train_data == "synthetic"
    if synthetic:
        task.register_benchmark(difficulty=cfg.task_difficulty)
    ro_cfg, tr_cfg = engine_configs(cfg, model_dir, run_dir)
    rollout_engine = build_rollout_engine(ro_cfg)
    train_engine = build_train_engine(tr_cfg) if train_engine is None else train_engine
    check_engines(cfg, rollout_engine, train_engine)
    if rollout_engine.capabilities.sync_reference:  # the post-sync probe scored by the trainer (server mode)
        from r3.engines.sync_check import train_engine_reference

        rollout_engine.set_sync_reference(train_engine_reference(train_engine))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    template = templates.get("arith" if synthetic else "qwen-math-boxed")
    stream = (
        task.TrainStream(seed=cfg.seed, difficulty=cfg.task_difficulty)
        if synthetic
        else rollout.TableStream(cfg.train_data, seed=cfg.seed)
    )
    params = SamplingParams(
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        stop_token_ids=template.stop_token_ids(tokenizer),
    )
    return Loop(
        cfg=cfg,
        rollout_engine=rollout_engine,
        train_engine=train_engine,
        stream=stream,
        tokenizer=tokenizer,
        template=template,
        reward_fn=reward_fn,
        params=params,
        log=log,
    )


def global_step(loop: Loop, step: int) -> dict[str, float]:
    """Global step `step` (seeded by (cfg.seed, step, round): a resumed run resamples the same data);
    returns its metrics line. Raises NonFiniteError (nothing synced) on a NaN/inf loss or gradient."""
    cfg = loop.cfg
    t_step = t0 = time.time()
    if cfg.max_turns > 1:  # episodes of several turns, the prefix's routing from the held rows
        from experiments import multiturn

        ro = multiturn.collect(loop, step)
    else:
        ro = rollout.collect_step(loop, step)
    rec: dict[str, float] = {
        "step": step,
        "time/rollout": time.time() - t0,
        "rollout/reward_mean": ro.reward_mean,
        "rollout/response_len_mean": ro.response_len_mean,
        "rollout/stop_frac": ro.stop_frac,
        "rollout/kept_groups": float(len(ro.kept)),
        "rollout/sampled_groups": float(ro.sampled_groups),
        "rollout/sampling_rounds": float(ro.rounds),
        **ro.extra,
    }
    loop.last_batch = None
    if ro.kept:
        batch = rollout.build_batch(ro.kept, pad_id=loop.tokenizer.pad_token_id, with_routing=loop.capture_routing)
        loop.last_batch = batch
        rec.update(to_host(policy_update(cfg, loop.train_engine, batch)))
        bad = [k for k in SIGNIFICANT_KEYS if k in rec and not (isinstance(rec[k], float) and math.isfinite(rec[k]))]
        if bad:  # no checkpoint of this step: a resumed run redoes it from the last good one, no gap
            loop.log(f"non-finite {bad} at step {step}; run stopped; the step's metrics: {json.dumps(rec)}")
            raise NonFiniteError(
                f"cell {cfg.name!r}: non-finite {', '.join(f'{k}={rec[k]}' for k in bad)} at global step "
                f"{step}; the run stopped without checkpointing this step (the step's metrics are in its "
                f"log.txt); likely cause: lr {cfg.lr} too high or a broken batch"
            )
        t0 = time.time()
        loop.rollout_engine.sync_weights(loop.train_engine.rollout_state_dict())
        rec["time/sync"] = time.time() - t0
    rec["time/step"] = time.time() - t_step
    rec["time"] = time.time()
    return rec
