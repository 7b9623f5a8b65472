"""HFRolloutEngine and HFTrainEngine on tiny models."""

import pytest
import torch
from r3_tiny_models import tiny_dense, tiny_moe

from r3.engines.base import RolloutEngine, SamplingParams, TrainBatch, TrainEngine
from r3.engines.hf.fp8 import quantize_dequantize_fp8
from r3.engines.hf.rollout import HFRolloutEngine
from r3.engines.hf.train import HFTrainEngine
from r3.losses import ppo_clip_loss
from r3.replay import ReplayMode
from r3.trace import RoutingSpec, RoutingTrace, pad_traces, validate_expert_ids

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17], [18, 19]]


def _batch(samples, with_routing=True):
    seqs = [s.prompt_ids + s.response_ids for s in samples]
    S = max(len(q) for q in seqs)
    ids = torch.zeros(len(seqs), S, dtype=torch.long)
    attn = torch.zeros(len(seqs), S, dtype=torch.long)
    loss_mask = torch.zeros(len(seqs), S - 1)
    for b, (s, q) in enumerate(zip(samples, seqs)):
        ids[b, : len(q)] = torch.tensor(q)
        attn[b, : len(q)] = 1
        loss_mask[b, len(s.prompt_ids) - 1 : len(q) - 1] = 1
    routing = pad_traces([s.expert_ids_TLK for s in samples], S - 1) if with_routing else None
    return TrainBatch(input_ids_BS=ids, attention_mask_BS=attn, loss_mask_BT=loss_mask, expert_ids_BTLK=routing)


def test_protocols():
    assert isinstance(HFRolloutEngine(tiny_moe(), precision="fp32"), RolloutEngine)
    assert isinstance(HFTrainEngine(tiny_moe(), lr=1e-3), TrainEngine)


def test_fp32_rollout_logprobs_equal_teacher_forced_and_trace_aligned():
    model = tiny_moe(seed=4)
    eng = HFRolloutEngine(model, precision="fp32", seed=0)
    samples = eng.generate(PROMPTS, SamplingParams(max_new_tokens=7, temperature=0.7), capture_routing=True)
    train = HFTrainEngine(model, lr=1e-3)
    batch = _batch(samples)
    with torch.no_grad():
        for b, s in enumerate(samples):
            full = torch.tensor([s.prompt_ids + s.response_ids])
            logits = model(full[:, :-1]).logits[0] / 0.7
            ref = torch.log_softmax(logits, -1).gather(-1, full[0, 1:, None])[:, 0][len(s.prompt_ids) - 1 :]
            torch.testing.assert_close(s.logprobs_R, ref, atol=2e-5, rtol=0)
            assert s.logprobs_R.dtype == torch.float32
            assert s.expert_ids_TLK.shape == (len(s.prompt_ids) + len(s.response_ids) - 1, 2, 2)
            RoutingTrace(s.expert_ids_TLK, RoutingSpec(num_layers=2, top_k=2, num_experts=8))
    # the training engine's own routing on the same tokens matches the fp32 rollout's on real tokens
    res = train.compute_logprobs(batch, routing=ReplayMode.RECORD)
    for b, s in enumerate(samples):
        T = s.expert_ids_TLK.shape[0]
        assert torch.equal(res.expert_ids_BTLK[b, :T], s.expert_ids_TLK)


