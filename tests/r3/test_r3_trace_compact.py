"""A batch whose routing trace is uint8 (r3.trace.pad_traces for E <= 256) replays exactly as its int64
copy, in the transformers and the megatron train engine (1 rank, CPU, fp32): same log-probs, same
entropy, same update; megatron's recordings come back uint8 and replay to the same log-probs."""

import pytest
import torch
from r3_tiny_models import tiny_moe

from r3.engines.base import TrainBatch
from r3.engines.hf.train import HFTrainEngine
from r3.replay import ReplayMode

B, S, L, K, E = 3, 10, 2, 2, 8


def _batch(ids_BTLK):
    ids = torch.randint(3, 64, (B, S), generator=torch.Generator().manual_seed(0))
    am = torch.ones(B, S, dtype=torch.long)
    am[1, 7:] = 0
    return TrainBatch(input_ids_BS=ids, attention_mask_BS=am, loss_mask_BT=am[:, 1:].float(), expert_ids_BTLK=ids_BTLK)


def _routing():
    g = torch.Generator().manual_seed(1)
    return torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(B * (S - 1) * L)]).view(B, S - 1, L, K)


def _nll(logp_BT, entropy_BT, rows):
    return -logp_BT.mean(), {}


def _same_replay(make_engine):
    wide = _routing()
    compact = wide.to(torch.uint8)
    eng = make_engine()
    a = eng.compute_logprobs(_batch(wide), routing=ReplayMode.REPLAY, with_entropy=True)
    b = eng.compute_logprobs(_batch(compact), routing=ReplayMode.REPLAY, with_entropy=True)
    assert torch.equal(a.logp_BT, b.logp_BT) and torch.equal(a.entropy_BT, b.entropy_BT)
    m_wide = make_engine().train_step(_batch(wide), _nll, routing=ReplayMode.REPLAY)
    m_compact = make_engine().train_step(_batch(compact), _nll, routing=ReplayMode.REPLAY)
    for k in ("actor/loss", "actor/grad_norm"):
        assert float(m_wide[k]) == float(m_compact[k]), k
    return eng, a


def test_hf_engine_replays_a_uint8_trace_as_int64():
    _same_replay(lambda: HFTrainEngine(tiny_moe(0, router_std=0.5), lr=1e-2))


@pytest.mark.megatron
def test_megatron_engine_replays_a_uint8_trace_as_int64_and_records_uint8():
    pytest.importorskip("megatron.core")
    from r3.engines.megatron.train import MegatronTrainEngine

    hf = tiny_moe(0, router_std=0.5)
    eng, replayed = _same_replay(lambda: MegatronTrainEngine(hf, lr=1e-2, seed=0))
    rec = eng.compute_logprobs(_batch(None), routing=ReplayMode.RECORD).expert_ids_BTLK
    assert rec.dtype == torch.uint8 and rec.shape == (B, S - 1, L, K)
    own = eng.compute_logprobs(_batch(None), routing=ReplayMode.OFF).logp_BT
    assert torch.equal(eng.compute_logprobs(_batch(rec), routing=ReplayMode.REPLAY).logp_BT, own)
