"""Test doubles of rollout engines with one routing-capture bug each, for tests/r3/test_r3_conformance.py.

Each wraps a real engine (its samples, logprobs and syncs are the real engine's) and corrupts the
routing it returns the way a bug reported in the vLLM / SGLang / verl / slime / NeMo-RL trackers does.
They sit after the real engine's boundary validation, as a bug inside an engine would."""

from __future__ import annotations

import dataclasses

import torch

from r3.engines.base import RolloutSample, SamplingParams


class CaptureBugDouble:
    """Forwards everything to `inner`; subclasses corrupt the traces in `corrupt`."""

    bug = "none"

    def __init__(self, inner):
        self.inner = inner

    @property
    def capabilities(self):
        return self.inner.capabilities

    @property
    def last_num_cached_tokens(self):
        return getattr(self.inner, "last_num_cached_tokens", None)

    def sync_weights(self, state_dict) -> None:
        self.inner.sync_weights(state_dict)

    def generate(self, prompts, params: SamplingParams, *, capture_routing: bool = False) -> list[RolloutSample]:
        samples = self.inner.generate(prompts, params, capture_routing=capture_routing)
        if capture_routing:
            samples = [dataclasses.replace(s, expert_ids_TLK=s.expert_ids_TLK.clone()) for s in samples]
            self.corrupt(samples)
        return samples

    def generate_continuations(self, prompts, params, *, known_routing):
        return self.inner.generate_continuations(prompts, params, known_routing=known_routing)

    def corrupt(self, samples: list[RolloutSample]) -> None:
        """Change the samples' traces in place."""


class AllZeroRoutes(CaptureBugDouble):
    """A MoE kernel that never calls the capture hook: the buffer stays zero ("every token to expert 0")."""

    bug = "all-zero routes"

    def corrupt(self, samples):
        for s in samples:
            s.expert_ids_TLK.zero_()


class Layer0Overwritten(CaptureBugDouble):
    """A draft / MTP layer's router writes its rows into layer 0's slot (here: the last layer's rows)."""

    bug = "layer 0 overwritten"

    def corrupt(self, samples):
        for s in samples:
            s.expert_ids_TLK[:, 0] = s.expert_ids_TLK[:, -1]


class RowsShiftedByOne(CaptureBugDouble):
    """Rows read one KV slot too far: row t holds token t+1's routing (the last row repeated)."""

    bug = "rows shifted by one"

    def corrupt(self, samples):
        for s in samples:
            t = s.expert_ids_TLK
            t[:-1] = t[1:].clone()


class PaddingToExpertZero(CaptureBugDouble):
    """A left-padded batch whose padding rows are returned as expert 0 in place of a shorter prompt's first rows."""

    bug = "padding mapped to expert 0"

    def corrupt(self, samples):
        longest = max(len(s.prompt_ids) for s in samples)
        for s in samples:
            pad = min(longest - len(s.prompt_ids), s.expert_ids_TLK.shape[0])
            s.expert_ids_TLK[:pad] = 0


class DenseLayerOffset(CaptureBugDouble):
    """Layer index counted over all decoder layers with one dense layer first: MoE layer l lands in slot l+1."""

    bug = "dense-layer offset"

    def corrupt(self, samples):
        for s in samples:
            t = s.expert_ids_TLK
            t[:, 1:] = t[:, :-1].clone()


class PrefixHitLosesPromptRows(CaptureBugDouble):
    """On a prefix-cache hit only the computed tokens' rows come back: the cached prompt rows are lost."""

    bug = "prompt rows lost after a prefix-cache hit"

    def corrupt(self, samples):
        cached = self.inner.last_num_cached_tokens
        for s, n in zip(samples, cached):
            if n:
                s.expert_ids_TLK = s.expert_ids_TLK[n:].clone()


class StaleAfterSync(CaptureBugDouble):
    """A routing cache keyed by prompt that a weight sync does not clear: prompt rows of the old weights."""

    bug = "stale routing after a sync"

    def __init__(self, inner):
        super().__init__(inner)
        self.cache: dict[tuple, torch.Tensor] = {}

    def corrupt(self, samples):
        for s in samples:
            key, rows = tuple(s.prompt_ids), len(s.prompt_ids) - 1
            if key in self.cache:
                s.expert_ids_TLK[:rows] = self.cache[key]
            else:
                self.cache[key] = s.expert_ids_TLK[:rows].clone()


class WrongPromptStartTrim(CaptureBugDouble):
    """routed_experts_prompt_start applied one row early: the tail starts at row k - 1."""

    bug = "wrong prompt-start trim"

    def generate_continuations(self, prompts, params, *, known_routing):
        full = self.inner.generate(prompts, params, capture_routing=True)
        out = []
        for s, known in zip(full, known_routing):
            k = known.shape[0]
            tail = s.expert_ids_TLK[k - 1 : -1]
            out.append(dataclasses.replace(s, expert_ids_TLK=torch.cat([known.to(tail.dtype), tail])))
        return out


DOUBLES = (
    AllZeroRoutes,
    Layer0Overwritten,
    RowsShiftedByOne,
    PaddingToExpertZero,
    DenseLayerOffset,
    PrefixHitLosesPromptRows,
    StaleAfterSync,
    WrongPromptStartTrim,
)
