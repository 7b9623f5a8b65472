"""Readback check of a weight sync: what the rollout engine holds vs what the trainer synced (light: torch).

DESIGN invariant 8. A probe of the engine's logprobs (r3.engines.sync_check) cannot tell a stale
tensor after one small RL step: an lr-1e-5 step moves a 48-token probe by about 1e-4 nats, far
below any tolerance that a bf16 engine passes. So after every sync the engine is asked for the
values it holds at a deterministic sample of elements and they are compared, exactly, with the
trainer's synced tensors cast to the engine's dtype.

The sample (`plan_readback`), in the names of an HF checkpoint on disk (`checkpoint_views`):
- every tensor that is not a routed expert's: embeddings, lm_head, attention (q/k/v/o, q/k norms),
  router gates, layer norms, dense MLPs;
- in every MoE layer, the gate/up/down projections of `experts_per_layer` experts, chosen by a
  generator seeded with the layer's name (the same experts at every sync);
- in each chosen tensor, either `elements` positions from a generator seeded with the tensor's name
  (vLLM: the worker extension reads any element), or the first `leading_rows` rows (SGLang's
  /get_weights_by_name returns `tensor.tolist()[:truncate_size]`).
The positions do not move between syncs, so the previous sync's expected values tell whether the
trainer changed a sampled element (`readback_changed_elements`): a stale tensor shows as "got the
previous version's value". Why exact: a reload copies the checkpoint tensor into the parameter with
`param.copy_` (round to nearest even, as `Tensor.to`), so an engine holding the synced weights holds
exactly `trainer_tensor.to(engine_dtype)`; a tolerance would only hide small staleness. fp8 engines
(a scale per block) are not covered: their readback is refused by the engines that could ask.
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from collections.abc import Iterator, Mapping

import torch

from r3.engines.sync_check import SyncCheckError  # light: torch only

EXPERT = re.compile(r"^(?P<layer>.*\.mlp\.experts\.)(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")
"""A routed expert's tensor under its on-disk checkpoint name."""

READBACK_SEED = 20260917
"""Base seed of the sample; with the tensor or layer name it fixes the positions across processes."""


def checkpoint_views(state_dict: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """(on-disk checkpoint name, view) for every tensor, without copies: transformers-5 fused experts
    `mlp.experts.gate_up_proj` [E, 2I, H] -> `mlp.experts.{e}.gate_proj.weight` = [e, :I] and
    `up_proj.weight` = [e, I:] (forward: `linear(x, W[e]).chunk(2)`, gate first), `down_proj` [E, H, I]
    -> `{e}.down_proj.weight` = [e]; the same mapping as r3.engines.hf_checkpoint.to_checkpoint_names."""
    for k, v in state_dict.items():
        if k.endswith(".mlp.experts.gate_up_proj") and v.ndim == 3:
            prefix, i = k[: -len("gate_up_proj")], v.shape[1] // 2
            for e in range(v.shape[0]):
                yield f"{prefix}{e}.gate_proj.weight", v[e, :i]
                yield f"{prefix}{e}.up_proj.weight", v[e, i:]
        elif k.endswith(".mlp.experts.down_proj") and v.ndim == 3:
            prefix = k[: -len("down_proj")]
            for e in range(v.shape[0]):
                yield f"{prefix}{e}.down_proj.weight", v[e]
        else:
            yield k, v


def tensor_kind(name: str) -> str:
    """experts / router / attention / embedding / lm_head / norm / mlp / other (for messages)."""
    if EXPERT.match(name):
        return "experts"
    if name.endswith(".mlp.gate.weight"):
        return "router"
    if ".self_attn." in name:
        return "attention"
    if "embed_tokens" in name:
        return "embedding"
    if name.startswith("lm_head"):
        return "lm_head"
    if "norm" in name:
        return "norm"
    if ".mlp." in name:
        return "mlp"
    return "other"


def _generator(name: str, seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed + zlib.crc32(name.encode()))


@dataclasses.dataclass(frozen=True)
class ReadbackPlan:
    """Which elements are read back: checkpoint name -> int64 flat positions (row-major) and shape."""

    positions: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, ...]]

    def index(self, name: str) -> tuple[torch.Tensor, ...]:
        """The positions of `name` as one index tensor per dimension."""
        return torch.unravel_index(self.positions[name], self.shapes[name])


