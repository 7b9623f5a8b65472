"""The experiment grid: every cell of the paper as a named function, under two presets.

    python -m experiments.grid list --preset paper|tiny [--runs DIR] [--seeds 0,1,2] [--cells GLOB]
                                    [--model-base PATH --model-sft PATH --model-dense PATH]
    python -m experiments.grid show CELL --preset paper|tiny      # the cell's RunConfig as JSON

Inputs: a preset name (and, for `paper`, checkpoint paths). Outputs: `list` prints every cell with
its key settings and its state, read from the run directory `<runs>/<cell>` (r3.rundir: not
started / queued / running / incomplete / complete / collapsed / failed); `show` prints one config.

One private builder (`_rl`) plus one named function per paper cell (torchtitan config_registry
style, STYLE.md rule 5). The presets share the cell definitions and differ only in scale (`_Scale`):
- `paper`: Qwen3-30B-A3B Base and SFT (paths by flag), SGLang rollout, megatron-core training,
  180 global steps, eval every 5 on AIME24/AIME25/AMC23/MATH500/MATH500-L5, lr 3e-6 single-mini-step
  and 1e-6 multi-mini-step (mini_steps=8). Values the paper does not publish are marked so.
- `tiny`: the embedded zoo on CPU, rolled out by an FP8 inference engine by default (the regime
  where the mismatch matters at this scale; not the paper's setting), with `-bf16` variants.
Static mismatch cells (MoE native, MoE + R3, dense reference) are `StaticCell`s: one job per
rollout precision, run by `experiments.static_mismatch` (the zoo's models for `tiny`, the given
SFT and dense checkpoints with SGLang + megatron for `paper`), written to `<runs>/static/<precision>/`.
Seeds are a grid axis: with several seeds every name gets `-s<seed>`.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Literal

from eval.benchmarks import PAPER_BENCHMARKS
from experiments.config import Algorithm, ModelKind, Precision, RunConfig
from r3 import rundir

Preset = Literal["tiny", "paper"]

# Training layout per preset, part of each RL cell's RunConfig (recorded in its config.json; the
# user's overrides win). Not published: the paper does not describe its layout. On the 16 training
# GPUs of the paper preset (slurm.resources): experts split 8 ways (EP 8 x expert-DP 2; DP 16 for
# the dense part), full activation recompute, one sequence per micro-batch, bf16 parameters + fp32
# main grads + distributed optimizer, which r3.engines.megatron.memory plans to fit an 80 GB GPU
# (fp32 with a replicated AdamW would not).
TRAIN_LAYOUT: dict[Preset, dict] = {
    "paper": {"train_expert_parallel": 8, "train_recompute": True, "train_micro_batch": 1, "train_precision": "bf16"},
    "tiny": {},
}
Mini = Literal["single", "multi"]
PRESETS: tuple[Preset, ...] = ("paper", "tiny")


def model_placeholder(kind: str) -> str:
    """The model_path of a paper cell until the user passes --model-<kind> PATH."""
    return f"<set --model-{kind} PATH>"


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Scale:
    """Everything a preset changes: scale, engines and checkpoints, never the cell definitions.
    RunConfig fields are not re-declared here: `run` holds the preset's values of them (documented
    on RunConfig), checked against RunConfig's fields when the preset is built."""

    preset: Preset
    model_paths: Mapping[str, str | None]
    """Checkpoint per model kind (base / sft / dense); None: the embedded zoo's model."""
    precisions: tuple[Precision, ...]
    """Rollout precisions with a cell each; the first one is the default (no name suffix)."""
    lr_single: float
    """RunConfig.lr of single-mini-step cells."""
    lr_multi: float
    """RunConfig.lr of multi-mini-step cells."""
    multi_mini_steps: int
    """RunConfig.mini_steps of multi-mini-step cells."""
    run: Mapping[str, object]
    """RunConfig fields every cell of the preset shares."""
    per_trainer: Mapping[str, Mapping[str, object]] = dataclasses.field(default_factory=dict)
    """RunConfig fields that belong to one train engine (name -> fields), applied to a cell only when
    it trains with that engine after overrides (a tiny cell moved to megatron drops the transformers
    trainer's options instead of being refused for them)."""

    def __post_init__(self) -> None:
        named = set(self.run).union(*self.per_trainer.values())
        unknown = sorted(named - {f.name for f in dataclasses.fields(RunConfig)})
        if unknown:
            raise ValueError(f"preset {self.preset!r}: {unknown} are not RunConfig fields")


