"""The post-sync probe check, shared by every engine that syncs weights: does the engine compute what
the synced weights compute? (light: torch)

The second line of the sync check; the first reads weights back (r3.engines.weight_check). A fixed
probe sequence (PROBE_LEN token ids drawn once from a seeded generator) is scored by the engine
(vLLM `prompt_logprobs`, from raw logits: temperature does not enter) and by a reference: in-process,
an fp32 transformers forward of the state dict that was synced (tiny models only: it builds the whole
model in fp32); server mode, the trainer's own forward when the caller sets one, else no probe.
The median |logprob difference| per probe token must be within the precision's tolerance
(VLLMRolloutConfig.sync_tolerance; measured numbers in docs/vllm.md): a reload that leaves stale or
mis-laid-out weights (vLLM's CPU MoE prepack bug, r3.engines.vllm.worker) is off by nats, a correct
bf16 engine by hundredths; a reload that kept one small RL step's stale experts is not, which is why
the readback comes first.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

PROBE_LEN = 48
"""Tokens of the probe sequence (47 logprobs compared)."""


class SyncCheckError(RuntimeError):
    """After a weight sync the engine does not compute what the synced weights compute."""


def probe_ids(vocab_size: int, length: int = PROBE_LEN) -> list[int]:
    gen = torch.Generator().manual_seed(12345)
    return torch.randint(0, vocab_size, (length,), generator=gen).tolist()


class SyncChecker:
    """Reference logprobs of the probe under a state dict, and the comparison with the engine's."""

    def __init__(self, hf_config, *, precision: str, tolerance: float, probe: Sequence[int] | None = None):
        self.hf_config, self.precision, self.tolerance = hf_config, precision, tolerance
        self.probe = list(probe) if probe is not None else probe_ids(int(hf_config.vocab_size))
        self._model = None  # fp32 transformers model, built on first use and reloaded per check

    @torch.no_grad()
    def reference_logprobs(self, state_dict: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """float32 [len(probe) - 1]: log p(probe[t+1] | probe[:t+1]) under an fp32 forward of `state_dict`."""
        from transformers import AutoModelForCausalLM

        if self._model is None:
            self._model = AutoModelForCausalLM.from_config(self.hf_config, dtype=torch.float32).eval()
        self._model.load_state_dict({k: v.detach().float() for k, v in state_dict.items()}, strict=True)
        ids = torch.tensor([self.probe])
        logp_TV = torch.log_softmax(self._model(input_ids=ids).logits[0, :-1].float(), dim=-1)
        return logp_TV.gather(1, ids[0, 1:, None])[:, 0]

    def compare(
        self, engine_logprobs: torch.Tensor, state_dict: Mapping[str, torch.Tensor], *, version: int
    ) -> dict[str, float]:
        """Raise SyncCheckError unless the median |difference| from an fp32 forward of `state_dict` is
        within tolerance; return the numbers."""
        return self.compare_with(engine_logprobs, self.reference_logprobs(state_dict), version=version)

    def compare_with(
        self,
        engine_logprobs: torch.Tensor,
        ref: torch.Tensor,
        *,
        version: int,
        where: str = "",
        reference: str = "an fp32 transformers forward",
    ) -> dict[str, float]:
        """The same against given reference logprobs (e.g. the trainer's forward of the probe)."""
        ref = ref.detach().float().cpu().reshape(-1)
        if engine_logprobs.shape != ref.shape:
            raise SyncCheckError(
                f"the engine scored {tuple(engine_logprobs.shape)} probe tokens, expected {tuple(ref.shape)}"
            )
        diff = (engine_logprobs.float() - ref).abs()
        med, mean, mx = float(diff.median()), float(diff.mean()), float(diff.max())
        if not med <= self.tolerance:  # also catches NaN
            raise SyncCheckError(
                f"after weight sync v{version}: the {self.precision} engine{where}'s logprobs of a "
                f"{len(self.probe)}-token probe differ from {reference} of the synced weights by "
                f"median {med:.3g} / mean {mean:.3g} / max {mx:.3g} nats per token; expected median <= "
                f"{self.tolerance:g}. Likely cause: the reload left stale or mis-laid-out weights (vLLM's CPU reload "
                "skips the MoE prepack unless r3.engines.vllm.worker re-runs it), or the state dict is not this "
                "model's"
            )
        return {"probe_median_abs_diff": med, "probe_mean_abs_diff": mean, "probe_max_abs_diff": mx}


def prompt_logprobs_of(probe: Sequence[int], prompt_logprobs: Sequence) -> torch.Tensor:
    """float32 [len(probe) - 1] from vLLM prompt_logprobs (entry t: {token id: Logprob or its JSON dict},
    entry 0 None); token ids may be JSON string keys."""
    if prompt_logprobs is None or len(prompt_logprobs) != len(probe):
        n = None if prompt_logprobs is None else len(prompt_logprobs)
        raise SyncCheckError(f"vLLM returned {n} prompt logprobs for a {len(probe)}-token probe")
    out = []
    for t in range(1, len(probe)):
        entry = prompt_logprobs[t]
        lp = entry.get(probe[t], entry.get(str(probe[t]))) if isinstance(entry, dict) else None
        if lp is None:
            raise SyncCheckError(f"prompt logprobs at position {t} lack the probe token {probe[t]}: {str(entry)[:200]}")
        out.append(float(lp["logprob"] if isinstance(lp, dict) else lp.logprob))
    return torch.tensor(out, dtype=torch.float32)


SyncReference = Callable[[Sequence[int]], torch.Tensor]
"""probe token ids [P] -> float32 [P - 1]: log p(probe[t+1] | probe[:t+1]) under the weights just synced
(e.g. `train_engine_reference(train_engine)`: the trainer's own forward, which holds those weights)."""


def train_engine_reference(train_engine: Any) -> SyncReference:
    """A SyncReference from a TrainEngine: its compute_logprobs of a one-row batch holding the probe
    (native routing, no replay), on the host. Call it right after a sync (the RL loop syncs
    `train_engine.rollout_state_dict()`), so the trainer holds the synced weights; under several
    training ranks pass the driver's proxy (experiments.distributed.DriverEngine) so the followers
    run the same forward (a 1-row batch under data parallelism: the ranks without a row run padding)."""
    from r3.engines.base import TrainBatch

    def reference(probe: Sequence[int]) -> torch.Tensor:
        ids_BS = torch.tensor([list(map(int, probe))], dtype=torch.long)
        batch = TrainBatch(
            input_ids_BS=ids_BS,
            attention_mask_BS=torch.ones_like(ids_BS),
            loss_mask_BT=torch.ones(1, ids_BS.shape[1] - 1, dtype=torch.float32),
        )
        return train_engine.compute_logprobs(batch).logp_BT[0].float().cpu()

    return reference
