"""SGLangRolloutEngine against recorded /generate bodies in SGLang's documented format, plus a real
HTTP round trip on localhost (a stand-in server; no SGLang here)."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from r3.engines.base import RolloutEngine, SamplingParams, request_seed
from r3.engines.http import urllib_transport
from r3.engines.sglang.engine import SGLangError, SGLangRolloutEngine
from r3.trace import RoutingSpec

SPEC = RoutingSpec(num_layers=2, top_k=2, num_experts=8)


def _b64_routing(rows_TLK: np.ndarray) -> str:
    return base64.b64encode(rows_TLK.astype("<i4").tobytes()).decode()


ROUTING_0 = np.array([[[1, 5], [2, 0]], [[3, 4], [7, 6]], [[0, 1], [5, 2]], [[6, 2], [1, 3]]])  # T = 3 + 2 - 1
ROUTING_1 = np.array([[[2, 3], [4, 5]], [[7, 0], [1, 6]]])  # T = 2 + 1 - 1

# A recorded exchange (request as this client sends it; response in the documented format:
# list per prompt, meta_info.output_token_logprobs = [[logprob, token_id, text|null], ...]).
REQUEST = {
    "input_ids": [[11, 12, 13], [21, 22]],
    "return_logprob": True,
    "sampling_params": [
        {
            "max_new_tokens": 4,
            "temperature": 1.0,
            "top_p": 0.95,
            "stop_token_ids": [2],
            "sampling_seed": request_seed(7, 0),
        },
        {
            "max_new_tokens": 4,
            "temperature": 1.0,
            "top_p": 0.95,
            "stop_token_ids": [2],
            "sampling_seed": request_seed(7, 1),
        },
    ],
    "return_routed_experts": True,
    "routed_experts_start_len": 0,
}
RESPONSE = [
    {
        "text": "ab",
        "output_ids": [31, 2],
        "meta_info": {
            "id": "5f1e",
            "finish_reason": {"type": "stop", "matched": 2},
            "prompt_tokens": 3,
            "completion_tokens": 2,
            "cached_tokens": 0,
            "e2e_latency": 0.12,
            "output_token_logprobs": [[-0.25, 31, None], [-1.5, 2, None]],
            "routed_experts": _b64_routing(ROUTING_0),
        },
    },
    {
        "text": "c",
        "output_ids": [41],
        "meta_info": {
            "id": "9a0c",
            "finish_reason": {"type": "length", "length": 1},
            "prompt_tokens": 2,
            "completion_tokens": 1,
            "cached_tokens": 2,
            "e2e_latency": 0.1,
            "output_token_logprobs": [[-0.75, 41, None]],
            "routed_experts": _b64_routing(ROUTING_1),
        },
    },
]
PARAMS = SamplingParams(max_new_tokens=4, temperature=1.0, top_p=0.95, seed=7, stop_token_ids=(2,))


class Recorder:
    """A transport replaying canned answers and recording what was sent."""

    def __init__(self, answers):
        self.answers, self.calls = list(answers), []

    def __call__(self, method, url, body, timeout_s):
        self.calls.append((method, url, json.loads(json.dumps(body)) if body is not None else None))
        ans = self.answers.pop(0)
        if isinstance(ans, Exception):
            raise ans
        return ans


def test_request_body_matches_recorded():
    eng = SGLangRolloutEngine(["http://h:1"], routing_spec=SPEC, transport=Recorder([]))
    assert eng.request_body(REQUEST["input_ids"], PARAMS, capture_routing=True) == REQUEST
    plain = eng.request_body([[1]], SamplingParams(max_new_tokens=3), capture_routing=False)
    assert plain == {
        "input_ids": [[1]],
        "return_logprob": True,
        "sampling_params": {"max_new_tokens": 3, "temperature": 1.0, "top_p": 1.0},
    }


def test_generate_parses_recorded_response():
    rec = Recorder([(200, RESPONSE)])
    eng = SGLangRolloutEngine(["http://h:1/"], routing_spec=SPEC, transport=rec)
    assert isinstance(eng, RolloutEngine)
    out = eng.generate(REQUEST["input_ids"], PARAMS, capture_routing=True)
    assert rec.calls == [("POST", "http://h:1/generate", REQUEST)]
    assert [s.response_ids for s in out] == [[31, 2], [41]]
    assert torch.equal(out[0].logprobs_R, torch.tensor([-0.25, -1.5])) and out[0].logprobs_R.dtype == torch.float32
    assert [s.finish_reason for s in out] == ["stop", "length"]
    assert out[0].expert_ids_TLK.shape == (4, 2, 2)  # prompt 3 + response 2 - 1: the last token is never fed
    assert torch.equal(out[0].expert_ids_TLK, torch.from_numpy(ROUTING_0))  # top-k order kept, not sorted
    assert torch.equal(out[1].expert_ids_TLK, torch.from_numpy(ROUTING_1))


def test_missing_routing_names_the_server_flag():
    resp = json.loads(json.dumps(RESPONSE))
    del resp[0]["meta_info"]["routed_experts"]
    eng = SGLangRolloutEngine(["http://h:1"], routing_spec=SPEC, transport=Recorder([(200, resp)]))
    with pytest.raises(SGLangError, match="--enable-return-routed-experts"):
        eng.generate(REQUEST["input_ids"], PARAMS, capture_routing=True)
    with pytest.raises(ValueError, match="needs routing_spec"):
        SGLangRolloutEngine(["http://h:1"], transport=Recorder([])).generate([[1]], PARAMS, capture_routing=True)


def test_wrong_routing_size_is_refused():
    resp = json.loads(json.dumps(RESPONSE))
    resp[0]["meta_info"]["routed_experts"] = _b64_routing(ROUTING_0[:3])  # one row short
    eng = SGLangRolloutEngine(["http://h:1"], routing_spec=SPEC, transport=Recorder([(200, resp)]))
    with pytest.raises(ValueError, match=r"got=12, expected=16 \(tokens=4"):
        eng.generate(REQUEST["input_ids"], PARAMS, capture_routing=True)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda r: r[0]["meta_info"].update(finish_reason={"type": "abort", "message": "oom"}), "aborted"),
        (lambda r: r[0]["meta_info"].pop("output_token_logprobs"), "lacks meta_info.output_token_logprobs"),
        (lambda r: r[0].update(output_ids=[31]), "disagree"),
        (lambda r: r.pop(), "returned 1 results for 2 prompts"),
    ],
)
def test_malformed_responses(mutate, match):
    resp = json.loads(json.dumps(RESPONSE))
    mutate(resp)
    eng = SGLangRolloutEngine(["http://h:1"], routing_spec=SPEC, transport=Recorder([(200, resp)]))
    with pytest.raises(SGLangError, match=match):
        eng.generate(REQUEST["input_ids"], PARAMS, capture_routing=True)


def _answer_for(body):
    """A server stand-in: response token = prompt's first token + 100, logprob -0.5."""
    return [
        {
            "output_ids": [p[0] + 100],
            "meta_info": {
                "finish_reason": {"type": "length", "length": 1},
                "output_token_logprobs": [[-0.5, p[0] + 100, None]],
            },
        }
        for p in body["input_ids"]
    ]


