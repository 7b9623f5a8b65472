"""Multi-turn rollouts with router-mask caching (PAPER.md "Router mask caching"; RunConfig.max_turns > 1).

An episode on the synthetic task (experiments.task): the model answers the prompt; a wrong answer
gets the environment's reply (`task.hint_text`: the next step of the worked solution, as a calculator
tool returns it) as fixed tokens appended to the sequence, and the model answers again on the same
sequence, up to `max_turns` answers; a right answer ends the episode. The reward is the last answer's
(the grader's, as single-turn). One episode becomes one RolloutSample (`EpisodeSample`):

    prompt_ids   = the task prompt
    response_ids = answer_1 + reply_1 + answer_2 + ... + answer_n
    loss_mask_R  = 1 on answer tokens, 0 on reply tokens (fed, not sampled: out of the loss and of
                   every mismatch metric; their inference logprobs are 0 and never read)
    expert_ids_TLK = one row per fed token of the whole sequence (prompt + response - 1 rows), which
                   R3 replays as it does a single-turn trace (experiments.rollout.build_batch)

Router-mask caching: the routing of a token depends only on the tokens before it (causal attention),
so after turn t the driver holds the rows of everything fed so far. Turn t+1's prompt is turn t's
sequence plus the reply, and the engine is asked only for the rows after the held ones
(`generate_continuations(prompts, params, known_routing=held rows)`: vLLM's
`routed_experts_prompt_start` with the prefix's KV from its prefix cache, the transformers engine's
rows from a start). The prefix's rows are neither transferred again nor replaced: the trace is the
held rows followed by the new ones, which equals a fresh capture of the final sequence (fp32, tested).
An engine that cannot (RolloutCapabilities.prefix_cached_routing False) is asked for the whole
sequence again (`multiturn/routing_rows_recaptured`, `multiturn/prefix_cached_routing` = 0).

Each turn's prompt must extend the previous sequence exactly (`check_extends`): a conversation that is
decoded to text and encoded again (re-tokenization drift: special tokens dropped, merges across a
turn boundary) would train on other tokens than were sampled and misalign every routing row after
the drift, so it stops the step with the first differing position.

Metrics per step (over every sampled episode, kept or not): multiturn/turns_mean,
multiturn/env_tokens_mean, multiturn/routing_rows_reused (held rows not asked for again),
multiturn/routing_rows_transferred (rows the engine returned), multiturn/routing_rows_recaptured
(prefix rows returned again by an engine without prefix-cached routing), multiturn/bytes_saved
(rows reused x L x K x bytes per id: 1 for uint8 traces, E <= 256), multiturn/prefix_cached_routing.

Departures: evaluation stays single-turn (eval.hook); the paper's agent/multi-turn rollouts are not
part of its experiments (it names the cache as the mechanism that makes them cheap).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

from experiments import rollout, task
from r3.engines.base import RolloutEngine, RolloutSample, SamplingParams, request_seed

MAX_TOKENS_SHOWN = 4
"""Tokens shown on each side of the first differing position in a drift error."""


@dataclasses.dataclass(kw_only=True)
class EpisodeSample(RolloutSample):
    """A multi-turn episode as one sample; response_ids interleave answers and environment replies."""

    loss_mask_R: torch.Tensor
    """float32 [R]: 1 on tokens the model sampled, 0 on the environment's tokens."""
    turns: int
    """Model answers in the episode (1..max_turns)."""


class HintEnvironment:
    """The synthetic task's environment: after a wrong answer in turn t, the sequence so far followed by
    `task.hint_text(problem, t)` encoded without special tokens (no BOS in the middle of a sequence)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def next_prompt(self, problem: task.Problem, seq_ids: Sequence[int], turn: int) -> list[int]:
        """Token ids of the next turn's prompt: `seq_ids` (prompt and every turn so far) + the reply."""
        reply = self.tokenizer(task.hint_text(problem, turn), add_special_tokens=False)["input_ids"]
        return list(seq_ids) + list(reply)


