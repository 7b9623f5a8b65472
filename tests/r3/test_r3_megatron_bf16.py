"""bf16 training path of the megatron engine (one process): bf16 parameters, megatron's DDP with
fp32 main grads and distributed optimizer; a checkpoint resumes exactly (fp32 master weights and
Adam state included), and a precision mismatch on load is refused. Multi-rank: tests/distributed."""

from __future__ import annotations

import pytest
import torch
from r3_tiny_models import tiny_moe

pytest.importorskip("megatron.core")

from r3.engines.base import TrainBatch  # noqa: E402
from r3.engines.megatron.train import MegatronTrainEngine  # noqa: E402
from r3.replay import ReplayMode  # noqa: E402

pytestmark = pytest.mark.megatron


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 64, (4, 7), generator=g)
    return TrainBatch(input_ids_BS=ids, attention_mask_BS=torch.ones_like(ids), loss_mask_BT=torch.ones(4, 6))


def _loss(batch):
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])

    def loss_fn(logp_BT, entropy_BT, rows):
        return -(adv[rows, None] * logp_BT).sum() / 24, {}

    return loss_fn


def test_bf16_checkpoint_resumes_exactly(tmp_path):
    hf = tiny_moe(0, router_std=0.5)
    a = MegatronTrainEngine(hf, lr=1e-2, precision="bf16")
    assert {p.dtype for p in a.model.parameters()} >= {torch.bfloat16}
    batch, loss_fn = _batch(), _loss(_batch())
    a.train_step(batch, loss_fn)
    a.save(str(tmp_path / "ck"))
    m_a = a.train_step(batch, loss_fn)
    w_a = a.rollout_state_dict()

    b = MegatronTrainEngine(hf, lr=1e-2, precision="bf16")
    b.load(str(tmp_path / "ck"))
    m_b = b.train_step(batch, loss_fn)
    w_b = b.rollout_state_dict()
    assert float(m_a["actor/grad_norm"]) == float(m_b["actor/grad_norm"])
    assert all(torch.equal(w_a[k], w_b[k]) for k in w_a)
    assert b.steps == 2

    c = MegatronTrainEngine(hf, lr=1e-2, precision="fp32")
    with pytest.raises(ValueError, match="precision 'bf16', this engine runs 'fp32'"):
        c.load(str(tmp_path / "ck"))


def test_bf16_replay_obeys_forced_routing():
    hf = tiny_moe(1, router_std=0.5)
    eng = MegatronTrainEngine(hf, lr=1e-3, precision="bf16")
    batch = _batch()
    own = eng.compute_logprobs(batch, routing=ReplayMode.RECORD)
    batch.expert_ids_BTLK = own.expert_ids_BTLK
    again = eng.compute_logprobs(batch, routing=ReplayMode.REPLAY)
    assert torch.equal(again.logp_BT, eng.compute_logprobs(batch, routing=ReplayMode.OFF).logp_BT)
    forced = torch.roll(own.expert_ids_BTLK, 1, dims=-1).add(1).remainder(8)
    batch.expert_ids_BTLK = forced
    assert (eng.compute_logprobs(batch, routing=ReplayMode.REPLAY).logp_BT - again.logp_BT).abs().max() > 1e-3