def test_batches_round_robin_and_keep_order():
    calls = []
    lock = threading.Lock()

    def transport(method, url, body, timeout_s):
        with lock:
            calls.append(
                (url, [p[0] for p in body["input_ids"]], [s["sampling_seed"] for s in body["sampling_params"]])
            )
        return 200, _answer_for(body)

    eng = SGLangRolloutEngine(["http://a:1", "http://b:2"], batch_size=3, transport=transport)
    prompts = [[i] for i in range(8)]
    out = eng.generate(prompts, SamplingParams(max_new_tokens=1, seed=100))
    assert [s.response_ids for s in out] == [[i + 100] for i in range(8)]
    assert sorted(calls) == [
        ("http://a:1/generate", [0, 1, 2], [request_seed(100, i) for i in (0, 1, 2)]),
        ("http://a:1/generate", [6, 7], [request_seed(100, i) for i in (6, 7)]),
        ("http://b:2/generate", [3, 4, 5], [request_seed(100, i) for i in (3, 4, 5)]),
    ]  # distinct seeds per prompt


def test_retries_with_backoff_then_gives_up():
    rec = Recorder([ConnectionRefusedError("refused"), (503, "loading"), (200, _answer_for({"input_ids": [[1]]}))])
    eng = SGLangRolloutEngine(["http://h:1"], retries=2, backoff_s=0.0, transport=rec)
    assert eng.generate([[1]], SamplingParams(max_new_tokens=1))[0].response_ids == [101]
    assert len(rec.calls) == 3
    dead = SGLangRolloutEngine(
        ["http://h:1"],
        retries=1,
        backoff_s=0.0,
        transport=Recorder([ConnectionResetError("x"), ConnectionResetError("y")]),
    )
    with pytest.raises(ConnectionError, match="failed after 2 attempts"):
        dead.generate([[1]], SamplingParams(max_new_tokens=1))
    bad = SGLangRolloutEngine(["http://h:1"], backoff_s=0.0, transport=Recorder([(400, {"error": "bad top_p"})]))
    with pytest.raises(SGLangError, match="HTTP 400.*bad top_p"):  # a client error is not retried
        bad.generate([[1]], SamplingParams(max_new_tokens=1))


