"""Routing record/replay on a tiny transformers Qwen3-MoE (2 layers, hidden 32, 8 experts, top-2)."""

import copy

import pytest
import torch
from r3_tiny_models import tiny_moe

from r3.engines.hf.replay import RoutingReplay
from r3.metrics import mismatch_metrics, routing_disagreement
from r3.replay import ConsumptionCheck

IMPLS = ["eager", "batched_mm", "grouped_mm"]


def _tokens(B=3, S=12, seed=0):
    return torch.randint(3, 64, (B, S), generator=torch.Generator().manual_seed(seed))


def _logp(logits_BSV, ids_BS):
    return torch.log_softmax(logits_BSV.float(), -1)[:, :-1].gather(-1, ids_BS[:, 1:, None])[..., 0]


@pytest.mark.parametrize("impl", IMPLS)
def test_replaying_own_routing_reproduces_logits_exactly(impl):
    model = tiny_moe(experts_implementation=impl)
    rr = RoutingReplay(model)
    ids = _tokens()
    with torch.no_grad(), rr.recording():
        native = model(ids).logits
    rec = rr.recorded_expert_ids()
    assert rec.shape == (3, 12, 2, 2)
    with torch.no_grad(), rr.replaying(rec):
        replayed = model(ids).logits
    assert torch.equal(native, replayed)


@pytest.mark.parametrize("impl", IMPLS)
def test_replaying_other_routing_forces_those_experts(impl):
    model = tiny_moe(experts_implementation=impl)
    rr = RoutingReplay(model)
    ids = _tokens()
    forced = torch.stack([torch.randperm(8, generator=torch.Generator().manual_seed(i))[:2] for i in range(3 * 12 * 2)])
    forced = forced.view(3, 12, 2, 2)
    seen = []
    handles = [
        layer.mlp.experts.register_forward_pre_hook(lambda m, a: seen.append(a[1].clone()))
        for layer in model.model.layers
    ]
    with torch.no_grad():
        native = model(ids).logits
        seen.clear()
        with rr.replaying(forced):
            replayed = model(ids).logits
    for h in handles:
        h.remove()
    for layer in range(2):
        assert torch.equal(seen[layer], forced[:, :, layer].reshape(-1, 2))
    assert not torch.allclose(native, replayed)


def test_replay_gradient_reaches_router_only_through_replayed_experts():
    model = tiny_moe().train()
    rr = RoutingReplay(model)
    ids = _tokens(2, 8)
    # replay only experts {0..3}: experts 4..7 must get no gradient; the router must get one
    g = torch.Generator().manual_seed(1)
    forced = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(2 * 7 * 2)]).view(2, 7, 2, 2)
    logits_seen = []

    def keep_logits(module, args, out):
        out[0].retain_grad()
        logits_seen.append(out[0])

    h = model.model.layers[0].mlp.gate.register_forward_hook(keep_logits)  # runs after the replay hook
    with rr.replaying(forced):
        out = model(ids[:, :-1]).logits
        out.float().logsumexp(-1).sum().backward()
    h.remove()
    gate0 = model.model.layers[0].mlp.gate
    assert gate0.weight.grad is not None and gate0.weight.grad.abs().sum() > 0
    experts0 = model.model.layers[0].mlp.experts
    assert experts0.gate_up_proj.grad[4:].abs().max() == 0 and experts0.gate_up_proj.grad[:4].abs().max() > 0
    # d loss / d router logit of a non-replayed expert is 0: with norm_topk_prob the full softmax
    # denominator cancels, g_i = exp(s_i) / sum_{j in I} exp(s_j)
    grad_NE = logits_seen[0].grad
    chosen = torch.zeros_like(grad_NE, dtype=torch.bool).scatter_(1, forced[:, :, 0].reshape(-1, 2), True)
    assert grad_NE[~chosen].abs().max() < 1e-6 * grad_NE[chosen].abs().max()
    assert grad_NE[chosen].abs().max() > 0


