"""Routing-capture conformance: is the routing an engine captures the routing the trainer would use?

    python -m r3.conformance --engine vllm --model CKPT [--precision fp32|bf16] [--train-engine hf|megatron]
    python -m r3.conformance --engine vllm --urls http://h1:8000 --model CKPT --weight-sync-dir /shared/sync
    python -m r3.conformance --engine sglang --urls http://h1:30000 --model CKPT --weight-sync-dir /shared/sync

Inputs: a registered rollout engine (r3.engines.registry: in-process, or a client of servers given by
--urls) serving the checkpoint CKPT, and the train engine whose own routing (ReplayMode.RECORD through
compute_logprobs, as r3.algorithm._routing_metrics measures it in every run) is the reference.
Output: a Markdown table on stdout, one row per check with got / expected / result, each failure's
likely cause below it; exit status 1 when any check fails. Sampling is greedy or seeded, so a run
repeats.

The battery, and the capture bug each check is there to catch (reported in the vLLM, SGLang, verl,
slime and NeMo-RL trackers):
- trace/shape, trace/dtype-range, trace/degenerate-rows: prompt + response - 1 rows of [L, K] ids in
  [0, E); no row repeating an expert (all-zero "every token to expert 0" from kernels that skip the
  capture hook, padding mapped to expert 0) and no layer constant over all tokens, where the trainer's
  routing of the same tokens has none;
- agreement/trainer, agreement/per-layer: the engine's rows vs the trainer's on the same tokens (top-k
  compared as sets, r3.metrics.routing_disagreement): equal in fp32; in bf16 the disagreement profile
  (the paper reports about 10% of (token, layer) pairs for Qwen3-30B-A3B) under a sanity bound that a
  shifted, overwritten or offset capture exceeds. A failure names the pattern it matches (rows
  shifted by d tokens, layers shifted by d, one layer holding another's rows);
- invariance/batch, invariance/prefix-cache, invariance/chunked-prefill: a prompt alone vs inside a
  large batch (wrong KV slots), asked twice (rows lost or shifted on a prefix-cache hit), prefilled in
  small chunks (rows lost at chunk borders): identical rows;
- trim/prompt-start: asking for the rows from a prompt position on (vLLM routed_experts_prompt_start)
  returns exactly the tail of the full capture;
- sync/same-weights, sync/new-weights, sync/back-to-original: after a sync of the weights the engine
  holds, rows are unchanged; after a sync of perturbed router weights they equal the trainer's routing
  under the new weights (not the old: stale cached rows); after syncing the original weights back
  they are the first run's again. Servers are left holding the original weights;
- bytes/token: the trace as the engine hands it over, against the floor L*K*ceil(log2 E)/8 bytes.

Tolerances. fp32 engines must match exactly (the vLLM CPU build and the transformers engine do,
tests/r3/test_r3_conformance.py). In bf16 the engine's routing differs from the fp32 trainer's at
near-ties, so agreement has a bound (`max_disagreement`, 0.3 of pairs, per layer too: about 3x the
paper's 10%, well below what a shifted capture gives); invariance checks allow `bf16_tolerance` = 1%
of (token, layer) pairs = 5%, because bf16 kernels may pick their reduction order by batch size or chunk
(GPU split-K, tile shapes; the transformers bf16 engine measured about 1% between a prompt alone and in
a batch) and flip a near-tie; every capture bug above moves whole rows or layers.
Rows are compared up to the first response token where two greedy runs part (after that the
sequences differ and so do their rows).

Departures: SGLang's client requests routed_experts_start_len=0 only, so trim/prompt-start is n/a
for it; chunked prefill is checked only for the in-process vLLM engine (a second engine with a small
max_num_batched_tokens); for servers, launch one with a small --max-num-batched-tokens (vLLM) or
--chunked-prefill-size (SGLang) and run the command against it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from r3.engines.base import RolloutEngine, RolloutSample, SamplingParams, TrainBatch, TrainEngine
from r3.metrics import routing_disagreement
from r3.replay import ReplayMode
from r3.trace import RoutingSpec, default_encoding

Status = Literal["pass", "FAIL", "n/a"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ConformanceConfig:
    """What to run the battery against, and its tolerances."""

    engine: str
    """Registered rollout engine name (r3.engines.registry.rollout_engine_names())."""
    model_path: str
    """transformers checkpoint the engine serves and the trainer loads."""
    precision: Literal["fp32", "bf16"] = "bf16"
    """Rollout numerics; fp32 requires exact agreement with the (fp32) trainer."""
    urls: tuple[str, ...] = ()
    """Server URLs (server engines); empty: in-process."""
    train_engine: str = "hf"
    """Registered train engine whose RECORD routing is the reference."""
    weight_sync_dir: str | None = None
    """Server mode: a directory the servers read, for the sync checks (None: n/a)."""
    batch_size: int = 32
    """Prompts in the sampled batch and in the large batch of invariance/batch."""
    max_new_tokens: int = 16
    """Response length cap of every request."""
    long_prompt_tokens: int = 200
    """Length of the prompt of the prefix-cache, chunked-prefill and trim checks: longer than a cache
    block (vLLM's CPU block is 128 tokens) and several chunks; capped by the model's context."""
    chunk_tokens: int = 32
    """max_num_batched_tokens of the chunked-prefill engine (in-process vLLM)."""
    seed: int = 0
    """Prompts, sampling seeds and the router perturbation."""
    max_disagreement: float = 0.3
    """bf16: largest fraction of (token, layer) pairs, overall and per layer, where engine and trainer
    pick different expert sets (paper: ~0.10)."""
    bf16_tolerance: float = 0.05
    """bf16: largest fraction of differing (token, layer) pairs between two runs that must be equal. Measured
    on the tiny zoo: the transformers bf16 engine flips 1 pair of 92-116 (about 1%) between a prompt alone and
    in a left-padded batch (other GEMM shapes, a near-tie); vLLM's CPU bf16 engine flips none."""

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {self.precision!r}")
        if self.batch_size < 2 or self.max_new_tokens < 2 or self.long_prompt_tokens < 4 or self.chunk_tokens < 2:
            raise ValueError(
                f"need batch_size >= 2, max_new_tokens >= 2, long_prompt_tokens >= 4, chunk_tokens >= 2; got "
                f"{self.batch_size}, {self.max_new_tokens}, {self.long_prompt_tokens}, {self.chunk_tokens}"
            )
        if not (0 < self.max_disagreement < 1 and 0 <= self.bf16_tolerance < 1):
            raise ValueError(
                f"need 0 < max_disagreement < 1 and 0 <= bf16_tolerance < 1, got {self.max_disagreement}, "
                f"{self.bf16_tolerance}"
            )


@dataclasses.dataclass(kw_only=True)
class CheckRow:
    """One line of the table."""

    name: str
    status: Status
    got: str
    expected: str
    cause: str = ""
    """FAIL: the failure the evidence points to; n/a: why the check cannot run on this engine."""


# --- comparing traces ---------------------------------------------------------------------------


def _sets(ids_NLK: torch.Tensor) -> torch.Tensor:
    return ids_NLK.long().sort(dim=-1).values


def _same_NL(a_NLK: torch.Tensor, b_NLK: torch.Tensor) -> torch.Tensor:
    """bool [N, L]: the two rows choose the same expert set."""
    return (_sets(a_NLK) == _sets(b_NLK)).all(dim=-1)


def repeated_expert_NL(ids_NLK: torch.Tensor) -> torch.Tensor:
    """bool [N, L]: the row names one expert twice (all-zero and all-equal rows included)."""
    s = _sets(ids_NLK)
    return (s[..., 1:] == s[..., :-1]).any(dim=-1) if s.shape[-1] > 1 else torch.zeros(s.shape[:2], dtype=torch.bool)


def diagnose(got_NLK: torch.Tensor, ref_NLK: torch.Tensor) -> str:
    """The capture bug a disagreement looks like, from which shifted copy of the reference the rows
    match (token shifts: wrong KV slot / off-by-one; layer shifts: dense-layer or pipeline-stage offset;
    one layer equal to another layer of the engine's own trace: a draft/MTP router writing into it)."""
    n, num_layers = got_NLK.shape[:2]
    if n == 0:
        return "no rows"
    if bool((got_NLK == 0).all()):
        return "all-zero routes: every token to expert 0 (a kernel that skips the capture hook)"
    base = float(_same_NL(got_NLK, ref_NLK).float().mean())
    for d in (1, -1, 2, -2):  # row t holds token t+d's routing
        if n > abs(d) + 1:
            a, b = (got_NLK[: n - d], ref_NLK[d:]) if d > 0 else (got_NLK[-d:], ref_NLK[: n + d])
            m = float(_same_NL(a, b).float().mean())
            if m > 0.9 and m > base + 0.2:
                return (
                    f"rows shifted by {d:+d} token(s): row t holds token t{d:+d}'s routing ({m:.0%} of rows match "
                    f"that shift, {base:.0%} unshifted): rows read from the wrong KV slots, or an off-by-one"
                )
    for d in (1, -1, 2, -2):  # layer l holds layer l+d's routing
        if num_layers > abs(d):
            a, b = (
                (got_NLK[:, : num_layers - d], ref_NLK[:, d:])
                if d > 0
                else (got_NLK[:, -d:], ref_NLK[:, : num_layers + d])
            )
            m = float(_same_NL(a, b).float().mean())
            if m > 0.9 and m > base + 0.2:
                return (
                    f"layers shifted by {d:+d}: layer l holds layer l{d:+d}'s routing ({m:.0%} match): a dense-layer "
                    "or pipeline-stage offset in the layer index of the capture"
                )
    per_layer = _same_NL(got_NLK, ref_NLK).float().mean(dim=0)
    good = per_layer > 0.8
    for layer in (~good).nonzero().flatten().tolist():
        if not good.any():
            break
        for other in range(num_layers):
            if (
                other != layer
                and float(_same_NL(got_NLK[:, layer : layer + 1], got_NLK[:, other : other + 1]).float().mean()) > 0.9
            ):
                return (
                    f"layer {layer} holds layer {other}'s rows ({per_layer[layer]:.0%} agree with the trainer's layer "
                    f"{layer}): another router (a draft/MTP layer, or a layer-index collision) overwrote layer {layer}"
                )
        return f"layer {layer} disagrees with the trainer ({1 - per_layer[layer]:.0%} of its rows) while others agree"
    return ""


@dataclasses.dataclass(kw_only=True)
class RowDiff:
    """Two captures of one sequence compared on the rows both runs fed with the same tokens."""

    rows: int
    """Rows compared."""
    pairs_differ: int
    """(token, layer) pairs with different expert sets among them."""
    shape_a: tuple
    shape_b: tuple
    diagnosis: str = ""

    @property
    def fraction(self) -> float:
        return self.pairs_differ / max(self.rows * (self.shape_a[1] if len(self.shape_a) > 1 else 1), 1)


def compare_rows(a: RolloutSample, b: RolloutSample, *, start: int = 0) -> RowDiff:
    """Rows start.. of two captures of the same prompt, up to the first response token where they part
    (row t is computed from tokens 0..t, so rows < prompt + common response length are comparable)."""
    ta, tb = a.expert_ids_TLK, b.expert_ids_TLK
    common = 0
    for x, y in zip(a.response_ids, b.response_ids):
        if x != y:
            break
        common += 1
    n = min(len(a.prompt_ids) + common, len(a.prompt_ids) + len(a.response_ids) - 1)
    if ta.shape[1:] != tb.shape[1:] or ta.shape[0] != tb.shape[0] and min(ta.shape[0], tb.shape[0]) < n:
        return RowDiff(rows=0, pairs_differ=-1, shape_a=tuple(ta.shape), shape_b=tuple(tb.shape))
    ra, rb = ta[start:n], tb[start:n]
    same = _same_NL(ra, rb)
    d = RowDiff(rows=n - start, pairs_differ=int((~same).sum()), shape_a=tuple(ta.shape), shape_b=tuple(tb.shape))
    if d.pairs_differ:
        d.diagnosis = diagnose(rb, ra)  # b is the run under test, a the reference run
    return d


# --- the reference: the trainer's own routing ---------------------------------------------------


def trainer_routing(trainer: TrainEngine, samples: Sequence[RolloutSample]) -> list[torch.Tensor]:
    """The train engine's own routing (ReplayMode.RECORD) of each sample's tokens: int64 [P + R - 1, L, K]."""
    seqs = [list(s.prompt_ids) + list(s.response_ids) for s in samples]
    S = max(len(x) for x in seqs)
    ids_BS = torch.zeros(len(seqs), S, dtype=torch.long)
    mask_BS = torch.zeros(len(seqs), S, dtype=torch.long)
    loss_BT = torch.zeros(len(seqs), S - 1)
    for b, (x, s) in enumerate(zip(seqs, samples)):
        ids_BS[b, : len(x)] = torch.tensor(x)
        mask_BS[b, : len(x)] = 1
        loss_BT[b, len(s.prompt_ids) - 1 : len(x) - 1] = 1.0
    batch = TrainBatch(input_ids_BS=ids_BS, attention_mask_BS=mask_BS, loss_mask_BT=loss_BT)
    rec = trainer.compute_logprobs(batch, routing=ReplayMode.RECORD).expert_ids_BTLK
    return [rec[b, : len(x) - 1].cpu().long() for b, x in enumerate(seqs)]


def perturbed_router(state_dict: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """The weights with every MoE router (`mlp.gate.weight`) plus seeded noise of the router's own
    standard deviation: routing changes on many pairs while the rest of the model stays."""
    gen = torch.Generator().manual_seed(seed)
    out = dict(state_dict)
    gates = [k for k in state_dict if k.endswith("mlp.gate.weight")]
    if not gates:
        raise ValueError("no MoE router weights (*.mlp.gate.weight) in the trainer's state dict: is the model MoE?")
    for k in gates:
        w = state_dict[k]
        noise = torch.randn(w.shape, generator=gen, dtype=torch.float32) * w.float().std()
        out[k] = (w.float() + noise).to(w.dtype)
    return out


def load_trainer_weights(trainer: TrainEngine, state_dict: dict[str, torch.Tensor], rebuild: Callable[[dict], Any]):
    """A train engine holding `state_dict`: the transformers trainer in place (load_state_dict), any other
    one rebuilt by `rebuild` from a checkpoint of the weights."""
    model = getattr(trainer, "model", None)
    if isinstance(model, torch.nn.Module) and hasattr(model, "config") and hasattr(model, "generation_config"):
        with torch.no_grad():
            model.load_state_dict(state_dict)
        return trainer
    return rebuild(state_dict)


# --- prompts ------------------------------------------------------------------------------------


def make_prompts(
    model_path: str, n: int, long_tokens: int, seed: int, long_seed: int | None = None
) -> tuple[list[list[int]], list[int]]:
    """n short arithmetic prompts of varied length and one long one (token ids), from the model's
    tokenizer (digits and + - * are in every tokenizer used here: the tiny zoo's and Qwen3's); random
    ids from the upper half of the vocabulary when the checkpoint has no tokenizer. The long prompt
    comes from `long_seed` (default: `seed`)."""
    rng = random.Random(seed)

    def expr(terms: int) -> str:
        s = str(rng.randint(0, 99))
        for _ in range(terms):
            s += rng.choice("+-*") + str(rng.randint(0, 99))
        return s + "\n"

    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_path)
        encode = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    except (OSError, ValueError):
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(model_path).vocab_size
        encode = lambda s: [vocab // 2 + rng.randrange(vocab // 2) for _ in s]  # noqa: E731
    short = [encode(expr(rng.randint(1, 5))) for _ in range(n)]
    long: list[int] = []
    rng = random.Random(seed if long_seed is None else long_seed)
    while len(long) < long_tokens:
        long += encode(expr(3))
    return short, long[:long_tokens]


# --- the battery --------------------------------------------------------------------------------


class Battery:
    """Runs the checks on one built rollout engine against one train engine (see the module docstring).

    engine: any RolloutEngine (test doubles wrap a real one). trainer: holds the weights the engine serves.
    rebuild_trainer(state_dict): a train engine holding other weights (used when the trainer cannot load
    them in place). chunked_engine: the same engine prefilling in small chunks, or None with
    `chunked_reason`."""

    def __init__(
        self,
        engine: RolloutEngine,
        trainer: TrainEngine,
        *,
        spec: RoutingSpec,
        cfg: ConformanceConfig,
        prompts: Sequence[Sequence[int]],
        long_prompt: Sequence[int],
        rebuild_trainer: Callable[[dict], TrainEngine],
        chunked_engine: RolloutEngine | None = None,
        chunked_reason: str = "",
    ):
        self.engine, self.trainer, self.spec, self.cfg = engine, trainer, spec, cfg
        self.prompts, self.long = [list(p) for p in prompts], list(long_prompt)
        self.rebuild_trainer = rebuild_trainer
        self.chunked, self.chunked_reason = chunked_engine, chunked_reason
        self.exact = cfg.precision == "fp32"
        self.greedy = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=0.0)
        self.rows: list[CheckRow] = []

    # helpers -----------------------------------------------------------------------------------
    def add(self, name: str, ok: bool | None, got: str, expected: str, cause: str = "") -> None:
        status: Status = "n/a" if ok is None else ("pass" if ok else "FAIL")
        self.rows.append(CheckRow(name=name, status=status, got=got, expected=expected, cause=cause))

    def guarded(self, name: str, expected: str, fn: Callable[[], None]) -> None:
        """Run a check; an exception (e.g. the engine's own boundary validation refusing its trace) is a FAIL."""
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - every engine error is a finding of the battery
            self.add(name, False, f"{type(e).__name__}", expected, str(e).splitlines()[0][:400] if str(e) else repr(e))

    def gen(self, prompts, params=None) -> list[RolloutSample]:
        return self.engine.generate(prompts, params or self.greedy, capture_routing=True)

    def equal_enough(self, d: RowDiff) -> bool:
        if d.pairs_differ < 0:
            return False
        return d.pairs_differ == 0 if self.exact else d.fraction <= self.cfg.bf16_tolerance

    def tolerance_text(self) -> str:
        return "identical rows" if self.exact else f"<= {self.cfg.bf16_tolerance:.0%} pairs differ (bf16)"

    def diff_got(self, d: RowDiff) -> str:
        if d.pairs_differ < 0:
            return f"rows {d.shape_a[0]} vs {d.shape_b[0]}"
        return f"{d.pairs_differ}/{d.rows * self.spec.num_layers} pairs differ over {d.rows} rows"

    def diff_cause(self, d: RowDiff, what: str) -> str:
        if d.pairs_differ < 0:
            return (
                f"{what}: the capture has {d.shape_b[0]} rows, the reference run {d.shape_a[0]} "
                f"({d.shape_a[0] - d.shape_b[0]:+d} rows): rows lost or added"
            )
        return f"{what}: {d.diagnosis or 'rows differ'}"

    # the battery -------------------------------------------------------------------------------
    def run(self) -> list[CheckRow]:
        caps = self.engine.capabilities
        if not caps.captures_routing:
            self.add("engine/captures-routing", False, "captures_routing=False", "True", "R3 cannot run on this engine")
            return self.rows
        try:  # greedy baselines the invariance, trim and sync checks compare with (the long prompt's first request)
            self.alone, self.long_first = self.gen([self.prompts[0]])[0], self.gen([self.long])[0]
            self.first_cached = (getattr(self.engine, "last_num_cached_tokens", None) or [0])[0]
        except Exception as e:  # noqa: BLE001 - the engine cannot even capture: nothing else to check
            self.add("trace/baseline", False, type(e).__name__, "a greedy capture", str(e).splitlines()[0][:400])
            return self.rows
        self.guarded("trace/sampled-batch", "a captured batch", self.check_sampled_batch)
        self.guarded("invariance/batch", self.tolerance_text(), self.check_batch_invariance)
        self.guarded("invariance/prefix-cache", self.tolerance_text(), self.check_prefix_cache)
        self.guarded("invariance/chunked-prefill", self.tolerance_text(), self.check_chunked_prefill)
        self.guarded("trim/prompt-start", "the tail of the full capture", self.check_trim)
        if caps.weight_sync:
            self.guarded("sync", "syncs run", self.check_syncs)
        else:
            for name in ("sync/same-weights", "sync/new-weights", "sync/back-to-original"):
                self.add(name, None, "", "", "engine has no weight sync (servers: give --weight-sync-dir)")
        return self.rows

    def check_sampled_batch(self) -> None:
        """trace/*, agreement/*, bytes/token on a seeded sampled batch."""
        spec, n_layers, k = self.spec, self.spec.num_layers, self.spec.top_k
        params = SamplingParams(max_new_tokens=self.cfg.max_new_tokens, temperature=1.0, seed=self.cfg.seed)
        samples = self.gen(self.prompts, params)
        # shape
        bad = [
            (i, tuple(s.expert_ids_TLK.shape), len(s.prompt_ids) + len(s.response_ids) - 1)
            for i, s in enumerate(samples)
            if s.expert_ids_TLK is None
            or tuple(s.expert_ids_TLK.shape) != (len(s.prompt_ids) + len(s.response_ids) - 1, n_layers, k)
        ]
        cause = ""
        if bad:
            i, shape, rows = bad[0]
            if len(shape) == 3 and shape[1] != n_layers:
                cause = (
                    f"{shape[1]} layers captured, the trainer has {n_layers} MoE layers: dense layers or "
                    "pipeline stages counted?"
                )
            elif len(shape) == 3 and shape[0] != rows:
                cause = f"sample {i}: {shape[0]} rows for {rows} fed tokens ({shape[0] - rows:+d}): " + (
                    "off-by-one at the last token (n tokens have n - 1 rows)"
                    if abs(shape[0] - rows) == 1
                    else "rows lost or added"
                )
        self.add(
            "trace/shape",
            not bad,
            f"{len(samples) - len(bad)}/{len(samples)} samples right"
            + (f"; sample {bad[0][0]}: {list(bad[0][1])}" if bad else ""),
            f"[prompt + response - 1, {n_layers}, {k}]",
            cause,
        )
        good = [s for s in samples if s.expert_ids_TLK is not None and s.expert_ids_TLK.shape[1:] == (n_layers, k)]
        good = [s for s in good if s.expert_ids_TLK.shape[0] == len(s.prompt_ids) + len(s.response_ids) - 1]
        if not good:
            return
        got_NLK = torch.cat([s.expert_ids_TLK for s in good])
        dtypes = sorted({str(s.expert_ids_TLK.dtype).replace("torch.", "") for s in good})
        lo, hi = int(got_NLK.min()), int(got_NLK.max())
        ints = not (got_NLK.dtype.is_floating_point or got_NLK.dtype == torch.bool)
        self.add(
            "trace/dtype-range",
            ints and lo >= 0 and hi < spec.num_experts,
            f"{'/'.join(dtypes)}, ids {lo}..{hi}",
            f"integer, ids in [0, {spec.num_experts})",
            "" if hi < spec.num_experts else "ids beyond E: a model with more experts, or -1 padding read as unsigned",
        )
        ref_NLK = torch.cat(trainer_routing(self.trainer, good))
        self._degenerate(got_NLK, ref_NLK)
        self._agreement(got_NLK, ref_NLK)
        self._bytes(good[0].expert_ids_TLK)

    def _degenerate(self, got_NLK: torch.Tensor, ref_NLK: torch.Tensor) -> None:
        rep = repeated_expert_NL(got_NLK) & ~repeated_expert_NL(ref_NLK)
        zero = (got_NLK == 0).all(dim=-1) & rep
        const_L = _same_NL(got_NLK, got_NLK[:1].expand_as(got_NLK)).all(dim=0) & ~_same_NL(
            ref_NLK, ref_NLK[:1].expand_as(ref_NLK)
        ).all(dim=0)
        n = int(rep.sum())
        cause = ""
        if bool((got_NLK == 0).all()):
            cause = "all-zero routes: every token to expert 0 (a kernel that skips the capture hook)"
        elif int(zero.sum()):
            tok = zero.any(dim=1).nonzero().flatten()
            cause = (
                f"{int(zero.sum())} rows route every top-k slot to expert 0 (tokens {tok[:3].tolist()}...): padding "
                "rows mapped to expert 0, or rows the capture never wrote"
            )
        elif n:
            cause = f"{n} rows name one expert twice: a capture buffer mixing rows"
        elif bool(const_L.any()):
            layers = const_L.nonzero().flatten().tolist()
            cause = f"layer(s) {layers} give every token the same experts: a buffer never written"
        self.add(
            "trace/degenerate-rows",
            not cause,
            f"{n} repeated-expert rows, {int(const_L.sum())} constant layers "
            f"of {got_NLK.shape[0]} x {self.spec.num_layers}",
            "0 and 0 (as the trainer's routing)",
            cause,
        )

    def _agreement(self, got_NLK: torch.Tensor, ref_NLK: torch.Tensor) -> None:
        d = routing_disagreement(got_NLK, ref_NLK)
        pair, tokd = float(d["routing/pair_disagreement"]), float(d["routing/token_disagreement"])
        per_layer = [float(v) for v in d["routing/per_layer"]]
        order = int(((got_NLK.long() != ref_NLK) & _same_NL(got_NLK, ref_NLK)[..., None]).any(-1).sum())
        bound = 0.0 if self.exact else self.cfg.max_disagreement
        ok = pair <= bound and max(per_layer) <= bound
        cause = "" if ok else diagnose(got_NLK, ref_NLK)
        if not ok and not cause:
            cause = "routing differs from the trainer's beyond the bound: other weights, or a capture mixing rows"
        n_pairs = got_NLK.shape[0] * self.spec.num_layers
        self.add(
            "agreement/trainer",
            ok,
            f"pairs {pair:.4f}, tokens {tokd:.4f} ({n_pairs} pairs; same set, other order: {order})",
            "pairs 0 (fp32: exact)" if self.exact else f"pairs <= {bound} (paper, bf16 Qwen3-30B-A3B: ~0.10)",
            cause,
        )
        self.add(
            "agreement/per-layer",
            max(per_layer) <= bound,
            " ".join(f"L{i} {v:.3f}" for i, v in enumerate(per_layer)),
            "all 0" if self.exact else f"each <= {bound}",
            "" if max(per_layer) <= bound else cause,
        )

    def _bytes(self, trace: torch.Tensor) -> None:
        s = self.spec
        per_token = trace.element_size() * s.num_layers * s.top_k
        floor = s.num_layers * s.top_k * s.bits_per_id / 8
        aligned = s.num_layers * s.top_k * (1 if default_encoding(s.num_experts) == "uint8" else 2)
        wire = {"vllm": "base64 .npy on the wire: x4/3", "sglang": "SGLang sends base64 int32: 16/3 B per id"}
        note = wire.get(self.cfg.engine, "") if self.cfg.urls else "in process"
        self.add(
            "bytes/token",
            per_token <= aligned,
            f"{per_token} B ({str(trace.dtype).replace('torch.', '')}; {per_token / floor:.2f}x floor; {note})",
            f"<= {aligned} B ({default_encoding(s.num_experts)}); floor L*K*ceil(log2 E)/8 = {floor:g} B",
            ""
            if per_token <= aligned
            else f"ids widened to {trace.dtype} before transfer ({per_token / aligned:.0f}x the byte-aligned size)",
        )

    def check_batch_invariance(self) -> None:
        # four prompts alone vs the same four spread over the large batch (rows from other requests' KV slots)
        n = min(4, len(self.prompts))
        alone = [self.alone] + [self.gen([p])[0] for p in self.prompts[1:n]]
        where = [round(i * (len(self.prompts) - 1) / max(n - 1, 1)) for i in range(n)]
        batch = list(self.prompts[n:])
        for i, pos in enumerate(where):
            batch.insert(pos, self.prompts[i])
        out = self.gen(batch)
        diffs = [compare_rows(a, out[pos]) for a, pos in zip(alone, where)]
        bad = [x for x in diffs if x.pairs_differ < 0]
        d = (
            bad[0]
            if bad
            else RowDiff(
                rows=sum(x.rows for x in diffs),
                pairs_differ=sum(x.pairs_differ for x in diffs),
                shape_a=diffs[0].shape_a,
                shape_b=diffs[0].shape_b,
                diagnosis=next((x.diagnosis for x in diffs if x.diagnosis), ""),
            )
        )
        self.add(
            "invariance/batch",
            self.equal_enough(d),
            f"{n} prompts alone vs at rows {where} of {len(batch)}: {self.diff_got(d)}",
            self.tolerance_text(),
            "" if self.equal_enough(d) else self.diff_cause(d, "the prompt's rows change with its batch"),
        )

    def check_prefix_cache(self) -> None:
        first = self.long_first
        if not self.engine.capabilities.prefix_cache:
            self.add("invariance/prefix-cache", None, "", self.tolerance_text(), "engine has no prefix cache")
            return
        second = self.gen([self.long])[0]
        cached = getattr(self.engine, "last_num_cached_tokens", None)
        if cached is not None and self.first_cached:
            raise RuntimeError(
                "inconclusive: the long prompt's first request already hit the prefix cache "
                f"({self.first_cached} tokens)"
            )
        hit = f"{cached[0]} of {len(self.long)} prompt tokens cached" if cached else "hit not reported by the engine"
        d = compare_rows(first, second)
        ok = self.equal_enough(d)
        cause = "" if ok else self.diff_cause(d, "second request of the same prompt (a prefix-cache hit)")
        if ok and cached is not None and cached[0] == 0:
            ok, cause = (
                False,
                "inconclusive: no prefix-cache hit; raise --long-prompt-tokens above the engine's cache block",
            )
        self.add("invariance/prefix-cache", ok, f"{hit}; {self.diff_got(d)}", self.tolerance_text(), cause)

    def check_chunked_prefill(self) -> None:
        if self.chunked is None:
            self.add("invariance/chunked-prefill", None, "", self.tolerance_text(), self.chunked_reason)
            return
        chunked = self.chunked.generate([self.long], self.greedy, capture_routing=True)[0]
        d = compare_rows(self.long_first, chunked)
        how = chunked_prefill_setting(self.chunked)
        self.add(
            "invariance/chunked-prefill",
            self.equal_enough(d),
            f"{how}; {self.diff_got(d)}",
            self.tolerance_text(),
            "" if self.equal_enough(d) else self.diff_cause(d, "prefilled in chunks"),
        )

    def check_trim(self) -> None:
        eng = self.engine
        if not (eng.capabilities.prefix_cached_routing and hasattr(eng, "generate_continuations")):
            self.add("trim/prompt-start", None, "", "the tail of the full capture", "engine has no prompt-start trim")
            return
        full = self.long_first
        k = len(self.long) // 2 + 1  # inside the prompt, not on a cache-block border
        cont = eng.generate_continuations([self.long], self.greedy, known_routing=[full.expert_ids_TLK[:k]])[0]
        d = compare_rows(full, cont, start=k)
        ok = self.equal_enough(d)
        self.add(
            "trim/prompt-start",
            ok,
            f"rows from {k} on: {self.diff_got(d)}",
            f"rows {k}.. of the full capture" + ("" if self.exact else f" ({self.tolerance_text()})"),
            ""
            if ok
            else self.diff_cause(d, f"trimmed at prompt position {k}") + " (prompt start applied at the wrong row?)",
        )

    def check_syncs(self) -> None:
        # a copy: the transformers trainer's state dict shares storage with the model it loads new weights into
        sd = {k: v.detach().clone() for k, v in self.trainer.rollout_state_dict().items()}
        probes = [self.prompts[0], self.long]
        before = [self.alone, self.long_first]

        def same_as(rows: list[RolloutSample], ref: list[RolloutSample], name: str, what: str, expected: str) -> None:
            diffs = [compare_rows(a, b) for a, b in zip(ref, rows)]
            ok = all(self.equal_enough(d) for d in diffs)
            worst = max(diffs, key=lambda d: (d.pairs_differ < 0, d.fraction))
            self.add(
                name,
                ok,
                "; ".join(self.diff_got(d) for d in diffs),
                expected,
                "" if ok else self.diff_cause(worst, what),
            )

        try:
            self.engine.sync_weights(sd)
            same_as(
                [self.gen([p])[0] for p in probes],
                before,
                "sync/same-weights",
                "after a sync of the same weights",
                self.tolerance_text(),
            )
            self._new_weights(sd)
        finally:
            self.engine.sync_weights(sd)
            self.trainer = load_trainer_weights(self.trainer, sd, self.rebuild_trainer)
        same_as(
            [self.gen([p])[0] for p in probes],
            before,
            "sync/back-to-original",
            "after syncing the original weights back",
            self.tolerance_text(),
        )

    def _new_weights(self, sd: dict[str, torch.Tensor]) -> None:
        new = perturbed_router(sd, self.cfg.seed + 1)
        self.engine.sync_weights(new)
        samples = self.gen([*self.prompts[: max(2, len(self.prompts) // 4)], self.long])
        lens = [len(s.prompt_ids) + len(s.response_ids) - 1 for s in samples]
        if any(s.expert_ids_TLK is None or s.expert_ids_TLK.shape[0] != n for s, n in zip(samples, lens)):
            raise ValueError(
                f"after the sync: traces of {[tuple(s.expert_ids_TLK.shape) for s in samples]} rows for "
                f"{lens} fed tokens"
            )
        old_ref = torch.cat(trainer_routing(self.trainer, samples))
        self.trainer = load_trainer_weights(self.trainer, new, self.rebuild_trainer)
        new_ref = torch.cat(trainer_routing(self.trainer, samples))
        got = torch.cat([s.expert_ids_TLK for s in samples])
        to_new = float(routing_disagreement(got, new_ref)["routing/pair_disagreement"])
        to_old = float(routing_disagreement(got, old_ref)["routing/pair_disagreement"])
        moved = float(routing_disagreement(old_ref, new_ref)["routing/pair_disagreement"])
        bound = 0.0 if self.exact else self.cfg.max_disagreement
        ok = to_new <= bound and to_new < to_old
        cause = ""
        if moved < 0.2:
            ok, cause = False, f"inconclusive: the perturbation moved only {moved:.0%} of pairs"
        elif not ok and to_old < to_new:
            cause = (
                f"stale routing: rows follow the previous weights ({to_old:.2%} of pairs differ from them, "
                f"{to_new:.2%} from the new): cached rows or KV kept across the sync, or the router not reloaded"
            )
        elif not ok:
            cause = diagnose(got, new_ref) or "rows differ from the trainer's under the new weights"
        self.add(
            "sync/new-weights",
            ok,
            f"vs new weights {to_new:.4f}, vs old {to_old:.4f} (perturbation moved {moved:.2f})",
            f"vs new <= {bound} and < vs old",
            cause,
        )


def chunked_prefill_setting(engine: Any) -> str:
    """How an in-process vLLM engine schedules prefill (vllm_config.scheduler_config)."""
    try:
        sc = engine.llm.llm_engine.vllm_config.scheduler_config
        return f"chunked prefill {sc.enable_chunked_prefill}, {sc.max_num_batched_tokens} tokens per step"
    except AttributeError:
        return "chunked engine"


def chunked_prefill_config(rollout_cfg: Any, chunk_tokens: int) -> tuple[Any | None, str]:
    """The config of the same engine prefilling in chunks of `chunk_tokens`, or (None, why not): an
    in-process engine whose config schedules prefill by `max_num_batched_tokens` (vLLM's)."""
    fields = {f.name for f in dataclasses.fields(rollout_cfg)}
    if "max_num_batched_tokens" not in fields:
        return None, "engine has no chunked prefill (one prefill call per batch)"
    if getattr(rollout_cfg, "urls", ()):
        return None, "server mode: run against a server launched with a small prefill chunk (tokens per step)"
    return (
        dataclasses.replace(
            rollout_cfg,
            max_num_batched_tokens=chunk_tokens,
            max_num_seqs=min(rollout_cfg.max_num_seqs, chunk_tokens),
        ),
        "",
    )


# --- command line -------------------------------------------------------------------------------


def engine_configs(cfg: ConformanceConfig) -> tuple[Any, Any]:
    """(rollout config, train config) through the registry, as every run builds them."""
    from r3.engines import registry

    rollout = registry.RolloutSettings(
        model_path=cfg.model_path,
        precision=cfg.precision,
        seed=cfg.seed,
        urls=tuple(cfg.urls),
        weight_sync_dir=cfg.weight_sync_dir,
    )
    train = registry.TrainSettings(model_path=cfg.model_path, lr=1e-6)
    return registry.rollout_config_for(cfg.engine, rollout), registry.train_config_for(cfg.train_engine, train)


def battery_for(
    cfg: ConformanceConfig,
    engine: RolloutEngine,
    trainer: TrainEngine,
    *,
    workdir: str | Path,
    chunked_engine: RolloutEngine | None = None,
    chunked_reason: str = "",
) -> Battery:
    """The battery of `cfg` on built engines: prompts from the model's tokenizer, the routing geometry from
    its config; a trainer that cannot load weights in place is rebuilt from a checkpoint in `workdir`."""
    from transformers import AutoConfig

    from r3.engines.hf_checkpoint import write_checkpoint
    from r3.engines.registry import build_train_engine

    hf_cfg = AutoConfig.from_pretrained(cfg.model_path)
    if not getattr(hf_cfg, "num_experts", None):
        raise ValueError(f"{cfg.model_path} has no routed experts (config.num_experts): there is no routing to check")
    room = int(getattr(hf_cfg, "max_position_embeddings", 4096)) - cfg.max_new_tokens - 1
    # the long prompt is new in every run, so its first request cannot hit a prefix cache that an earlier run
    # (or an RL job on the same servers) warmed, which would make the prefix-cache check compare two hits
    fresh = random.SystemRandom().randrange(2**62)
    prompts, long = make_prompts(cfg.model_path, cfg.batch_size, min(cfg.long_prompt_tokens, room), cfg.seed, fresh)
    _, train_cfg = engine_configs(cfg)

    def rebuild(state_dict: dict) -> TrainEngine:
        out = Path(workdir) / "weights"
        tied = bool(getattr(hf_cfg, "tie_word_embeddings", False))
        write_checkpoint(out, state_dict, base_model_path=cfg.model_path, tie_word_embeddings=tied)
        return build_train_engine(dataclasses.replace(train_cfg, model_path=str(out)))

    return Battery(
        engine,
        trainer,
        spec=RoutingSpec.from_hf_config(hf_cfg),
        cfg=cfg,
        prompts=prompts,
        long_prompt=long,
        rebuild_trainer=rebuild,
        chunked_engine=chunked_engine,
        chunked_reason=chunked_reason,
    )


def run(cfg: ConformanceConfig) -> list[CheckRow]:
    """Build the engines of `cfg` through the registry and run the battery."""
    from r3.engines.registry import build_rollout_engine, build_train_engine

    rollout_cfg, train_cfg = engine_configs(cfg)
    chunked_cfg, reason = chunked_prefill_config(rollout_cfg, cfg.chunk_tokens)
    engine = chunked = None
    with tempfile.TemporaryDirectory(prefix="r3-conformance-") as tmp:
        try:
            engine = build_rollout_engine(rollout_cfg)
            chunked = build_rollout_engine(chunked_cfg) if chunked_cfg is not None else None
            trainer = build_train_engine(train_cfg)
            battery = battery_for(cfg, engine, trainer, workdir=tmp, chunked_engine=chunked, chunked_reason=reason)
            return battery.run()
        finally:
            for e in (chunked, engine):
                if e is not None and hasattr(e, "close"):
                    e.close()


def format_table(rows: Sequence[CheckRow], cfg: ConformanceConfig | None = None) -> str:
    """The Markdown table, then one line per FAIL / n/a row with its cause."""
    lines = []
    if cfg is not None:
        where = ", ".join(cfg.urls) if cfg.urls else "in process"
        lines.append(
            f"routing-capture conformance: engine {cfg.engine} ({where}), {cfg.precision}, model {cfg.model_path}, "
            f"reference: train engine {cfg.train_engine} (RECORD)\n"
        )
    lines += ["| check | result | got | expected |", "|---|---|---|---|"]
    lines += [f"| {r.name} | {r.status} | {r.got} | {r.expected} |" for r in rows]
    notes = [f"- {r.status} {r.name}: {r.cause}" for r in rows if r.status != "pass" and r.cause]
    fails = sum(r.status == "FAIL" for r in rows)
    lines += ["", *notes, *([""] if notes else [])]
    lines.append(f"{len(rows)} checks: {fails} failed, {sum(r.status == 'n/a' for r in rows)} not applicable")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m r3.conformance", description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", required=True, help="rollout engine: hf, vllm, sglang (r3.engines.registry)")
    ap.add_argument("--model", required=True, help="checkpoint directory the engine serves")
    ap.add_argument("--urls", nargs="*", default=[], help="server URLs (server engines)")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    ap.add_argument("--train-engine", default="hf", help="reference train engine: hf or megatron")
    ap.add_argument("--weight-sync-dir", default=None, help="server mode: a directory the servers read")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--long-prompt-tokens", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-disagreement", type=float, default=0.3)
    ap.add_argument("--bf16-tolerance", type=float, default=0.05)
    args = ap.parse_args(argv)
    urls = tuple(u for x in args.urls for u in x.split(",") if u)
    cfg = ConformanceConfig(
        engine=args.engine,
        model_path=args.model,
        precision=args.precision,
        urls=urls,
        train_engine=args.train_engine,
        weight_sync_dir=args.weight_sync_dir,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        long_prompt_tokens=args.long_prompt_tokens,
        seed=args.seed,
        max_disagreement=args.max_disagreement,
        bf16_tolerance=args.bf16_tolerance,
    )
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # read at vllm's import: keep the table readable
    rows = run(cfg)
    print(format_table(rows, cfg), flush=True)
    return 1 if any(r.status == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