def test_finished_rows_leave_the_batch_and_results_stay_exact(monkeypatch):
    """Rows that stopped are dropped from the decode batch and KV cache (the engine's compaction):
    every sample's logprobs still equal a teacher-forced forward of its own tokens, its routing
    equals the trainer's on every fed token (rows recorded before and after compaction), and the
    samples are those of the loop without compaction (same random draws per row)."""
    model = tiny_moe(seed=4)
    eng = HFRolloutEngine(model, precision="fp32", seed=0)
    prompts = [p for p in PROMPTS for _ in range(8)]
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=5, stop_token_ids=tuple(range(0, 64, 5)))
    samples = eng.generate(prompts, params, capture_routing=True)
    st = eng.last_generate
    lens = [len(s.response_ids) for s in samples]
    assert st["compactions"] >= 2 and len(set(lens)) >= 4, (st, lens)
    assert st["fed_row_steps"] < st["rows"] * st["decode_steps"]  # finished rows stopped costing compute
    with torch.no_grad():
        for s in samples:
            full = torch.tensor([s.prompt_ids + s.response_ids])
            ref = torch.log_softmax(model(full[:, :-1]).logits[0], -1).gather(-1, full[0, 1:, None])[:, 0]
            torch.testing.assert_close(s.logprobs_R, ref[len(s.prompt_ids) - 1 :], atol=2e-5, rtol=0)
    res = HFTrainEngine(model, lr=1e-3).compute_logprobs(_batch(samples), routing=ReplayMode.RECORD)
    for b, s in enumerate(samples):
        assert torch.equal(res.expert_ids_BTLK[b, : s.expert_ids_TLK.shape[0]], s.expert_ids_TLK)
    monkeypatch.setattr("r3.engines.hf.rollout._COMPACT_BELOW", 0.0)  # never compact
    plain = eng.generate(prompts, params, capture_routing=True)
    assert eng.last_generate["compactions"] == 0
    assert [s.response_ids for s in plain] == [s.response_ids for s in samples]
    assert all(torch.equal(a.expert_ids_TLK, b.expert_ids_TLK) for a, b in zip(plain, samples))


def test_a_real_token_without_recorded_routing_is_refused():
    """The recorder's boundary check: a fed token whose row no call recorded (a decode loop that
    dropped its row too early) stops the rollout instead of handing -1 experts to replay."""
    model = tiny_moe(seed=4)
    eng = HFRolloutEngine(model, precision="fp32", seed=0)
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    with eng.replay.recording():
        eng.model(input_ids=ids)
        eng.replay.feed_rows(torch.tensor([1]), 2)  # the next call feeds row 1 only
        eng.model(input_ids=ids[1:, :1])
        with pytest.raises(ValueError, match=r"sequence 0: 1 of its 4 fed tokens have no recorded routing"):
            eng.replay.recorded_traces(torch.ones(2, 5, dtype=torch.long))
        assert eng.replay.recorded_traces(torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]))[1].shape[0] == 3


def test_sampling_reproducible_stop_tokens_and_top_p():
    eng = HFRolloutEngine(tiny_moe(), precision="bf16", seed=0)
    p = SamplingParams(max_new_tokens=6, seed=3)
    a, b = eng.generate(PROMPTS, p), eng.generate(PROMPTS, p)
    assert [s.response_ids for s in a] == [s.response_ids for s in b]
    stop = eng.generate(
        PROMPTS, SamplingParams(max_new_tokens=6, stop_token_ids=tuple(range(64))), capture_routing=True
    )
    for s, prompt in zip(stop, PROMPTS):
        assert len(s.response_ids) == 1 and s.finish_reason == "stop"
        assert s.expert_ids_TLK.shape[0] == len(prompt)
    assert all(s.finish_reason == "length" and len(s.response_ids) == 6 for s in a)
    greedy = eng.generate(PROMPTS, SamplingParams(max_new_tokens=5, temperature=0.0))
    nucleus = eng.generate(PROMPTS, SamplingParams(max_new_tokens=5, top_p=1e-6, seed=9))
    assert [s.response_ids for s in greedy] == [s.response_ids for s in nucleus]


def test_dense_control_has_no_routing():
    eng = HFRolloutEngine(tiny_dense(), precision="bf16")
    s = eng.generate(PROMPTS[:2], SamplingParams(max_new_tokens=3), capture_routing=True)
    assert s[0].expert_ids_TLK is None and len(s[0].response_ids) == 3


