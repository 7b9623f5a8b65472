"""Routing traces: validation, compact storage round trips, SGLang wire format, padding."""

import base64
import math

import numpy as np
import pytest
import torch

from r3.trace import (
    RoutingSpec,
    RoutingTrace,
    decode,
    default_encoding,
    encode,
    encoded_nbytes,
    from_sglang,
    pad_traces,
    place_traces,
    to_sglang,
    trace_dtype,
)


def _random_trace(T, spec, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack(
        [torch.randperm(spec.num_experts, generator=g)[: spec.top_k] for _ in range(T * spec.num_layers)]
    ).view(T, spec.num_layers, spec.top_k)
    return RoutingTrace(ids, spec)


def test_validation_messages():
    spec = RoutingSpec(num_layers=2, top_k=2, num_experts=8)
    with pytest.raises(ValueError, match=r"got=12 .*expected=16 \(tokens=4, num_layers=2, topk=2\)"):
        RoutingTrace(torch.ones(3, 2, 2, dtype=torch.long), spec, num_tokens=4)
    with pytest.raises(ValueError, match="in \\[0, 8\\)"):
        RoutingTrace(torch.tensor([[[0, 8], [1, 2]]]), spec)
    with pytest.raises(ValueError, match="duplicate expert.*token 1, layer 0"):
        RoutingTrace(torch.tensor([[[0, 1], [1, 2]], [[3, 3], [1, 2]]]), spec)
    with pytest.raises(ValueError, match="integer"):
        RoutingTrace(torch.zeros(1, 2, 2), spec)
    spec1 = RoutingSpec(num_layers=2, top_k=1, num_experts=8)
    with pytest.raises(ValueError, match=r"layer\(s\) \[1\] have all-zero routing"):
        RoutingTrace(torch.tensor([[[3], [0]], [[4], [0]], [[5], [0]]]), spec1)


def test_spec_from_hf_config_counts_moe_layers():
    from transformers import Qwen3MoeConfig

    cfg = Qwen3MoeConfig(
        num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[1], num_experts=16, num_experts_per_tok=4
    )
    # MoE layers: (i + 1) % 2 == 0 -> 1, 3, 5 ; minus mlp_only 1 -> 3, 5
    assert RoutingSpec.from_hf_config(cfg) == RoutingSpec(num_layers=2, top_k=4, num_experts=16)


@pytest.mark.parametrize(
    "E,K,encoding",
    [
        (8, 2, "uint8"),
        (8, 2, "bitpack"),
        (128, 8, "uint8"),
        (128, 8, "bitpack"),
        (300, 4, "uint16"),
        (300, 4, "bitpack"),
    ],
)
def test_round_trip_exact_and_order_preserved(E, K, encoding):
    spec = RoutingSpec(num_layers=3, top_k=K, num_experts=E)
    tr = _random_trace(37, spec, seed=E)
    assert not torch.equal(tr.expert_ids_TLK, tr.expert_ids_TLK.sort(-1).values)  # unsorted input
    data = encode(tr, encoding)
    assert len(data) == encoded_nbytes(37, spec, encoding)
    back = decode(data, encoding=encoding, num_tokens=37, spec=spec)
    assert torch.equal(back.expert_ids_TLK, tr.expert_ids_TLK.long())


def test_sizes_and_default_encoding():
    spec = RoutingSpec(num_layers=48, top_k=8, num_experts=128)  # Qwen3-30B-A3B
    # floor: 48 * 8 * 7 bits = 2688 bits = 336 bytes per token; uint8: 384
    assert encoded_nbytes(1, spec, "bitpack") == 336 and encoded_nbytes(1, spec, "uint8") == 384
    assert spec.bits_per_id == 7
    assert default_encoding(256) == "uint8" and default_encoding(257) == "uint16"
    with pytest.raises(ValueError, match="uint8 holds"):
        encode(_random_trace(2, RoutingSpec(num_layers=1, top_k=2, num_experts=300)), "uint8")
    with pytest.raises(ValueError, match="expected 16"):
        decode(b"\0" * 15, encoding="uint8", num_tokens=4, spec=RoutingSpec(num_layers=2, top_k=2, num_experts=8))


def test_from_sglang_shape_and_start_len():
    spec = RoutingSpec(num_layers=2, top_k=2, num_experts=8)
    tr = _random_trace(9, spec)
    # a 10-token sequence has 9 rows; with start_len=3 the server sends 10 - 1 - 3 = 6 rows
    b64 = base64.b64encode(tr.expert_ids_TLK.numpy().astype("<i4").tobytes())
    got = from_sglang(b64, seqlen=10, spec=spec)
    assert torch.equal(got.expert_ids_TLK, tr.expert_ids_TLK)
    part = base64.b64encode(tr.expert_ids_TLK[3:].numpy().astype("<i4").tobytes()).decode()
    assert torch.equal(from_sglang(part, seqlen=10, start_len=3, spec=spec).expert_ids_TLK, tr.expert_ids_TLK[3:])
    assert from_sglang(to_sglang(tr), seqlen=10, spec=spec).expert_ids_TLK.equal(tr.expert_ids_TLK)
    with pytest.raises(ValueError, match=r"got=36, expected=40 \(tokens=10"):
        from_sglang(b64, seqlen=11, spec=spec)  # off by one: the last token has no row


def test_pad_traces_dummy_rows_are_distinct():
    spec = RoutingSpec(num_layers=2, top_k=3, num_experts=8)
    a, b = _random_trace(4, spec, 1), _random_trace(2, spec, 2)
    out = pad_traces([a, b], 5)
    assert out.shape == (2, 5, 2, 3)
    assert torch.equal(out[0, :4], a.expert_ids_TLK) and torch.equal(out[1, :2], b.expert_ids_TLK)
    assert torch.equal(out[1, 2:], torch.tensor([0, 1, 2]).expand(3, 2, 3))
    assert torch.equal(out[0, 4], torch.tensor([[0, 1, 2], [0, 1, 2]]))
    RoutingTrace(out.reshape(-1, 2, 3), spec)  # padded batch passes validation (no duplicate experts)
    with pytest.raises(ValueError, match="T_max"):
        pad_traces([a], 3)


def test_place_traces_left_padding():
    spec = RoutingSpec(num_layers=1, top_k=2, num_experts=8)
    a = _random_trace(2, spec, 3)
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    b = _random_trace(3, spec, 4)
    out = place_traces([a, b], mask)
    assert torch.equal(out[0, 1:], a.expert_ids_TLK) and torch.equal(out[0, 0], torch.tensor([[0, 1]]))
    assert torch.equal(out[1], b.expert_ids_TLK)
    with pytest.raises(ValueError, match="off-by-one"):
        place_traces([a, a], mask)


def test_bitpack_is_at_floor():
    spec = RoutingSpec(num_layers=4, top_k=8, num_experts=128)
    n = len(encode(_random_trace(100, spec), "bitpack"))
    assert n == math.ceil(100 * 4 * 8 * 7 / 8)
    assert np.frombuffer(encode(_random_trace(1, spec), "uint8"), np.uint8).size == 32


def test_pad_traces_is_compact_uint8_up_to_256_experts_int32_beyond():
    """The batch trace stays compact (r3.trace.trace_dtype): uint8 for E <= 256 (the paper's 128 experts),
    int32 beyond (NCCL has no int16); the ids and the dummy padding rows are unchanged by it."""
    spec = RoutingSpec(num_layers=2, top_k=3, num_experts=128)
    a, b = _random_trace(4, spec, 1), _random_trace(2, spec, 2)
    out = pad_traces([a, b], 5)
    assert out.dtype == torch.uint8 and out.shape == (2, 5, 2, 3)
    assert torch.equal(out[0, :4].long(), a.expert_ids_TLK.long()) and torch.equal(
        out[1, 2:].long(), torch.tensor([0, 1, 2]).expand(3, 2, 3)
    )
    assert pad_traces([a.expert_ids_TLK.long()], 4).dtype == torch.uint8  # raw int64 ids < 256
    assert pad_traces([a.expert_ids_TLK.long()], 4, num_experts=300).dtype == torch.int32
    big = RoutingSpec(num_layers=1, top_k=2, num_experts=300)
    ids = torch.tensor([[[299, 7]], [[3, 256]]])
    wide = pad_traces([RoutingTrace(ids, big)], 3)
    assert wide.dtype == torch.int32 and torch.equal(wide[0, :2].long(), ids)  # no wrap at 256
    with pytest.raises(ValueError, match=r"trace 0: expert ids must be in \[0, 128\), got min=-1"):
        pad_traces([torch.tensor([[[-1, 2]]])], 2, num_experts=128)  # -1 would wrap to 255 in uint8
    assert trace_dtype(256) == torch.uint8 and trace_dtype(257) == torch.int32
