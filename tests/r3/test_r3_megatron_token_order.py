"""Replay rows under context parallelism and packed (THD) sequences (r3.engines.megatron.token_order),
checked against megatron-core's own slicing functions applied to tensors of token positions.

megatron's `get_batch_on_this_cp_rank` (utils.py:1994) reads the CP size and rank from the group it
is given, through `.size()` and `.rank()` only (utils.get_pg_size / get_pg_rank); one process cannot
hold a CP group of 2+, so `_CPRank` stands in for the process group: megatron's slicing itself runs.
`get_thd_batch_on_this_cp_rank` (utils.py:2041) runs for CP = 1; for CP > 1 it calls Transformer
Engine's `thd_get_partitioned_indices`, which is not installed here (asserted below), whose
definition (TE thd_partition_indices_kernel: each sequence's padded span cut into 2 * CP chunks,
chunks r and 2 * CP - 1 - r, sequence after sequence) is megatron's BSHD split applied per span.
"""

import pytest
import torch

pytest.importorskip("megatron.core")

from megatron.core.utils import get_batch_on_this_cp_rank, get_thd_batch_on_this_cp_rank  # noqa: E402

from r3.engines.megatron import token_order  # noqa: E402
from r3.engines.megatron.compat import init_single_process_group  # noqa: E402
from r3.engines.megatron.replay import to_megatron_layout  # noqa: E402
from r3.engines.megatron.token_order import PackedLayout  # noqa: E402
from r3.trace import RoutingSpec  # noqa: E402

pytestmark = pytest.mark.megatron
L, K, E = 2, 2, 8
SPEC = RoutingSpec(num_layers=L, top_k=K, num_experts=E)


class _CPRank:
    """The process group megatron's get_batch_on_this_cp_rank is handed: its size and this rank."""

    def __init__(self, size: int, rank: int):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


@pytest.fixture(autouse=True, scope="module")
def _process_group():
    init_single_process_group()  # megatron's get_pg_size reads a group only once torch.distributed runs


def megatron_cp_split(x_BS: torch.Tensor, cp: int, rank: int) -> torch.Tensor:
    """megatron's load-balanced CP split of a [B, S, ...] tensor (sequence dimension 1)."""
    return get_batch_on_this_cp_rank({"tokens": x_BS.clone()}, cp_group=_CPRank(cp, rank))["tokens"]


def _routing(B: int, T: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(B * T * L)]).view(B, T, L, K)


# --- padded batches (BSHD) under CP --------------------------------------------------------------------
@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_bshd_index_is_megatrons_cp_split(cp):
    B, S = 3, 24
    seq_major_row_BS = torch.arange(S)[None, :] * B + torch.arange(B)[:, None]  # (b, s) -> row s * B + b
    for rank in range(cp):
        local_BS = megatron_cp_split(seq_major_row_BS, cp, rank)  # [B, S / cp]
        # the router sees the rank's [S / cp, B] hidden states flattened seq-major
        assert torch.equal(token_order.bshd_index(B, S, cp, rank), local_BS.t().reshape(-1))
        assert torch.equal(token_order.cp_positions(S, cp, rank), megatron_cp_split(torch.arange(S)[None], cp, rank)[0])


def test_cp_positions_golden():
    # S = 8, CP = 2: chunks of 2; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2
    assert token_order.cp_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert token_order.cp_positions(8, 2, 1).tolist() == [2, 3, 4, 5]


@pytest.mark.parametrize(("cp", "tp"), [(2, 1), (2, 2), (4, 1)])
def test_bshd_replay_rows_are_what_each_rank_router_sees(cp, tp):
    """The rows handed to each (CP, TP) rank's router equal the rollout rows of the tokens megatron puts
    on that rank: the trace (plus the dummy row of the unfed last token) split by megatron, seq-major,
    then the TP rank's sequence-parallel slice."""
    B, S = 2, 16
    ids_BTLK = _routing(B, S - 1)
    per_layer = to_megatron_layout(ids_BTLK, seq_len=S, spec=SPEC)
    full_BSLK = torch.cat([ids_BTLK, torch.arange(K).expand(B, 1, L, K)], dim=1)
    for rank in range(cp):
        seen_NLK = megatron_cp_split(full_BSLK, cp, rank).transpose(0, 1).reshape(-1, L, K)
        n = seen_NLK.shape[0] // tp
        index = token_order.bshd_index(B, S, cp, rank)
        for t in range(tp):
            for layer in range(L):
                rows = token_order.router_rows(per_layer[layer], index, tp_size=tp, tp_rank=t)
                assert torch.equal(rows, seen_NLK[t * n : (t + 1) * n, layer])


