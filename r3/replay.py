"""Engine-agnostic replay bookkeeping: the typed mode and the consumed-exactly-once check.

The mode is an explicit value held by one object per model (STYLE.md rule 3: verl's
`RouterReplayAction` enum, not slime's `os.environ["ROUTING_REPLAY_STAGE"]`). Engine adapters
(r3.engines.hf.replay for transformers, r3.engines.megatron.replay for megatron-core) use `ConsumptionCheck` so that
a forward in which some MoE layer did not use its recorded routing, or used it twice, fails
loudly instead of silently training on the training engine's own routing.
"""

from __future__ import annotations

import enum


class ReplayMode(enum.Enum):
    """What the routers do in the next forwards."""

    OFF = "off"
    """Route natively (top-k of the live router logits); nothing recorded."""
    RECORD = "record"
    """Route natively and record the selected experts of every fed token."""
    REPLAY = "replay"
    """Force the given experts; gate weights are the softmax of the live logits over them."""


class ConsumptionCheck:
    """Counts, per forward, how often each MoE layer consumed (recorded or replayed) routing.

    begin() at the start of a forward, consume(layer) in each router call, end() at the end:
    end() raises unless every layer 0..L-1 was consumed exactly once.
    """

    def __init__(self, num_layers: int):
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.num_layers = num_layers
        self._counts = [0] * num_layers
        self.active = False

    def begin(self) -> None:
        self._counts = [0] * self.num_layers
        self.active = True

    def consume(self, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"MoE layer index {layer} outside [0, {self.num_layers})")
        self._counts[layer] += 1

    def end(self) -> None:
        self.active = False
        bad = [(i, c) for i, c in enumerate(self._counts) if c != 1]
        if bad:
            detail = ", ".join(f"layer {i}: {c} times" for i, c in bad)
            raise RuntimeError(
                f"routing replay: every MoE layer must consume its routing exactly once per forward, but {detail} "
                f"(of {self.num_layers} layers); likely cause: a layer skipped (early exit, pipeline stage) or "
                "a router called twice (a hook registered twice, or an unwrapped recompute)"
            )

    @property
    def counts(self) -> tuple[int, ...]:
        return tuple(self._counts)
