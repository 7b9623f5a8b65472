"""SGLang rollout engine: an HTTP client of SGLang servers implementing RolloutEngine (cluster mode).

Built against SGLang's documented native API (docs "Native APIs" and "Sampling Parameters";
`GenerateReqInput` / `UpdateWeightFromDiskReqInput` in sglang/srt/managers/io_struct.py):
- POST /generate with `input_ids` (a batch: list of lists), `sampling_params` (max_new_tokens,
  temperature, top_p, stop_token_ids; a list of dicts when per-prompt seeds are sent as
  `sampling_seed`), `return_logprob: true`, and for routing capture `return_routed_experts:
  true` + `routed_experts_start_len: 0` (the server must run with --enable-return-routed-experts).
  The response is a list (one object per prompt) with `meta_info.output_token_logprobs` =
  [[logprob, token_id, text|null], ...] for the generated tokens (logprobs after temperature
  unless the server sets SGLANG_RETURN_ORIGINAL_LOGPROB: do not), `meta_info.finish_reason` =
  {"type": "stop"|"length"|"abort", ...}, and `meta_info.routed_experts` = base64 of raw
  little-endian int32 of logical shape (seqlen - 1 - start_len, num_hidden_layers, top_k): the last
  token is never fed, so it has no row (DESIGN invariant 1). SGLang reports a row for every decoder
  layer; `decode_routed_experts` keeps the MoE layers' rows only (a model with dense layers, e.g.
  mlp_only_layers, has fewer MoE layers than rows) and stores ids as uint8 when E <= 256 (an int64
  trace of one 8k-token sample of Qwen3-30B-A3B is 25 MB; uint8 is 3 MB), widened only when the
  batch is padded for replay.
- POST /update_weights_from_disk {"model_path", "weight_version"} -> {"success", "message"}. The
  directory holds the weights under the names of an HF checkpoint on disk (`to_checkpoint_names`:
  per-expert `mlp.experts.{e}.{gate,up,down}_proj.weight`, which SGLang's and vLLM's Qwen3-MoE
  loaders match), in the served checkpoint's dtype, never transformers-5's fused in-memory names
  (`mlp.experts.gate_up_proj`), which those loaders skip without a word. Every later /generate
  answer carries `meta_info.weight_version` (SGLang >= 0.5); a result from another version than
  the last sync stops the step.
- The check after every sync (`verify_sync`): POST /generate {"input_ids": [probe], "return_logprob":
  true, "logprob_start_len": 0, "sampling_params": {"max_new_tokens": 1, "temperature": 1.0}} ->
  `meta_info.input_token_logprobs` = [[logprob, token_id, text|null], ...] aligned with the probe,
  entry 0's logprob null (no context); SGLang computes these teacher-forced logprobs in the prefill
  (tokenizer_manager's meta_info, GenerateReqInput.logprob_start_len: default -1 = output tokens
  only). Each server's answer is compared with reference logprobs of the synced weights (see
  `SGLangRolloutEngine.check_sync`): a server that keeps the version number but not the weights (a
  loader that skips tensors under names it does not match) stops the run with SyncCheckError.
- The readback after every sync (SGLangRolloutConfig.verify_readback): POST /get_weights_by_name
  {"name": checkpoint name, "truncate_size": readback_rows} -> the first rows of the tensor the server
  holds, as nested float lists (http_server.py -> ModelRunner.get_weights_by_name -> the model class's
  get_weights_by_name: `weight.float().tolist()[:truncate_size]`, q/k/v and gate/up narrowed out of
  the stacked qkv_proj / gate_up_proj). They are compared exactly with the same rows of the trainer's
  tensor cast to the served dtype, for a sample that includes every MoE layer's experts, router,
  attention, embeddings, lm_head and norms (r3.engines.weight_check). A server that cannot answer
  (the model classes read, e.g. Qwen3MoeForCausalLM, may not implement get_weights_by_name, and
  per-expert names need a mapping onto the fused w13/w2 that SGLang's llama-style implementations
  lack) stops the sync with SyncCheckError saying so: set verify_readback=False to rely on the
  version and the probe. Not run against a real SGLang server here (no GPU). Then GET /model_info
  (older servers: /get_weight_version) -> "weight_version" must be the synced version (SGLang
  flushes its radix cache inside update_weights_from_disk and fails the update when it cannot).
- GET /health -> 200 when the server is up.
Request size is bounded: a /generate batch holds at most `batch_size` prompts and at most
`max_response_mb` of estimated response JSON (routing base64 + logprob entries for prompt + max new
tokens), so 64 samples of 8k tokens with routing (about 1 GB of JSON) become several requests.
Standard library only (urllib + concurrent.futures). Batches go round-robin to the servers,
several in flight per server; connection errors and 502/503/504 are retried with exponential
backoff. The transport is injectable, so the client is tested against recorded request/response
bodies without a server (tests/r3/test_r3_sglang_client.py); it has not run against a real server
here (no GPU): untested end to end.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from r3.engines import http
from r3.engines.base import RolloutCapabilities, RolloutSample, SamplingParams, request_seed
from r3.engines.hf_checkpoint import checkpoint_dtype, write_checkpoint
from r3.engines.http import ServerError, Transport, urllib_transport
from r3.engines.sglang.config import SGLangRolloutConfig
from r3.engines.sglang.routing import decode_routed_experts, response_bytes_estimate
from r3.engines.sync_check import PROBE_LEN, SyncCheckError, SyncReference, probe_ids
from r3.engines.weight_check import ReadbackChecker, check_version
from r3.trace import RoutingSpec


class SGLangError(ServerError):
    """The server answered, but not as the protocol requires."""


class SGLangRolloutEngine:
    """RolloutEngine over one or more SGLang servers (r3.engines.base.RolloutEngine)."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        tokenizer_or_none: Any = None,
        routing_spec: RoutingSpec | None = None,
        batch_size: int = 64,
        in_flight_per_server: int = 2,
        request_timeout_s: float = 3600.0,
        retries: int = 5,
        backoff_s: float = 1.0,
        weight_sync_dir: str | Path | None = None,
        base_model_path: str | Path | None = None,
        send_seeds: bool = True,
        transport: Transport | None = None,
        layer_ids: Sequence[int] | None = None,
        num_hidden_layers: int | None = None,
        max_response_mb: float = 256.0,
        check_server_flags: bool = False,
        sync_tolerance: float | None = None,
        sync_reference: SyncReference | None = None,
        reference_max_params: int = 2_000_000_000,
        readback_rows: int | None = None,
        readback_experts_per_layer: int = 4,
        readback_dtype: torch.dtype = torch.bfloat16,
    ):
        """routing_spec: (L, K, E) of the served model, needed for capture_routing (build it with
        RoutingSpec.from_hf_config; SGLang reports num_hidden_layers rows, so every layer must be
        MoE, as in Qwen3-MoE). weight_sync_dir: a directory the servers can read (shared file
        system) where sync_weights writes checkpoints; base_model_path: the served checkpoint,
        whose config/tokenizer files are copied beside the new weights. send_seeds: pass
        SamplingParams.seed as per-prompt `sampling_seed` (SamplingParams field of current SGLang;
        turn off for servers that predate it). layer_ids / num_hidden_layers: which of SGLang's
        per-decoder-layer routing rows are MoE layers (from_model_config reads them from the
        checkpoint; None: every row). max_response_mb: split batches whose estimated response is
        larger (response_bytes_estimate). check_server_flags: ask each server's flags once before the
        first /generate (check_servers; the registry's config turns it on). sync_tolerance: verify
        every sync (check_sync) with this bound (None: no check). sync_reference /
        reference_max_params: where the check's reference comes from (set_sync_reference).
        readback_rows: after every sync read back this many leading rows of sampled tensors and compare
        them with the trainer's cast to readback_dtype (the served dtype; None: no readback)."""
        urls = [u.rstrip("/") for u in urls]
        if not urls:
            raise ValueError("SGLangRolloutEngine needs at least one server URL (e.g. http://host:30000)")
        bad = [u for u in urls if not u.startswith(("http://", "https://"))]
        if bad:
            raise ValueError(f"server URLs must start with http:// or https://, got {bad}")
        if batch_size < 1 or in_flight_per_server < 1 or retries < 0:
            raise ValueError(
                f"batch_size ({batch_size}) and in_flight_per_server ({in_flight_per_server}) "
                f"must be >= 1, retries ({retries}) >= 0"
            )
        self.urls = urls
        self.tokenizer = tokenizer_or_none
        self.routing_spec = routing_spec
        self.batch_size = batch_size
        self.in_flight_per_server = in_flight_per_server
        self.request_timeout_s = request_timeout_s
        self.retries, self.backoff_s = retries, backoff_s
        self.weight_sync_dir = Path(weight_sync_dir) if weight_sync_dir else None
        self.base_model_path = Path(base_model_path) if base_model_path else None
        self.send_seeds = send_seeds
        self.transport = transport or urllib_transport
        self.weight_version = 0
        self.layer_ids = list(layer_ids) if layer_ids is not None else None
        self._checked: set[tuple[bool, bool]] = set()
        self.check_flags = check_server_flags
        self.num_hidden_layers = num_hidden_layers
        if max_response_mb <= 0:
            raise ValueError(f"max_response_mb must be > 0, got {max_response_mb}")
        self.max_response_bytes = int(max_response_mb * 1e6)
        if sync_tolerance is not None and sync_tolerance <= 0:
            raise ValueError(f"sync_tolerance must be > 0 (or None: no check), got {sync_tolerance}")
        self.sync_tolerance = sync_tolerance
        self.sync_reference = sync_reference
        self.reference_max_params = reference_max_params
        self._fp32_checker = None  # r3.engines.sync_check.SyncChecker, built on first use
        self._warned_unverified = False
        self.last_sync_check: dict[str, float] = {}
        self.readback = (
            None
            if readback_rows is None
            else ReadbackChecker(
                engine_dtype=readback_dtype,
                storage_dtype=checkpoint_dtype(self.base_model_path),
                experts_per_layer=readback_experts_per_layer,
                leading_rows=readback_rows,
            )
        )

    @classmethod
    def from_model_config(cls, urls: Sequence[str], model_path: str | Path, **kw: Any) -> "SGLangRolloutEngine":
        """Routing spec read from the served checkpoint's config.json (transformers format); a
        model without routed experts gets no spec (the engine then does not capture routing)."""
        from transformers import AutoConfig

        if Path(model_path).is_dir() and not (Path(model_path) / "config.json").exists():
            # a tokenizer-only directory (evaluation): generation works, routing capture does not
            return cls(urls, routing_spec=None, base_model_path=kw.pop("base_model_path", model_path), **kw)
        hf_cfg = AutoConfig.from_pretrained(str(model_path))
        spec = RoutingSpec.from_hf_config(hf_cfg) if getattr(hf_cfg, "num_experts", None) else None
        if spec is not None:  # SGLang sends a routing row per decoder layer; keep the MoE layers'
            step = getattr(hf_cfg, "decoder_sparse_step", 1) or 1
            only = set(getattr(hf_cfg, "mlp_only_layers", []) or [])
            kw.setdefault(
                "layer_ids", [i for i in range(hf_cfg.num_hidden_layers) if i not in only and (i + 1) % step == 0]
            )
            kw.setdefault("num_hidden_layers", hf_cfg.num_hidden_layers)
        return cls(urls, routing_spec=spec, base_model_path=kw.pop("base_model_path", model_path), **kw)

    @classmethod
    def from_config(cls, cfg: SGLangRolloutConfig, **kw: Any) -> "SGLangRolloutEngine":
        """The registry's constructor (r3.engines.registry); kw: test seams (transport)."""
        return cls.from_model_config(
            cfg.urls,
            cfg.model_path,
            weight_sync_dir=cfg.weight_sync_dir,
            batch_size=cfg.batch_size,
            in_flight_per_server=cfg.in_flight_per_server,
            request_timeout_s=cfg.request_timeout_s,
            retries=cfg.retries,
            send_seeds=cfg.send_seeds,
            max_response_mb=cfg.max_response_mb,
            check_server_flags=cfg.check_server_flags,
            sync_tolerance=cfg.sync_tolerance if cfg.verify_sync else None,
            reference_max_params=cfg.reference_max_params,
            readback_rows=cfg.readback_rows if cfg.verify_readback and cfg.precision == "bf16" else None,
            readback_experts_per_layer=cfg.readback_experts_per_layer,
            **kw,
        )

    @property
    def capabilities(self) -> RolloutCapabilities:
        # routed_experts_start_len lets the server skip a prefix's rows (prefix-cached routing)
        return RolloutCapabilities(
            captures_routing=self.routing_spec is not None,
            weight_sync=self.weight_sync_dir is not None,
            prefix_cache=True,  # SGLang's radix cache is on unless launched with --disable-radix-cache
            # the server can return rows from `routed_experts_start_len` on, but this client has no
            # continuation call yet (one start length per request: prompts would be grouped by it), so
            # multi-turn runs recapture the prefix rows (experiments.multiturn reports it)
            prefix_cached_routing=False,
            sync_reference=True,
        )

    # --- HTTP ---------------------------------------------------------------------------------
    def _request(self, method: str, url: str, body: dict | None, *, timeout_s: float | None = None) -> Any:
        return http.request_with_retry(
            self.transport,
            method,
            url,
            body,
            timeout_s=self.request_timeout_s if timeout_s is None else timeout_s,
            retries=self.retries,
            backoff_s=self.backoff_s,
            error_cls=SGLangError,
            what="SGLang server",
        )

    def health(self) -> dict[str, bool]:
        """GET /health on every server (one attempt each)."""
        return http.health(self.transport, self.urls)

    def wait_until_healthy(self, timeout_s: float = 600.0, poll_s: float = 5.0) -> None:
        http.wait_until_healthy(self.transport, self.urls, timeout_s=timeout_s, poll_s=poll_s, what="SGLang servers")

    # --- generation ---------------------------------------------------------------------------
    def request_body(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, *, capture_routing: bool, seed_offset: int = 0
    ) -> dict:
        """The /generate body for one batch (prompts are token ids)."""
        sp: dict[str, Any] = {
            "max_new_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
        }
        if params.stop_token_ids:
            sp["stop_token_ids"] = list(params.stop_token_ids)
        body: dict[str, Any] = {"input_ids": [list(map(int, p)) for p in prompts], "return_logprob": True}
        if params.seed is None or not self.send_seeds:
            body["sampling_params"] = sp
        else:  # distinct per-prompt seeds, or the G samples of a group would be identical
            body["sampling_params"] = [
                {**sp, "sampling_seed": request_seed(params.seed, seed_offset + i)} for i in range(len(prompts))
            ]
        if capture_routing:
            body["return_routed_experts"] = True
            body["routed_experts_start_len"] = 0
        return body

    def parse_response(
        self, prompts: Sequence[Sequence[int]], payload: Any, *, capture_routing: bool
    ) -> list[RolloutSample]:
        """RolloutSamples from a /generate response, validated against the request."""
        outs = [payload] if isinstance(payload, dict) and len(prompts) == 1 else payload
        if not isinstance(outs, list) or len(outs) != len(prompts):
            n = len(outs) if isinstance(outs, list) else type(outs).__name__
            raise SGLangError(f"/generate returned {n} results for {len(prompts)} prompts")
        samples = []
        for i, (prompt, out) in enumerate(zip(prompts, outs)):
            meta = out.get("meta_info") if isinstance(out, dict) else None
            if not isinstance(meta, dict):
                raise SGLangError(f"result {i} has no meta_info: {str(out)[:300]}")
            fr = meta.get("finish_reason")
            kind = fr.get("type") if isinstance(fr, dict) else fr
            if kind not in ("stop", "length"):
                raise SGLangError(
                    f"result {i} finished with {fr!r} (expected stop or length): the request "
                    "was aborted or is unfinished; see the server log"
                )
            olp = meta.get("output_token_logprobs")
            if olp is None:
                raise SGLangError(
                    f"result {i} lacks meta_info.output_token_logprobs although return_logprob "
                    "was true; the server is older than this client expects"
                )
            ids = [int(e[1]) for e in olp]
            if any(e[0] is None for e in olp):
                raise SGLangError(
                    f"result {i} has null logprobs at positions {[j for j, e in enumerate(olp) if e[0] is None][:5]}"
                )
            if "output_ids" in out and list(out["output_ids"]) != ids:
                raise SGLangError(
                    f"result {i}: output_ids ({len(out['output_ids'])} tokens) disagree with "
                    f"output_token_logprobs ({len(ids)} tokens)"
                )
            trace = None
            if capture_routing:
                if "routed_experts" not in meta or meta["routed_experts"] is None:
                    raise SGLangError(
                        f"result {i} has no meta_info.routed_experts although return_routed_experts was true: "
                        "start the SGLang server with --enable-return-routed-experts (needed for R3 replay)"
                    )
                trace = decode_routed_experts(
                    meta["routed_experts"],
                    seqlen=len(prompt) + len(ids),
                    spec=self.routing_spec,
                    layer_ids=self.layer_ids,
                    num_rows=self.num_hidden_layers,
                ).expert_ids_TLK
            served = meta.get("weight_version")
            if self.weight_version and served is not None and str(served) != str(self.weight_version):
                raise SGLangError(
                    f"result {i} was generated with weight version {served!r}, but the trainer's last sync is "
                    f"version {self.weight_version}: the server did not take the synced weights (restarted, or "
                    f"its update failed); rollout would sample an old policy. See the server log"
                )
            samples.append(
                RolloutSample(
                    prompt_ids=list(prompt),
                    response_ids=ids,
                    logprobs_R=torch.tensor([float(e[0]) for e in olp], dtype=torch.float32),
                    expert_ids_TLK=trace,
                    finish_reason=kind,
                )
            )
        return samples

    def request_spans(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, *, capture_routing: bool
    ) -> list[tuple[int, int]]:
        """[start, stop) prompt ranges of the /generate requests: at most batch_size prompts and at
        most max_response_mb of estimated response each (a single prompt may exceed it alone)."""
        rows = (self.num_hidden_layers or self.routing_spec.num_layers) if capture_routing else 0
        k = self.routing_spec.top_k if capture_routing else 0
        spans, start, size = [], 0, 0
        for i, p in enumerate(prompts):
            est = response_bytes_estimate(len(p), params.max_new_tokens, routing_layers=rows, top_k=k)
            if i > start and (i - start >= self.batch_size or size + est > self.max_response_bytes):
                spans.append((start, i))
                start, size = i, 0
            size += est
        spans.append((start, len(prompts)))
        return spans

    def check_servers(self, *, capture_routing: bool, seeded: bool) -> None:
        """Once per engine, before the first /generate: every server's flags (GET /get_server_info,
        SGLang's ServerArgs) must allow what is asked. Routing capture without
        `--enable-return-routed-experts` is refused here, before a large request comes back without
        routing; per-prompt seeds without `--enable-deterministic-inference` get a warning (SGLang
        then does not honour them: a resumed run no longer reproduces its samples). A server that
        does not answer the endpoint or omits a flag is not judged."""
        key = (capture_routing, seeded)
        if not self.check_flags or key in self._checked:
            return
        for u in self.urls:
            try:
                status, info = self.transport("GET", f"{u}/get_server_info", None, 30.0)
            except (ConnectionError, TimeoutError, OSError):
                continue
            if status != 200 or not isinstance(info, dict):
                continue
            if capture_routing and info.get("enable_return_routed_experts") is False:
                raise SGLangError(
                    f"{u} runs without --enable-return-routed-experts, so it cannot return the "
                    "routing that R3 replays; restart it with the flag (slurm.servers adds it)"
                )
            if seeded and info.get("enable_deterministic_inference") is False:
                import warnings

                warnings.warn(
                    f"{u} runs without --enable-deterministic-inference: SGLang ignores per-prompt "
                    "sampling seeds, so a resumed run will not reproduce its samples",
                    stacklevel=3,
                )
        self._checked.add(key)

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, *, capture_routing: bool = False
    ) -> list[RolloutSample]:
        """One sample per prompt; batches spread over the servers, several in flight each."""
        if capture_routing and self.routing_spec is None:
            raise ValueError(
                "capture_routing=True needs routing_spec (num_layers, top_k, num_experts) to "
                "decode SGLang's flat routed_experts; build the engine with from_model_config"
            )
        self.check_servers(capture_routing=capture_routing, seeded=params.seed is not None and self.send_seeds)
        if self.tokenizer is not None:
            vocab = len(self.tokenizer)
            for i, p in enumerate(prompts):
                if p and (max(p) >= vocab or min(p) < 0):
                    raise ValueError(
                        f"prompt {i} has token ids outside [0, {vocab}) (max {max(p)}): "
                        "encoded with a different tokenizer?"
                    )
        if not prompts:
            return []
        spans = self.request_spans(prompts, params, capture_routing=capture_routing)
        starts = [a for a, _ in spans]

        def run(b: int) -> list[RolloutSample]:
            start, stop = spans[b]
            chunk = prompts[start:stop]
            body = self.request_body(chunk, params, capture_routing=capture_routing, seed_offset=start)
            payload = self._request("POST", f"{self.urls[b % len(self.urls)]}/generate", body)
            return self.parse_response(chunk, payload, capture_routing=capture_routing)

        workers = min(len(starts), len(self.urls) * self.in_flight_per_server)
        with cf.ThreadPoolExecutor(max_workers=workers) as ex:
            results = list(ex.map(run, range(len(starts))))
        return [s for batch in results for s in batch]

    # --- weights ------------------------------------------------------------------------------
    def update_weights_from_disk(self, model_path: str | Path, *, weight_version: str | None = None) -> None:
        """Every server reloads its weights from `model_path` (a path the servers can read)."""
        body: dict[str, Any] = {"model_path": str(model_path)}
        if weight_version is not None:
            body["weight_version"] = weight_version
        for u in self.urls:
            payload = self._request("POST", f"{u}/update_weights_from_disk", body)
            if not (isinstance(payload, dict) and payload.get("success")):
                raise SGLangError(f"{u} refused update_weights_from_disk({model_path}): {str(payload)[:500]}")

    def sync_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Write the trainer's weights (transformers names, in memory or on disk) as safetensors into
        weight_sync_dir under on-disk checkpoint names (`to_checkpoint_names`) in the served
        checkpoint's dtype (bf16 for Qwen3-30B-A3B), then have every server load them; the previous
        version's directory is deleted afterwards."""
        if self.weight_sync_dir is None:
            raise ValueError(
                "sync_weights needs weight_sync_dir: a directory on a file system the SGLang "
                "servers can read (pass weight_sync_dir=... to SGLangRolloutEngine)"
            )
        self.weight_version += 1
        out = write_checkpoint(
            self.weight_sync_dir / f"v{self.weight_version:06d}",
            state_dict,
            base_model_path=self.base_model_path,
            dtype=checkpoint_dtype(self.base_model_path),
        )
        self.update_weights_from_disk(out, weight_version=str(self.weight_version))
        if self.readback is not None or self.sync_tolerance is not None:
            self.last_sync_check = self.check_version()
            if self.readback is not None:
                self.last_sync_check.update(self.check_readback(state_dict))
            if self.sync_tolerance is not None:
                self.last_sync_check.update(self.check_sync(state_dict))
        prev = self.weight_sync_dir / f"v{self.weight_version - 1:06d}"
        if prev.exists():
            shutil.rmtree(prev, ignore_errors=True)  # the servers hold the new version

    # --- the check after a sync ---------------------------------------------------------------
    def check_version(self) -> dict[str, float]:
        """Every server's weight version (GET /model_info, older servers /get_weight_version) must be
        the last sync's; a server with neither endpoint is checked by the version in every /generate
        answer instead (parse_response, parse_probe)."""
        for u in self.urls:
            for path in ("/model_info", "/get_weight_version"):
                try:
                    status, info = self.transport("GET", f"{u}{path}", None, 30.0)
                except (ConnectionError, TimeoutError, OSError):
                    continue
                if status == 200 and isinstance(info, dict) and "weight_version" in info:
                    check_version(info["weight_version"], self.weight_version, where=u)
                    break
        return {}

    def read_weights(self, url: str, name: str, rows: int) -> torch.Tensor:
        """float32: the first `rows` rows of `name` as the server holds it (POST /get_weights_by_name)."""
        try:
            payload = self._request("POST", f"{url}/get_weights_by_name", {"name": name, "truncate_size": rows})
        except SGLangError as e:
            raise SyncCheckError(
                f"after weight sync v{self.weight_version}: {url} cannot read back {name} (/get_weights_by_name: {e}); "
                "expected its first rows. Likely cause: the served model class does not implement "
                "get_weights_by_name or does not map this name (SGLang's Qwen3-MoE class read here has none, and "
                "per-expert names need a mapping onto the fused expert tensors). Set "
                "SGLangRolloutConfig.verify_readback=False to check syncs by weight version and probe only"
            ) from e
        if not isinstance(payload, list):
            raise SyncCheckError(
                f"{url}/get_weights_by_name({name}) returned {str(payload)[:200]}; expected nested lists of floats"
            )
        return torch.tensor(payload, dtype=torch.float32).reshape(-1)

    def check_readback(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Every server's leading rows of the readback sample vs the trainer's (r3.engines.weight_check)."""
        expected = self.readback.expected(state_dict)
        out: dict[str, float] = {}
        names = list(self.readback.plan.positions)
        rows = self.readback.leading_rows
        for u in self.urls:
            with cf.ThreadPoolExecutor(max_workers=self.in_flight_per_server) as ex:
                got = dict(zip(names, ex.map(lambda n: self.read_weights(u, n, rows), names)))
            out = self.readback.compare(got, expected, version=self.weight_version, where=u, commit=False)
        self.readback.commit(expected)
        return out

    def set_sync_reference(self, reference: SyncReference | None) -> None:
        """Where check_sync's reference logprobs come from: `reference(probe)` of the weights just
        synced, e.g. `train_engine_reference(train_engine)` (the trainer holds exactly those weights,
        at any scale). None: an fp32 transformers forward of the synced state dict in this process,
        for models of at most reference_max_params parameters."""
        self.sync_reference = reference

    def probe(self, state_dict: Mapping[str, torch.Tensor] | None = None) -> list[int]:
        """The fixed probe sequence (PROBE_LEN ids from a seeded generator, as the vLLM check), below
        the vocabulary of the embedding (state_dict), the served config and the tokenizer."""
        sizes = []
        for k, v in (state_dict or {}).items():
            if k.endswith("embed_tokens.weight"):
                sizes.append(int(v.shape[0]))
        if self.base_model_path is not None and (self.base_model_path / "config.json").exists():
            vocab = json.loads((self.base_model_path / "config.json").read_text()).get("vocab_size")
            if isinstance(vocab, int):
                sizes.append(vocab)
        if self.tokenizer is not None:
            sizes.append(len(self.tokenizer))
        if not sizes:
            raise ValueError(
                "the sync check needs the vocabulary size: pass base_model_path (a checkpoint with "
                "config.json) or a state dict with model.embed_tokens.weight"
            )
        return probe_ids(min(sizes), PROBE_LEN)

    @staticmethod
    def probe_body(probe: Sequence[int]) -> dict:
        """/generate body that returns teacher-forced logprobs of every probe token. temperature 1.0:
        servers that scale returned logprobs by the temperature then leave them unchanged."""
        return {
            "input_ids": [list(map(int, probe))],
            "sampling_params": {"max_new_tokens": 1, "temperature": 1.0, "top_p": 1.0},
            "return_logprob": True,
            "logprob_start_len": 0,
        }

    def parse_probe(self, probe: Sequence[int], payload: Any, *, url: str) -> torch.Tensor:
        """float32 [len(probe) - 1] from `meta_info.input_token_logprobs` (entry t = [logprob of
        probe[t] given probe[:t], probe[t], text|null]; entry 0 has no context and is dropped)."""
        out = payload[0] if isinstance(payload, list) and len(payload) == 1 else payload
        meta = out.get("meta_info") if isinstance(out, dict) else None
        itl = meta.get("input_token_logprobs") if isinstance(meta, dict) else None
        if not isinstance(itl, list) or len(itl) != len(probe):
            n = len(itl) if isinstance(itl, list) else None
            raise SGLangError(
                f"{url}: the probe request returned {n} input_token_logprobs for a {len(probe)}-token probe "
                "(expected one per input token with logprob_start_len=0); is the server older than SGLang 0.4, or "
                f"its prefix cache serving the probe's prefix? answer: {str(out)[:300]}"
            )
        ids = [int(e[1]) for e in itl]
        if ids != list(probe):
            raise SGLangError(f"{url}: input_token_logprobs name other tokens than the probe: {ids[:8]} vs {probe[:8]}")
        if any(e[0] is None for e in itl[1:]):
            raise SGLangError(f"{url}: null input logprobs at {[t for t, e in enumerate(itl) if e[0] is None][1:6]}")
        served = meta.get("weight_version")
        if self.weight_version and served is not None and str(served) != str(self.weight_version):
            raise SyncCheckError(
                f"after weight sync v{self.weight_version}: {url} still serves weight version {served!r}; the "
                "update did not reach it (see the server log)"
            )
        return torch.tensor([float(e[0]) for e in itl[1:]], dtype=torch.float32)

    def probe_logprobs(self, url: str, probe: Sequence[int]) -> torch.Tensor:
        """One server's teacher-forced logprobs of the probe, float32 [len(probe) - 1]."""
        payload = self._request("POST", f"{url}/generate", self.probe_body(probe))
        return self.parse_probe(probe, payload, url=url)

    def _reference(self, probe: list[int], state_dict: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        if self.sync_reference is not None:
            return self.sync_reference(probe).detach().float().cpu().reshape(-1)
        params = sum(v.numel() for v in state_dict.values())
        if params > self.reference_max_params or self.base_model_path is None:
            if not self._warned_unverified:
                import warnings

                why = (
                    f"{params / 1e9:.1f}B parameters > reference_max_params {self.reference_max_params / 1e9:.1f}B"
                    if self.base_model_path is not None
                    else "no base_model_path (config.json) to build an fp32 reference from"
                )
                warnings.warn(
                    f"SGLang weight syncs are NOT verified: no reference logprobs ({why}); call "
                    "engine.set_sync_reference(train_engine_reference(train_engine)) so the trainer scores the probe",
                    stacklevel=3,
                )
                self._warned_unverified = True
            return None
        if self._fp32_checker is None:
            from transformers import AutoConfig

            from r3.engines.sync_check import SyncChecker

            cfg = AutoConfig.from_pretrained(str(self.base_model_path))
            self._fp32_checker = SyncChecker(cfg, precision="fp32", tolerance=self.sync_tolerance or 0.0, probe=probe)
        self._fp32_checker.probe = list(probe)
        return self._fp32_checker.reference_logprobs(state_dict)

    def check_sync(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Every server's logprobs of the probe vs the reference of `state_dict` (just synced): the
        median |difference| per token must be within sync_tolerance on each server, else
        SyncCheckError (got / expected / likely cause / what to do). Returns the worst server's
        numbers ({} when no reference is available: see set_sync_reference)."""
        probe = self.probe(state_dict)
        ref = self._reference(probe, state_dict)
        if ref is None:
            return {}
        if ref.shape != (len(probe) - 1,):
            raise SyncCheckError(f"the sync reference returned shape {tuple(ref.shape)}, expected ({len(probe) - 1},)")
        worst: dict[str, float] = {}
        for u in self.urls:
            diff = (self.probe_logprobs(u, probe) - ref).abs()
            med, mean, mx = float(diff.median()), float(diff.mean()), float(diff.max())
            if not med <= self.sync_tolerance:  # also catches NaN
                raise SyncCheckError(
                    f"after weight sync v{self.weight_version}: {u} scores a {len(probe)}-token probe {med:.3g} nats "
                    f"per token (median; mean {mean:.3g}, max {mx:.3g}) away from the synced weights' reference; "
                    f"expected median <= {self.sync_tolerance:g}. The server reports the new version but does not "
                    "compute with the new weights. Likely cause: its loader skipped tensors whose names it does not "
                    "match (e.g. fused expert names `mlp.experts.gate_up_proj`; to_checkpoint_names writes per-expert "
                    "names), a server restarted on the old checkpoint, or a reference of other weights. Check the "
                    f"server log and the tensor names in {self.weight_sync_dir}/v{self.weight_version:06d}"
                )
            if med >= worst.get("probe_median_abs_diff", -1.0):
                worst = {"probe_median_abs_diff": med, "probe_mean_abs_diff": mean, "probe_max_abs_diff": mx}
        return worst