def check_extends(prev_ids: Sequence[int], next_ids: Sequence[int], *, where: str) -> None:
    """Refuse a next-turn prompt that is not the previous sequence followed by at least one token."""
    prev, nxt = list(prev_ids), list(next_ids)
    if len(nxt) > len(prev) and nxt[: len(prev)] == prev:
        return
    n = min(len(prev), len(nxt))
    first = next((i for i in range(n) if prev[i] != nxt[i]), n)
    lo, hi = max(0, first - MAX_TOKENS_SHOWN), first + MAX_TOKENS_SHOWN
    what = (
        f"first difference at position {first}: got {nxt[lo:hi]}, expected {prev[lo:hi]} (positions {lo}..)"
        if first < n
        else f"it has {len(nxt)} tokens, expected more than the previous sequence's {len(prev)}"
    )
    raise ValueError(
        f"{where}: the next turn's prompt does not extend the previous turn's sequence exactly; {what}. Likely "
        "cause: re-tokenization drift (the conversation was decoded to text and encoded again, which drops "
        "special tokens such as EOS or merges tokens across the turn boundary); the sampled tokens, their "
        "logprobs and every routing row after that position would no longer line up. Append the "
        "environment's reply tokens to the previous token ids instead"
    )


@dataclasses.dataclass
class MultiTurnStats:
    """Counters of one step's episodes (summed over sampling rounds)."""

    episodes: int = 0
    turns: int = 0
    env_tokens: int = 0
    rows_reused: int = 0
    rows_transferred: int = 0
    rows_recaptured: int = 0
    bytes_saved: int = 0
    prefix_cached_routing: bool = False
    """Later turns took the prefix's routing from the held rows (False: recaptured, or no capture)."""

    def metrics(self) -> dict[str, float]:
        n = max(self.episodes, 1)
        return {
            "multiturn/turns_mean": self.turns / n,
            "multiturn/env_tokens_mean": self.env_tokens / n,
            "multiturn/routing_rows_reused": float(self.rows_reused),
            "multiturn/routing_rows_transferred": float(self.rows_transferred),
            "multiturn/routing_rows_recaptured": float(self.rows_recaptured),
            "multiturn/bytes_saved": float(self.bytes_saved),
            "multiturn/prefix_cached_routing": float(self.prefix_cached_routing),
        }