def plan_readback(
    shapes: Mapping[str, tuple[int, ...]],
    *,
    experts_per_layer: int,
    elements: int = 16,
    leading_rows: int | None = None,
    seed: int = READBACK_SEED,
) -> ReadbackPlan:
    """The sample (module docstring) over checkpoint names and shapes."""
    if experts_per_layer < 1 or elements < 1 or (leading_rows is not None and leading_rows < 1):
        raise ValueError(
            f"readback needs experts_per_layer >= 1, elements >= 1 and leading_rows >= 1 (or None); got "
            f"{experts_per_layer}, {elements}, {leading_rows}"
        )
    experts: dict[str, set[int]] = {}
    for name in shapes:
        m = EXPERT.match(name)
        if m:
            experts.setdefault(m["layer"], set()).add(int(m["e"]))
    chosen = {}
    for layer, ids in experts.items():
        ids_sorted = sorted(ids)
        pick = torch.randperm(len(ids_sorted), generator=_generator(layer, seed))[:experts_per_layer]
        chosen[layer] = {ids_sorted[i] for i in pick.tolist()}
    positions, kept = {}, {}
    for name, shape in shapes.items():
        m = EXPERT.match(name)
        if m and int(m["e"]) not in chosen[m["layer"]]:
            continue
        numel = 1
        for s in shape:
            numel *= int(s)
        if numel == 0:
            continue
        if leading_rows is not None:
            per_row = numel // int(shape[0]) if shape else 1
            pos = torch.arange(min(leading_rows, int(shape[0]) if shape else 1) * per_row)
        elif numel <= elements:
            pos = torch.arange(numel)
        else:  # drawn with replacement (a randperm of a 300M-element embedding would be large), deduplicated
            pos = torch.randint(0, numel, (elements,), generator=_generator(name, seed)).unique()
        positions[name], kept[name] = pos.to(torch.int64), tuple(int(s) for s in shape)
    return ReadbackPlan(positions=positions, shapes=kept)