def test_constructor_validation():
    with pytest.raises(ValueError, match="at least one server URL"):
        SGLangRolloutEngine([])
    with pytest.raises(ValueError, match="http://"):
        SGLangRolloutEngine(["localhost:30000"])


# --- real HTTP on localhost ----------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    updates: list = []

    def log_message(self, *a):  # keep test output quiet
        pass

    def _send(self, code, obj):
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send(200, {}) if self.path == "/health" else self._send(404, {"detail": "Not Found"})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/generate":
            self._send(200, RESPONSE if body == REQUEST else _answer_for(body))
        elif self.path == "/update_weights_from_disk":
            self.updates.append(body)
            self._send(
                200, {"success": True, "message": "Succeeded to update model weights.", "num_paused_requests": 0}
            )
        else:
            self._send(404, {"detail": "Not Found"})


@pytest.fixture()
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    _Handler.updates = []
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_http_round_trip_health_and_weight_sync(server, tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text('{"model_type": "qwen3_moe"}')
    eng = SGLangRolloutEngine([server], routing_spec=SPEC, weight_sync_dir=tmp_path / "sync", base_model_path=base)
    assert eng.health() == {server: True}
    out = eng.generate(REQUEST["input_ids"], PARAMS, capture_routing=True)
    assert torch.equal(out[0].expert_ids_TLK, torch.from_numpy(ROUTING_0))
    sd = {"model.embed_tokens.weight": torch.arange(6.0).reshape(2, 3)}
    eng.sync_weights(sd)
    eng.sync_weights({k: v + 1 for k, v in sd.items()})
    assert [u["weight_version"] for u in _Handler.updates] == ["1", "2"]
    v2 = tmp_path / "sync" / "v000002"
    assert _Handler.updates[1]["model_path"] == str(v2)
    assert not (tmp_path / "sync" / "v000001").exists()  # the previous version is removed
    assert (v2 / "config.json").exists()
    from safetensors.torch import load_file

    assert torch.equal(
        load_file(str(v2 / "model.safetensors"))["model.embed_tokens.weight"], sd["model.embed_tokens.weight"] + 1
    )


def test_http_errors(server):
    status, body = urllib_transport("GET", f"{server}/nope", None, 5)
    assert status == 404 and body == {"detail": "Not Found"}
    closed = "http://127.0.0.1:9"  # discard port: nothing listens
    eng = SGLangRolloutEngine([closed], retries=0)
    assert eng.health() == {closed: False}
    with pytest.raises(ConnectionError, match="is the SGLang server up"):
        eng.generate([[1]], SamplingParams(max_new_tokens=1))
    with pytest.raises(ValueError, match="weight_sync_dir"):
        eng.sync_weights({})
