"""Seeded rollout-only mismatch doses (r3.engines.hf.noise) in the transformers rollout engine."""

import pytest
import torch
from r3_tiny_models import tiny_moe

from r3.engines.base import SamplingParams, TrainBatch
from r3.engines.hf.config import HFRolloutConfig
from r3.engines.hf.noise import RolloutNoise, noisy_topk_routing
from r3.engines.hf.rollout import HFRolloutEngine
from r3.engines.hf.train import HFTrainEngine
from r3.metrics import mismatch_metrics
from r3.replay import ReplayMode
from r3.trace import pad_traces

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17], [18, 19]] * 4


def _batch(samples):
    seqs = [s.prompt_ids + s.response_ids for s in samples]
    S = max(len(q) for q in seqs)
    ids = torch.zeros(len(seqs), S, dtype=torch.long)
    attn = torch.zeros(len(seqs), S, dtype=torch.long)
    loss_mask = torch.zeros(len(seqs), S - 1)
    infer = torch.zeros(len(seqs), S - 1)
    for b, (s, q) in enumerate(zip(samples, seqs)):
        ids[b, : len(q)] = torch.tensor(q)
        attn[b, : len(q)] = 1
        loss_mask[b, len(s.prompt_ids) - 1 : len(q) - 1] = 1
        infer[b, len(s.prompt_ids) - 1 : len(q) - 1] = s.logprobs_R
    routing = pad_traces([s.expert_ids_TLK for s in samples], S - 1)
    return TrainBatch(input_ids_BS=ids, attention_mask_BS=attn, loss_mask_BT=loss_mask, expert_ids_BTLK=routing), infer


def test_noisy_topk_routing_selects_from_noisy_and_weights_from_clean_logits():
    s = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    eps = torch.tensor([[0.0, 0.0, 3.0, 0.0]])  # lifts expert 2 above expert 1
    w, ids = noisy_topk_routing(s, eps, top_k=2, norm_topk_prob=True)
    assert ids.tolist() == [[2, 0]]  # order of s + eps: 3.0 > 2.0
    p = torch.softmax(s, -1)[0]
    torch.testing.assert_close(w, torch.stack([p[2], p[0]])[None] / (p[2] + p[0]))
    w_raw, _ = noisy_topk_routing(s, eps, top_k=2, norm_topk_prob=False)
    torch.testing.assert_close(w_raw, torch.stack([p[2], p[0]])[None])
    # no noise: exactly the native router (same ops)
    gate = tiny_moe().model.layers[0].mlp.gate
    x = torch.randn(7, 32)
    logits, w_native, ids_native = gate(x)
    w0, ids0 = noisy_topk_routing(logits, torch.zeros_like(logits), gate.top_k, gate.norm_topk_prob)
    assert torch.equal(ids0, ids_native) and torch.equal(w0, w_native)


@pytest.mark.parametrize("dose", ["router_noise", "logit_noise"])
def test_each_dose_is_seeded_per_call_and_per_engine(dose):
    model = tiny_moe(seed=4, router_std=1.0)
    eng = HFRolloutEngine(model, precision="fp32", seed=0, **{dose: 1.0})

    def run(engine, seed):
        s = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, seed=seed), capture_routing=True)
        return (
            [x.response_ids for x in s],
            torch.cat([x.expert_ids_TLK for x in s]),
            torch.cat([x.logprobs_R for x in s]),
        )

    a, b, other = run(eng, 3), run(eng, 3), run(eng, 4)
    assert a[0] == b[0] and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])  # same seed, same samples
    assert not torch.equal(a[2], other[2])  # another seed: other samples
    # a fresh engine with the dose gives the same samples for the same call seed
    again = run(HFRolloutEngine(model, precision="fp32", seed=0, **{dose: 1.0}), 3)
    assert again[0] == a[0] and torch.equal(again[1], a[1])
    # the dose changes what the noise-free engine does with the same sampling seed
    plain = run(HFRolloutEngine(model, precision="fp32", seed=0), 3)
    if dose == "router_noise":
        assert not torch.equal(plain[1], a[1])  # routing differs
    else:
        assert torch.equal(plain[1][: len(PROMPTS[0]) - 1], a[1][: len(PROMPTS[0]) - 1])  # prompt routing equal
        assert not torch.equal(plain[2], a[2])
    # no call seed: the engine's own seeded stream, reproducible across engines with the same seed
    x, y, z = (HFRolloutEngine(model, precision="fp32", seed=s, **{dose: 1.0}) for s in (7, 7, 8))
    x, y, z = (run(e, None) for e in (x, y, z))
    assert x[0] == y[0] and torch.equal(x[1], y[1]) and torch.equal(x[2], y[2])
    assert not torch.equal(x[2], z[2])


def test_router_noise_trace_is_what_the_experts_used():
    """The recorded trace is the noisy selection the experts consumed (the hook rewrites the router's
    outputs in place, and the recorder keeps a view of them)."""
    eng = HFRolloutEngine(tiny_moe(seed=4, router_std=1.0), precision="fp32", seed=0, router_noise=2.0)
    used = []
    for layer in eng.model.model.layers:
        layer.mlp.experts.register_forward_pre_hook(lambda m, args: used.append(args[1].clone()))
    s = eng.generate([[5, 6, 7, 8]], SamplingParams(max_new_tokens=5, seed=1), capture_routing=True)[0]
    L = len(eng.model.model.layers)
    # calls: prefill (4 rows) then one row per decode step, each call layer by layer
    per_call = [torch.stack(used[i : i + L], dim=1) for i in range(0, len(used), L)]  # [rows, L, K]
    assert torch.equal(torch.cat(per_call)[: s.expert_ids_TLK.shape[0]], s.expert_ids_TLK.long())


