"""The collapse study's cells as Python (STYLE.md rule 5): arms x mismatch levels x seeds, per plan.

Issue 11: reproduce, at CPU scale, the instability R3 prevents (or show with evidence that it does
not appear here). A cell is one single-mini-step RL run on the embedded zoo's SFT model:

    <plan>-<level>-<arm>-s<seed>        e.g. full-fp8all-grpo-r3-s2

- arm: `grpo`, `grpo-tis`, `grpo-r3`, `grpo-tis-r3` (PAPER.md, single-mini-step table);
- level: the source and strength of the training-inference mismatch, a dose of the calibrated
  ladder of the plan's zoo (experiments.doses.ladder: RunConfig fields with a physical meaning): bf16 rollout, FP8
  rollouts (routers, every linear layer, W8A8 serving), vLLM's bf16 kernels, router-logit noise
  and output-logit noise at the paper's per-token KL and 3x and 10x it, and the fp32 control;
- seed: prompt order, sampling and initialisation (`RunConfig.seed`).

A plan (`_Plan`, one function per plan in `PLANS`) fixes everything else: zoo size (model scale),
task difficulty and response length, global steps, learning rates, batch shape, evaluation, and
`stop_on_collapse`. The collapse step is `r3.collapse` (eval average below 0.5 x its
running best for 2 consecutive evaluation points, never recovering), checked after every step;
with stop_on_collapse the run stops there.

Step times (`STEP_SECONDS`) are measured values (docs/study.md) used to print a plan's cost.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from experiments import grid, zoo
from experiments.config import RunConfig
from experiments.doses import ladder

# --- arms: the paper's methods ---------------------------------------------------
ARMS: dict[str, dict[str, bool]] = {
    "grpo": {"tis": False, "replay": False},
    "grpo-tis": {"tis": True, "replay": False},
    "grpo-r3": {"tis": False, "replay": True},
    "grpo-tis-r3": {"tis": True, "replay": True},
    "gspo": {"algorithm": "gspo", "tis": False, "replay": False},
    "gspo-r3": {"algorithm": "gspo", "tis": False, "replay": True},
}


def arm_of(cfg: RunConfig) -> str:
    """The arm (ARMS key) whose fields `cfg` has."""
    for name, fields in ARMS.items():
        if all(getattr(cfg, k) == v for k, v in {"algorithm": "grpo", **fields}.items()):
            return name
    raise ValueError(f"cell {cfg.name!r}: algorithm={cfg.algorithm} tis={cfg.tis} replay={cfg.replay} is no study arm")


# --- plans ------------------------------------------------------------------------------------------
# RunConfig fields every study cell shares unless its plan overrides them (`_Plan.run`): the tiny
# preset's batch shape and evaluation, single-mini-step GRPO on the SFT model, stopped at collapse.
_STUDY_RUN: Mapping[str, Any] = dict(
    preset="tiny", model="sft", algorithm="grpo", mini_steps=1, global_steps=150,
    task_difficulty=2,  # experiments.task difficulty (2 = what the zoo was trained on; 3-4: longer chains)
    max_new_tokens=48, prompts_per_step=16, group_size=8, eval_every=5,
    eval_max_problems=0,  # all 512 held-out problems (one eval point has a standard error of ~2.2 points)
    dynamic_sampling=True, max_sampling_rounds=4, checkpoint_every=5,
    stop_on_collapse=True,  # a collapsed cell costs only the steps up to its collapse
)  # fmt: skip


_STUDY_ZOO_RUN: Mapping[str, Any] = dict(
    task_difficulty=5,  # the `study` zoo's level: rewritten chains, 63-188 response tokens
    max_new_tokens=256, global_steps=50, stop_on_collapse=False,  # the late score needs every step
    # GRPO lifts this zoo from about 41% to above 90% within 10-20 steps; after that most groups are
    # all-correct, and dynamic sampling at 4 rounds of 16 prompts spent 20-50 s per step on rollout.
    # One round of 24 prompts (more in one batched call) and at most 2 rounds bound it.
    gen_prompts_per_round=24, max_sampling_rounds=2, eval_batch_size=512,
)  # fmt: skip
"""Plan fields shared by the plans on the `study` zoo."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Plan:
    """Everything a plan fixes besides (arm, level, seed). RunConfig fields are not re-declared here:
    `run` holds the plan's values of them (over `_STUDY_RUN`), checked against RunConfig's fields."""

    name: str
    zoo_size: str
    """experiments.zoo.SIZES key: model scale (also RunConfig.zoo_size, and which zoo is built)."""
    levels: tuple[str, ...]
    arms: tuple[str, ...]
    seeds: tuple[int, ...]
    lrs: tuple[float, ...]
    """Learning rates (an axis when several: the cell name then carries `-lr<value>`)."""
    run: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """RunConfig fields of every cell of the plan, over `_STUDY_RUN`."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.run) - {f.name for f in dataclasses.fields(RunConfig)})
        if unknown:
            raise ValueError(f"study plan {self.name!r}: {unknown} are not RunConfig fields")


def _full() -> _Plan:
    """The sweep run for docs/study.md: the strongest default mismatch (FP8 rollout of every linear
    layer), GRPO / GRPO+TIS / GRPO+R3, 3 seeds, 150 steps each (or to collapse), lr 1e-4.
    The pilot chose them: at lr 3e-4 every arm (R3 included) lost about 8 points within 5 steps, an
    LR effect, not a mismatch one; at 1e-4 nothing degraded in 30 steps, and fp8all has the
    largest native k3 KL (about 4x fp8router, 7x bf16). Weaker doses with seeds: plan `dose`."""
    return _Plan(
        name="full",
        zoo_size="tiny",
        levels=("fp8all",),
        arms=("grpo", "grpo-tis", "grpo-r3"),
        seeds=(0, 1, 2),
        lrs=(1e-4,),
    )


def _dose() -> _Plan:
    """The dose axis with seeds (not run yet: about 1.5 h on 2 idle cores): the weaker doses, GRPO vs
    GRPO+R3, 3 seeds, 150 steps; with `full` it gives the dose-response figure three doses."""
    return _Plan(
        name="dose",
        zoo_size="tiny",
        levels=("bf16", "fp8router"),
        arms=("grpo", "grpo-r3"),
        seeds=(0, 1, 2),
        lrs=(1e-4,),
    )


def _pilot() -> _Plan:
    """Find the regime first: one seed, GRPO vs GRPO+R3, every default level, two learning rates,
    30 steps. A cell that collapses here (or a native/R3 gap) picks the full sweep's level and lr."""
    return _Plan(
        name="pilot",
        zoo_size="tiny",
        levels=("bf16", "fp8router", "fp8all"),
        arms=("grpo", "grpo-r3"),
        seeds=(0,),
        lrs=(1e-4, 3e-4),
        run=dict(global_steps=30),
    )


