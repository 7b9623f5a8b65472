"""Mismatch doses of the study, and their calibration against the paper's static mismatch.

    python -m experiments.study calibrate [--zoo-dir runs/zoo] [--n-prompts 128] [--doses NAME ...]
    python -m experiments.study calibrate --router-noise 0.5 1 2 --logit-noise 0.05   # ad-hoc doses

A dose is everything on the rollout side that makes the inference engine differ from the fp32
trainer (RunConfig fields: `Dose.run_fields`): the rollout precision (bf16; FP8 of the routers, of
every linear layer, or W8A8 serving numerics, r3.engines.hf.fp8), and two seeded noise doses
(r3.engines.hf.noise): `rollout_router_noise`, noise on the router logits that changes routing only
(R3 removes it), and `rollout_logit_noise`, noise on the output logits (R3 cannot remove it).

Calibration (`measure_doses`): per dose, the transformers rollout engine samples `group_size`
responses to each of `n_prompts` held-out problems of the zoo's SFT MoE model at temperature 1;
the fp32 train engine recomputes their logprobs with its own routing (native) and replaying the
rollout's (R3), with the static measurement's formulas (experiments.static_mismatch: r3.metrics).
Reported per dose: k3 KL per token and per response (the sum over a response's tokens, averaged
over responses: k3 per token x tokens / responses), F(2), the share of (token, MoE layer) routing
pairs and of tokens (any layer) whose top-k set differs, beside the paper's (PAPER.md: Qwen3-30B-A3B,
SGLang vs Megatron: k3 1.535e-3 native / 7.5e-4 R3, F(2) 2.54e-4 / 5.83e-6, 10% of pairs, 94% of
tokens; per response not published). Outputs: the table on stdout and, with `out`, a JSON file.

Departures from the paper: its mismatch comes from two engines' kernels on a 48-layer model with
responses of thousands of tokens; here the doses are emulated on a 4-layer model whose responses are
about 24 tokens, so a per-token dose matched to the paper's is a per-response dose far below it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from experiments import static_mismatch, task

PAPER = {
    "k3_kl": 1.535e-3,
    "k3_kl_r3": 7.5e-4,
    "extreme_frac@2": 2.54e-4,
    "extreme_frac@2_r3": 5.83e-6,
    "routing_pair_disagreement": 0.10,
    "routing_token_disagreement": 0.94,
}
"""The paper's static mismatch of Qwen3-30B-A3B (PAPER.md "Reported numbers"): k3 KL per token native
and with R3, F(2) native and with R3 (appendix table), routing pairs and tokens that differ."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Dose:
    """One rollout-side mismatch setting (the trainer is always the fp32 transformers engine)."""

    name: str
    engine: str = "hf"
    """The rollout engine (r3.engines.registry); the noise doses and FP8 scopes need `hf`."""
    precision: str = "fp32"
    """Rollout numerics: fp32 (no mismatch but kernels' rounding), bf16, or fp8 (with fp8_scope)."""
    fp8_scope: str = "router"
    """With fp8: `router`, `all` or `w8a8` (r3.engines.hf.fp8)."""
    router_noise: float = 0.0
    """Std of the router-logit noise (r3.engines.hf.noise); 0: off."""
    logit_noise: float = 0.0
    """Std of the output-logit noise; 0: off."""
    note: str = ""
    """What the dose stands for (printed with the table)."""

    def run_fields(self) -> dict:
        """The RunConfig fields that set this dose (experiments.config)."""
        return {
            "rollout_engine": self.engine,
            "rollout_precision": self.precision,
            "rollout_fp8_scope": self.fp8_scope,
            "rollout_router_noise": self.router_noise,
            "rollout_logit_noise": self.logit_noise,
        }


