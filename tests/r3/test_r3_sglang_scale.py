"""SGLang client at paper scale: bounded request size, routing rows of every
decoder layer reduced to the MoE layers, uint8 traces; against canned responses (no server)."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch

from r3.engines.base import SamplingParams, request_seed
from r3.engines.sglang.engine import SGLangRolloutEngine
from r3.engines.sglang.routing import decode_routed_experts, response_bytes_estimate
from r3.trace import RoutingSpec


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(a.astype("<i4").tobytes()).decode()


class Server:
    """Answers /generate with one token per prompt and routing rows for `rows` decoder layers."""

    def __init__(self, rows: int, k: int = 2, dense_rows: tuple[int, ...] = ()):
        self.rows, self.k, self.dense, self.bodies = rows, k, dense_rows, []

    def __call__(self, method, url, body, timeout_s):
        self.bodies.append(json.loads(json.dumps(body)))
        out = []
        for p in body["input_ids"]:
            ids = np.stack(
                [np.stack([np.array([(t + l) % 8, (t + l + 1) % 8]) for l in range(self.rows)]) for t in range(len(p))]
            )  # seqlen - 1 = len(p) rows (one new token)
            ids[:, list(self.dense)] = 0  # what a dense layer's row holds is not routing
            out.append(
                {
                    "meta_info": {
                        "finish_reason": {"type": "length"},
                        "output_token_logprobs": [[-1.0, 5, None]],
                        "routed_experts": _b64(ids),
                    }
                }
            )
        return 200, out


def test_requests_are_bounded_by_estimated_response_size():
    spec = RoutingSpec(num_layers=48, top_k=8, num_experts=128)
    # Qwen3-30B-A3B at the paper's length: one sample's response is ~19 MB of JSON
    one = response_bytes_estimate(1024, 8192, routing_layers=48, top_k=8)
    assert 19e6 < one < 20e6
    srv = Server(rows=48, k=8)
    eng = SGLangRolloutEngine(
        ["http://a:1", "http://b:1"], routing_spec=spec, transport=srv, batch_size=64, max_response_mb=100
    )
    spans = eng.request_spans([[1] * 1024] * 64, SamplingParams(max_new_tokens=8192), capture_routing=True)
    assert [b - a for a, b in spans] == [5] * 12 + [4]  # 64 samples: 13 requests of <= 100 MB, not 1 GB
    assert all(b - a <= 64 for a, b in spans)
    # without routing the logprobs alone are small: batch_size bounds the request
    spans = eng.request_spans([[1] * 1024] * 130, SamplingParams(max_new_tokens=8192), capture_routing=False)
    assert [b - a for a, b in spans] == [64, 64, 2]


def test_split_batches_keep_per_prompt_seeds_and_order():
    spec = RoutingSpec(num_layers=2, top_k=2, num_experts=8)
    srv = Server(rows=2)
    eng = SGLangRolloutEngine(["http://a:1"], routing_spec=spec, transport=srv, batch_size=2)
    out = eng.generate([[1, 2], [3], [4, 5, 6]], SamplingParams(max_new_tokens=1, seed=10), capture_routing=True)
    assert [len(b["input_ids"]) for b in srv.bodies] == [2, 1]
    seeds = [sp["sampling_seed"] for b in srv.bodies for sp in b["sampling_params"]]
    assert seeds == [request_seed(10, i) for i in range(3)]  # as one request: splitting does not change sampling
    assert [s.prompt_ids for s in out] == [[1, 2], [3], [4, 5, 6]]


def test_rows_of_dense_layers_are_dropped_and_traces_are_uint8(tmp_path):
    from transformers import Qwen3MoeConfig

    cfg = Qwen3MoeConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=8,
        num_experts_per_tok=2,
        mlp_only_layers=[0, 2],
    )
    cfg.save_pretrained(tmp_path)
    srv = Server(rows=4, dense_rows=(0, 2))
    eng = SGLangRolloutEngine.from_model_config(["http://a:1"], tmp_path, transport=srv)
    assert (eng.layer_ids, eng.routing_spec.num_layers) == ([1, 3], 2)
    (s,) = eng.generate([[7, 8, 9]], SamplingParams(max_new_tokens=1), capture_routing=True)
    assert s.expert_ids_TLK.dtype == torch.uint8 and s.expert_ids_TLK.shape == (3, 2, 2)
    assert s.expert_ids_TLK[0].tolist() == [[1, 2], [3, 4]]  # rows of layers 1 and 3 (t = 0)


def test_decode_refuses_wrong_counts_and_ids():
    spec = RoutingSpec(num_layers=2, top_k=2, num_experts=8)
    good = np.array([[[1, 2], [3, 4]]])
    assert decode_routed_experts(_b64(good), seqlen=2, spec=spec).expert_ids_TLK.dtype == torch.uint8
    with pytest.raises(ValueError, match=r"got=6, expected=4 \(tokens=1"):
        decode_routed_experts(_b64(np.arange(6)), seqlen=2, spec=spec)
    with pytest.raises(ValueError, match=r"in \[0, 8\), got min=1 max=9"):
        decode_routed_experts(_b64(np.array([[[1, 9], [3, 4]]])), seqlen=2, spec=spec)
    wide = RoutingSpec(num_layers=1, top_k=2, num_experts=512)
    assert decode_routed_experts(_b64(np.array([[[300, 2]]])), seqlen=2, spec=wide).expert_ids_TLK.dtype == torch.int32


def test_server_flags_are_checked_once_before_the_first_request():
    from r3.engines.sglang.engine import SGLangError

    spec = RoutingSpec(num_layers=2, top_k=2, num_experts=8)
    info = {"enable_return_routed_experts": False, "enable_deterministic_inference": False}
    calls = []

    def transport(method, url, body, timeout_s):
        calls.append(url.rsplit("/", 1)[1])
        if url.endswith("/get_server_info"):
            return 200, info
        return Server(rows=2)(method, url, body, timeout_s)

    eng = SGLangRolloutEngine(["http://a:1"], routing_spec=spec, transport=transport, check_server_flags=True)
    with pytest.raises(SGLangError, match="without --enable-return-routed-experts"):
        eng.generate([[1, 2]], SamplingParams(max_new_tokens=1), capture_routing=True)
    assert calls == ["get_server_info"]  # refused before any /generate
    info["enable_return_routed_experts"] = True
    with pytest.warns(UserWarning, match="ignores per-prompt sampling seeds"):
        eng.generate([[1, 2]], SamplingParams(max_new_tokens=1, seed=3), capture_routing=True)
    eng.generate([[1, 2]], SamplingParams(max_new_tokens=1, seed=4), capture_routing=True)
    assert calls.count("get_server_info") == 2  # once per (capture, seeded) kind of request