def _on_study_zoo(name: str, levels: tuple[str, ...], arms: tuple[str, ...], **run: Any) -> _Plan:
    """A plan on the `study` zoo: 3 seeds, lr 1e-4, `_STUDY_ZOO_RUN` with `run` over it."""
    return _Plan(name=name, zoo_size="study", levels=levels, arms=arms, seeds=(0, 1, 2), lrs=(1e-4,),
                 run={**_STUDY_ZOO_RUN, **run})  # fmt: skip


def _learn() -> _Plan:
    """The gate before any mismatch cell: on the `study` zoo with an fp32 rollout (no mismatch), does
    GRPO raise the late held-out score (mean of the last quarter of evaluation points) by 10 points
    over step 0, on 3 seeds? The study plan's fp32 control cells are these."""
    return _on_study_zoo("learn", ("fp32",), ("grpo",))


def _study() -> _Plan:
    """The sweep on the `study` zoo: routing-only doses (router noise at the paper's per-token k3 KL,
    3x and 10x it) and the non-routing control (logit noise at 3x, matched in per-token KL to
    router-3x: if KL alone hurt, R3 could not help there), GRPO vs GRPO+R3, 3 seeds, 50 steps; the
    zero-mismatch control is plan `learn` (same seeds and steps)."""
    return _on_study_zoo("study", ("router-1x", "router-3x", "router-10x", "logit-3x"), ("grpo", "grpo-r3"))


def _study_tis() -> _Plan:
    """TIS at the strongest routing dose: GRPO+TIS and GRPO+TIS+R3 beside plan `study`'s cells."""
    return _on_study_zoo("studytis", ("router-10x",), ("grpo-tis", "grpo-tis-r3"))


def _ministeps() -> _Plan:
    """The paper's multi-mini-step setting (8 optimizer steps per global step, each on an eighth of
    the groups, where its GRPO collapsed by step 120) at the strongest routing dose: GRPO, GRPO+R3,
    GSPO, GSPO+R3. Every sample is still trained on once, so a step costs about what a
    single-mini-step one does, plus the pi_old forward that no longer fuses into the update."""
    return _on_study_zoo("ministeps", ("router-10x",), ("grpo", "grpo-r3", "gspo", "gspo-r3"), mini_steps=8)


def _strong() -> _Plan:
    """Routing doses beyond the paper's range (30x and 100x its per-token k3 KL), GRPO vs GRPO+R3:
    where does single-mini-step GRPO start to break on this zoo, if anywhere?"""
    return _on_study_zoo("strong", ("router-100x", "router-30x"), ("grpo", "grpo-r3"))


def _strong_tis() -> _Plan:
    """TIS where routing noise costs GRPO the most (router-100x): GRPO+TIS and GRPO+TIS+R3 beside
    plan `strong`'s GRPO and GRPO+R3 cells (same seeds, so they pair)."""
    return _on_study_zoo("strongtis", ("router-100x",), ("grpo-tis", "grpo-tis-r3"))


def _strong_logit() -> _Plan:
    """The non-routing control at router-100x's per-token KL: output-logit noise, which R3 cannot
    remove. If GRPO loses as much here as under router-100x, the KL, not the routing, costs it."""
    return _on_study_zoo("stronglogit", ("logit-100x",), ("grpo", "grpo-r3"))


