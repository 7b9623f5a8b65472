"""Group runs into settings (one table / figure set each) and cells (one method, all seeds).

A setting is (preset, model, mini_steps, rollout_precision), the paper's table layouts. In a
setting, runs whose configs agree on everything but `name` and `seed` are the seeds of one
cell and are averaged (mean line, min/max band). Two cells with the same method label that
differ in another field (an lr sweep, say) are labelled with the differing fields.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Literal

import pandas as pd

from plots.runs import Run, RunStatus, Setting, method_order

# Fields that do not make two runs different cells: seeds are averaged; URLs are deployment.
_SEED_FIELDS = ("name", "seed", "rollout_urls")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Cell:
    """One method variant of one setting, over all its seeds (runs sorted by seed)."""

    setting: Setting
    method: str
    """Paper method label (GRPO, GRPO+R3, ...): what paper rows and colours key on."""
    label: str
    """`method`, plus the differing config fields when two cells share a method label."""
    runs: tuple[Run, ...]

    @property
    def status(self) -> RunStatus:
        """running if any seed runs, else failed if any failed, else complete."""
        statuses = {r.status for r in self.runs}
        return "running" if "running" in statuses else "failed" if "failed" in statuses else "complete"

    @property
    def display(self) -> str:
        """Label for legends and table rows: marks seeds and unfinished runs."""
        text = self.label
        if len(self.runs) > 1:
            text += f" ({len(self.runs)} seeds)"
        if self.status != "complete":
            text += f" ({self.status})"
        return text

    @property
    def collapse_steps(self) -> list[int | None]:
        return [r.collapse_step for r in self.runs]

    @property
    def missing_eval_steps(self) -> dict[str, list[int]]:
        return {r.name: r.missing_eval_steps for r in self.runs if r.missing_eval_steps}

    def curve(self, source: Literal["metrics", "evals"], column: str) -> pd.DataFrame:
        """Seed statistics of one column over steps.

        Returns a frame indexed by step with columns mean, min, max, n (seeds with a value at
        that step); empty when no seed has the column.
        """
        per_seed = {}
        for r in self.runs:
            frame = r.metrics if source == "metrics" else r.evals
            if column in frame.columns:
                per_seed[r.name] = pd.to_numeric(frame[column], errors="coerce")
        if not per_seed:
            return pd.DataFrame(columns=["mean", "min", "max", "n"], index=pd.Index([], name="step"))
        wide = pd.DataFrame(per_seed).sort_index()
        out = pd.DataFrame(
            {"mean": wide.mean(axis=1), "min": wide.min(axis=1), "max": wide.max(axis=1), "n": wide.count(axis=1)}
        )
        out.index.name = "step"
        return out[out["n"] > 0]


def _variant_key(run: Run) -> tuple:
    d = run.config.to_dict()
    return tuple(sorted((k, repr(v)) for k, v in d.items() if k not in _SEED_FIELDS))


def group_cells(runs: list[Run]) -> dict[Setting, list[Cell]]:
    """Settings (sorted by slug) -> cells in the paper's row order."""
    by_setting: dict[Setting, dict[tuple, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        by_setting[r.setting][_variant_key(r)].append(r)
    out: dict[Setting, list[Cell]] = {}
    for setting in sorted(by_setting, key=lambda s: s.slug):
        variants = by_setting[setting]
        by_method: dict[str, list[list[Run]]] = defaultdict(list)
        for seeds in variants.values():
            by_method[seeds[0].method].append(sorted(seeds, key=lambda r: (r.config.seed, r.name)))
        cells = []
        for method, groups in by_method.items():
            differing = _differing_fields(groups) if len(groups) > 1 else []
            for seeds in groups:
                label = method
                if differing:
                    cfg = seeds[0].config.to_dict()
                    label += " (" + ", ".join(f"{k}={cfg[k]}" for k in differing) + ")"
                cells.append(Cell(setting=setting, method=method, label=label, runs=tuple(seeds)))
        out[setting] = sorted(cells, key=lambda c: (method_order(c.method), c.label))
    return out


def _differing_fields(groups: list[list[Run]]) -> list[str]:
    dicts = [g[0].config.to_dict() for g in groups]
    return [k for k in dicts[0] if k not in _SEED_FIELDS and len({repr(d[k]) for d in dicts}) > 1]
