"""Memory plan of one training GPU for a Qwen3-MoE model and a megatron layout (TP/PP/EP/DP).

    plan = plan_memory(QWEN3_30B_A3B, world=16, ep=8, micro_batch=1, seq_len=9216, recompute=True)
    print(plan.table()); plan.check(gpu_gb=80)   # raises with the numbers when it cannot fit

Light (no torch, no megatron): slurm.submit --dry-run prints it for every cell.

What it counts, per GPU, for megatron-core's mixed precision with the distributed optimizer
(`bf16=True`, `accumulate_allreduce_grads_in_fp32=True`, `use_distributed_optimizer=True`):
  weights      2 B/param  bf16 model parameters of this rank's shard;
  grads        4 B/param  fp32 main-gradient buffer (megatron DDP's contiguous buffer);
  optimizer   12 B/param  fp32 master copy + Adam m + Adam v, sharded over the data-parallel
                          replicas of that parameter (dense: DP; experts: expert-DP);
  activations             one micro-batch of `micro_batch` sequences of `seq_len` tokens (the engine
                          cuts each micro-batch to its own longest row, so seq_len is the longest
                          a row can be: prompt + max_new_tokens):
      layers: per token and layer, bf16 (2 B), no dropout, divided by TP (the engine runs TP > 1
      with sequence parallelism, which splits them all):
        attention  2 * (4h + q + 2kv + q)    LN in, QKV in/out, core attention out, proj in
        MoE        2 * k * (2h + 3I) + 2 * 2h  per routed copy: permuted input, fc1 out (2I),
                                                activation out (I), fc2 out; router/LN in
      with full recompute only each layer's input (2h B) is kept, plus one layer in full during
      its recompute;
      attention scores: none with the engine's SDPA core attention (model.SDPADotProductAttention);
      with megatron's local DotProductAttention (attention="local") 14 B per score per head
      (b x heads x S x S: the baddbmm buffer and result 2 + 2, the fp32 upcast 4 and fp32 softmax 4,
      the bf16 probabilities 2; the composition r3.engines.megatron.rehearsal measured);
      logits: not divided by TP (the engine gathers the vocab-parallel logits): the logits and their
      gradient (2 x 2 B per vocabulary entry per token in bf16), the output layer's weight gradient
      before it joins the main grad (2 B x V x h), and the fp32 temporaries of the chunked logprob /
      entropy (12 B per entry of one chunk of `logits_chunk` tokens; r3.engines.megatron.logits);
      unchunked (logits_chunk=0) 16 B per entry of every token instead;
  reserve     a fixed allowance for the CUDA context, NCCL buffers and allocator fragmentation.
A forward-only engine (`step=False`: the static measurement's compute_logprobs) keeps megatron's
fp32 main-grad buffer and the distributed optimizer's fp32 master shard (both built with the
engine) but no Adam state (created at the first step) and no gradients of activations.
Parameter shards: dense parameters (attention, router, norms, embeddings) over TP x PP, experts
over EP x PP (expert-TP = 1, as r3.engines.megatron.parallel sets it). PP is assumed to split
layers evenly and embeddings are counted as if spread with them (the first/last stages hold more:
an approximation).
These are estimates, not measurements: no GPU here. They follow the accounting of Korthikanti et
al., "Reducing Activation Recomputation in Large Transformer Models" (2022), adapted to MoE.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal

from r3.metrics import LOGITS_CHUNK_TOKENS

GB = 1e9
BYTES_WEIGHT, BYTES_GRAD, BYTES_OPTIM = 2, 4, 12
RESERVE_GB = 6.0
"""CUDA context (~0.5-1 GB), NCCL communicator buffers and allocator fragmentation: a common
allowance for H100/A100 training jobs (not measured here)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelShape:
    """The numbers of a Qwen3(-MoE) config.json the plan needs."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    """Dense MLP width (layers without experts)."""
    moe_ffn: int = 0
    experts: int = 0
    top_k: int = 0
    moe_layers: int = 0
    tied: bool = False

    @classmethod
    def from_config_dict(cls, c: dict) -> "ModelShape":
        n_layers = c["num_hidden_layers"]
        experts = c.get("num_experts", 0) or 0
        if experts and c.get("model_type") == "qwen3_moe":
            only, step = set(c.get("mlp_only_layers") or []), c.get("decoder_sparse_step", 1) or 1
            moe_layers = sum(1 for i in range(n_layers) if i not in only and (i + 1) % step == 0)
        else:
            experts, moe_layers = 0, 0
        return cls(
            vocab=c["vocab_size"],
            hidden=c["hidden_size"],
            layers=n_layers,
            heads=c["num_attention_heads"],
            kv_heads=c.get("num_key_value_heads", c["num_attention_heads"]),
            head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
            ffn=c.get("intermediate_size", 0),
            moe_ffn=c.get("moe_intermediate_size", 0) if experts else 0,
            experts=experts,
            top_k=c.get("num_experts_per_tok", 0) if experts else 0,
            moe_layers=moe_layers,
            tied=bool(c.get("tie_word_embeddings", False)),
        )

    @classmethod
    def from_model_dir(cls, path: str | Path) -> "ModelShape":
        return cls.from_config_dict(json.loads((Path(path) / "config.json").read_text()))

    # --- parameter counts ---------------------------------------------------------------------------
    def attention_params(self) -> int:
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return self.hidden * (q + 2 * kv) + q * self.hidden + 2 * self.head_dim  # + q/k norms

    def expert_params(self) -> int:
        """All routed-expert weights (gate, up, down per expert per MoE layer)."""
        return self.moe_layers * self.experts * 3 * self.hidden * self.moe_ffn

    def dense_params(self) -> int:
        """Everything else: embeddings, attention, norms, routers, dense MLPs."""
        per_layer = self.attention_params() + 2 * self.hidden
        routers = self.moe_layers * self.experts * self.hidden
        dense_mlps = (self.layers - self.moe_layers) * 3 * self.hidden * self.ffn
        emb = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * per_layer + routers + dense_mlps + emb + self.hidden

    def total_params(self) -> int:
        return self.dense_params() + self.expert_params()

    def active_params(self) -> int:
        """Parameters one token uses (k of E experts per MoE layer)."""
        if not self.experts:
            return self.total_params()
        return self.dense_params() + self.expert_params() * self.top_k // self.experts


QWEN3_30B_A3B = ModelShape(
    vocab=151936,
    hidden=2048,
    layers=48,
    heads=32,
    kv_heads=4,
    head_dim=128,
    ffn=6144,
    moe_ffn=768,
    experts=128,
    top_k=8,
    moe_layers=48,
    tied=False,
)
"""Qwen/Qwen3-30B-A3B(-Base) config.json as published on the Hugging Face hub (30.5B parameters,
3.3B activated): used when the checkpoint directory is not readable where the plan is made."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class MemoryPlan:
    """Per-GPU bytes of one training rank (see the module docstring for each term)."""

    layout: str
    dense_local: int
    expert_local: int
    weights: float
    grads: float
    optimizer: float
    activations: float
    reserve: float
    logits: float = 0.0
    """Part of `activations`: logits, their gradient and the logprob/entropy temporaries."""
    attention_scores: float = 0.0
    """Part of `activations`: the [b, heads, S, S] scores of megatron's local attention (0 with SDPA)."""

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.reserve

    @property
    def static(self) -> float:
        """Weights, grads and optimizer state: what a rank holds between steps."""
        return self.weights + self.grads + self.optimizer

    def table(self) -> str:
        rows = [
            ("weights", self.weights),
            ("grads", self.grads),
            ("optimizer state", self.optimizer),
            ("activations", self.activations),
            ("  of which logits + logprob/entropy", self.logits),
            ("  of which attention scores", self.attention_scores),
            ("reserve (context, NCCL, fragmentation)", self.reserve),
            ("total per GPU", self.total),
        ]
        head = (
            f"memory plan per GPU: {self.layout}; params on this rank: {self.dense_local / 1e9:.2f}B dense + "
            f"{self.expert_local / 1e9:.2f}B expert"
        )
        return head + "\n" + "\n".join(f"  {name:<40} {b / GB:8.1f} GB" for name, b in rows)

    def check(self, gpu_gb: float) -> None:
        if self.total > gpu_gb * GB:
            raise ValueError(
                f"the layout does not fit: {self.total / GB:.1f} GB per GPU needed, {gpu_gb:.0f} GB "
                f"available\n{self.table()}\nraise expert_parallel (experts dominate), enable "
                f"recompute, lower the micro-batch, or add training nodes"
            )