NOISE_STDS: dict[str, dict[str, float]] = {
    # Stds that reach the paper's per-token k3 KL and 3x and 10x it on each zoo's SFT model, found
    # with `calibrate --router-noise / --logit-noise` (docs/study.md "Doses"): deeper models flip
    # more routing per std, so each zoo has its own.
    "tiny": {"router-1x": 0.23, "router-3x": 0.45, "router-10x": 0.69,
             "logit-1x": 0.24, "logit-3x": 0.40, "logit-10x": 0.75},
    "study": {"router-1x": 0.51, "router-3x": 0.64, "router-10x": 0.82,
              "logit-1x": 0.37, "logit-3x": 0.61, "logit-10x": 1.11,
              # beyond the paper's range, to find where GRPO breaks: 1.0 measured 27x and 1.15 53x
              # (runs/study/calibration-study-zoo-30x.json); 30x interpolated, 100x extrapolated (k3 ~ std^4.8)
              "router-30x": 1.02, "router-100x": 1.31,
              # the non-routing control at router-100x's KL: logit std 2.0 measured 53x
              # (runs/study/calib-logit.log, k3 ~ std^3 from 1.11); 100x extrapolated
              "logit-100x": 2.5},
}  # fmt: skip


def ladder(zoo_size: str = "tiny") -> dict[str, Dose]:
    """The calibrated ladder of a zoo: the precision doses (any zoo) and the noise doses at that zoo's
    stds (`NOISE_STDS`; none for a zoo not calibrated). `python -m experiments.study calibrate`
    measures every one by default."""
    stds = NOISE_STDS.get(zoo_size, {})
    fixed = (
        Dose(name="fp32", note="no mismatch: the floor (KV-cached decode vs full forward, both fp32)"),
        Dose(name="bf16", precision="bf16", note="bf16 rollout"),
        Dose(name="fp8router", precision="fp8", fp8_scope="router", note="FP8 router weights"),
        Dose(name="fp8all", precision="fp8", fp8_scope="all", note="FP8 weights of every linear layer"),
        Dose(name="w8a8", precision="fp8", fp8_scope="w8a8", note="FP8 serving: W8A8, router and head bf16"),
        Dose(name="vllmbf16", engine="vllm", precision="bf16", note="vLLM's bf16 CPU kernels (the `vllm` extra)"),
    )
    # noise doses on an fp32 rollout, so each is the only mismatch
    words = {"1x": "paper's per-token KL", "3x": "3x", "10x": "10x", "30x": "30x", "100x": "100x"}
    noise = tuple(
        Dose(name=name, **{f"{name.split('-')[0]}_noise": std},
             note=f"{name.split('-')[0]} noise: {words[name.split('-')[1]]}")
        for name, std in stds.items()
    )  # fmt: skip
    return {d.name: d for d in fixed + noise}


def _engines(moe_dir: Path, seed: int):
    from r3.engines import registry

    # no step is taken; lr must be > 0
    settings = registry.TrainSettings(model_path=str(moe_dir), lr=1e-6, seed=seed)
    return registry.build_train_engine(registry.train_config_for("hf", settings))


def _rollout_engine(moe_dir: Path, dose: Dose, seed: int):
    from r3.engines import registry

    options = {"progress_min_prompts": 0}  # no progress bar per dose
    if dose.engine == "hf":  # the settings only the transformers engine has
        options |= {"fp8_scope": dose.fp8_scope, "router_noise": dose.router_noise, "logit_noise": dose.logit_noise}
    settings = registry.RolloutSettings(model_path=str(moe_dir), precision=dose.precision, seed=seed, options=options)
    return registry.build_rollout_engine(registry.rollout_config_for(dose.engine, settings))


