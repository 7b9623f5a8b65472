"""Run configuration: one frozen dataclass describes one grid cell completely.

Every setting that changes a result lives here (STYLE.md rule 5): the grid in
`experiments.grid` builds these, the run loop in `experiments.run` reads them, and the
run directory keeps a copy (`config.json`) so plots and resumption never guess.

Values the paper does not publish (PAPER.md, "Setup") are marked "not published" in their
docstring; their defaults follow the common choices PAPER.md lists.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, ClassVar, Literal

from r3.engines import registry
from r3.engines.base import Precision
from r3.losses import LossAgg

Algorithm = Literal["grpo", "gspo"]
ModelKind = Literal["base", "sft", "dense"]
RolloutEngineName = str
"""A name registered in r3.engines.registry (checked in __post_init__)."""
TrainEngineName = str


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    """One RL run (one cell of the grid)."""

    RENAMED: ClassVar[dict[str, str]] = {"sglang_urls": "rollout_urls"}
    """Keys of config.json files written by older versions -> today's field (read by from_dict and
    r3.rundir.read_config)."""

    name: str
    """Cell name; also the run directory's name under the runs root."""
    preset: Literal["tiny", "paper"] = "tiny"
    """Which preset built it: `tiny` (embedded CPU zoo) or `paper` (Qwen3-30B-A3B on Slurm)."""
    seed: int = 0
    """Seed for prompt order, sampling and initialisation; same seed, same metrics."""

    # --- model ---------------------------------------------------------------------------
    model: ModelKind = "sft"
    """Starting checkpoint kind: the Base model, its SFT model, or the dense control."""
    model_path: str | None = None
    """Checkpoint directory (HF format). None: the embedded zoo's model of kind `model`."""
    zoo_dir: str | None = None
    """Embedded zoo directory used when model_path is None (None: runs/zoo, built when missing)."""

    # --- algorithm -----------------------------------------------------------------------
    algorithm: Algorithm = "grpo"
    """Policy loss: GRPO (PPO token clip) or GSPO (sequence-ratio clip)."""
    replay: bool = False
    """R3: replay the rollout engine's routing in every training forward."""
    routing_probe: bool = True
    """With R3: one extra no-grad forward per step that routes natively, so the run still logs how
    much routing replay overrode (routing/*_disagreement). Metrics only; off saves that forward."""
    tis: bool = False
    """Truncated importance sampling on pi_old / pi_infer (detached), capped at `tis_cap`."""
    tis_cap: float = 2.0
    """TIS cap C (not published; common default 2)."""
    mini_steps: int = 1
    """Optimizer steps per global step; the batch is split into this many mini-batches."""
    lr: float = 1e-6
    """Adam learning rate (paper: 1e-6 multi-mini-step, 3e-6 single-mini-step)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Global gradient-norm clip."""
    clip_low: float = 0.2
    """PPO lower clip (not published; common default 0.2)."""
    clip_high: float = 0.2
    """PPO upper clip (not published; common default 0.2)."""
    dual_clip: float | None = 3.0
    """Dual-clip bound c for negative advantages (None disables)."""
    gspo_clip_low: float = 3e-4
    """GSPO sequence-ratio lower clip (common default)."""
    gspo_clip_high: float = 4e-4
    """GSPO sequence-ratio upper clip (common default)."""
    loss_agg: LossAgg = "token-mean"
    """Loss aggregation for GRPO (GSPO always uses seq-mean-token-mean)."""
    std_normalize: bool = True
    """GRPO advantage divides by the group std (+1e-6)."""

    # --- rollout -------------------------------------------------------------------------
    global_steps: int = 60
    """Global steps (paper: 180)."""
    prompts_per_step: int = 16
    """Prompts per global step after dynamic sampling (not published for the paper)."""
    group_size: int = 8
    """Responses per prompt, G (not published)."""
    max_new_tokens: int = 48
    """Maximum response length in tokens (not published)."""
    temperature: float = 1.0
    """Sampling temperature for training rollouts (> 0); the trainer scores under the same
    temperature (DESIGN.md invariant 6)."""
    top_p: float = 1.0
    """Nucleus sampling for training rollouts: 1 only (the trainers score the untruncated
    distribution; a truncated rollout would make every mismatch metric compare two distributions)."""
    dynamic_sampling: bool = True
    """Drop groups whose rewards are all equal; keep sampling until the batch is full."""
    max_sampling_rounds: int = 4
    """Cap on extra sampling rounds per step when dynamic sampling cannot fill the batch."""
    gen_prompts_per_round: int = 0
    """Prompts sampled per dynamic-sampling round (0: prompts_per_step). Larger oversamples, as
    DAPO's generation batch (verl `data.gen_batch_size`): one big round fills the batch where
    several small ones would, and a batched engine samples it faster; kept groups beyond
    prompts_per_step are dropped, in stream order. Not published for the paper."""
    rollout_engine: RolloutEngineName = "hf"
    """Inference engine, a name of r3.engines.registry: in-process transformers (`hf`), SGLang
    servers (`sglang`), vLLM (`vllm`, when registered)."""
    rollout_precision: Precision = "bf16"
    """Rollout numerics: bf16 (default engine) or an FP8 inference engine (e4m3, per-row)."""
    rollout_urls: tuple[str, ...] = ()
    """Servers of a server-backed rollout engine (cluster mode); the Slurm job launches them and fills
    this when empty (the engine says what servers it needs: r3.engines.registry.server_launcher)."""
    train_engine: TrainEngineName = "hf"
    """Training engine: transformers fp32 (`hf`) or megatron-core (`megatron`)."""
    train_micro_batch: int = 0
    """Sequences per forward/backward micro-batch (0: the whole mini-batch at once)."""
    train_max_tokens_per_micro_batch: int = 0
    """transformers trainer: length-grouped micro-batches of at most this many padded tokens, each
    trimmed to its longest row (0: off; r3.engines.hf.config.HFTrainConfig). Excludes train_micro_batch."""
    train_tensor_parallel: int = 1
    """megatron TP size, with sequence parallelism when > 1 (train_engine 'megatron')."""
    train_pipeline_parallel: int = 1
    """megatron PP size (train_engine 'megatron'): decoder layers split over PP stages, megatron's 1F1B schedule."""
    train_expert_parallel: int = 1
    """megatron EP size: each MoE layer's experts split over this many training ranks; data
    parallelism is the rest (DP = training ranks / (TP x PP)); r3.engines.megatron.parallel."""
    train_recompute: bool = False
    """megatron full activation recompute (replay then runs again in backward: REPLAY_BACKWARD)."""
    train_precision: Literal["fp32", "bf16"] = "fp32"
    """megatron trainer numerics: fp32 (embedded default), or bf16 parameters with fp32 main grads
    and megatron's distributed optimizer (what a 30B model needs; r3.engines.megatron.optim)."""

    rollout_max_num_batched_tokens: int = 0
    """vLLM rollout: tokens scheduled per engine step (VLLMRolloutConfig.max_num_batched_tokens; 0: vLLM's
    default, 2048). vLLM's CPU build (0.30.0) fails a seeded request whose prefill is split over steps
    (gpu_model_runner._bookkeeping_sync calls Generator.get_offset, which a CPU generator lacks:
    "CPU Generator does not use offset"); long multi-turn prompts need a budget that holds a whole batch."""
    max_turns: int = 1
    """Model turns per episode (experiments.multiturn): 1 is single-turn; more lets the synthetic task's
    environment answer a wrong answer with a hint (environment tokens, masked out of the loss) and the
    model answer again on the same sequence, up to this many times; the reward is the last answer's.
    Each turn's prefix routing comes from the rows already held (router-mask caching, PAPER.md)."""

    # --- data ------------------------------------------------------------------------------
    train_data: str = "synthetic"
    """Training prompts: `synthetic` (embedded task) or a data_prep output directory/parquet."""
    task_difficulty: int = 2
    """Embedded synthetic task difficulty knob (ignored for real data)."""

    # --- evaluation, collapse, checkpoints --------------------------------------------------
    eval_every: int = 5
    """Evaluate every this many global steps (paper: 5), and at step 0."""
    eval_benchmarks: tuple[str, ...] = ("synthetic",)
    """Benchmarks evaluated in the loop (paper: aime24, aime25, amc23, math500, math500_l5)."""
    eval_samples: int = 1
    """Samples per problem at evaluation (avg@k)."""
    eval_temperature: float = 1.0
    """Sampling temperature at evaluation."""
    eval_max_problems: int = 0
    """Cap on problems per benchmark (0: all)."""
    eval_batch_size: int = 64
    """Prompts per rollout-engine call at evaluation (eval.run); part of the eval sampling seed."""
    collapse_frac: float = 0.5
    """Collapse rule: the eval average falls below this fraction of its running best ..."""
    collapse_patience: int = 2
    """... at this many consecutive evaluation points (it does not recover)."""
    stop_on_collapse: bool = False
    """Stop the run at the collapse step (the paper runs on; default keeps going)."""
    checkpoint_every: int = 5
    """Write a resumable checkpoint every this many global steps (and at the end)."""
    keep_checkpoints: int = 2
    """Keep the newest N checkpoints (older ones are deleted after a newer one is complete)."""

    log_to: tuple[str, ...] = ()
    """Mirror each step's metrics to these backends besides metrics.jsonl: `tensorboard`, `wandb`
    (experiments.tracking; off by default; W&B honours WANDB_MODE=offline)."""
    wandb_project: str = "r3"
    """W&B project name (with `wandb` in log_to)."""
    rollout_fp8_scope: Literal["router", "all", "w8a8"] = "router"
    """FP8 rollout (hf engine, precision fp8): quantise the MoE routers only, or every linear layer (per-row e4m3),
    or `w8a8` as FP8 serving does (weights and per-token dynamic activations of every linear layer but the
    routers and lm_head, which stay bf16; r3.engines.hf.fp8)."""
    rollout_fp32_attention: bool = False
    """Transformers bf16/fp8 rollout: attention with fp32 internals (HFRolloutConfig.fp32_attention: faster
    on CPU, GPU-serving-like accumulation); off keeps torch's bf16 kernel, as the documented measurements."""
    rollout_router_noise: float = 0.0
    """Mismatch dose, rollout only: std of seeded Gaussian noise on the inference engine's router logits
    before top-k (gate weights from the clean logits): a routing-only mismatch that R3 removes, the analogue
    of two engines' kernels disagreeing (r3.engines.hf.noise; calibrated doses: docs/study.md "Doses"). 0: off."""
    rollout_logit_noise: float = 0.0
    """Mismatch dose, rollout only: std of seeded Gaussian noise on the inference engine's output logits; the
    rollout samples from and reports that distribution: a non-routing mismatch that R3 cannot remove. 0: off."""
    zoo_size: str | None = None
    """Zoo recipe (experiments.zoo.SIZES) expected in zoo_dir when model_path is None; None: whatever zoo is there."""

    def __post_init__(self) -> None:
        from r3.engines.base import PRECISIONS
        from r3.engines.registry import rollout_engine_names, train_engine_names

        errors = []

        def choice(field: str, allowed) -> None:
            if getattr(self, field) not in allowed:
                errors.append(f"{field}={getattr(self, field)!r} is not one of {sorted(allowed)}")

        choice("algorithm", Algorithm.__args__)
        choice("model", ModelKind.__args__)
        choice("rollout_engine", rollout_engine_names())
        choice("train_engine", train_engine_names())
        choice("rollout_precision", PRECISIONS)
        choice("loss_agg", LossAgg.__args__)
        for field in (
            "eval_every",
            "checkpoint_every",
            "keep_checkpoints",
            "global_steps",
            "prompts_per_step",
            "max_new_tokens",
            "max_sampling_rounds",
            "eval_samples",
            "eval_batch_size",
            "collapse_patience",
        ):
            if getattr(self, field) < 1:
                errors.append(f"{field} must be >= 1, got {getattr(self, field)}")
        if self.train_micro_batch < 0:
            errors.append(f"train_micro_batch must be >= 0 (0: whole mini-batch), got {self.train_micro_batch}")
        if self.train_max_tokens_per_micro_batch and self.train_micro_batch:
            errors.append(
                f"set train_micro_batch (fixed rows) or train_max_tokens_per_micro_batch (length-grouped), not both; "
                f"got {self.train_micro_batch} and {self.train_max_tokens_per_micro_batch}"
            )
        par = (self.train_tensor_parallel, self.train_pipeline_parallel, self.train_expert_parallel)
        if min(par) < 1:
            errors.append(f"train_tensor/pipeline/expert_parallel = {par} must be >= 1")
        # <kind>_<x> applies to the chosen engine when its config has a field <x> (experiments.step
        # passes changed settings by name): a changed setting it has no field for is refused, not ignored
        for kind, engine, names, has, own in (
            ("train", self.train_engine, registry.train_engine_names(), registry.train_config_has,
             ("train_engine", "train_data")),
            ("rollout", self.rollout_engine, registry.rollout_engine_names(), registry.rollout_config_has,
             ("rollout_engine", "rollout_precision", "rollout_urls")),
        ):  # fmt: skip
            if engine not in names:  # unknown names are reported above
                continue
            for f in dataclasses.fields(self):
                key = f.name.removeprefix(f"{kind}_")
                if key == f.name or f.name in own or getattr(self, f.name) == f.default or has(engine, key):
                    continue
                having = [n for n in names if has(n, key)]
                errors.append(
                    f"{f.name}={getattr(self, f.name)!r} is not a setting of the {engine!r} {kind} engine (its "
                    f"config has no field {key!r}); use a {kind} engine that has it {having}, or drop it"
                )
        if self.train_precision not in ("fp32", "bf16"):
            errors.append(f"train_precision must be 'fp32' or 'bf16', got {self.train_precision!r}")
        if self.lr <= 0 or self.grad_clip <= 0:
            errors.append(f"lr and grad_clip must be > 0, got lr={self.lr}, grad_clip={self.grad_clip}")
        if self.dual_clip is not None and self.dual_clip <= 1:
            errors.append(f"dual_clip must be > 1 (common value 3) or None to disable, got {self.dual_clip}")
        if self.tis_cap <= 0:
            errors.append(f"tis_cap must be > 0 (common value 2), got {self.tis_cap}")
        if not (0 <= self.clip_low < 1 and self.clip_high >= 0):
            errors.append(f"need 0 <= clip_low < 1 and clip_high >= 0, got {self.clip_low}, {self.clip_high}")
        if not self.temperature > 0:
            errors.append(
                f"temperature must be > 0 for training rollouts (the trainer scores softmax(logits / temperature)), "
                f"got {self.temperature}; greedy decoding gives a group identical samples"
            )
        if self.top_p != 1:
            errors.append(
                f"top_p must be 1 for training rollouts, got {self.top_p}: the trainers score the untruncated "
                "tempered distribution, so a truncated rollout would make pi_old / pi_infer (k3 KL, F(tau), TIS, "
                "the PPO ratio) compare different distributions; truncate at evaluation only"
            )
        bad_backends = sorted(set(self.log_to) - {"tensorboard", "wandb"})
        if bad_backends:
            errors.append(f"log_to has unknown backends {bad_backends}; allowed: ['tensorboard', 'wandb']")
        if self.algorithm == "gspo" and self.tis:
            # The GSPO loss here has no importance-weight input, and the paper publishes no GSPO+TIS
            # form (its GSPO cells are GSPO and GSPO+R3 only): refuse rather than log a TIS that
            # is not applied.
            errors.append(
                "tis=True with algorithm='gspo' is not supported (TIS would not be applied); "
                "use algorithm='grpo' for TIS, or tis=False"
            )
        known = self.rollout_engine in registry.rollout_engine_names()  # unknown names are reported above
        if known and not self.rollout_urls and self.preset == "tiny" and registry.server_only(self.rollout_engine):
            errors.append(
                f"rollout_engine={self.rollout_engine!r} runs on servers only: set rollout_urls, or use the paper "
                "preset on a cluster (slurm.submit launches the servers)"
            )
        if self.mini_steps < 1:
            errors.append(f"mini_steps must be >= 1, got {self.mini_steps}")
        if self.group_size < 2:
            errors.append(f"group_size must be >= 2 for group advantages, got {self.group_size}")
        if self.mini_steps >= 1 and self.prompts_per_step % self.mini_steps:
            errors.append(
                f"prompts_per_step ({self.prompts_per_step}) must be divisible by mini_steps "
                f"({self.mini_steps}) so every mini-batch holds whole groups"
            )
        if self.gen_prompts_per_round and self.gen_prompts_per_round < self.prompts_per_step:
            errors.append(
                f"gen_prompts_per_round ({self.gen_prompts_per_round}) must be 0 or >= prompts_per_step "
                f"({self.prompts_per_step}): a round samples at least one batch"
            )
        if self.rollout_max_num_batched_tokens < 0:
            errors.append(f"rollout_max_num_batched_tokens must be >= 0 (0: vLLM's default), got "
                          f"{self.rollout_max_num_batched_tokens}")  # fmt: skip
        if self.max_turns < 1:
            errors.append(f"max_turns must be >= 1 (1: single-turn), got {self.max_turns}")
        elif self.max_turns > 1 and self.train_data != "synthetic":
            errors.append(
                f"max_turns={self.max_turns} needs train_data='synthetic', got {self.train_data!r}: the multi-turn "
                "environment (experiments.multiturn) replies with steps of the synthetic task's worked solution, "
                "which a data_prep table does not have; use max_turns=1 for table data"
            )
        if self.model == "dense" and self.replay:
            errors.append("replay needs an MoE model; the dense control has no router")
        choice("rollout_fp8_scope", ("router", "all", "w8a8"))
        for field in ("rollout_router_noise", "rollout_logit_noise"):
            std = getattr(self, field)
            if not (isinstance(std, (int, float)) and math.isfinite(std) and std >= 0):
                errors.append(f"{field} must be a finite std >= 0 in logit units (0: off), got {std!r}")
        router_noise = self.rollout_router_noise
        if self.model == "dense" and isinstance(router_noise, (int, float)) and router_noise > 0:
            errors.append(
                f"rollout_router_noise={self.rollout_router_noise} needs an MoE model; the dense control has no router"
            )
        if not 0 < self.collapse_frac < 1:
            errors.append(f"collapse_frac must be in (0, 1), got {self.collapse_frac}")
        if errors:
            raise ValueError(f"invalid RunConfig {self.name!r}: " + "; ".join(errors))

    # --- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        d = {cls.RENAMED.get(k, k): v for k, v in d.items()}  # config.json files of older versions
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"unknown RunConfig fields {unknown}; known: {sorted(known)}")
        kw = {}
        for k, v in d.items():
            if isinstance(v, list):  # JSON has no tuples
                v = tuple(v)
            kw[k] = v
        return cls(**kw)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: Path) -> "RunConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def replace(self, **changes: Any) -> "RunConfig":
        return dataclasses.replace(self, **changes)
