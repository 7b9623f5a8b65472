"""RouterReplay bridge (r3.engines.megatron.replay) and MegatronTrainEngine on a tiny Qwen3-MoE (CPU, fp32)."""

import pytest
import torch

pytest.importorskip("megatron.core")

from r3_tiny_models import tiny_moe  # noqa: E402

from r3.engines.base import TrainBatch  # noqa: E402
from r3.engines.hf.replay import RoutingReplay  # noqa: E402
from r3.engines.megatron.model import gpt_logits  # noqa: E402
from r3.engines.megatron.replay import MegatronRouterReplay, from_megatron_layout, to_megatron_layout  # noqa: E402
from r3.engines.megatron.train import MegatronTrainEngine  # noqa: E402
from r3.replay import ReplayMode  # noqa: E402
from r3.trace import RoutingSpec  # noqa: E402

pytestmark = pytest.mark.megatron
B, S, L, K, E = 3, 10, 2, 2, 8
SPEC = RoutingSpec(num_layers=L, top_k=K, num_experts=E)


def _batch(seed=0, with_routing=None):
    ids = torch.randint(3, 64, (B, S), generator=torch.Generator().manual_seed(seed))
    am = torch.ones(B, S, dtype=torch.long)
    am[1, 7:] = 0  # right padding on one row
    lm = am[:, 1:].float()
    return TrainBatch(input_ids_BS=ids, attention_mask_BS=am, loss_mask_BT=lm, expert_ids_BTLK=with_routing)


