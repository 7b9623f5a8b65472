"""Build the RL training set: `python -m data_prep.build [--sources ...] --out DIR`.

Inputs: source specs (default: the three offline pools shipped in data_prep/pools; see
data_prep.sources for `hub:bigmath`, `hub:orz` and local .jsonl/.json/.parquet files) and the
evaluation sets (eval.benchmarks) for decontamination.
Outputs: DIR/train.parquet (id, problem, answer, source, plus kept metadata) and
DIR/manifest.json, written LAST (a directory without it is an unfinished build): per source
the rows read and the bad rows (count, reasons, first examples); per filter the rows in and
dropped (per source too); the removed ids with the evaluation item each matched; for exact
dedup and decontamination, what the canonical text form changed (`canonicalisation`: rows the
legacy text form would have dropped, and the ids only one form dropped); the final count; the
sha256 of train.parquet; the config; the library versions.

Departures from the paper: the paper filters ~100k problems from Big-Math (RL-verified) and
ORZ. Neither could be obtained offline, so the default build runs on DeepScaleR-Preview, MATH
train and MATH level 3-5 (data_prep/pools/README.md); `--sources hub:bigmath hub:orz` is the
paper's mix on a networked machine (untested here). The filter thresholds are not published;
defaults and their reasons are in data_prep/config.py.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import importlib.metadata
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from data_prep import filters
from data_prep.config import BuildConfig
from data_prep.decontam import EvalIndex, decontaminate, load_eval_sets
from data_prep.dedup import exact_duplicates, near_duplicates
from data_prep.sampling import difficulty_keep, sample_balanced
from data_prep.sources import file_sha256, load_source, parse_spec
from data_prep.table import rows_to_table, write_parquet
from data_prep.text import LEGACY
from data_prep.verify import verify_answers

MAX_LISTED = 20
"""Examples listed per filter in the manifest (decontamination lists every removed id)."""
VERSION_PACKAGES = ("numpy", "pyarrow", "math-verify", "datasets", "tqdm")

Keep = list[bool]
Stage = Callable[[list[dict[str, Any]]], tuple[Keep, dict[str, Any]]]


def _predicate_stage(pred: Callable[[dict[str, Any]], bool]) -> Stage:
    def run(rows: list[dict[str, Any]]) -> tuple[Keep, dict[str, Any]]:
        keep = [not pred(r) for r in rows]
        return keep, {"examples": [r["id"] for r, k in zip(rows, keep) if not k][:MAX_LISTED]}

    return run


def canonicalisation_effect(rows: Sequence[dict[str, Any]], keep: Keep, keep_legacy: Keep) -> dict[str, Any]:
    """What the canonical text form (data_prep.text.canonical) changed in one stage, on that
    stage's input rows: rows dropped with the legacy text form instead, and the ids each form
    alone dropped."""
    only_canon = [r["id"] for r, k, kl in zip(rows, keep, keep_legacy) if not k and kl]
    only_legacy = [r["id"] for r, k, kl in zip(rows, keep, keep_legacy) if k and not kl]
    return {
        "dropped_with_legacy_text": sum(not k for k in keep_legacy),
        "dropped_only_with_canonical_text": len(only_canon),
        "dropped_only_with_legacy_text": len(only_legacy),
        "examples_only_canonical": only_canon[:MAX_LISTED],
        "examples_only_legacy": only_legacy[:MAX_LISTED],
    }


def stages(cfg: BuildConfig, *, progress: bool, eval_loader=None) -> list[tuple[str, bool, Stage]]:
    """(name, enabled, stage) in pipeline order: cheap text rules first, math-verify last."""

    def exact(rows):
        keep, m = exact_duplicates(rows)
        keep_legacy, _ = exact_duplicates(rows, form=LEGACY)
        return keep, {
            "examples": [dataclasses.asdict(x) for x in m[:MAX_LISTED]],
            "canonicalisation": canonicalisation_effect(rows, keep, keep_legacy),
        }

    def near(rows):
        keep, m = near_duplicates(
            rows,
            threshold=cfg.near_dup_threshold,
            shingle_size=cfg.shingle_size,
            num_perm=cfg.minhash_perms,
            progress=progress,
        )
        return keep, {"examples": [dataclasses.asdict(x) for x in m[:MAX_LISTED]]}

    def decon(rows):
        evals = load_eval_sets(cfg.eval_sets, eval_loader)
        index = EvalIndex(evals, n=cfg.decontam_ngram, min_coverage=cfg.decontam_min_coverage)
        keep, m = decontaminate(rows, index, honor_source_flags=cfg.decontam_source_flags, progress=progress)
        legacy = EvalIndex(evals, n=cfg.decontam_ngram, min_coverage=cfg.decontam_min_coverage, form=LEGACY)
        keep_legacy, _ = decontaminate(rows, legacy, honor_source_flags=cfg.decontam_source_flags)
        by_set = collections.Counter(x.eval_item.split("/", 1)[0] for x in m)
        return keep, {
            "eval_items": index.size,
            "by_eval_set": dict(by_set),
            "by_method": dict(collections.Counter(x.method for x in m)),
            "canonicalisation": canonicalisation_effect(rows, keep, keep_legacy),
            "removed": [dataclasses.asdict(x) for x in m],
        }

    def difficulty(rows):
        keep, missing = difficulty_keep(rows, lo=cfg.solve_rate_min, hi=cfg.solve_rate_max)
        return keep, {"rows_without_solve_rate": missing}

    def verifiable(rows):
        out = verify_answers(rows, workers=cfg.verify_workers, timeout_s=cfg.verify_timeout_s, progress=progress)
        return out.keep, {
            "by_outcome": out.counts,
            "examples": [{"id": i, "reason": r} for i, r in list(out.reasons.items())[:MAX_LISTED]],
        }

    def sample(rows):
        return sample_balanced(rows, target=cfg.target_size, seed=cfg.seed), {}

    def length(r):
        return filters.is_out_of_length(
            r["problem"], r["answer"], problem_chars=cfg.problem_chars, answer_chars=cfg.answer_chars
        )

    return [
        ("length", cfg.length_filter, _predicate_stage(length)),
        (
            "multiple_choice",
            cfg.drop_multiple_choice,
            _predicate_stage(lambda r: filters.is_multiple_choice(r["problem"], r["answer"])),
        ),
        ("proof", cfg.drop_proofs, _predicate_stage(lambda r: filters.is_proof(r["problem"], r["answer"]))),
        (
            "yes_no_true_false",
            cfg.drop_binary_answers,
            _predicate_stage(lambda r: filters.is_binary_answer(r["answer"])),
        ),
        (
            "missing_figure",
            cfg.drop_missing_figures,
            _predicate_stage(lambda r: filters.has_missing_figure(r["problem"])),
        ),
        (
            "multi_part",
            cfg.drop_multipart,
            _predicate_stage(lambda r: filters.is_unrepresentable_multipart(r["problem"], r["answer"])),
        ),
        ("exact_dedup", cfg.exact_dedup, exact),
        ("decontaminate", cfg.decontaminate, decon),
        ("near_dedup", cfg.near_dedup, near),
        ("difficulty", cfg.difficulty_filter, difficulty),
        ("verifiable", cfg.verify_answers, verifiable),
        ("target_size", cfg.target_size is not None, sample),
    ]


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in VERSION_PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def build(
    cfg: BuildConfig,
    out_dir: str | Path,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
    eval_loader=None,
) -> dict[str, Any]:
    """Run the stage; returns the manifest (also written to out_dir/manifest.json, last)."""
    t0 = time.time()
    specs = [parse_spec(s) for s in cfg.sources]  # a missing path fails here, before any work
    dup_names = [n for n, c in collections.Counter(s.name for s in specs).items() if c > 1]
    if dup_names:
        raise ValueError(f"source names must be unique, {dup_names} repeat; name them with name=path")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)  # from here on the directory is incomplete

    rows: list[dict[str, Any]] = []
    sources_m: dict[str, Any] = {}
    for spec in specs:
        src = load_source(spec, cache_dir=cfg.hub_cache_dir)
        sources_m[spec.name] = {
            "kind": spec.kind,
            "location": spec.location,
            "sha256": src.sha256,
            "rows_read": src.rows_read,
            "rows_valid": len(src.rows),
            "bad_rows": src.bad.to_dict(),
            "error": src.error,
        }
        log(f"[data_prep] {spec.name}: {len(src.rows)} valid rows of {src.rows_read} read")
        if src.error:
            log(f"[data_prep]   SOURCE SKIPPED: {src.error}")
        if src.bad.count:
            log(f"[data_prep]   {src.bad.count} bad rows reported and skipped: {dict(src.bad.by_reason)}")
            for ex in src.bad.examples:
                log(f"[data_prep]     {ex['where']}: {ex['reason']}: {ex['preview'][:100]}")
        rows.extend(src.rows)

    filters_m = []
    for name, enabled, stage in stages(cfg, progress=progress, eval_loader=eval_loader):
        if not enabled:
            filters_m.append({"name": name, "enabled": False})
            continue
        ts = time.time()
        keep, details = stage(rows)
        dropped = collections.Counter(r["source"] for r, k in zip(rows, keep) if not k)
        filters_m.append(
            {
                "name": name,
                "enabled": True,
                "rows_in": len(rows),
                "dropped": sum(dropped.values()),
                "dropped_by_source": dict(sorted(dropped.items())),
                "seconds": round(time.time() - ts, 2),
                **details,
            }
        )
        rows = [r for r, k in zip(rows, keep) if k]
        log(
            f"[data_prep] {name:<18} in {filters_m[-1]['rows_in']:>7}  dropped {filters_m[-1]['dropped']:>6}  "
            f"({filters_m[-1]['seconds']} s)"
        )
        if "canonicalisation" in details:
            c = details["canonicalisation"]
            log(
                f"[data_prep] {'':<18} legacy text form would drop {c['dropped_with_legacy_text']} "
                f"(+{c['dropped_only_with_canonical_text']} only canonical, "
                f"-{c['dropped_only_with_legacy_text']} only legacy)"
            )
    if not rows:
        raise RuntimeError(
            f"no rows survived the build (sources: {sources_m}); no output written. "
            "Check the source errors above or loosen the filters."
        )

    table, json_cols = rows_to_table(rows)
    tmp = out / "train.parquet.tmp"
    write_parquet(table, tmp)
    os.replace(tmp, out / "train.parquet")
    manifest = {
        "status": "complete",
        "final_count": len(rows),
        "final_by_source": dict(sorted(collections.Counter(r["source"] for r in rows).items())),
        "output": {
            "file": "train.parquet",
            "sha256": file_sha256(out / "train.parquet"),
            "columns": table.column_names,
            "json_encoded_columns": json_cols,
        },
        "sources": sources_m,
        "filters": filters_m,
        "config": cfg.to_dict(),
        "versions": _versions(),
        "seconds": round(time.time() - t0, 1),
        "finished": time.time(),
    }
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, out / "manifest.json")
    log(f"[data_prep] {len(rows)} rows -> {out / 'train.parquet'} (manifest written)")
    return manifest


def filter_table(manifest: dict[str, Any]) -> str:
    """The per-filter table of a manifest as Markdown (used in data_prep/README.md)."""
    lines = ["| step | rows in | dropped | rows out |", "|---|---:|---:|---:|"]
    for f in manifest["filters"]:
        if f["enabled"]:
            lines.append(f"| {f['name']} | {f['rows_in']} | {f['dropped']} | {f['rows_in'] - f['dropped']} |")
        else:
            lines.append(f"| {f['name']} | (off) | | |")
    lines.append(f"| **final** | | | **{manifest['final_count']}** |")
    return "\n".join(lines)


def canonicalisation_table(manifest: dict[str, Any]) -> str:
    """Rows dropped per stage with the canonical vs the legacy text form, as Markdown."""
    lines = [
        "| step | rows in | dropped (canonical) | dropped (legacy) | only canonical | only legacy |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for f in manifest["filters"]:
        c = f.get("canonicalisation") if f["enabled"] else None
        if c:
            lines.append(
                f"| {f['name']} | {f['rows_in']} | {f['dropped']} | {c['dropped_with_legacy_text']} | "
                f"{c['dropped_only_with_canonical_text']} | {c['dropped_only_with_legacy_text']} |"
            )
    return "\n".join(lines)


def _parse_args(argv: Sequence[str] | None) -> tuple[BuildConfig, Path, bool, bool]:
    p = argparse.ArgumentParser(prog="python -m data_prep.build", description=__doc__.split("\n\n")[0])
    p.add_argument("--sources", nargs="+", default=None, help="pool names, hub:bigmath, hub:orz, or [name=]path")
    p.add_argument("--out", required=True, type=Path, help="output directory (train.parquet, manifest.json)")
    p.add_argument("--config", type=Path, help="JSON object of BuildConfig fields (flags below override it)")
    p.add_argument("--seed", type=int)
    p.add_argument("--target-size", type=int)
    p.add_argument("--difficulty", nargs=2, type=float, metavar=("MIN", "MAX"), help="keep solve rates in [MIN, MAX]")
    p.add_argument("--workers", type=int, help="math-verify worker processes")
    p.add_argument(
        "--disable",
        action="append",
        default=[],
        metavar="FIELD",
        help="turn off a boolean BuildConfig switch, e.g. --disable near_dedup (repeatable)",
    )
    p.add_argument("--print-table", action="store_true", help="print the per-filter Markdown table at the end")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    fields = {f.name: f for f in dataclasses.fields(BuildConfig)}
    kw: dict[str, Any] = {}
    if a.config:
        raw = json.loads(a.config.read_text())
        unknown = sorted(set(raw) - set(fields))
        if unknown:
            p.error(f"--config {a.config}: unknown fields {unknown}; known: {sorted(fields)}")
        kw.update({k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    if a.sources:
        kw["sources"] = tuple(a.sources)
    for flag, field in (("seed", "seed"), ("target_size", "target_size"), ("workers", "verify_workers")):
        if getattr(a, flag) is not None:
            kw[field] = getattr(a, flag)
    if a.difficulty:
        kw.update(difficulty_filter=True, solve_rate_min=a.difficulty[0], solve_rate_max=a.difficulty[1])
    for name in a.disable:
        if name not in fields or fields[name].type not in ("bool", bool):
            p.error(
                f"--disable {name}: not a boolean BuildConfig field; choose from "
                f"{sorted(n for n, f in fields.items() if f.type in ('bool', bool))}"
            )
        kw[name] = False
    return BuildConfig(**kw), a.out, a.print_table, not a.no_progress


def main(argv: Sequence[str] | None = None) -> int:
    cfg, out, print_table, progress = _parse_args(argv)
    try:
        manifest = build(cfg, out, progress=progress)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"[data_prep] error: {e}", file=sys.stderr)
        return 2
    if print_table:
        print(filter_table(manifest))
        print()
        print(canonicalisation_table(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