def measure_doses(
    moe_dir: Path,
    doses: list[Dose],
    *,
    n_prompts: int = 128,
    group_size: int = 8,
    max_new_tokens: int = 48,
    seed: int = 0,
    difficulty: int = 2,
    log=print,
) -> list[dict]:
    """One record per dose (see the module docstring): the dose's fields, `moe` and `moe_r3` metrics of
    experiments.static_mismatch (k3_kl, extreme_frac@2, routing_*_disagreement, tokens, ...), and
    `k3_kl_per_response`, `k3_kl_per_response_r3`, `responses`, `mean_response_tokens`, `seconds`."""
    from transformers import AutoTokenizer

    from r3.replay import ReplayMode

    probs = task.heldout_problems(n_prompts, difficulty=difficulty)
    tok = AutoTokenizer.from_pretrained(moe_dir)
    trainer = _engines(moe_dir, seed)  # the fp32 trainer is the same for every dose
    rows = []
    for dose in doses:
        t0 = time.time()
        ro = _rollout_engine(moe_dir, dose, seed)
        batch = static_mismatch._sample_batch(
            ro, tok, probs, group_size=group_size, max_new_tokens=max_new_tokens, seed=seed, moe=True
        )
        del ro
        tb, mask, fed = batch.train, batch.train.loss_mask_BT, batch.train.attention_mask_BS[:, 1:].bool()
        native = trainer.compute_logprobs(tb, routing=ReplayMode.RECORD)
        moe = static_mismatch._metrics(
            native.logp_BT, batch.infer_logp_BT, mask, tb.expert_ids_BTLK, native.expert_ids_BTLK, fed
        )
        r3 = trainer.compute_logprobs(tb, routing=ReplayMode.REPLAY)
        moe_r3 = static_mismatch._metrics(r3.logp_BT, batch.infer_logp_BT, mask, None, None, None)
        responses = int(mask.shape[0])
        row = {
            **dataclasses.asdict(dose),
            "moe": moe,
            "moe_r3": moe_r3,
            "responses": responses,
            "mean_response_tokens": moe["tokens"] / responses,
            # mean over responses of the sum over its tokens = the token mean x tokens / responses
            "k3_kl_per_response": moe["k3_kl"] * moe["tokens"] / responses,
            "k3_kl_per_response_r3": moe_r3["k3_kl"] * moe_r3["tokens"] / responses,
            "seconds": round(time.time() - t0, 1),
        }
        rows.append(row)
        log(format_row(row))
    return rows


def _e(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


HEADER = (
    "| dose | k3/token native | k3/token R3 | x paper | k3/response native | k3/response R3 | F(2) native | "
    "F(2) R3 | pairs differ | tokens differ | tokens/response | note |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def format_row(row: dict) -> str:
    """One Markdown table row of a `measure_doses` record."""
    moe, r3 = row["moe"], row["moe_r3"]
    return (
        f"| {row['name']} | {_e(moe['k3_kl'])} | {_e(r3['k3_kl'])} | {moe['k3_kl'] / PAPER['k3_kl']:.2f} | "
        f"{_e(row['k3_kl_per_response'])} | {_e(row['k3_kl_per_response_r3'])} | {_e(moe['extreme_frac@2'])} | "
        f"{_e(r3['extreme_frac@2'])} | {_pct(moe['routing_pair_disagreement'])} | "
        f"{_pct(moe['routing_token_disagreement'])} | {row['mean_response_tokens']:.1f} | {row['note']} |"
    )


def paper_row() -> str:
    p = PAPER
    return (
        f"| paper (Qwen3-30B-A3B) | {_e(p['k3_kl'])} | {_e(p['k3_kl_r3'])} | 1.00 | not published | not published | "
        f"{_e(p['extreme_frac@2'])} | {_e(p['extreme_frac@2_r3'])} | {_pct(p['routing_pair_disagreement'])} | "
        f"{_pct(p['routing_token_disagreement'])} | not published | SGLang vs Megatron |"
    )


def table(rows: list[dict]) -> str:
    """The calibration table: the paper's row, then one row per dose."""
    return "\n".join([HEADER, paper_row(), *(format_row(r) for r in rows)])


def write(out: Path, rows: list[dict], settings: dict) -> None:
    """The calibration's JSON record: settings, the paper's anchors and one record per dose."""
    from r3 import rundir

    rec = {"settings": settings, "paper": PAPER, "doses": rows}
    rundir.write_text_atomic(Path(out), json.dumps(rec, indent=1) + "\n")