def test_logit_noise_reports_the_logprobs_it_sampled_from():
    eng = HFRolloutEngine(tiny_moe(seed=4), precision="fp32", seed=0, logit_noise=0.5)
    seen = []  # the head's output after the noise hook (hooks run in registration order)
    eng.model.lm_head.register_forward_hook(lambda m, a, out: seen.append(out[:, -1].clone()))
    s = eng.generate([[5, 6, 7]], SamplingParams(max_new_tokens=4, temperature=0.7, seed=2))[0]
    clean = HFRolloutEngine(tiny_moe(seed=4), precision="fp32", seed=0)
    for t, tok in enumerate(s.response_ids):
        lp = torch.log_softmax(seen[t][0] / 0.7, -1)[tok]
        torch.testing.assert_close(s.logprobs_R[t], lp, atol=1e-6, rtol=0)
    with torch.no_grad():
        ref = clean.model(torch.tensor([[5, 6, 7]])).logits[0, -1]
    assert (seen[0][0] - ref).abs().max() > 0.1  # the head's output really is perturbed


def test_doses_are_rollout_only_and_r3_removes_router_noise_only():
    """The trainer never sees a dose (its logprobs are unchanged; the source model has no hooks); in
    fp32, replaying the rollout's routing brings the router-noise KL to the fp32 floor, and leaves the
    logit-noise KL in place."""
    model = tiny_moe(seed=4, router_std=1.0)
    trainer = HFTrainEngine(model, lr=1e-3)
    params = SamplingParams(max_new_tokens=10, seed=5)
    kl = {}
    for name, kw in {"fp32": {}, "router": {"router_noise": 1.0}, "logit": {"logit_noise": 0.3}}.items():
        eng = HFRolloutEngine(model, precision="fp32", seed=0, **kw)
        assert all(not g.mlp.gate._forward_hooks for g in model.model.layers) and not model.lm_head._forward_hooks
        batch, infer = _batch(eng.generate(PROMPTS, params, capture_routing=True))
        native = trainer.compute_logprobs(batch, routing=ReplayMode.RECORD)
        replay = trainer.compute_logprobs(batch, routing=ReplayMode.REPLAY)
        for mode, res in (("native", native), ("replay", replay)):
            kl[name, mode] = float(mismatch_metrics(res.logp_BT, infer, batch.loss_mask_BT)["mismatch/k3_kl"])
        if name == "router":  # the rollout routed differently from the trainer's own routing
            assert not torch.equal(native.expert_ids_BTLK, batch.expert_ids_BTLK)
        # the trainer's logprobs do not depend on the rollout engine: the same tokens give the same numbers
        again = HFTrainEngine(model, lr=1e-3).compute_logprobs(batch, routing=ReplayMode.RECORD)
        assert torch.equal(again.logp_BT, native.logp_BT)
    assert kl["fp32", "native"] < 1e-8 and kl["fp32", "replay"] < 1e-8
    assert kl["router", "native"] > 100 * max(kl["router", "replay"], 1e-9)
    assert kl["router", "replay"] < 1e-7  # the fp32 floor
    assert kl["logit", "native"] > 1e-3 and kl["logit", "replay"] > 1e-3  # R3 cannot remove it
    assert kl["logit", "replay"] == pytest.approx(kl["logit", "native"], rel=1e-3)


def test_validation():
    with pytest.raises(ValueError, match=r"router_noise must be a finite std >= 0.*got -1"):
        HFRolloutConfig(model_path="x", router_noise=-1)
    with pytest.raises(ValueError, match=r"logit_noise must be a finite std >= 0.*got nan"):
        HFRolloutConfig(model_path="x", logit_noise=float("nan"))
    from r3_tiny_models import tiny_dense

    with pytest.raises(ValueError, match="router noise 1.0 needs an MoE model"):
        RolloutNoise(tiny_dense(), router_std=1.0)
    assert RolloutNoise.attach(tiny_moe(), router_std=0.0, logit_std=0.0, seed=0) is None
    eng = HFRolloutEngine(tiny_moe(), precision="bf16", router_noise=0.5, logit_noise=0.1)
    n = eng.noise
    n.remove()
    assert not any(layer.mlp.gate._forward_hooks for layer in eng.model.model.layers)


def test_stream_seeds_are_fixed():
    """Golden values: the calibrated doses (docs/study.md "Doses") were measured with these streams;
    a change of the mix would silently move every dose's draws."""
    from r3.engines.hf.noise import LOGIT_STREAM, ROUTER_STREAM, stream_seed

    assert stream_seed(0, ROUTER_STREAM) == 7919892530791287365
    assert stream_seed(0, LOGIT_STREAM) == 1092597310007415928
    assert len({stream_seed(s, k) for s in range(100) for k in (ROUTER_STREAM, LOGIT_STREAM)}) == 200