def test_bf16_vs_fp32_routing_disagrees_natively_and_not_with_replay():
    fp32 = tiny_moe(seed=3)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    r32, r16 = RoutingReplay(fp32), RoutingReplay(bf16)
    ids = _tokens(8, 48, seed=5)
    mask = torch.ones(8, 47)
    with torch.no_grad():
        # feed input_ids[:, :-1]: one routing row per fed token
        with r16.recording():
            logits16 = bf16(ids[:, :-1]).logits
        rec16 = r16.recorded_expert_ids()
        with r32.recording():
            logits32 = fp32(ids[:, :-1]).logits
        rec32 = r32.recorded_expert_ids()
        with r32.replaying(rec16):
            logits32_r3 = fp32(ids[:, :-1]).logits
    lp = lambda lg: torch.log_softmax(lg.float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    native = routing_disagreement(rec32, rec16)
    assert native["routing/pair_disagreement"] > 0
    kl_native = mismatch_metrics(lp(logits32), lp(logits16), mask)["mismatch/k3_kl"]
    kl_r3 = mismatch_metrics(lp(logits32_r3), lp(logits16), mask)["mismatch/k3_kl"]
    assert kl_r3 < kl_native


def test_replay_routes_exactly_as_recorded_in_bf16_engine():
    fp32 = tiny_moe(seed=3)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    r32, r16 = RoutingReplay(fp32), RoutingReplay(bf16)
    ids = _tokens(8, 48, seed=5)[:, :-1]
    seen = []
    handles = [
        l.mlp.experts.register_forward_pre_hook(lambda m, a: seen.append(a[1].clone())) for l in fp32.model.layers
    ]
    with torch.no_grad():
        with r16.recording():
            bf16(ids)
        rec16 = r16.recorded_expert_ids()
        with r32.replaying(rec16):
            fp32(ids)
    for h in handles:
        h.remove()
    replayed = torch.stack([s.view(8, 47, 2) for s in seen], dim=2)
    assert routing_disagreement(replayed, rec16)["routing/pair_disagreement"] == 0


def test_record_during_generate_matches_full_forward():
    model = tiny_moe(seed=1)
    rr = RoutingReplay(model)
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16]]
    P = 5
    input_ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts])  # left padding
    attn = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad(), rr.recording():
        seq = model.generate(
            input_ids=input_ids,
            attention_mask=attn,
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
    token_mask = torch.cat([attn, torch.ones(3, seq.shape[1] - P, dtype=attn.dtype)], dim=1)
    traces = rr.recorded_traces(token_mask)
    for b, p in enumerate(prompts):
        full = seq[b, P - len(p) :][None]
        with torch.no_grad(), rr.recording():
            model(full[:, :-1])
        ref = rr.recorded_expert_ids()[0]
        assert traces[b].shape == (len(p) + 6 - 1, 2, 2)
        assert torch.equal(traces[b], ref)


def test_mismatched_trace_errors_are_clear():
    model = tiny_moe()
    rr = RoutingReplay(model)
    ids = _tokens(2, 6)
    with torch.no_grad(), rr.recording():
        model(ids[:, :-1])
    rec = rr.recorded_expert_ids()
    with pytest.raises(ValueError, match="off-by-one from the last token"), torch.no_grad(), rr.replaying(rec):
        model(ids)  # fed 6 tokens, the trace has 5 rows
    with pytest.raises(ValueError, match=r"\[B, T, 2, 2\]"):
        with rr.replaying(rec[:, :, :1]):
            pass
    bad = rec.clone()
    bad[0, 0, 0] = torch.tensor([3, 3])
    with pytest.raises(ValueError, match="duplicate expert"):
        with rr.replaying(bad):
            pass


def test_each_layer_consumed_exactly_once():
    model = tiny_moe()
    rr = RoutingReplay(model)
    block = model.model.layers[1].mlp
    h = block.register_forward_hook(lambda m, a, o: m.gate(a[0].reshape(-1, a[0].shape[-1])) and None)
    with pytest.raises(RuntimeError, match="layer 1: 2 times"), torch.no_grad(), rr.recording():
        model(_tokens(1, 4))
    h.remove()
    check = ConsumptionCheck(3)
    check.begin()
    check.consume(0)
    check.consume(2)
    with pytest.raises(RuntimeError, match="layer 1: 0 times"):
        check.end()


def test_replay_with_gradient_checkpointing_matches_plain():
    ids = _tokens(2, 10, seed=7)
    grads = []
    for ckpt in (False, True):
        model = tiny_moe(seed=2).train()
        if ckpt:
            model.activation_checkpointing_enable()
        rr = RoutingReplay(model)
        calls = []
        model.model.layers[0].mlp.gate.register_forward_hook(lambda m, a, o: calls.append(1))
        forced = torch.stack(
            [torch.randperm(8, generator=torch.Generator().manual_seed(i))[:2] for i in range(2 * 9 * 2)]
        ).view(2, 9, 2, 2)
        with rr.replaying(forced):
            out = model(ids[:, :-1]).logits
            out.float().logsumexp(-1).mean().backward()
        assert len(calls) == (2 if ckpt else 1)  # the checkpointed layer recomputed its router in backward
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], msg=n)


def test_deep_copy_of_attached_model_routes_natively_with_its_own_weights():
    model = tiny_moe(seed=0)
    rr = RoutingReplay(model)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for layer in clone.model.layers:
            layer.mlp.gate.weight.mul_(-1.0)  # the clone's routing now differs from the original's
    ids = _tokens(2, 6)
    rr2 = RoutingReplay(clone)
    with torch.no_grad(), rr.recording():
        model(ids)
    with torch.no_grad(), rr2.recording():
        clone(ids)
    assert not torch.equal(rr.recorded_expert_ids(), rr2.recorded_expert_ids())
    rr.remove()
    with torch.no_grad():
        plain = model(ids).logits
    assert torch.equal(plain, tiny_moe(seed=0)(ids).logits)


def test_replaying_per_sequence_traces_with_left_padding():
    model = tiny_moe(seed=6)
    rr = RoutingReplay(model)
    seqs = [[5, 6, 7, 8, 9], [10, 11, 12]]
    traces, native = [], []
    for s in seqs:
        with torch.no_grad(), rr.recording():
            native.append(model(torch.tensor([s[:-1]])).logits[0])
        traces.append(rr.recorded_expert_ids()[0])
    fed = torch.tensor([[5, 6, 7, 8], [0, 0, 10, 11]])
    fed_mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    pos = (fed_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad(), rr.replaying_traces(traces, fed_mask):
        out = model(fed, attention_mask=fed_mask, position_ids=pos).logits
    torch.testing.assert_close(out[0], native[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1, 2:], native[1], atol=1e-5, rtol=0)