class ReadbackChecker:
    """Plans the readback on the first sync, computes the expected values of each sync and compares
    them with what an engine returned (raising SyncCheckError with got / expected / likely cause)."""

    def __init__(
        self,
        *,
        engine_dtype: torch.dtype,
        experts_per_layer: int,
        elements: int = 16,
        leading_rows: int | None = None,
        storage_dtype: torch.dtype | None = None,
    ):
        """storage_dtype: the dtype the synced checkpoint is written in when it is not the trainer's
        (SGLang writes the served checkpoint's dtype): expected = trainer.to(storage).to(engine)."""
        self.engine_dtype, self.storage_dtype = engine_dtype, storage_dtype
        self.experts_per_layer, self.elements, self.leading_rows = experts_per_layer, elements, leading_rows
        self.plan: ReadbackPlan | None = None
        self._previous: dict[str, torch.Tensor] = {}  # expected values of the last sync that passed

    def expected(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """float32 values of the trainer's tensors, cast to the engine's dtype, at the planned positions
        (the plan is made from this state dict's names and shapes on first use)."""
        views = dict(checkpoint_views(state_dict))
        if self.plan is None:
            self.plan = plan_readback(
                {k: tuple(v.shape) for k, v in views.items()},
                experts_per_layer=self.experts_per_layer,
                elements=self.elements,
                leading_rows=self.leading_rows,
            )
        out = {}
        for name in self.plan.positions:
            if name not in views:
                raise SyncCheckError(
                    f"the synced state dict lacks {name}, which the first sync had (readback plan of "
                    f"{len(self.plan.positions)} tensors); the trainer's rollout_state_dict changed its names"
                )
            v = views[name]
            idx = tuple(i.to(v.device) for i in self.plan.index(name))
            x = v.detach()[idx]
            if self.storage_dtype is not None and x.is_floating_point():
                x = x.to(self.storage_dtype)
            out[name] = x.to(self.engine_dtype).to("cpu", torch.float32)
        return out

    def compare(
        self,
        got: Mapping[str, torch.Tensor],
        expected: Mapping[str, torch.Tensor],
        *,
        version: int,
        where: str,
        commit: bool = True,
    ) -> dict[str, float]:
        """Raise SyncCheckError unless every read-back value equals the expected one exactly; returns
        counts: tensors, elements, elements the trainer changed since the previous passing sync.
        commit: remember `expected` as the previous sync's values (False while other workers or
        servers of the same sync are still to be compared; then call `commit`)."""
        missing = [k for k in expected if k not in got]
        if missing:
            raise SyncCheckError(
                f"after weight sync v{version}: {where} returned no values for {len(missing)} of {len(expected)} "
                f"read-back tensors (e.g. {missing[:3]}); expected one value per requested element"
            )
        bad, stale, changed, elements = [], [], 0, 0
        kinds: dict[str, list[int]] = {}
        for name, exp in expected.items():
            g = got[name].to(torch.float32).reshape(-1)
            if g.shape != exp.shape:
                raise SyncCheckError(
                    f"after weight sync v{version}: {where} returned {g.numel()} values for {name}, expected "
                    f"{exp.numel()}"
                )
            elements += exp.numel()
            prev = self._previous.get(name)
            if prev is not None:
                changed += int((prev != exp).sum())
            kind = kinds.setdefault(tensor_kind(name), [0, 0])
            kind[1] += 1
            wrong = ~(g == exp)  # NaN counts as wrong
            if bool(wrong.any()):
                kind[0] += 1
                j = int(wrong.nonzero()[0, 0])
                bad.append((name, j, float(g[j]), float(exp[j]), None if prev is None else float(prev[j])))
                if prev is not None and torch.equal(g, prev) and not torch.equal(prev, exp):
                    stale.append(name)
        if bad:
            raise SyncCheckError(self._message(bad, stale, kinds, len(expected), version=version, where=where))
        if commit:
            self.commit(expected)
        return {
            "readback_tensors": float(len(expected)),
            "readback_elements": float(elements),
            "readback_changed_elements": float(changed),
        }

    def commit(self, expected: Mapping[str, torch.Tensor]) -> None:
        """The expected values of a sync every engine passed: the next sync's "previous" values."""
        self._previous = dict(expected)

    def _message(self, bad, stale, kinds, n, *, version: int, where: str) -> str:
        shape = self.plan.shapes if self.plan is not None else {}
        lines = []
        for name, j, g, e, p in bad[:3]:
            pos = int(self.plan.positions[name][j]) if self.plan is not None else j
            multi = tuple(int(i) for i in torch.unravel_index(torch.tensor(pos), shape.get(name, (pos + 1,))))
            prev = "" if p is None else f", previous sync's value {p!r}"
            lines.append(f"{name}{list(multi)}: got {g!r}, expected {e!r}{prev}")
        summary = ", ".join(f"{k} {b}/{t}" for k, (b, t) in sorted(kinds.items()))
        stale_kinds = sorted({tensor_kind(s) for s in stale})
        if stale and stale_kinds == ["experts"]:
            cause = (
                "the reload skipped the routed experts' tensors and kept the previous version's (a loader that "
                "does not match their names, e.g. fused `mlp.experts.gate_up_proj` instead of per-expert names, or "
                "a reload path that leaves the MoE layers' parameters untouched)"
            )
        elif stale:
            cause = f"the reload did not reach these tensors ({', '.join(stale_kinds)}): they hold the previous version"
        else:
            cause = (
                "the engine holds other values than the synced ones: a wrong layout after the reload (e.g. vLLM's "
                "CPU MoE prepack skipped, r3.engines.vllm.worker), a checkpoint of other weights, or another dtype "
                "than the engine's"
            )
        return (
            f"after weight sync v{version}: {where} holds other weights than the trainer synced: {len(bad)} of {n} "
            f"read-back tensors differ (per kind, differing/read: {summary}); {len(stale)} of them still hold "
            f"exactly the previous sync's values. First: {'; '.join(lines)}. Expected: every read-back element "
            f"equal to the trainer's synced value cast to {str(self.engine_dtype).removeprefix('torch.')} "
            f"(exact). Likely cause: {cause}"
        )


def check_version(reported: object, expected: int, *, where: str) -> None:
    """Raise SyncCheckError unless the engine reports the weight version of the last sync."""
    if reported is None or str(reported) != str(expected):
        raise SyncCheckError(
            f"after weight sync v{expected}: {where} reports weight version {reported!r}, expected {expected}. "
            "Likely cause: the reload did not run to its end on that worker/server (an error in its log), the "
            "server was restarted on the old checkpoint, or another client synced it"
        )
