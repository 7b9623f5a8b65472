"""In-process transformers rollout engine (embedded mode): bf16 / fp8 / fp32 numerics, KV cache.

Implements `r3.engines.base.RolloutEngine`. It plays the paper's inference engine (SGLang): its
numerics differ from the fp32 training engine (`r3.engines.hf.train`), so a real
training-inference mismatch exists, and it records the routing of every fed token (one row per
fed token: T = prompt + response - 1, DESIGN.md invariant 1) through `r3.engines.hf.replay`.

Decoding is a hand-written loop over the model's forward with a `DynamicCache` (one prefill
call, one call per decoded token), not `GenerationMixin.generate`: it samples from a seeded
`torch.Generator` (reproducible), returns the logprob it sampled from, and avoids generate's
per-step logits-processor machinery. Left padding with explicit position ids. Finished rows leave
the batch and the cache (`_COMPACT_BELOW`), as continuous batching does in a serving engine: a
batch of short and long responses then costs about its real tokens, not rows x longest.

Departures from the paper's engine: logprobs are those of the temperature-scaled distribution
before top-p truncation (what vLLM/SGLang return by default); temperature 0 is greedy and reports
the logprob under temperature 1. The fp8 engine computes in bf16 with fp8-quantised weights
(r3.engines.hf.fp8), like an FP8 serving engine with per-channel weight scales.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm
from transformers import AttentionInterface, AutoModelForCausalLM, DynamicCache

from r3.engines.base import Precision, RolloutCapabilities, RolloutSample, SamplingParams, config_kwargs
from r3.engines.hf.config import HFRolloutConfig
from r3.engines.hf.fp8 import Fp8Scope, apply_fp8
from r3.engines.hf.noise import RolloutNoise
from r3.engines.hf.replay import RoutingReplay, find_moe_blocks
from r3.trace import trace_dtype

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.bfloat16}
_COMPACT_BELOW = 0.75
"""Drop finished rows from the decode batch (and its KV cache) once fewer than this share of the
batch's rows is still generating: finished rows then stop costing compute, and the cache copy that
compaction costs is paid only a few times per call (every finished row would be one copy per step)."""


_SDPA_FP32 = "r3_sdpa_fp32"
"""The attention implementation of bf16 / fp8 engines (registered with transformers below)."""


def _sdpa_fp32(module, query, key, value, attention_mask, *args, **kwargs):
    """transformers' SDPA attention on fp32 copies of bf16 q / k / v; the output is rounded back to
    bf16. Inputs, KV cache and output keep bf16 precision, and softmax and products accumulate in
    fp32, as GPU serving kernels (FlashAttention, FlashInfer) do; what differs from torch's own bf16
    CPU kernel is that the probabilities are not rounded to bf16 before the value product. Why: that
    CPU kernel, at decode shapes (one query row per sequence), took 170 ms of a 560 ms bf16 generate
    (fp32: 35 ms; 128 samples x 48 tokens of the tiny zoo model, torch profiler), so bf16 rollout was
    slower than fp32 rollout; with this, 0.75x the time per token of the bf16 kernel (same shapes,
    measured side by side), and samples within bf16's mismatch (tests/r3/test_r3_hf_rollout_attention.py)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    out, weights = sdpa_attention_forward(
        module, query.float(), key.float(), value.float(), attention_mask, *args, **kwargs
    )
    return out.to(query.dtype), weights


AttentionInterface.register(_SDPA_FP32, _sdpa_fp32)


def load_causal_lm(model_path_or_model: str | Path | nn.Module) -> nn.Module:
    """A fresh fp32 copy of the model. A path is loaded with transformers; a module is rebuilt from
    its config and its state dict is copied in (not deep-copied: hooks and routing-replay state
    attached to the source must not follow)."""
    if isinstance(model_path_or_model, nn.Module):
        src = model_path_or_model
        fresh = type(src)(copy.deepcopy(src.config)).float()
        fresh.load_state_dict(src.state_dict())
        return fresh
    return AutoModelForCausalLM.from_pretrained(str(model_path_or_model), dtype=torch.float32)


