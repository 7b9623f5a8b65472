"""One global step's data: sample groups, reward them with the grader, dynamic sampling, batching.

Dynamic sampling (PAPER.md "Setup"; DAPO): a group whose G rewards are all equal (all right or
all wrong) carries no GRPO signal and is dropped; sampling continues, `gen_prompts` fresh
prompts per round (default `prompts_per_step`; more oversamples, as DAPO's generation batch),
until `prompts_per_step` groups are kept, in stream order, or `max_sampling_rounds` rounds
have run (the cap). A step that ends short trains on the groups it has (at least one); a step
with none skips the update (recorded as `rollout/kept_groups` = 0).

Batching: sequence i = prompt_i + response_i, right-padded to S; target position t predicts
token t+1, so response token j of sequence i sits at t = len(prompt_i) - 1 + j in every [B, T]
tensor (T = S - 1), and the routing trace (len(prompt_i) + len(response_i) - 1 rows, one per
fed token, DESIGN.md invariant 1) fills rows 0.. of expert_ids_BTLK, padding rows holding
r3.trace's distinct dummy experts. A multi-turn sample (experiments.multiturn.EpisodeSample) carries
`loss_mask_R`, 0 on the environment's tokens inside its response: those positions stay out of the
loss and of every mismatch metric (they were fed, so their routing rows stay in the trace).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

from experiments import task
from r3.algorithm import Batch
from r3.engines.base import RolloutEngine, RolloutSample, SamplingParams, TrainBatch
from r3.trace import pad_traces

RewardFn = Callable[[Sequence[str], Sequence[str]], list[float]]
"""reward_fn(responses, gold_answers) -> rewards (1.0 right, 0.0 wrong)."""
SampleFn = Callable[[list[task.Problem], list[list[int]], SamplingParams], tuple[list[RolloutSample], list[float]]]
"""sample_fn(problems, prompts, params) -> (samples, rewards), one problem and prompt per sample: a
round's sampling and grading when it is not one generate call (experiments.multiturn)."""


@dataclasses.dataclass(kw_only=True)
class Group:
    """G responses to one prompt, with their rewards."""

    problem: task.Problem
    samples: list[RolloutSample]
    rewards: list[float]

    @property
    def informative(self) -> bool:
        """Not all rewards equal: the group has a nonzero GRPO advantage somewhere."""
        return max(self.rewards) != min(self.rewards)


@dataclasses.dataclass(kw_only=True)
class StepRollout:
    """The groups kept for training plus the bookkeeping of how they were obtained."""

    kept: list[Group]
    sampled_groups: int
    rounds: int
    reward_mean: float
    """Mean reward over every sampled response (kept or not)."""
    response_len_mean: float
    """Mean response length in tokens over every sampled response (sampled tokens: a multi-turn
    response's environment tokens are not counted)."""
    stop_frac: float
    """Fraction of sampled responses that ended with EOS (the rest hit max_new_tokens)."""
    extra: dict[str, float] = dataclasses.field(default_factory=dict)
    """Further metrics of the step's sampling (multiturn/* of experiments.multiturn)."""


def sampling_seed(run_seed: int, step: int, round_: int) -> int:
    """The rollout seed of (run, step, round): a resumed run resamples exactly the same data."""
    return (run_seed * 1_000_003 + step * 101 + round_) % (2**62)


def select_groups(groups: Sequence[Group], needed: int, *, dynamic: bool) -> list[Group]:
    """Keep up to `needed` groups in order: informative ones only when `dynamic`."""
    pool = [g for g in groups if g.informative] if dynamic else list(groups)
    return pool[:needed]