def activation_bytes_per_token_layer(m: ModelShape, *, moe: bool) -> int:
    h, q, kv = m.hidden, m.heads * m.head_dim, m.kv_heads * m.head_dim
    attention = 2 * (4 * h + q + 2 * kv + q)
    if moe:
        mlp = 2 * m.top_k * (2 * h + 3 * m.moe_ffn) + 2 * 2 * h
    else:
        mlp = 2 * (2 * h + 3 * m.ffn)
    return attention + mlp


def plan_memory(
    m: ModelShape,
    *,
    world: int,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    micro_batch: int,
    seq_len: int,
    recompute: bool,
    reserve_gb: float = RESERVE_GB,
    precision: Literal["bf16", "fp32"] = "bf16",
    attention: Literal["sdpa", "local"] = "sdpa",
    logits_chunk: int = LOGITS_CHUNK_TOKENS,
    step: bool = True,
) -> MemoryPlan:
    """Per-GPU memory of one training rank; see the module docstring. micro_batch: sequences per
    forward/backward; seq_len: tokens per sequence (prompt + response). precision "bf16": megatron's
    mixed precision with the distributed optimizer (the cluster target); "fp32": what
    MegatronTrainEngine runs today (fp32 weights, grads and activations; AdamW m and v replicated
    on every DP rank, no master copy). attention, logits_chunk: the engine's core attention and
    logprob/entropy chunk (module docstring); step False: a forward-only engine (module docstring)."""
    if world % (tp * pp) or world % (ep * pp):
        raise ValueError(f"world size {world} is not divisible by TP x PP = {tp * pp} and EP x PP = {ep * pp}")
    if m.experts and m.experts % ep:
        raise ValueError(f"{m.experts} experts cannot be split over EP = {ep}")
    if micro_batch < 1 or seq_len < 1:
        raise ValueError(f"micro_batch and seq_len must be >= 1, got {micro_batch}, {seq_len}")
    dp, edp = world // (tp * pp), world // (pp * ep)
    dense_local = m.dense_params() // (tp * pp)
    expert_local = m.expert_params() // (ep * pp)
    if precision == "bf16":
        weights = BYTES_WEIGHT * (dense_local + expert_local)
        grads = BYTES_GRAD * (dense_local + expert_local)
        per_param = BYTES_OPTIM if step else 4  # master + Adam m, v; forward-only: the master shard only
        optimizer = per_param * (dense_local / dp + expert_local / edp)
        act_scale = 1
    elif precision == "fp32":
        weights = grads = 4 * (dense_local + expert_local)
        optimizer = 8 * (dense_local + expert_local) if step else 0
        act_scale = 2
    else:
        raise ValueError(f"precision must be 'bf16' or 'fp32', got {precision!r}")
    tokens = micro_batch * seq_len
    layers_local = -(-m.layers // pp)
    moe_frac = m.moe_layers / m.layers if m.layers else 0.0
    per_layer = moe_frac * activation_bytes_per_token_layer(m, moe=True) + (
        1 - moe_frac
    ) * activation_bytes_per_token_layer(m, moe=False)
    if not step:  # no_grad forward: one layer's activations at a time
        act = tokens * per_layer
    elif recompute:
        act = tokens * (layers_local * 2 * m.hidden + per_layer)
    else:
        act = tokens * layers_local * per_layer
    scores = 0.0
    if attention == "local":  # live in the forward, and again in the recompute inside backward
        scores = 14 * micro_batch * (m.heads / tp) * seq_len**2 * (1 if recompute or not step else layers_local)
    elif attention != "sdpa":
        raise ValueError(f"attention must be 'sdpa' or 'local', got {attention!r}")
    lb = 2 * act_scale  # bytes of one logit (bf16, or fp32)
    chunk = min(logits_chunk, tokens) if logits_chunk else 0
    temporaries = chunk * m.vocab * 12 if chunk else tokens * m.vocab * 16
    grad_side = (tokens * m.vocab * lb + m.vocab * m.hidden * lb) if step else 0  # d logits, output-layer dW
    logits = tokens * m.vocab * lb + max(temporaries, grad_side)
    act = act * act_scale / tp + scores + logits
    layout = (
        f"{precision}; world {world} = TP {tp} x PP {pp} x DP {dp}, experts EP {ep} x expert-DP {edp}; "
        f"micro-batch {micro_batch} x {seq_len} tokens, recompute {'on' if recompute else 'off'}"
    )
    return MemoryPlan(
        layout=layout,
        dense_local=dense_local,
        expert_local=expert_local,
        weights=weights,
        grads=grads,
        optimizer=optimizer,
        activations=act,
        reserve=reserve_gb * GB,
        logits=logits,
        attention_scores=scores,
    )