def test_recorded_rows_of_every_cp_rank_restore_the_full_order():
    B, S, cp = 3, 8, 2
    full_NK = to_megatron_layout(_routing(B, S - 1), seq_len=S, spec=SPEC)[0]
    indices = [token_order.bshd_index(B, S, cp, r) for r in range(cp)]
    assert torch.equal(token_order.restore_full_order([full_NK[i] for i in indices], indices), full_NK)
    with pytest.raises(ValueError, match="do not cover 0..23 once"):
        token_order.restore_full_order([full_NK[indices[0]]] * 2, [indices[0]] * 2)


def test_unpadded_sequence_is_refused_with_the_numbers():
    with pytest.raises(ValueError, match=r"got 10, expected a multiple of 2 \* CP = 4"):
        token_order.bshd_index(2, 10, 2, 0)
    with pytest.raises(ValueError, match="rank 2 of size 2"):
        token_order.cp_positions(8, 2, 2)
    with pytest.raises(ValueError, match="cannot be split over TP = 4"):
        token_order.router_rows(torch.zeros(6, K), torch.arange(6), tp_size=4)


# --- packed sequences (THD) ----------------------------------------------------------------------------
LENGTHS = (5, 3, 8)


def test_packed_layout_and_megatrons_packed_seq_params():
    layout = PackedLayout(lengths=LENGTHS, multiple=4)
    assert layout.padded == (8, 4, 8) and layout.total == 20
    assert layout.cu_seqlens().tolist() == [0, 5, 8, 16]
    assert layout.cu_seqlens(padded=True).tolist() == [0, 8, 12, 20]
    positions = torch.arange(layout.total)[None]
    batch, params = get_thd_batch_on_this_cp_rank(
        {"tokens": positions.clone()},
        layout.cu_seqlens(),
        layout.cu_seqlens(padded=True),
        torch.tensor([max(layout.padded)]),
        cp_size=1,
        cp_rank=0,
    )
    ours = layout.packed_seq_params()
    for field in ("qkv_format", "max_seqlen_q", "max_seqlen_kv"):
        assert getattr(ours, field) == getattr(params, field), field
    for field in ("cu_seqlens_q", "cu_seqlens_kv", "cu_seqlens_q_padded", "cu_seqlens_kv_padded"):
        assert torch.equal(getattr(ours, field), getattr(params, field)), field
    assert torch.equal(token_order.thd_index(layout, 1, 0), batch["tokens"][0])  # CP = 1: packed order


def test_megatrons_thd_cp_split_needs_transformer_engine_here():
    """Why THD under CP is checked against the per-span split below, not megatron's THD function."""
    pytest.importorskip("megatron.core")
    try:
        import transformer_engine  # noqa: F401

        pytest.skip("Transformer Engine is installed: megatron's THD CP split can run (not on this machine)")
    except ImportError:
        pass
    layout = PackedLayout(lengths=LENGTHS, multiple=4)
    with pytest.raises(AssertionError, match="Transformer Engine"):
        get_thd_batch_on_this_cp_rank(
            {"tokens": torch.arange(layout.total)[None]},
            layout.cu_seqlens(),
            layout.cu_seqlens(padded=True),
            torch.tensor([max(layout.padded)]),
            cp_size=2,
            cp_rank=0,
        )


@pytest.mark.parametrize("cp", [2, 3])
def test_thd_index_is_megatrons_split_of_each_packed_span(cp):
    layout = PackedLayout.from_attention_mask(
        torch.tensor([[1] * n + [0] * (8 - n) for n in LENGTHS]), cp_size=cp, tp_size=1
    )
    assert layout.multiple == 2 * cp and all(span % (2 * cp) == 0 for span in layout.padded)
    positions = torch.arange(layout.total)
    for rank in range(cp):
        start, expected = 0, []
        for span in layout.padded:
            expected.append(megatron_cp_split(positions[None, start : start + span], cp, rank)[0])
            start += span
        assert torch.equal(token_order.thd_index(layout, cp, rank), torch.cat(expected))


def test_thd_index_golden():
    # spans 8, 4, 8 over CP = 2: chunks of 2, 1, 2 tokens; rank 0 takes chunks 0 and 3 of each span
    layout = PackedLayout(lengths=LENGTHS, multiple=4)
    assert token_order.thd_index(layout, 2, 0).tolist() == [0, 1, 6, 7, 8, 11, 12, 13, 18, 19]
    assert token_order.thd_index(layout, 2, 1).tolist() == [2, 3, 4, 5, 9, 10, 14, 15, 16, 17]