class TableStream:
    """Training prompts from a data_prep table, shuffled by seed, cycled; `position` is the state
    (same interface as experiments.task.TrainStream).

    Read through `data_prep.load_train`, the data stage's own loader: a build directory whose
    manifest (written last) is missing, incomplete or does not match train.parquet is refused, so
    an interrupted build is never trained on."""

    def __init__(self, path: str, *, seed: int, position: int = 0):
        from data_prep import load_train

        rows = load_train(path)
        if not rows:
            raise ValueError(
                f"train_data {path}: expected at least one row, found an empty table; "
                "rerun `python -m data_prep.build` with looser filters"
            )
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
        self._rows = [rows[i] for i in order]
        self.position = position

    def take(self, n: int) -> list[task.Problem]:
        out = []
        for _ in range(n):
            r = self._rows[self.position % len(self._rows)]
            out.append(task.Problem(id=str(r["id"]), problem=str(r["problem"]), answer=str(r["answer"]), solution=""))
            self.position += 1
        return out


def collect(
    engine: RolloutEngine,
    encode: Callable[[str], list[int]],
    decode: Callable[[list[list[int]]], list[str]],
    stream,
    *,
    reward_fn: RewardFn,
    prompts_per_step: int,
    group_size: int,
    params: SamplingParams,
    dynamic: bool,
    max_rounds: int,
    capture_routing: bool,
    run_seed: int,
    step: int,
    gen_prompts: int = 0,
    sample_fn: SampleFn | None = None,
) -> StepRollout:
    """Sample rounds of `gen_prompts` (0: prompts_per_step) prompts x `group_size` until
    `prompts_per_step` groups are kept (or the cap).

    encode: problem text -> prompt ids (the prompt template); decode: response ids -> texts.
    stream: experiments.task.TrainStream or TableStream (anything with take(n) -> problems).
    sample_fn: replaces the round's generate + grading (None: one engine.generate call, rewards of
    the decoded responses)."""
    if max_rounds < 1:
        raise ValueError(f"max_sampling_rounds must be >= 1, got {max_rounds}")
    gen_prompts = gen_prompts or prompts_per_step
    if gen_prompts < prompts_per_step:
        raise ValueError(f"gen_prompts ({gen_prompts}) must be >= prompts_per_step ({prompts_per_step})")
    kept: list[Group] = []
    n_sampled, rewards_all, lens_all, stops = 0, [], [], 0
    rounds = 0
    while len(kept) < prompts_per_step and rounds < max_rounds:
        problems = stream.take(gen_prompts)
        prompts = [encode(p.problem) for p in problems]
        flat = [ids for ids in prompts for _ in range(group_size)]
        p = dataclasses.replace(params, seed=sampling_seed(run_seed, step, rounds))
        if sample_fn is None:
            samples = engine.generate(flat, p, capture_routing=capture_routing)
            texts = decode([s.response_ids for s in samples])
            golds = [pr.answer for pr in problems for _ in range(group_size)]
            rewards = [float(r) for r in reward_fn(texts, golds)]
        else:
            samples, rewards = sample_fn([pr for pr in problems for _ in range(group_size)], flat, p)
        groups = [
            Group(
                problem=pr,
                samples=samples[i * group_size : (i + 1) * group_size],
                rewards=rewards[i * group_size : (i + 1) * group_size],
            )
            for i, pr in enumerate(problems)
        ]
        kept += select_groups(groups, prompts_per_step - len(kept), dynamic=dynamic)
        n_sampled += len(groups)
        rewards_all += rewards
        lens_all += [model_tokens(s) for s in samples]
        stops += sum(s.finish_reason == "stop" for s in samples)
        rounds += 1
        if not dynamic:
            break
    return StepRollout(
        kept=kept,
        sampled_groups=n_sampled,
        rounds=rounds,
        reward_mean=sum(rewards_all) / len(rewards_all),
        response_len_mean=sum(lens_all) / len(lens_all),
        stop_frac=stops / len(lens_all),
    )


def model_tokens(s: RolloutSample) -> int:
    """Response tokens the model sampled (a multi-turn response also holds environment tokens)."""
    mask = getattr(s, "loss_mask_R", None)
    return len(s.response_ids) if mask is None else int(mask.sum())


