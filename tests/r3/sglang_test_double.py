"""A TEST DOUBLE of an SGLang server that computes with a real model (no SGLang here: no GPU).

`ModelServer` answers the parts of SGLang's native HTTP API the client uses, from a tiny transformers
Qwen3-MoE (fp32) that it loads from a checkpoint directory:
- POST /update_weights_from_disk {"model_path", "weight_version"}: loads the synced directory's
  model.safetensors (on-disk per-expert names) into the served model. `skip_experts=True` imitates a
  loader that does not match the expert tensors' names: it loads every other tensor, keeps the old
  experts and still reports success and the new version (the failure the post-sync check must catch).
- POST /generate: for each prompt of `input_ids`, one greedy token with its logprob in
  `meta_info.output_token_logprobs`, and with `return_logprob` + `logprob_start_len: 0` the teacher-
  forced `meta_info.input_token_logprobs` ([[logprob, token_id, null], ...], entry 0's logprob null, as
  SGLang); `meta_info.weight_version` is the last loaded version.
- POST /get_weights_by_name {"name", "truncate_size"}: the first truncate_size rows of the tensor under
  its on-disk checkpoint name, as nested float lists (SGLang's llama-style `weight.float().tolist()
  [:truncate_size]`); per-expert names are served from transformers' fused expert tensors. HTTP 400 for
  a name it does not hold.
- GET /model_info: {"weight_version": the last loaded version, ...}. `version_lag=True` imitates a
  server whose update loaded the weights but not the version (e.g. restarted from a later checkpoint).
- GET /health: 200.
It is not SGLang: its numerics are transformers' fp32 ones, it ignores sampling parameters other
than max_new_tokens, and it does not capture routing.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

EXPERT_KEY = ".mlp.experts."


class ModelServer:
    """Context manager: a localhost HTTP server (test double) serving the model in `model_dir`."""

    def __init__(self, model_dir: str | Path, *, skip_experts: bool = False, version_lag: bool = False):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        self.skip_experts, self.version_lag = skip_experts, version_lag
        self.reads = 0
        self.weight_version = "0"
        self.loaded: list[dict] = []
        self.probes = 0
        self._lock = threading.Lock()

    # --- what the handler calls -------------------------------------------------------------------
    def update(self, body: dict) -> dict:
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM

        path = Path(body["model_path"])
        with self._lock:
            if self.skip_experts:  # only the names that are the same in memory and on disk
                sd = load_file(str(path / "model.safetensors"))
                kept = {k: v for k, v in sd.items() if EXPERT_KEY not in k}
                self.model.load_state_dict(kept, strict=False)
                self.loaded.append({"path": str(path), "tensors": len(kept), "skipped": len(sd) - len(kept)})
            else:  # transformers' own loader: per-expert names on disk -> fused tensors in memory
                new = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
                self.model.load_state_dict(new.state_dict(), strict=True)
                self.loaded.append({"path": str(path), "tensors": len(new.state_dict()), "skipped": 0})
            if not self.version_lag:
                self.weight_version = str(body.get("weight_version", self.weight_version))
        return {"success": True, "message": "Succeeded to update model weights.", "num_paused_requests": 0}

    @torch.no_grad()
    def get_weights_by_name(self, body: dict) -> list | None:
        from r3.engines.weight_check import checkpoint_views

        with self._lock:
            views = dict(checkpoint_views(self.model.state_dict()))
            t = views.get(body["name"])
            self.reads += 1
            return None if t is None else t.float().tolist()[: int(body.get("truncate_size", 100))]

    @torch.no_grad()
    def generate(self, body: dict) -> list[dict]:
        prompts = body["input_ids"]
        prompts = [prompts] if prompts and isinstance(prompts[0], int) else prompts
        input_lp = body.get("return_logprob") and body.get("logprob_start_len", -1) == 0
        out = []
        with self._lock:
            for p in prompts:
                ids = torch.tensor([p])
                logp_TV = torch.log_softmax(self.model(input_ids=ids).logits[0].float(), dim=-1)
                nxt = int(logp_TV[-1].argmax())
                meta = {
                    "finish_reason": {"type": "length", "length": 1},
                    "prompt_tokens": len(p),
                    "completion_tokens": 1,
                    "weight_version": self.weight_version,
                    "output_token_logprobs": [[float(logp_TV[-1, nxt]), nxt, None]],
                }
                if input_lp:
                    self.probes += 1
                    lp = logp_TV[:-1].gather(1, ids[0, 1:, None])[:, 0].tolist()
                    meta["input_token_logprobs"] = [[None, p[0], None]] + [
                        [lp[t - 1], p[t], None] for t in range(1, len(p))
                    ]
                out.append({"text": "", "output_ids": [nxt], "meta_info": meta})
        return out

    # --- server lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> str:
        served = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code: int, obj) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # noqa: N802
                if self.path == "/health":
                    self._send(200, {})
                elif self.path == "/model_info":
                    self._send(200, {"model_path": "double", "weight_version": served.weight_version})
                else:
                    self._send(404, {"detail": "Not Found"})

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/generate":
                    self._send(200, served.generate(body))
                elif self.path == "/update_weights_from_disk":
                    self._send(200, served.update(body))
                elif self.path == "/get_weights_by_name":
                    w = served.get_weights_by_name(body)
                    self._send(200, w) if w is not None else self._send(400, {"error": "Get parameter by name failed"})
                else:
                    self._send(404, {"detail": "Not Found"})

        self._srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._srv.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self._srv.server_address[1]}"

    def __exit__(self, *exc) -> None:
        self._srv.shutdown()
        self._srv.server_close()