# The tiny preset: ONE block, edited by whoever tunes the embedded runs.
_TINY = _Scale(
    preset="tiny",
    model_paths={"base": None, "sft": None, "dense": None},
    precisions=("fp8", "bf16"),
    # lr_single from the embedded LR sweep on GRPO+R3 (docs/embedded.md); lr_multi not swept.
    lr_single=3e-5,
    lr_multi=1e-5,
    multi_mini_steps=8,
    run=dict(
        rollout_engine="hf", train_engine="hf", train_data="synthetic",
        global_steps=60, eval_every=5, eval_benchmarks=("synthetic",), eval_samples=1, eval_temperature=1.0,
        eval_max_problems=0, prompts_per_step=16, group_size=8, max_new_tokens=48, temperature=1.0,
        checkpoint_every=5,
        # Batch shapes (each lever measured by benchmarks/bench_batching.py): 3 x oversampled
        # dynamic-sampling rounds (about 40% of the SFT model's groups are informative, so one round
        # of 48 prompts usually fills the 16, and costs 0.63 x three rounds of 16), evaluation in one
        # batch of all 512 problems (0.34 x batches of 64)
        gen_prompts_per_round=48, eval_batch_size=512,
    ),
    # length-grouped train micro-batches: 0.58 x the batch padded to its longest row (same benchmark)
    per_trainer={"hf": dict(train_max_tokens_per_micro_batch=1024)},
)  # fmt: skip

_PAPER = _Scale(
    preset="paper",
    model_paths={k: model_placeholder(k) for k in ("base", "sft", "dense")},
    precisions=("bf16",),  # SGLang's default bf16 rollout, as in the paper
    lr_single=3e-6, lr_multi=1e-6, multi_mini_steps=8,  # published
    run=dict(
        rollout_engine="sglang", train_engine="megatron", train_data="<set --train-data DIR>",
        global_steps=180, eval_every=5, eval_benchmarks=PAPER_BENCHMARKS,
        eval_samples=8,  # avg@k: k not published
        eval_temperature=0.6,  # not published (Qwen3's recommended sampling temperature)
        eval_max_problems=0,
        prompts_per_step=128,  # not published
        group_size=8,  # not published
        max_new_tokens=8192,  # not published
        temperature=1.0,  # not published
        checkpoint_every=5,  # ours: at most 5 steps lost to a preemption
        # the training layout of Qwen3-30B-A3B per 8-GPU node: bf16 + distributed optimizer, EP 8,
        # full recompute (slurm.submit prints its memory plan; r3/engines/megatron/memory.py)
        **TRAIN_LAYOUT["paper"],
    ),
)  # fmt: skip

SCALES: dict[Preset, _Scale] = {"paper": _PAPER, "tiny": _TINY}


def _rl(s: _Scale, *, model: ModelKind, mini: Mini, algorithm: Algorithm, tis: bool = False,
        replay: bool = False) -> RunConfig:  # fmt: skip
    """The one builder: a cell's definition (model, mini-steps, algorithm, TIS, R3) at scale `s`.

    Names, precision and seed are filled in by `cells()`.
    """
    return RunConfig(
        name="?", preset=s.preset, model=model, model_path=s.model_paths.get(model),
        algorithm=algorithm, replay=replay, tis=tis,
        mini_steps=1 if mini == "single" else s.multi_mini_steps,
        lr=s.lr_single if mini == "single" else s.lr_multi,
        # GSPO aggregates seq-mean-token-mean (PAPER.md "Setup"); GRPO keeps RunConfig's token-mean.
        loss_agg="seq-mean-token-mean" if algorithm == "gspo" else "token-mean",
        rollout_precision=s.precisions[0], **s.run,
    )  # fmt: skip