def run_episodes(
    engine: RolloutEngine,
    problems: Sequence[task.Problem],
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    *,
    env: HintEnvironment,
    max_turns: int,
    capture_routing: bool,
    decode: Callable[[list[list[int]]], list[str]],
    reward_fn: rollout.RewardFn,
    stats: MultiTurnStats,
) -> tuple[list[EpisodeSample], list[float]]:
    """One episode per prompt (problems[i] is prompt i's): turns until a right answer or max_turns.
    Returns the episodes as samples and their rewards (the last answer's); updates `stats`."""
    n = len(prompts)
    seqs = [list(map(int, p)) for p in prompts]  # every token so far (prompt, answers, replies)
    resp: list[list[int]] = [[] for _ in range(n)]
    logp: list[list[float]] = [[] for _ in range(n)]
    mask: list[list[float]] = [[] for _ in range(n)]
    traces: list[torch.Tensor | None] = [None] * n
    turns, finish, rewards = [0] * n, ["length"] * n, [0.0] * n
    # the SGLang client declares the capability (routed_experts_start_len) but has no continuation call
    # yet: it recaptures, and multiturn/prefix_cached_routing says so
    cont = getattr(engine, "generate_continuations", None)
    cached = capture_routing and engine.capabilities.prefix_cached_routing and callable(cont)
    stats.prefix_cached_routing = cached
    active = list(range(n))
    for turn in range(1, max_turns + 1):
        # turn 1 keeps the round's seed (as single-turn); later turns mix the turn in (resume resamples them)
        seed = params.seed if turn == 1 or params.seed is None else request_seed(params.seed, turn)
        p = dataclasses.replace(params, seed=seed)
        batch = [seqs[i] for i in active]
        if turn == 1 or not capture_routing:
            out = engine.generate(batch, p, capture_routing=capture_routing)
        elif cached:
            known = [traces[i] for i in active]
            out = cont(batch, p, known_routing=known)
            stats.rows_reused += sum(k.shape[0] for k in known)
            stats.bytes_saved += sum(k.numel() * k.element_size() for k in known)
        else:  # no prefix-cached routing: the whole sequence's rows again (the prefix's are re-transferred)
            out = engine.generate(batch, p, capture_routing=True)
            stats.rows_recaptured += sum(traces[i].shape[0] for i in active)
        if len(out) != len(batch):
            raise RuntimeError(f"turn {turn}: the rollout engine returned {len(out)} samples for {len(batch)} prompts")
        for i, s in zip(active, out):
            if list(s.prompt_ids) != seqs[i]:
                raise RuntimeError(f"turn {turn}: the rollout engine returned episode {i} with another prompt")
            if capture_routing:
                t = s.expert_ids_TLK
                expected = len(seqs[i]) + len(s.response_ids) - 1
                if t is None or t.shape[0] != expected:
                    raise ValueError(
                        f"turn {turn}, episode {i}: routing trace has "
                        f"{None if t is None else t.shape[0]} rows, expected {expected} (sequence "
                        f"{len(seqs[i])} + response {len(s.response_ids)} - 1); likely cause: an engine that "
                        "drops or repeats the held prefix's rows in a continuation"
                    )
                held = 0 if traces[i] is None else traces[i].shape[0]
                stats.rows_transferred += t.shape[0] - (held if cached and turn > 1 else 0)
                traces[i] = t
            resp[i] += s.response_ids
            logp[i] += s.logprobs_R.tolist()
            mask[i] += [1.0] * len(s.response_ids)
            seqs[i] += s.response_ids
            turns[i], finish[i] = turn, s.finish_reason
        texts = decode([s.response_ids for s in out])
        got = [float(r) for r in reward_fn(texts, [problems[i].answer for i in active])]
        following = []
        for i, r in zip(active, got):
            rewards[i] = r
            if r >= 1.0 or turn == max_turns:
                continue
            nxt = env.next_prompt(problems[i], seqs[i], turn)
            check_extends(seqs[i], nxt, where=f"turn {turn + 1} of episode {i} (problem {problems[i].id})")
            reply = nxt[len(seqs[i]) :]
            resp[i] += reply
            logp[i] += [0.0] * len(reply)  # not sampled: masked out, never read
            mask[i] += [0.0] * len(reply)
            stats.env_tokens += len(reply)
            seqs[i] = nxt
            following.append(i)
        active = following
        if not active:
            break
    stats.episodes += n
    stats.turns += sum(turns)
    samples = [
        EpisodeSample(
            prompt_ids=list(map(int, prompts[i])),
            response_ids=resp[i],
            logprobs_R=torch.tensor(logp[i], dtype=torch.float32),
            expert_ids_TLK=traces[i],
            finish_reason=finish[i],
            loss_mask_R=torch.tensor(mask[i], dtype=torch.float32),
            turns=turns[i],
        )
        for i in range(n)
    ]
    return samples, rewards


def collect(loop, step: int) -> rollout.StepRollout:
    """experiments.rollout.collect with multi-turn episodes (loop: experiments.step.Loop, cfg.max_turns > 1);
    the step's multiturn/* metrics are in the result's `extra`."""
    cfg = loop.cfg
    stats = MultiTurnStats()
    env = HintEnvironment(loop.tokenizer)

    def sample(problems, prompts, params):
        return run_episodes(
            loop.rollout_engine,
            problems,
            prompts,
            params,
            env=env,
            max_turns=cfg.max_turns,
            capture_routing=loop.capture_routing,
            decode=loop.decode,
            reward_fn=loop.reward_fn,
            stats=stats,
        )

    ro = rollout.collect_step(loop, step, sample_fn=sample)
    ro.extra.update(stats.metrics())
    return ro