def test_sync_weights_and_fp8_requantisation():
    src, other = tiny_moe(seed=0), tiny_moe(seed=1)
    eng = HFRolloutEngine(src, precision="fp8", fp8_scope="router")
    eng.sync_weights(other.state_dict())
    w = eng.model.model.layers[0].mlp.gate.weight
    assert torch.equal(w, quantize_dequantize_fp8(other.model.layers[0].mlp.gate.weight.to(torch.bfloat16)))
    eng32 = HFRolloutEngine(src, precision="fp32")
    eng32.sync_weights(other.state_dict())
    ref = HFRolloutEngine(other, precision="fp32")
    p = SamplingParams(max_new_tokens=4, temperature=0.0)
    assert [s.response_ids for s in eng32.generate(PROMPTS, p)] == [s.response_ids for s in ref.generate(PROMPTS, p)]
    with pytest.raises(ValueError, match="missing keys"):
        eng32.sync_weights({"model.norm.weight": torch.ones(32)})


def _loss_fn(batch, adv, old):
    norm = float(batch.loss_mask_BT.sum())

    def fn(logp_BT, entropy_BT, rows):
        return ppo_clip_loss(logp_BT, old[rows], adv[rows], batch.loss_mask_BT[rows], normalizer=norm)

    return fn


def _rollout_batch(seed=0):
    eng = HFRolloutEngine(tiny_moe(seed=seed), precision="bf16", seed=seed)
    samples = eng.generate(PROMPTS, SamplingParams(max_new_tokens=6), capture_routing=True)
    return _batch(samples)


def test_train_step_micro_batching_and_checkpointing_do_not_change_the_update():
    """Fixed micro-batches, activation checkpointing and length-grouped micro-batches (rows [0, 3]
    and [1, 2] of sequences 8, 9, 10, 8 tokens long, the first trimmed to 8 columns of 10) give the
    whole batch's logprobs, routing, gradient and update."""
    batch = _rollout_batch()
    lengths = batch.attention_mask_BS.sum(-1).tolist()
    assert lengths == [8, 9, 10, 8]
    from r3.engines.hf.train import length_grouped_rows

    assert [g.tolist() for g in length_grouped_rows(batch.attention_mask_BS, 20)] == [[0, 3], [1, 2]]
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    params, norms, olds, recs = [], [], [], []
    for mb, ckpt, max_tok in [(0, False, 0), (2, False, 0), (1, True, 0), (0, False, 20)]:
        eng = HFTrainEngine(
            tiny_moe(seed=0), lr=1e-2, micro_batch=mb, gradient_checkpointing=ckpt, max_tokens_per_micro_batch=max_tok
        )
        recs.append(eng.compute_logprobs(batch, routing=ReplayMode.RECORD).expert_ids_BTLK)
        old = eng.compute_logprobs(batch, routing=ReplayMode.REPLAY).logp_BT
        olds.append(old)
        m = eng.train_step(batch, _loss_fn(batch, adv, old), routing=ReplayMode.REPLAY)
        assert m["actor/grad_norm"] > 0 and "actor/clip_frac" in m
        params.append(torch.cat([p.detach().flatten() for p in eng.model.parameters()]))
        norms.append(float(m["actor/grad_norm"]))
    fed = batch.attention_mask_BS[:, 1:].bool()  # padding positions are not computed in a trimmed micro-batch
    for i in (1, 2, 3):
        torch.testing.assert_close(olds[i][fed], olds[0][fed], atol=1e-6, rtol=0)
        assert torch.equal(recs[i][fed], recs[0][fed])
        validate_expert_ids(recs[i], RoutingSpec(num_layers=2, top_k=2, num_experts=8))  # padding: dummy rows
        # the gradient (its norm is scale-sensitive, unlike Adam's first step) is the same ...
        assert norms[i] == pytest.approx(norms[0], rel=1e-5)
        # ... and so is the update, up to Adam's sensitivity where |g| ~ eps (1 % of lr)
        torch.testing.assert_close(params[i], params[0], atol=1e-4, rtol=0)


def test_length_grouped_rows_pack_by_the_longest_row():
    from r3.engines.hf.train import length_grouped_rows

    mask = torch.zeros(5, 10, dtype=torch.long)
    for b, n in enumerate([5, 2, 9, 3, 3]):
        mask[b, :n] = 1
    assert [g.tolist() for g in length_grouped_rows(mask, 10)] == [[1, 3, 4], [0], [2]]
    assert [g.tolist() for g in length_grouped_rows(mask, 1)] == [[1], [3], [4], [0], [2]]  # over budget: alone
    assert [g.tolist() for g in length_grouped_rows(mask, 100)] == [[0, 1, 2, 3, 4]]
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])  # left padding: both end at the last column
    assert [g.tolist() for g in length_grouped_rows(left, 8)] == [[0, 1]]