def _random_routing(seed):
    """Distinct experts per row: the first K of a random permutation of E."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(B * (S - 1) * L)]).view(B, S - 1, L, K)


def _nll(logp_BT, entropy_BT, rows):
    return -logp_BT.mean(), {"nll": -logp_BT.mean().detach()}


@pytest.fixture(scope="module")
def hf():
    return tiny_moe(0, router_std=0.5)


@pytest.fixture(scope="module")
def engine(hf):
    return MegatronTrainEngine(hf, lr=1e-2, seed=0)


def test_layout_is_seq_major_and_round_trips():
    ids_BTLK = _random_routing(0)
    per_layer = to_megatron_layout(ids_BTLK, seq_len=S, spec=SPEC)
    assert len(per_layer) == L and per_layer[0].shape == (S * B, K)
    b, s, l = 2, 4, 1
    assert torch.equal(per_layer[l][s * B + b], ids_BTLK[b, s, l])  # row = s*B + b
    assert torch.equal(per_layer[0][(S - 1) * B + 1], torch.arange(K))  # last position: dummy 0..K-1
    assert torch.equal(from_megatron_layout(per_layer, batch_size=B, seq_len=S), ids_BTLK)


def test_wrong_shape_trace_error_names_the_off_by_one():
    ids_BSLK = torch.arange(K).expand(B, S, L, K)  # one row too many: includes the last token
    with pytest.raises(ValueError, match=r"got \(3, 10, 2, 2\), expected \(3, 9, 2, 2\).*last token"):
        to_megatron_layout(ids_BSLK, seq_len=S, spec=SPEC)
    with pytest.raises(ValueError, match="3 layers but the model has 2 MoE layers"):
        to_megatron_layout(torch.arange(K).expand(B, S - 1, 3, K), seq_len=S, spec=SPEC)
    dup = _random_routing(0).clone()
    dup[0, 0, 0] = torch.tensor([5, 5])
    with pytest.raises(ValueError, match="duplicate expert"):
        to_megatron_layout(dup, seq_len=S, spec=SPEC)


def test_transformers_recorded_routing_matches_megatron(engine, hf):
    batch = _batch()
    rec = engine.compute_logprobs(batch, routing=ReplayMode.RECORD).expert_ids_BTLK
    assert rec.shape == (B, S - 1, L, K)
    rr = RoutingReplay(hf)
    try:
        with torch.no_grad(), rr.recording():
            hf(batch.input_ids_BS[:, :-1])
        hf_rec = rr.recorded_expert_ids()
    finally:
        rr.remove()
    assert (hf_rec == rec).float().mean() > 0.99  # same model, fp32: same routing (ties aside)


def test_replaying_own_routing_reproduces_logprobs_exactly(engine):
    batch = _batch()
    native = engine.compute_logprobs(batch, routing=ReplayMode.RECORD, with_entropy=True)
    batch.expert_ids_BTLK = native.expert_ids_BTLK
    replayed = engine.compute_logprobs(batch, routing=ReplayMode.REPLAY, with_entropy=True)
    assert torch.equal(native.logp_BT, replayed.logp_BT)
    assert torch.equal(native.entropy_BT, replayed.entropy_BT)


def test_replaying_other_routing_forces_those_experts(engine, hf):
    batch = _batch(with_routing=_random_routing(1))
    native = engine.compute_logprobs(batch, routing=ReplayMode.RECORD)
    assert (native.expert_ids_BTLK != batch.expert_ids_BTLK).any()
    # the router's own output: routing_map is exactly the replayed experts, gate weights are the
    # softmax of the live logits over them (paper: g_i = I_i exp(s_i) / sum_j I_j exp(s_j))
    seen = []
    routers = [m for m in engine.model.modules() if type(m).__name__ == "TopKRouter"]
    hooks = [r.register_forward_hook(lambda m, a, out: seen.append((m, a[0], out))) for r in routers]
    try:
        forced = engine.compute_logprobs(batch, routing=ReplayMode.REPLAY)
    finally:
        for h in hooks:
            h.remove()
    layers = to_megatron_layout(batch.expert_ids_BTLK, seq_len=S, spec=SPEC)
    for l, (router, x_SBH, (probs_NE, map_NE)) in enumerate(seen):
        want_NE = torch.zeros(S * B, E, dtype=torch.bool).scatter(1, layers[l], True)
        assert torch.equal(map_NE, want_NE)
        logits_NE = x_SBH.reshape(S * B, -1) @ router.weight.T
        g_NK = torch.softmax(logits_NE.gather(1, layers[l]), dim=-1)
        torch.testing.assert_close(probs_NE.gather(1, layers[l]), g_NK)
    assert not torch.allclose(forced.logp_BT, native.logp_BT)
    # cross-engine: transformers replaying the same routing gives the same log-probs
    rr = RoutingReplay(hf)
    try:
        with torch.no_grad(), rr.replaying(batch.expert_ids_BTLK):
            hf_logits = hf(batch.input_ids_BS[:, :-1]).logits
    finally:
        rr.remove()
    hf_logp = torch.log_softmax(hf_logits, -1).gather(-1, batch.input_ids_BS[:, 1:, None])[..., 0]
    assert (hf_logp - forced.logp_BT).abs().max() < 1e-5


def test_replay_gradient_reaches_router_and_recompute_matches():
    hf = tiny_moe(0, router_std=0.5)
    plain = MegatronTrainEngine(hf, lr=1e-2, seed=0)
    recomp = MegatronTrainEngine(hf, lr=1e-2, seed=0, recompute=True)  # two engines, one process
    batch = _batch(with_routing=_random_routing(2))
    m_plain = plain.train_step(batch, _nll, routing=ReplayMode.REPLAY)
    m_recomp = recomp.train_step(batch, _nll, routing=ReplayMode.REPLAY)  # REPLAY_BACKWARD in the recompute
    for eng in (plain, recomp):
        for r in (m for m in eng.model.modules() if type(m).__name__ == "TopKRouter"):
            assert r.weight.grad is not None and r.weight.grad.abs().sum() > 0
    assert float(m_plain["actor/loss"]) == pytest.approx(float(m_recomp["actor/loss"]), abs=1e-6)
    assert float(m_plain["actor/grad_norm"]) == pytest.approx(float(m_recomp["actor/grad_norm"]), rel=1e-5)
    for (n, p), (_, q) in zip(plain.model.named_parameters(), recomp.model.named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=n)


def test_each_layer_consumed_exactly_once(engine):
    replay = engine.replay
    ids = _batch().input_ids_BS
    with pytest.raises(RuntimeError, match="exactly once per forward.*layer 0: 2 times"):
        with (
            torch.no_grad(),
            replay.session(ReplayMode.REPLAY, batch_size=B, seq_len=S, expert_ids_BTLK=_random_routing(3)) as sess,
        ):
            gpt_logits(engine.model, ids)
            gpt_logits(engine.model, ids)  # a second forward in one session
            sess.end_forward()
    with pytest.raises(ValueError, match="router sees 20 token rows"):  # batch differs from the trace's
        with (
            torch.no_grad(),
            replay.session(ReplayMode.REPLAY, batch_size=B, seq_len=S, expert_ids_BTLK=_random_routing(3)),
        ):
            gpt_logits(engine.model, ids[:2])
    out = engine.compute_logprobs(_batch())  # state was cleared after the errors
    assert torch.isfinite(out.logp_BT).all()


def test_model_claimed_twice_refused(engine):
    with pytest.raises(RuntimeError, match="already claimed"):
        MegatronRouterReplay(engine.model, SPEC)


def test_train_step_reduces_loss_and_resume_is_exact(hf, tmp_path):
    eng = MegatronTrainEngine(hf, lr=1e-2, seed=0, micro_batch=2)
    batch = _batch(with_routing=_random_routing(4))
    losses = [float(eng.train_step(batch, _nll, routing=ReplayMode.REPLAY)["actor/loss"]) for _ in range(4)]
    assert losses[-1] < losses[0] - 0.1, losses
    eng.save(str(tmp_path / "ckpt"))
    nxt = eng.train_step(batch, _nll, routing=ReplayMode.REPLAY)
    other = MegatronTrainEngine(hf, lr=1e-2, seed=0, micro_batch=2)
    other.load(str(tmp_path / "ckpt"))
    assert other.steps == 4
    resumed = other.train_step(batch, _nll, routing=ReplayMode.REPLAY)
    assert resumed == nxt
    a, b = eng.rollout_state_dict(), other.rollout_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


class _RunsCode:
    """A pickle payload that would run code on load (what a crafted checkpoint can carry)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))  # creating the marker file = code ran


def test_crafted_checkpoint_is_refused_without_running_code(engine, tmp_path):
    """load() must not unpickle code from a run
    directory's file, so a crafted checkpoint ran code. It must now refuse the file unexecuted."""
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save({"model": {}, "payload": _RunsCode(marker)}, engine.checkpoint_file(str(ckpt)))
    with pytest.raises(Exception, match="(?i)weights_only|unpickl|not allowed|unsupported global"):
        engine.load(str(ckpt))
    assert not marker.exists()