class HFRolloutEngine:
    """Batched sampling with a KV cache; records routing when asked."""

    def __init__(
        self,
        model_path_or_model: str | Path | nn.Module,
        *,
        precision: Precision = "bf16",
        device: str = "cpu",
        fp8_scope: Fp8Scope = "router",
        seed: int = 0,
        progress_min_prompts: int = 1024,
        fp32_attention: bool = False,
        router_noise: float = 0.0,
        logit_noise: float = 0.0,
    ):
        if precision not in _DTYPES:
            raise ValueError(f"precision must be one of {sorted(_DTYPES)}, got {precision!r}")
        self.precision = precision
        self.fp8_scope = fp8_scope
        self.progress_min_prompts = progress_min_prompts
        self.device = torch.device(device)
        self.model = load_causal_lm(model_path_or_model).to(self.device, _DTYPES[precision]).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        if fp32_attention and precision != "fp32" and self.model.config._attn_implementation == "sdpa":
            self.model.set_attn_implementation(_SDPA_FP32)  # bf16 attention with fp32 internals
        if precision == "fp8":
            apply_fp8(self.model, fp8_scope)
        self.replay = RoutingReplay(self.model) if find_moe_blocks(self.model) else None
        # seeded mismatch doses on this engine's own model copy only (the trainer never sees them)
        self.noise = RolloutNoise.attach(self.model, router_std=router_noise, logit_std=logit_noise, seed=seed)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        cfg = self.model.config
        self.pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
        eos = cfg.eos_token_id
        self.eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))

    @classmethod
    def from_config(cls, cfg: HFRolloutConfig) -> "HFRolloutEngine":
        """The registry's constructor (r3.engines.registry)."""
        return cls(cfg.model_path, **config_kwargs(cfg))

    @property
    def capabilities(self) -> RolloutCapabilities:
        # generate_continuations returns the rows from a prompt position on (the prefix's rows are the
        # caller's); it still prefills the whole prompt: this engine keeps no KV across calls
        return RolloutCapabilities(
            captures_routing=self.replay is not None,
            weight_sync=True,
            prefix_cached_routing=self.replay is not None,
        )

    # --- weight sync --------------------------------------------------------------------------
    @torch.no_grad()
    def sync_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Copy trainer weights (transformers names, any dtype) in; re-quantise for fp8."""
        own = self.model.state_dict()
        missing = [k for k in own if k not in state_dict and not self._is_tied(k)]
        unknown = [k for k in state_dict if k not in own]
        if missing or unknown:
            raise ValueError(
                f"sync_weights: {len(missing)} missing keys (e.g. {missing[:3]}), {len(unknown)} unknown keys "
                f"(e.g. {unknown[:3]}); likely cause: the trainer's model is not this architecture"
            )
        for k, v in state_dict.items():
            if own[k].shape != v.shape:
                raise ValueError(f"sync_weights: {k} has shape {tuple(v.shape)}, engine expects {tuple(own[k].shape)}")
            own[k].copy_(v.to(own[k].dtype))
        if self.precision == "fp8":
            apply_fp8(self.model, self.fp8_scope)

    def _is_tied(self, key: str) -> bool:
        return key == "lm_head.weight" and bool(getattr(self.model.config, "tie_word_embeddings", False))

    # --- sampling -----------------------------------------------------------------------------
    def _sample(self, logits_BV: torch.Tensor, params: SamplingParams, gen: torch.Generator):
        """Returns (tokens [B], logprobs float32 [B]) from the temperature-scaled distribution."""
        logits_BV = logits_BV.float()
        if params.temperature == 0:
            logp_BV = torch.log_softmax(logits_BV, dim=-1)
            tok_B = logp_BV.argmax(dim=-1)
            return tok_B, logp_BV.gather(1, tok_B[:, None])[:, 0]
        logp_BV = torch.log_softmax(logits_BV / params.temperature, dim=-1)
        probs_BV = logp_BV.exp()
        if params.top_p < 1.0:
            sorted_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
            # drop a token when the mass before it already reaches top_p (the first is always kept)
            drop_BV = (sorted_BV.cumsum(dim=-1) - sorted_BV) >= params.top_p
            sorted_BV = sorted_BV.masked_fill(drop_BV, 0.0)
            probs_BV = torch.zeros_like(probs_BV).scatter_(1, order_BV, sorted_BV)
        tok_B = torch.multinomial(probs_BV, 1, generator=gen)[:, 0]
        return tok_B, logp_BV.gather(1, tok_B[:, None])[:, 0]

    @torch.no_grad()  # not inference_mode: returned tensors may later meet autograd in the trainer
    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, *, capture_routing: bool = False
    ) -> list[RolloutSample]:
        """One sample per prompt. Routing (when captured): [len(prompt) + len(response) - 1, L, K]."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate needs at least one prompt, and every prompt at least one token")
        if params.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {params.max_new_tokens}")
        if params.temperature < 0 or not 0 < params.top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {params.temperature}, {params.top_p}")
        gen = self.generator
        if params.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(params.seed)
        if self.noise is not None:  # a dose's noise follows the call's seed, as the sampler does
            self.noise.reseed(params.seed)
        B, P, N = len(prompts), max(len(p) for p in prompts), params.max_new_tokens
        dev = self.device
        input_ids_BP = torch.full((B, P), self.pad_id, dtype=torch.long)
        mask_BS = torch.zeros(B, P + N, dtype=torch.long)
        for b, p in enumerate(prompts):
            input_ids_BP[b, P - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
            mask_BS[b, P - len(p) : P] = 1
        input_ids_BP, mask_BS = input_ids_BP.to(dev), mask_BS.to(dev)
        pos_BP = (mask_BS[:, :P].cumsum(-1) - 1).clamp(min=0)
        stop = torch.tensor(sorted(set(self.eos_ids) | set(params.stop_token_ids)) or [-1], device=dev)
        record = capture_routing and self.replay is not None
        ctx = self.replay.recording() if record else contextlib.nullcontext()
        tokens, logps = [], []
        active_B = torch.ones(B, dtype=torch.bool, device=dev)
        n_resp_B = torch.zeros(B, dtype=torch.long, device=dev)
        stopped_B = torch.zeros(B, dtype=torch.bool, device=dev)
        # rows_A: the rows of the whole batch that the model still feeds (finished rows are dropped
        # from the batch and the KV cache once enough of them have accumulated, `_COMPACT_BELOW`)
        rows_A = torch.arange(B, device=dev)
        stats = {"rows": B, "decode_steps": 0, "fed_row_steps": 0, "compactions": 0}
        with ctx:
            cache = DynamicCache(config=self.model.config)
            out = self.model(
                input_ids=input_ids_BP,
                attention_mask=mask_BS[:, :P],
                position_ids=pos_BP,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            next_pos_A1 = pos_BP[:, -1:] + 1
            show = 0 < self.progress_min_prompts <= B
            bar = tqdm(total=N, desc=f"generating {B} samples", unit="token", leave=False, disable=not show)
            for step in range(N):
                bar.update(1)
                logits_BV = out.logits[:, -1]
                if len(rows_A) < B:
                    # placeholder rows for the dropped ones: the sampler draws the same random numbers
                    # per row whatever the values (torch.multinomial), so compaction changes no sample
                    full_BV = logits_BV.new_zeros(B, logits_BV.shape[-1])
                    full_BV[rows_A] = logits_BV
                    logits_BV = full_BV
                tok_B, lp_B = self._sample(logits_BV, params, gen)
                tok_B = torch.where(active_B, tok_B, torch.full_like(tok_B, self.pad_id))
                tokens.append(tok_B)
                logps.append(lp_B)
                n_resp_B += active_B
                mask_BS[:, P + step] = active_B
                hit_B = active_B & torch.isin(tok_B, stop)
                stopped_B |= hit_B
                active_B = active_B & ~hit_B
                n_active = int(active_B.sum())
                if step == N - 1 or n_active == 0:
                    break
                if n_active < _COMPACT_BELOW * len(rows_A):
                    keep_A = active_B[rows_A].nonzero().flatten()
                    cache.batch_select_indices(keep_A)
                    rows_A, next_pos_A1 = rows_A[keep_A], next_pos_A1[keep_A]
                    stats["compactions"] += 1
                    if record:
                        self.replay.feed_rows(rows_A, B)
                stats["decode_steps"] += 1
                stats["fed_row_steps"] += len(rows_A)
                out = self.model(
                    input_ids=tok_B[rows_A, None],
                    attention_mask=mask_BS[rows_A, : P + step + 1],
                    position_ids=next_pos_A1,
                    cache=cache,
                    use_cache=True,
                )
                next_pos_A1 = next_pos_A1 + 1
            bar.close()
            self.last_generate = stats  # what the last call fed (benchmarks, tests)
            traces = self.replay.recorded_traces(mask_BS[:, : P + len(tokens)]) if record else None
            if traces is not None:  # compact as vLLM's and SGLang's clients return them (r3.trace.trace_dtype)
                dtype = trace_dtype(int(self.model.config.num_experts))
                traces = [t.to(dtype) for t in traces]
        tok_BN = torch.stack(tokens, dim=1).cpu()
        lp_BN = torch.stack(logps, dim=1).float().cpu()
        n_resp = n_resp_B.tolist()
        stopped = stopped_B.tolist()
        samples = []
        for b, p in enumerate(prompts):
            n = n_resp[b]
            samples.append(
                RolloutSample(
                    prompt_ids=list(p),
                    response_ids=tok_BN[b, :n].tolist(),
                    logprobs_R=lp_BN[b, :n].clone(),
                    expert_ids_TLK=traces[b].cpu() if traces is not None else None,
                    finish_reason="stop" if stopped[b] else "length",
                )
            )
        return samples

    def generate_continuations(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        *,
        known_routing: Sequence[torch.Tensor],
    ) -> list[RolloutSample]:
        """Multi-turn rollout (the same contract as r3.engines.vllm.engine.VLLMRolloutEngine.
        generate_continuations): prompt i continues a sequence whose first k_i = len(known_routing[i])
        routing rows the caller holds (its previous turn's trace, experiments.multiturn); the engine
        returns only rows k_i.. (`last_prefix_stats` counts the rows and bytes it did not return), and the
        sample's trace is the known rows followed by those, [len(prompt) + len(response) - 1, L, K].

        Departure from a serving engine with a prefix cache (vLLM, SGLang): this engine keeps no KV
        cache between calls, so it prefills the whole prompt again (the prefix's rows are recomputed in
        that forward and dropped; in fp32 they equal the known rows, tests/experiments/
        test_experiments_multiturn.py); what it saves is the transfer of the prefix's rows."""
        if self.replay is None:
            raise ValueError("generate_continuations needs routing capture; this model has no routed experts")
        if len(known_routing) != len(prompts):
            raise ValueError(f"got {len(known_routing)} known traces for {len(prompts)} prompts")
        L, K = self.replay.spec.num_layers, self.replay.spec.top_k
        for i, (p, known) in enumerate(zip(prompts, known_routing)):
            if known.ndim != 3 or tuple(known.shape[1:]) != (L, K):
                raise ValueError(f"prompt {i}: known routing has shape {tuple(known.shape)}, expected [k, {L}, {K}]")
            if not 0 <= known.shape[0] <= len(p) - 1:
                raise ValueError(
                    f"prompt {i}: {known.shape[0]} known routing rows for a {len(p)}-token prompt; at most "
                    f"len(prompt) - 1 = {len(p) - 1} rows are fed prompt tokens"
                )
        samples = self.generate(prompts, params, capture_routing=True)
        rows = 0
        for s, known in zip(samples, known_routing):
            k = known.shape[0]
            s.expert_ids_TLK = torch.cat([known.to(s.expert_ids_TLK.dtype), s.expert_ids_TLK[k:]])
            rows += k
        total = sum(s.expert_ids_TLK.shape[0] for s in samples)
        itemsize = samples[0].expert_ids_TLK.element_size()
        self.last_prefix_stats = {
            "cached_rows": rows,
            "total_rows": total,
            "hit_rate": rows / max(total, 1),
            "bytes_saved": rows * L * K * itemsize,
        }
        return samples
