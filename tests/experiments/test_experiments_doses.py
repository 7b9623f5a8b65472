"""Mismatch doses as RunConfig fields (rollout only) and their calibration command, on the micro zoo."""

from __future__ import annotations

import json
import time

import pytest

from experiments import doses, study
from experiments.config import RunConfig
from experiments.step import build_loop, engine_configs, global_step


def parity_reward(texts, golds):
    """A deterministic non-constant reward (the micro model solves nothing): even-length responses win."""
    return [float(len(t) % 2 == 0) for t in texts]


def test_dose_fields_reach_the_rollout_engine_only(tmp_path):
    plain = RunConfig(name="p")
    dosed = RunConfig(name="d", rollout_router_noise=0.4, rollout_logit_noise=0.2, rollout_fp8_scope="w8a8")
    ro, tr = engine_configs(dosed, tmp_path, tmp_path)
    assert (ro.router_noise, ro.logit_noise, ro.fp8_scope) == (0.4, 0.2, "w8a8")
    assert tr == engine_configs(plain, tmp_path, tmp_path)[1]  # the trainer's config does not change
    assert RunConfig.from_dict(dosed.to_dict()) == dosed
    for size in doses.NOISE_STDS:
        for d in doses.ladder(size).values():  # every named dose is a valid run config
            cfg = RunConfig(name=d.name, **d.run_fields())
            ro, _ = engine_configs(cfg, tmp_path, tmp_path)
            assert ro.precision == d.precision
            if d.engine == "hf":
                assert (ro.router_noise, ro.logit_noise) == (d.router_noise, d.logit_noise)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"rollout_router_noise": -0.1}, r"rollout_router_noise must be a finite std >= 0 .* got -0.1"),
        ({"rollout_logit_noise": float("inf")}, r"rollout_logit_noise must be a finite std >= 0 .* got inf"),
        ({"rollout_router_noise": 0.3, "model": "dense"}, "needs an MoE model; the dense control has no router"),
        (
            {"rollout_logit_noise": 0.1, "rollout_engine": "vllm"},
            r"rollout_logit_noise=0.1 is not a setting of the 'vllm' rollout engine .* \['hf'\]",
        ),
        ({"rollout_fp8_scope": "w4a8"}, r"rollout_fp8_scope='w4a8' is not one of \['all', 'router', 'w8a8'\]"),
    ],
)
def test_dose_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        RunConfig(name="x", **kw)


def _step_metrics(zoo, tmp_path, name, **kw):
    cfg = RunConfig(
        name=name,
        zoo_dir=str(zoo),
        model="sft",
        prompts_per_step=4,
        group_size=4,
        max_new_tokens=12,
        lr=1e-3,
        rollout_precision="fp32",
        max_sampling_rounds=2,
        **kw,
    )
    from experiments.run import resolve_model_dir

    loop = build_loop(cfg, resolve_model_dir(cfg), tmp_path / name, reward_fn=parity_reward, log=lambda m: None)
    return global_step(loop, 1)


def test_rl_step_under_replay_router_noise_falls_to_the_fp32_floor_and_logit_noise_does_not(micro_zoo, tmp_path):
    """One real global step per cell (fp32 rollout, so the dose is the only mismatch): the trainer's
    pi_old vs the rollout's logprobs (mismatch/k3_kl)."""
    kl = {
        (dose, replay): _step_metrics(micro_zoo, tmp_path, f"{dose}-{replay}", replay=replay, **kw)["mismatch/k3_kl"]
        for dose, kw in (("router", {"rollout_router_noise": 1.0}), ("logit", {"rollout_logit_noise": 0.3}))
        for replay in (False, True)
    }
    assert kl["router", True] < 1e-7  # the fp32 floor: R3 removes the routing-only dose
    assert kl["router", False] > 1e-4
    assert kl["logit", True] > 1e-3 and kl["logit", False] > 1e-3  # R3 cannot remove the output-logit dose


def test_calibrate_command_on_the_micro_zoo(micro_zoo, tmp_path, capsys):
    out = tmp_path / "calibration.json"
    t0 = time.time()
    argv = ["calibrate", "--zoo-dir", str(micro_zoo), "--n-prompts", "4", "--group-size", "2", "--max-new-tokens", "8"]
    argv += ["--doses", "fp32", "w8a8", "--router-noise", "1.0", "--logit-noise", "0.3", "--out", str(out)]
    assert study.main(argv) == 0
    assert time.time() - t0 < 60
    text = capsys.readouterr().out
    assert "| paper (Qwen3-30B-A3B) | 1.53e-03 | 7.50e-04 | 1.00 |" in text and "| 10.0% | 94.0% |" in text
    rec = json.loads(out.read_text())
    assert rec["settings"]["n_prompts"] == 4 and rec["paper"]["routing_token_disagreement"] == 0.94
    rows = {r["name"]: r for r in rec["doses"]}
    assert list(rows) == ["fp32", "w8a8", "router1", "logit0.3"]
    for r in rows.values():
        assert r["responses"] == 8 and r["moe"]["tokens"] > 0
        assert r["k3_kl_per_response"] == pytest.approx(r["moe"]["k3_kl"] * r["moe"]["tokens"] / 8)
        assert f"| {r['name']} |" in text
    assert rows["fp32"]["moe"]["k3_kl"] < 1e-7 and rows["fp32"]["moe"]["routing_pair_disagreement"] == 0
    router, logit = rows["router1"], rows["logit0.3"]
    assert router["moe"]["routing_pair_disagreement"] > 0.1 and router["moe"]["k3_kl"] > 1e-4
    assert router["moe_r3"]["k3_kl"] < 1e-7  # replay removes it
    assert logit["moe"]["routing_pair_disagreement"] == 0  # routing untouched
    assert logit["moe_r3"]["k3_kl"] == pytest.approx(logit["moe"]["k3_kl"], rel=1e-3) and logit["moe"]["k3_kl"] > 1e-3


def test_calibrate_refuses_unknown_doses_and_a_missing_zoo(tmp_path):
    with pytest.raises(SystemExit, match=r"--doses: unknown \['nope'\]"):
        study.main(["calibrate", "--doses", "nope"])
    with pytest.raises(SystemExit, match="no complete zoo there"):
        study.main(["calibrate", "--zoo-dir", str(tmp_path), "--doses", "fp32"])