def test_replay_changes_training_logprobs_to_rollout_routing():
    """Replay must drive the forward: replaying the engine's own routing reproduces its native
    logprobs exactly; replaying a routing that differs at one fed token (every layer) changes the
    logprobs from that token on and leaves every earlier position bit-identical (causality)."""
    batch = _rollout_batch(seed=2)
    eng = HFTrainEngine(tiny_moe(seed=2), lr=1e-3)
    native = eng.compute_logprobs(batch, routing=ReplayMode.RECORD)
    own = TrainBatch(
        input_ids_BS=batch.input_ids_BS,
        attention_mask_BS=batch.attention_mask_BS,
        loss_mask_BT=batch.loss_mask_BT,
        expert_ids_BTLK=native.expert_ids_BTLK,
    )
    assert torch.equal(eng.compute_logprobs(own, routing=ReplayMode.REPLAY).logp_BT, native.logp_BT)
    b, t = 0, 2
    changed = native.expert_ids_BTLK.clone()
    E = 8
    changed[b, t] = (changed[b, t] + 1) % E  # other experts, still distinct within each row
    forced = eng.compute_logprobs(
        TrainBatch(
            input_ids_BS=batch.input_ids_BS,
            attention_mask_BS=batch.attention_mask_BS,
            loss_mask_BT=batch.loss_mask_BT,
            expert_ids_BTLK=changed,
        ),
        routing=ReplayMode.REPLAY,
    )
    assert torch.equal(forced.logp_BT[:, :t], native.logp_BT[:, :t])
    assert not torch.allclose(forced.logp_BT[b, t], native.logp_BT[b, t])
    assert torch.equal(forced.logp_BT[1:], native.logp_BT[1:])  # other rows are untouched
    bad = TrainBatch(
        input_ids_BS=batch.input_ids_BS,
        attention_mask_BS=batch.attention_mask_BS,
        loss_mask_BT=batch.loss_mask_BT,
        expert_ids_BTLK=None,
    )
    with pytest.raises(ValueError, match="capture routing"):
        eng.compute_logprobs(bad, routing=ReplayMode.REPLAY)


def test_save_load_resume_is_exact(tmp_path):
    batch = _rollout_batch(seed=1)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])

    def step(eng):
        old = eng.compute_logprobs(batch, routing=ReplayMode.REPLAY).logp_BT
        return eng.train_step(batch, _loss_fn(batch, adv, old), routing=ReplayMode.REPLAY)

    a = HFTrainEngine(tiny_moe(seed=1), lr=1e-2, seed=0)
    step(a)
    step(a)
    a.save(str(tmp_path / "ckpt"))
    m_a = step(a)
    b = HFTrainEngine(tiny_moe(seed=5), lr=1e-2, seed=0)  # other init: everything must come from the checkpoint
    b.load(str(tmp_path / "ckpt"))
    m_b = step(b)
    assert m_a["actor/grad_norm"] == m_b["actor/grad_norm"]
    for (n, pa), (_, pb) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(pa, pb), n
    # the checkpoint is a transformers model directory the rollout engine can load
    HFRolloutEngine(str(tmp_path / "ckpt"), precision="bf16").generate(PROMPTS[:1], SamplingParams(max_new_tokens=2))


def test_large_generate_calls_show_a_progress_bar_small_ones_do_not(capsys):
    quiet = HFRolloutEngine(tiny_moe(), precision="fp32")  # default: bars from 1024 prompts on
    quiet.generate(PROMPTS, SamplingParams(max_new_tokens=3))
    assert "generating" not in capsys.readouterr().err
    loud = HFRolloutEngine(tiny_moe(), precision="fp32", progress_min_prompts=len(PROMPTS))
    loud.generate(PROMPTS, SamplingParams(max_new_tokens=3))
    assert f"generating {len(PROMPTS)} samples" in capsys.readouterr().err
