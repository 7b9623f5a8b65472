"""Micro-batches of the megatron engine are cut to their own longest row (MegatronTrainEngine._trimmed),
not the mini-batch's: the forward sees the shorter shape, and logprobs, entropy, the recording and a
train step equal the untrimmed (whole mini-batch in one micro-batch) computation. The engine's
default core attention (SDPA) gives the same logits as megatron's local DotProductAttention."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")

from r3_tiny_models import tiny_moe  # noqa: E402

from r3.engines.base import TrainBatch  # noqa: E402
from r3.engines.megatron import train as mtrain  # noqa: E402
from r3.engines.megatron.model import build_gpt_model, gpt_logits, load_hf_weights  # noqa: E402
from r3.replay import ReplayMode  # noqa: E402

pytestmark = pytest.mark.megatron
B, S = 3, 12


def _batch():
    ids = torch.randint(3, 64, (B, S), generator=torch.Generator().manual_seed(0))
    am = torch.ones(B, S, dtype=torch.long)
    am[1, 5:] = 0  # row 1: 5 real tokens, the others 12
    am[2, 8:] = 0
    return TrainBatch(input_ids_BS=ids, attention_mask_BS=am, loss_mask_BT=am[:, 1:].float())


def _loss(logp_BT, entropy_BT, rows):
    mask = _batch().loss_mask_BT[rows]  # as the algorithm's losses: padding positions carry no weight
    return -(logp_BT * mask).sum() / 20, {"ent": (entropy_BT * mask).sum().detach()}


@pytest.fixture(scope="module")
def hf():
    return tiny_moe(0, router_std=0.5)


def test_micro_batches_are_trimmed_and_results_equal_the_untrimmed_batch(hf, monkeypatch):
    whole = mtrain.MegatronTrainEngine(hf, lr=1e-2, seed=0, micro_batch=0)
    per_row = mtrain.MegatronTrainEngine(hf, lr=1e-2, seed=0, micro_batch=1)
    shapes = []
    real = mtrain.gpt_logits
    monkeypatch.setattr(mtrain, "gpt_logits", lambda m, ids: shapes.append(tuple(ids.shape)) or real(m, ids))
    batch = _batch()
    ref = whole.compute_logprobs(batch, routing=ReplayMode.RECORD, with_entropy=True)
    assert shapes == [(3, 12)]
    shapes.clear()
    got = per_row.compute_logprobs(batch, routing=ReplayMode.RECORD, with_entropy=True)
    assert shapes == [(1, 12), (1, 5), (1, 8)]  # each row at its own length
    fed = batch.attention_mask_BS[:, 1:].bool()
    assert got.logp_BT.shape == ref.logp_BT.shape == (B, S - 1)
    assert (got.logp_BT - ref.logp_BT)[fed].abs().max() < 1e-5
    assert (got.entropy_BT - ref.entropy_BT)[fed].abs().max() < 1e-5
    assert torch.equal(got.expert_ids_BTLK[fed], ref.expert_ids_BTLK[fed])
    assert got.logp_BT[~fed].abs().max() == 0  # positions a trimmed row did not feed: zeros
    # a recording with trimmed rows replays (the padding positions hold distinct dummy experts)
    replay = batch.rows(torch.arange(B)) if hasattr(batch, "rows") else batch
    replay = TrainBatch(**{**replay.__dict__, "expert_ids_BTLK": got.expert_ids_BTLK})
    again = per_row.compute_logprobs(replay, routing=ReplayMode.REPLAY)
    assert (again.logp_BT - got.logp_BT)[fed].abs().max() < 1e-6
    shapes.clear()
    m_whole = whole.train_step(batch, _loss)
    m_row = per_row.train_step(batch, _loss)
    assert shapes == [(3, 12), (1, 12), (1, 5), (1, 8)]
    assert float(m_row["actor/loss"]) == pytest.approx(float(m_whole["actor/loss"]), abs=1e-5)
    assert float(m_row["actor/grad_norm"]) == pytest.approx(float(m_whole["actor/grad_norm"]), rel=1e-5)
    # the gradients (kept after the step; Adam's normalised update would magnify rounding in near-zero ones)
    for (n, a), (_, b) in zip(whole.model.named_parameters(), per_row.model.named_parameters(), strict=True):
        assert (a.grad - b.grad).abs().max() <= 1e-6 * max(1.0, a.grad.abs().max()), n


def test_sdpa_attention_equals_megatron_local_attention(hf):
    models = {}
    for kind in ("sdpa", "local"):
        m = build_gpt_model(hf.config, attention=kind)
        load_hf_weights(m, hf.state_dict(), hf.config)
        models[kind] = m.eval()
    assert type(models["sdpa"].decoder.layers[0].self_attention.core_attention).__name__ == "SDPADotProductAttention"
    assert type(models["local"].decoder.layers[0].self_attention.core_attention).__name__ == "DotProductAttention"
    ids = _batch().input_ids_BS
    with torch.no_grad():
        diff = (gpt_logits(models["sdpa"], ids) - gpt_logits(models["local"], ids)).abs().max().item()
    assert diff < 1e-6, diff  # fp32; measured 7.5e-8


def test_unknown_attention_kind_refused(hf):
    with pytest.raises(ValueError, match=r"attention must be one of \('sdpa', 'local'\), got 'flash'"):
        build_gpt_model(hf.config, attention="flash")