def test_packed_routing_rows_and_their_cp_order():
    """Packed position q holds the rollout row of its token; a sequence's last token and its padding
    hold the dummy experts; CP rank r's router gets megatron's split of those packed rows, and every
    rank's rows restore the packed order."""
    S, cp = 8, 2
    ids_BTLK = _routing(len(LENGTHS), S - 1, seed=1)
    am_BS = torch.tensor([[1] * n + [0] * (S - n) for n in LENGTHS])
    layout = PackedLayout.from_attention_mask(am_BS, cp_size=cp)
    rows = layout.pack_routing(ids_BTLK, SPEC)
    assert len(rows) == L and rows[0].shape == (layout.total, K)
    start = 0
    for b, (n, span) in enumerate(zip(layout.lengths, layout.padded)):
        for layer in range(L):
            assert torch.equal(rows[layer][start : start + n - 1], ids_BTLK[b, : n - 1, layer])
            assert (rows[layer][start + n - 1 : start + span] == torch.arange(K)).all()  # last token + padding
        start += span
    # the tokens packed the same way: what megatron's THD batch holds, positions beyond each sequence 0
    tokens = layout.pack(torch.arange(1, S + 1).expand(len(LENGTHS), S), 0)[0]
    assert tokens[: layout.padded[0]].tolist() == [1, 2, 3, 4, 5, 0, 0, 0]
    indices = [token_order.thd_index(layout, cp, r) for r in range(cp)]
    for rank, index in enumerate(indices):
        start, expected = 0, []
        for span in layout.padded:
            expected.append(megatron_cp_split(rows[0][None, start : start + span], cp, rank)[0])
            start += span
        assert torch.equal(token_order.router_rows(rows[0], index), torch.cat(expected))
    assert torch.equal(token_order.restore_full_order([rows[0][i] for i in indices], indices), rows[0])


def test_packing_refuses_traces_and_layouts_of_another_batch():
    layout = PackedLayout(lengths=LENGTHS, multiple=4)
    with pytest.raises(ValueError, match=r"expected \[3, >= 7, 2, 2\]"):
        layout.pack_routing(_routing(3, 5), SPEC)
    with pytest.raises(ValueError, match="got B = 2"):
        layout.pack(torch.zeros(2, 8), 0)
    with pytest.raises(ValueError, match="sequences of >= 2 tokens"):
        PackedLayout(lengths=(1, 4), multiple=2)


# --- the engine: replay's packed path on a real model, and the refusals --------------------------------
def test_replay_hands_each_router_its_packed_rows_in_a_forward():
    """REPLAY with a packed layout, CP = 1: a forward of the packed tokens [1, total] (megatron's THD
    batch; the local attention here is causal over the whole row, not per sequence, which only TE's
    attention with PackedSeqParams does) feeds every router exactly the packed rows, and the
    consumption check passes: the router saw `total` token rows, in packed order."""
    from r3_tiny_models import tiny_moe

    from r3.engines.megatron.model import gpt_logits
    from r3.engines.megatron.train import MegatronTrainEngine
    from r3.replay import ReplayMode

    eng = MegatronTrainEngine(tiny_moe(0), lr=1e-3)
    S = 8
    ids_BTLK = _routing(len(LENGTHS), S - 1, seed=2)
    layout = PackedLayout(lengths=LENGTHS, multiple=1)  # CP = TP = 1: no span padding
    tokens = layout.pack(torch.randint(3, 64, (len(LENGTHS), S), generator=torch.Generator().manual_seed(0)), 0)
    given = []
    for inst in eng.replay._instances:

        def spy(rows, _orig=inst.set_target_indices):
            given.append(rows.clone())
            return _orig(rows)

        inst.set_target_indices = spy
    with eng.replay.session(
        ReplayMode.REPLAY, batch_size=1, seq_len=layout.total, expert_ids_BTLK=ids_BTLK, packed=layout
    ):
        with torch.no_grad():
            gpt_logits(eng.model.eval(), tokens)
    expected = layout.pack_routing(ids_BTLK, SPEC)
    assert len(given) == L and all(torch.equal(g, e) for g, e in zip(given, expected))
    with pytest.raises(NotImplementedError, match="routing=RECORD with a packed"):
        with eng.replay.session(ReplayMode.RECORD, batch_size=1, seq_len=layout.total, packed=layout):
            pass


@pytest.mark.parametrize(
    ("kw", "asked"),
    [({"context_parallel": 2}, "context_parallel=2"), ({"packed_sequences": True}, "packed_sequences=True")],
)
def test_engine_refuses_cp_and_packed_without_transformer_engine(kw, asked):
    from r3.engines.megatron.config import MegatronTrainConfig
    from r3.engines.registry import build_train_engine

    try:
        import transformer_engine  # noqa: F401

        cause = "Transformer Engine is importable, but this engine builds megatron's local layer spec"
    except ImportError:
        cause = "Transformer Engine is not installed here"
    with pytest.raises(NotImplementedError) as err:
        build_train_engine(MegatronTrainConfig(model_path="/nonexistent", lr=1e-3, **kw))  # refused before reading
    msg = str(err.value)
    assert f"{asked} was asked, but cannot run" in msg and cause in msg
    assert "dot_product_attention.py:57, :153" in msg and "To fix: on GPU nodes install transformer-engine" in msg
    with pytest.raises(ValueError, match="context_parallel=0"):
        MegatronTrainConfig(model_path="/m", lr=1e-3, context_parallel=0)
