"""Rehearse the paper layout's training rank on this CPU and print its peak per phase beside the plan.

    python -m benchmarks.rehearse_paper [--legacy] [--seq-len 9216] [--write-cache] [--json OUT]

Inputs: none (Qwen3-30B-A3B's published shapes, r3.engines.megatron.memory.QWEN3_30B_A3B; the
paper layout of slurm.resources: 16 ranks, EP 8, bf16, full recompute, micro-batch 1 of 1,024 prompt
+ 8,192 new tokens). Output: per phase, the rehearsed bytes of one rank (r3.engines.megatron.rehearsal:
the real engine's train_step on the rank's 16 local experts at full width, 1 and 2 decoder layers,
scaled to 48; static state from the plan), the plan's total, the driver-to-follower message of one
train-engine call, and the tensors that make up each peak. `--legacy` rehearses the engine as it was
before the attention / logprob fixes (megatron's local attention, full-vocabulary logprob and entropy).
`--write-cache` stores the result, with the legacy rehearsal's peaks beside it, where
`slurm.submit --dry-run` reads it (r3/engines/megatron/rehearsal_paper.json).
Takes ~1-2 minutes and ~5 GB of resident memory (the counted tensors are mostly never touched).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from r3.engines.megatron import rehearsal
from r3.engines.megatron.rehearsal import GB


def report(r: dict, gpu_gb: float) -> str:
    lay = r["layout"]
    lines = [
        f"rehearsed rank: Qwen3-30B-A3B, world {lay['world']} = DP {lay['world']} x TP 1 x PP 1, EP {lay['ep']}, "
        f"bf16, recompute, micro-batch 1 x {lay['seq_len']} tokens, attention {lay['attention']}"
        + (", LEGACY logprob/entropy" if lay["legacy"] else ""),
        f"  plan (r3.engines.megatron.memory)          total {r['plan_total'] / GB:6.1f} GB "
        f"(static {r['plan_static'] / GB:.1f} GB + activations + reserve {r['reserve'] / GB:.1f} GB)",
    ]
    for ph, b in r["phases"].items():
        act = r["activations_48_layers"].get(ph)
        extra = f"  activations {act / GB:5.1f} GB" if act is not None else ""
        lines.append(f"  rehearsed {ph:<16} peak {b / GB:6.1f} GB{extra}  {'fits' if b <= gpu_gb * GB else 'EXCEEDS'}")
    c = r["call"]
    lines.append(
        f"  driver-to-follower call of {c['rows']} rows: message {c['total'] / GB:.1f} GB (routing trace "
        f"{c['expert_ids'] / GB:.1f} GB), one part at a time through each follower's wire device; static + "
        f"largest part + reserve "
        f"{c['peak'] / GB:.1f} GB {'fits' if c['peak'] <= gpu_gb * GB else 'EXCEEDS'}"
    )
    verdict = "fits" if r["step_peak"] <= gpu_gb * GB else "DOES NOT FIT"
    lines.append(f"  step peak {r['step_peak'] / GB:.1f} GB of {gpu_gb:.0f} GB: {verdict}")
    lines.append(
        "  scaling: activations(48) = act(1) + 47 x per-layer slope; slope per phase (MB/layer): "
        + ", ".join(f"{ph} {v / 1e6:.1f}" for ph, v in r["activation_per_layer"].items())
    )
    for x in r["rehearsed"]:
        lines.append(
            f"  measured at {x['layers']} layer(s): built {x['built'] / GB:.2f} GB ({x['params'] / 1e6:.0f}M params), "
            + ", ".join(f"{k} {v / GB:.2f}" for k, v in x["phases"].items())
            + f" GB; {x['skipped_ops']} ops allocated, not computed; max RSS {x['max_rss_bytes'] / GB:.1f} GB"
        )
    lines.append(f"  built bytes / plan's 10 B per parameter at DP 1: {r['calibration']:.4f}")
    for ph, items in r["largest_at_peak"].items():
        top = ", ".join(f"{op.replace('aten.', '')} {n / GB:.2f}" for _, op, n in items[:6])
        lines.append(f"  largest tensors at the {ph} peak (GB, 2-layer rehearsal): {top}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--legacy", action="store_true", help="rehearse the pre-fix attention and logprob paths")
    ap.add_argument("--seq-len", type=int, default=9216)
    ap.add_argument("--gpu-gb", type=float, default=80)
    ap.add_argument("--call-rows", type=int, default=1024, help="rows of one train-engine call (128 x 8)")
    ap.add_argument("--write-cache", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    t0 = time.time()
    r = rehearsal.rehearse_layout(
        seq_len=args.seq_len,
        attention="local" if args.legacy else "sdpa",
        legacy=args.legacy,
        call_rows=args.call_rows,
    )
    r["seconds"] = round(time.time() - t0, 1)
    print(report(r, args.gpu_gb))
    print(f"  ({r['seconds']} s)")
    if args.json:
        args.json.write_text(json.dumps(r, indent=1) + "\n")
    if args.write_cache:
        if args.legacy or args.seq_len != 9216:
            raise SystemExit("--write-cache stores the paper layout's rehearsal: run it without --legacy / --seq-len")
        legacy = rehearsal.rehearse_layout(seq_len=args.seq_len, attention="local", legacy=True)
        r["legacy"] = {k: legacy[k] for k in ("layout", "phases", "step_peak", "plan_total", "activations_48_layers")}
        print(f"  the same rank with the pre-fix paths (--legacy): step peak {legacy['step_peak'] / GB:.1f} GB")
        rehearsal.CACHE.write_text(json.dumps(r, indent=1) + "\n")
        print(f"  wrote {rehearsal.CACHE}")


if __name__ == "__main__":
    main()