def build_batch(groups: Sequence[Group], *, pad_id: int, with_routing: bool) -> Batch:
    """Right-padded prompt+response sequences of all kept groups (see the module docstring)."""
    samples = [s for g in groups for s in g.samples]
    if not samples:
        raise ValueError("build_batch got no samples: dynamic sampling kept no group")
    lens = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
    B, S = len(samples), max(lens)
    ids_BS = torch.full((B, S), pad_id, dtype=torch.long)
    att_BS = torch.zeros((B, S), dtype=torch.long)
    mask_BT = torch.zeros((B, S - 1), dtype=torch.float32)
    infer_BT = torch.zeros((B, S - 1), dtype=torch.float32)
    for b, s in enumerate(samples):
        P, R = len(s.prompt_ids), len(s.response_ids)
        if s.logprobs_R.shape != (R,):
            raise ValueError(f"sample {b}: logprobs_R has shape {tuple(s.logprobs_R.shape)}, expected ({R},)")
        ids_BS[b, : P + R] = torch.tensor(list(s.prompt_ids) + list(s.response_ids), dtype=torch.long)
        att_BS[b, : P + R] = 1
        # 1 on sampled tokens; a multi-turn sample's loss_mask_R is 0 on the environment's tokens
        loss_mask_R = getattr(s, "loss_mask_R", None)
        if loss_mask_R is not None and loss_mask_R.shape != (R,):
            raise ValueError(f"sample {b}: loss_mask_R has shape {tuple(loss_mask_R.shape)}, expected ({R},)")
        mask_BT[b, P - 1 : P - 1 + R] = 1.0 if loss_mask_R is None else loss_mask_R.float()
        infer_BT[b, P - 1 : P - 1 + R] = s.logprobs_R.float()
    expert_ids = None
    if with_routing:
        traces = [s.expert_ids_TLK for s in samples]
        missing = [b for b, t in enumerate(traces) if t is None]
        if missing:
            raise ValueError(
                f"{len(missing)} of {B} samples have no routing trace (e.g. sample {missing[0]}); the rollout "
                "engine did not capture routing: call generate(..., capture_routing=True)"
            )
        for b, (t, n) in enumerate(zip(traces, lens)):
            if t.shape[0] != n - 1:
                raise ValueError(
                    f"sample {b}: routing trace has {t.shape[0]} rows, expected {n - 1} (prompt + response - 1); "
                    "likely cause: an engine that records the last token or drops the first"
                )
        expert_ids = pad_traces(traces, S - 1)  # uint8 for E <= 256 (r3.trace.trace_dtype), also on the wire
    rewards = torch.tensor([r for g in groups for r in g.rewards], dtype=torch.float32)
    return Batch(
        train=TrainBatch(
            input_ids_BS=ids_BS, attention_mask_BS=att_BS, loss_mask_BT=mask_BT, expert_ids_BTLK=expert_ids
        ),
        infer_logp_BT=infer_BT,
        rewards_B=rewards,
    )


def collect_step(loop, step: int, *, sample_fn=None) -> StepRollout:
    """`collect` with a run's settings: `loop` is an experiments.step.Loop (engines, stream,
    tokenizer, reward, sampling params, its RunConfig). `sample_fn` replaces the one-call sampling
    of a round (experiments.multiturn: episodes of several turns)."""
    cfg = loop.cfg
    return collect(
        loop.rollout_engine,
        loop.encode,
        loop.decode,
        loop.stream,
        prompts_per_step=cfg.prompts_per_step,
        group_size=cfg.group_size,
        params=loop.params,
        dynamic=cfg.dynamic_sampling,
        max_rounds=cfg.max_sampling_rounds,
        gen_prompts=cfg.gen_prompts_per_round,
        capture_routing=loop.capture_routing,
        run_seed=cfg.seed,
        step=step,
        reward_fn=loop.reward_fn,
        **({} if sample_fn is None else {"sample_fn": sample_fn}),
    )