# --- the cells (name = function name with '_' -> '-') ----------------------------------------------
CellFn = Callable[[_Scale], RunConfig]
CELLS: dict[str, CellFn] = {}


def _cell(fn: CellFn) -> CellFn:
    CELLS[fn.__name__.replace("_", "-")] = fn
    return fn


# Single-mini-step (mini_steps=1, lr 3e-6), SFT model: PAPER.md table 2.
@_cell
def sft_single_grpo(s: _Scale) -> RunConfig:
    return _rl(s, model="sft", mini="single", algorithm="grpo")


@_cell
def sft_single_grpo_tis(s: _Scale) -> RunConfig:
    return _rl(s, model="sft", mini="single", algorithm="grpo", tis=True)


@_cell
def sft_single_grpo_r3(s: _Scale) -> RunConfig:
    return _rl(s, model="sft", mini="single", algorithm="grpo", replay=True)


@_cell
def sft_single_grpo_tis_r3(s: _Scale) -> RunConfig:
    return _rl(s, model="sft", mini="single", algorithm="grpo", tis=True, replay=True)


# Single-mini-step, Base model (averages only published; GRPO+TIS+R3 added for symmetry).
@_cell
def base_single_grpo(s: _Scale) -> RunConfig:
    return _rl(s, model="base", mini="single", algorithm="grpo")


@_cell
def base_single_grpo_tis(s: _Scale) -> RunConfig:
    return _rl(s, model="base", mini="single", algorithm="grpo", tis=True)


@_cell
def base_single_grpo_r3(s: _Scale) -> RunConfig:
    return _rl(s, model="base", mini="single", algorithm="grpo", replay=True)


@_cell
def base_single_grpo_tis_r3(s: _Scale) -> RunConfig:
    return _rl(s, model="base", mini="single", algorithm="grpo", tis=True, replay=True)


# Multi-mini-step (mini_steps=8, lr 1e-6), SFT model: PAPER.md table 1.
@_cell
def sft_multi_grpo(s: _Scale) -> RunConfig:
    return _rl(s, model="sft", mini="multi", algorithm="grpo")


@_cell
def sft_multi_gspo(s: _Scale) -> RunConfig:
    return _rl(s, model="sft", mini="multi", algorithm="gspo")


@_cell
def sft_multi_grpo_r3(s: _Scale) -> RunConfig:
    return _rl(s, model="sft", mini="multi", algorithm="grpo", replay=True)


@_cell
def sft_multi_gspo_r3(s: _Scale) -> RunConfig:
    return _rl(s, model="sft", mini="multi", algorithm="gspo", replay=True)


# Multi-turn GRPO+R3 (router-mask caching, experiments.multiturn; not a paper cell): tiny preset only,
# transformers rollout and vLLM's (bf16 only: vLLM's CPU build has no FP8 path).
ONLY: dict[str, tuple[Preset, tuple[Precision, ...]]] = {
    "sft-single-grpo-r3-mt": ("tiny", ("fp8", "bf16")),
    "sft-single-grpo-r3-mt-vllm": ("tiny", ("bf16",)),
}
"""Cells that exist in one preset at some rollout precisions: name -> (preset, precisions)."""


@_cell
def sft_single_grpo_r3_mt(s: _Scale) -> RunConfig:
    return _rl(s, model="sft", mini="single", algorithm="grpo", replay=True).replace(max_turns=3)


@_cell
def sft_single_grpo_r3_mt_vllm(s: _Scale) -> RunConfig:
    # every prompt of a step's batch prefilled in one engine step (RunConfig.rollout_max_num_batched_tokens)
    return sft_single_grpo_r3_mt(s).replace(rollout_engine="vllm", rollout_max_num_batched_tokens=65536)


