"""RunConfig refuses, at construction, every value that used to crash late or be silently ignored
each message names the field, what was given and what is allowed."""

from __future__ import annotations

import pytest

from experiments.config import RunConfig


@pytest.mark.parametrize(
    "changes, message",
    [
        # used to divide by zero at step 5 (step % eval_every)
        (dict(eval_every=0), r"eval_every must be >= 1, got 0"),
        (dict(checkpoint_every=0), r"checkpoint_every must be >= 1, got 0"),
        # checked at construction, not only inside the loss at step 1
        (dict(dual_clip=1.0), r"dual_clip must be > 1 \(common value 3\) or None to disable, got 1.0"),
        (dict(tis_cap=0.0), r"tis_cap must be > 0 \(common value 2\), got 0.0"),
        # used to build the SGLang client silently
        (dict(rollout_engine="vlm"), r"rollout_engine='vlm' is not one of \[.*'hf'.*'sglang'.*\]"),
        (dict(train_engine="deepspeed"), r"train_engine='deepspeed' is not one of \['hf', 'megatron'\]"),
        (dict(rollout_precision="int4"), r"rollout_precision='int4' is not one of \['bf16', 'fp32', 'fp8'\]"),
        (dict(mini_steps=0), r"mini_steps must be >= 1, got 0"),
        (dict(loss_agg="mean"), r"loss_agg='mean' is not one of"),
        # bug 2: the GSPO loss takes no importance weights, so TIS would be logged but not applied
        (dict(algorithm="gspo", tis=True), r"tis=True with algorithm='gspo' is not supported"),
        # the engines' batch shapes
        (dict(gen_prompts_per_round=8), r"gen_prompts_per_round \(8\) must be 0 or >= prompts_per_step \(16\)"),
        (dict(eval_batch_size=0), r"eval_batch_size must be >= 1, got 0"),
        (
            dict(train_max_tokens_per_micro_batch=1024, train_engine="megatron"),
            r"train_max_tokens_per_micro_batch=1024 is not a setting of the 'megatron' train engine .* \['hf'\]",
        ),
        (
            dict(train_tensor_parallel=2),
            r"train_tensor_parallel=2 is not a setting of the 'hf' train engine .*'megatron'",
        ),
        (
            dict(train_max_tokens_per_micro_batch=1024, train_micro_batch=2),
            r"set train_micro_batch \(fixed rows\) or train_max_tokens_per_micro_batch",
        ),
    ],
)
def test_bad_values_fail_at_construction_with_what_and_how(changes, message):
    with pytest.raises(ValueError, match=message) as e:
        RunConfig(name="cell", **changes)
    assert "invalid RunConfig 'cell'" in str(e.value)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ValueError) as e:
        RunConfig(name="cell", eval_every=0, tis_cap=-1.0, rollout_engine="nope")
    msg = str(e.value)
    assert "eval_every" in msg and "tis_cap" in msg and "rollout_engine" in msg


def test_valid_edges_are_accepted():
    RunConfig(name="cell", dual_clip=None, eval_every=1, algorithm="gspo", tis=False)
    RunConfig(name="cell", algorithm="grpo", tis=True, tis_cap=1.5)