def _ministeps_control() -> _Plan:
    """The zero-mismatch control of `ministeps`: fp32 rollout, GRPO, 8 mini-steps. Without it a
    lower score in `ministeps` could be the mini-steps' (more off-policy updates), not the dose's."""
    return _on_study_zoo("ministepsctl", ("fp32",), ("grpo",), mini_steps=8)


def _long() -> _Plan:
    """The response-length axis: difficulty 3 (3-5 operands, about 1.5x longer chains of thought),
    96 new tokens, on the tiny zoo, strongest default level only."""
    return _Plan(
        name="long",
        zoo_size="tiny",
        levels=("fp8all",),
        arms=("grpo", "grpo-tis", "grpo-r3"),
        seeds=(0, 1, 2),
        lrs=(1e-4,),
        run=dict(task_difficulty=3, max_new_tokens=96),
    )


def _smoke() -> _Plan:
    """Seconds per cell on the micro zoo (tests): proves the command end to end, measures nothing.
    No dynamic sampling, so every step trains and logs its mismatch even when all rewards are 0."""
    return _Plan(
        name="smoke",
        zoo_size="micro",
        levels=("fp8router",),
        arms=("grpo", "grpo-r3"),
        seeds=(0,),
        lrs=(1e-3,),
        run=dict(
            global_steps=2, max_new_tokens=12, prompts_per_step=4, group_size=4, eval_every=1,
            eval_max_problems=8, dynamic_sampling=False, max_sampling_rounds=1, checkpoint_every=1,
            stop_on_collapse=False,
        ),
    )  # fmt: skip


PLANS: dict[str, Callable[[], _Plan]] = {
    "full": _full,
    "dose": _dose,
    "pilot": _pilot,
    "learn": _learn,
    "study": _study,
    "strong": _strong,
    "strongtis": _strong_tis,
    "stronglogit": _strong_logit,
    "studytis": _study_tis,
    "ministeps": _ministeps,
    "ministepsctl": _ministeps_control,
    "long": _long,
    "smoke": _smoke,
}

STEP_SECONDS: dict[str, float] = {"tiny": 3.8, "study": 22.0}
"""Measured seconds per global step of one cell (one torch thread; rollout with dynamic sampling,
old logprobs, update, sync; evaluation excluded), per zoo size: the median `time/step` of the
tiny pilot in docs/study.md (6 cells) and of the `learn` cells after their first 10 steps (two at a
time on the 2 cores). Used for the cost printed before a study when the output directory holds no
steps yet."""
EVAL_SECONDS: dict[str, float] = {"tiny": 6.3, "study": 16.0}
"""Measured seconds per evaluation point (512 held-out problems, one sample) in the same runs."""


def _lr_text(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-").replace("+0", "")


def cell(plan: _Plan, *, level: str, arm: str, seed: int, lr: float, zoo_dir: Path) -> RunConfig:
    """One study cell: the SFT model, single-mini-step GRPO with the arm's TIS/R3, at `level`."""
    doses = ladder(plan.zoo_size)
    if level not in doses or arm not in ARMS:
        raise ValueError(
            f"unknown level {level!r} or arm {arm!r}; levels of zoo {plan.zoo_size!r} {sorted(doses)}, "
            f"arms {sorted(ARMS)}"
        )
    name = f"{plan.name}-{level}-{arm}" + (f"-lr{_lr_text(lr)}" if len(plan.lrs) > 1 else "") + f"-s{seed}"
    fields = {**_STUDY_RUN, **plan.run, **ARMS[arm], **doses[level].run_fields()}
    return RunConfig(name=name, seed=seed, zoo_dir=str(zoo_dir), zoo_size=plan.zoo_size, lr=lr, **fields)


def plan(name: str) -> _Plan:
    if name not in PLANS:
        raise ValueError(f"unknown study plan {name!r}; plans: {sorted(PLANS)}")
    return PLANS[name]()


def cells(plan_name: str, *, zoo_dir: Path | None = None, pattern: str | None = None,
          **overrides: Any) -> dict[str, RunConfig]:  # fmt: skip
    """The plan's cells {name: RunConfig}, seeds innermost-last so seed 0 of every cell runs first.

    pattern: comma-separated globs on cell names. overrides: RunConfig fields for every cell
    (debugging, e.g. global_steps=10 to time a pilot)."""
    p = plan(plan_name)
    zdir = Path(zoo_dir).resolve() if zoo_dir else zoo.default_zoo_dir(p.zoo_size)
    out: dict[str, RunConfig] = {}
    for seed in p.seeds:
        for lr in p.lrs:
            for level in p.levels:
                for arm in p.arms:
                    c = cell(p, level=level, arm=arm, seed=seed, lr=lr, zoo_dir=zdir)
                    if not grid.select([c.name], pattern):  # the grid's one glob rule
                        continue
                    out[c.name] = c.replace(**overrides) if overrides else c
    return out