# --- static mismatch cells -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class StaticCell:
    """One static-mismatch job: MoE native, MoE + R3 and the dense reference at one rollout precision."""

    name: str
    """`static` (the preset's default precision) or `static-<precision>`."""
    preset: Preset
    precision: Precision
    seed: int = 0
    model_moe: str | None
    """The MoE checkpoint measured (the SFT model, as the paper's static measurement)."""
    model_dense: str | None
    """The dense reference (paper: Qwen3-8B; tiny: the zoo's dense control)."""
    rollout_engine: Literal["hf", "sglang", "vllm"]
    train_engine: Literal["hf", "megatron"]
    prompts: str = "synthetic"
    """Held-out prompts: `synthetic` (the embedded task's held-out split), `benchmarks` (the paper's
    evaluation sets, eval.benchmarks.PAPER_BENCHMARKS, each problem once), or a benchmark name or
    file (experiments.static_mismatch.checkpoint_problems)."""
    n_prompts: int = 0
    """Prompts measured (0: all of them)."""
    group_size: int = 8
    """Samples per prompt."""
    max_new_tokens: int = 48
    """Response length bound in tokens."""
    template: str | None = None
    """Prompt template of a checkpoint measurement (eval.templates; None: `qwen-math-boxed`, as the RL runs)."""
    train_tensor_parallel: int = 1
    """megatron TP of the recomputing trainer."""
    train_expert_parallel: int = 1
    """megatron EP of the recomputing trainer."""
    train_precision: Literal["fp32", "bf16"] = "fp32"
    """Parameters of the recomputing trainer (megatron; transformers is fp32)."""
    train_micro_batch: int = 0
    """Sequences per recompute forward (0: all at once)."""
    rollout_urls: tuple[str, ...] = ()
    """Servers of the MoE checkpoint (the Slurm job fills them when it launches servers)."""
    rollout_urls_dense: tuple[str, ...] = ()
    """Servers of the dense checkpoint."""

    @classmethod
    def from_dict(cls, d: dict) -> StaticCell:
        """A cell from its JSON form (the job payload): lists become tuples, unknown keys are refused."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown StaticCell fields {unknown}; known: {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def run_dir(self, runs: Path) -> Path:
        return Path(runs) / rundir.STATIC_DIR / self.precision

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


STATIC_SCALE: dict[Preset, dict] = {
    "tiny": {},  # the zoo measurement's own defaults (experiments.static_mismatch.run_static)
    # The paper does not say which prompts its static measurement used (PAPER.md): ours are its
    # evaluation sets (held out from the decontaminated training pool), 8 samples each, responses
    # as long as in the RL runs; the recompute runs megatron as the RL trainer does (bf16, EP 8 on
    # one 8-GPU node, one sequence per forward). Not published.
    "paper": dict(
        prompts="benchmarks", n_prompts=0, group_size=8, max_new_tokens=_PAPER.run["max_new_tokens"],
        train_expert_parallel=8, train_precision="bf16", train_micro_batch=1,
    ),
}  # fmt: skip
"""StaticCell fields per preset (prompts, lengths, the trainer's layout)."""


def _suffix(precision: str, s: _Scale, seed: int, seeds: tuple[int, ...]) -> str:
    out = "" if precision == s.precisions[0] else f"-{precision}"
    return out + (f"-s{seed}" if len(seeds) > 1 else "")


def _scale(preset: str, model_paths: Mapping[str, str | None] | None) -> _Scale:
    if preset not in SCALES:
        raise ValueError(f"unknown preset {preset!r}; choose one of {PRESETS}")
    s = SCALES[preset]  # type: ignore[index]
    if model_paths:
        unknown = sorted(set(model_paths) - {"base", "sft", "dense"})
        if unknown:
            raise ValueError(f"model_paths keys must be base/sft/dense, got {unknown}")
        s = dataclasses.replace(s, model_paths={**s.model_paths, **{k: v for k, v in model_paths.items() if v}})
    return s


def cells(preset: str, *, seeds: Iterable[int] = (0,), precisions: Iterable[str] | None = None,
          model_paths: Mapping[str, str | None] | None = None, pattern: str | None = None,
          **overrides) -> dict[str, RunConfig]:  # fmt: skip
    """Every RL cell of `preset`: {name: RunConfig}, in paper-table order.

    seeds: a grid axis (names get `-s<seed>` when there are several). precisions: rollout
    precisions to include (default: all of the preset's). model_paths: {"base"|"sft"|"dense": path}.
    pattern: comma-separated globs; only matching cells are built (see `select`).
    overrides: RunConfig fields applied to every selected cell (e.g. global_steps=3 for a smoke test).
    """
    s = _scale(preset, model_paths)
    seeds = tuple(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be non-empty and distinct, got {seeds}")
    precs = tuple(precisions) if precisions is not None else s.precisions
    bad = [p for p in precs if p not in s.precisions]
    if bad:
        raise ValueError(f"preset {preset!r} has rollout precisions {s.precisions}, not {bad}")
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown RunConfig override(s) {unknown}; known fields: {sorted(fields)}")
    if {"name", "seed", "rollout_precision", "preset"} & set(overrides):
        raise ValueError("name/seed/rollout_precision/preset are grid axes: use seeds=/precisions=/preset")
    out: dict[str, RunConfig] = {}
    for base, fn in CELLS.items():
        for prec in precs:
            for seed in seeds:
                name = base + _suffix(prec, s, seed, seeds)
                only = ONLY.get(base)
                if not select([name], pattern) or (only and (s.preset != only[0] or prec not in only[1])):
                    continue
                cfg = fn(s)
                trainer = s.per_trainer.get(overrides.get("train_engine", cfg.train_engine), {})
                out[name] = cfg.replace(name=name, seed=seed, rollout_precision=prec, **{**trainer, **overrides})
    return out


def static_cells(preset: str, *, seeds: Iterable[int] = (0,), precisions: Iterable[str] | None = None,
                 model_paths: Mapping[str, str | None] | None = None) -> dict[str, StaticCell]:  # fmt: skip
    """The static mismatch jobs of `preset`, one per rollout precision (and seed)."""
    s = _scale(preset, model_paths)
    seeds = tuple(seeds)
    precs = tuple(precisions) if precisions is not None else s.precisions
    out = {}
    for prec in precs:
        for seed in seeds:
            name = "static" + _suffix(prec, s, seed, seeds)
            out[name] = StaticCell(
                name=name, preset=s.preset, precision=prec, seed=seed, model_moe=s.model_paths.get("sft"),
                model_dense=s.model_paths.get("dense"), rollout_engine=s.run["rollout_engine"],
                train_engine=s.run["train_engine"], **STATIC_SCALE[s.preset],
            )  # fmt: skip
    return out


def select(names: Iterable[str], pattern: str | None) -> list[str]:
    """Names matching any comma-separated glob in `pattern` (all when None)."""
    names = list(names)
    if not pattern:
        return names
    globs = [g.strip() for g in pattern.split(",") if g.strip()]
    return [n for n in names if any(fnmatch.fnmatchcase(n, g) for g in globs)]


# --- listing --------------------------------------------------------------------------------------
def _fmt(x, spec: str = "") -> str:
    return "-" if x is None else format(x, spec)


def listing(preset: str, runs: Path, *, seeds=(0,), pattern: str | None = None, model_paths=None,
            **overrides) -> list[dict]:  # fmt: skip
    """One row per cell (RL cells, then the static parts) with key settings and state."""
    rows = []
    for name, c in cells(preset, seeds=seeds, model_paths=model_paths, pattern=pattern, **overrides).items():
        st = rundir.run_status(Path(runs) / name)
        rows.append({
            "cell": name,
            "model": c.model,
            "algo": c.algorithm + ("+tis" if c.tis else "") + ("+r3" if c.replay else ""),
            "mini": c.mini_steps, "lr": f"{c.lr:g}", "rollout": c.rollout_precision,
            "steps": f"{_fmt(st.last_step)}/{c.global_steps}", "state": st.state.value,
            "best": _fmt(st.best_score, ".3f"), "collapse": _fmt(st.collapse_step), "detail": st.detail,
        })  # fmt: skip
    for name, sc in static_cells(preset, seeds=seeds, model_paths=model_paths).items():
        if name not in select([name], pattern):
            continue
        st = rundir.static_status(sc.run_dir(runs))
        for _key, label in rundir.STATIC_PARTS:
            rows.append({
                "cell": f"{name}: {label}", "model": "dense" if _key == "dense" else "sft",
                "algo": "static", "mini": "-", "lr": "-", "rollout": sc.precision, "steps": "-",
                "state": st.state.value, "best": "-", "collapse": "-", "detail": st.detail,
            })  # fmt: skip
    return rows


def format_rows(rows: list[dict]) -> str:
    cols = ["cell", "model", "algo", "mini", "lr", "rollout", "steps", "state", "best", "collapse", "detail"]
    width = {c: max([len(c)] + [len(str(r[c])) for r in rows]) for c in cols}
    lines = ["  ".join(c.ljust(width[c]) for c in cols).rstrip()]
    lines += ["  ".join(str(r[c]).ljust(width[c]) for c in cols).rstrip() for r in rows]
    return "\n".join(lines)


def add_model_flags(ap: argparse.ArgumentParser) -> None:
    for kind in ("base", "sft", "dense"):
        ap.add_argument(f"--model-{kind}", metavar="PATH", default=None,
                        help=f"{kind} checkpoint (HF format); paper preset only, tiny uses the zoo")  # fmt: skip
    ap.add_argument("--train-data", metavar="DIR", default=None,
                    help="training prompts (a data_prep output); paper preset only")  # fmt: skip


def overrides_from(args: argparse.Namespace) -> dict:
    return {"train_data": args.train_data} if getattr(args, "train_data", None) else {}


def model_paths_from(args: argparse.Namespace) -> dict[str, str]:
    return {k: getattr(args, f"model_{k}") for k in ("base", "sft", "dense") if getattr(args, f"model_{k}")}


def parse_seeds(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes comma-separated integers, got {text!r}") from None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m experiments.grid", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    ls = sub.add_parser("list", help="every cell with its key settings and state")
    show = sub.add_parser("show", help="one cell's RunConfig as JSON")
    show.add_argument("cell")
    for p in (ls, show):
        p.add_argument("--preset", choices=PRESETS, required=True)
        p.add_argument("--seeds", type=parse_seeds, default=(0,), help="comma-separated, e.g. 0,1,2")
        add_model_flags(p)
    ls.add_argument("--runs", type=Path, default=None, help="runs root (default runs/<preset>)")
    ls.add_argument("--cells", default=None, help="comma-separated globs, e.g. 'sft-single-*'")
    ls.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    a = ap.parse_args(argv)
    mp = model_paths_from(a)
    if a.cmd == "show":
        all_cells = cells(a.preset, seeds=a.seeds, model_paths=mp, **overrides_from(a))
        statics = static_cells(a.preset, seeds=a.seeds, model_paths=mp)
        if a.cell in all_cells:
            print(json.dumps(all_cells[a.cell].to_dict(), indent=2, sort_keys=True))
        elif a.cell in statics:
            print(json.dumps(statics[a.cell].to_dict(), indent=2, sort_keys=True))
        else:
            sys.exit(f"no cell {a.cell!r} in preset {a.preset!r}; cells: {', '.join([*all_cells, *statics])}")
        return
    runs = a.runs or Path("runs") / a.preset
    rows = listing(a.preset, runs, seeds=a.seeds, pattern=a.cells, model_paths=mp, **overrides_from(a))
    print(json.dumps(rows, indent=1) if a.json else format_rows(rows))
    if not a.json:
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["state"]] = counts.get(r["state"], 0) + 1
        print(f"\n{len(rows)} rows under {runs}: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))


if __name__ == "__main__":
    main()
