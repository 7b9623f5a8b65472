"""The RL loop on a micro zoo: short loops per trainer, resume equality, faults, capture check."""

from __future__ import annotations

import json

import pytest

from experiments import checkpoint
from experiments.config import RunConfig
from experiments.run import run_cell
from experiments.step import NonFiniteError, check_engines
from r3 import rundir

TIME_KEYS = ("time",)


def parity_reward(texts, golds):
    """A deterministic non-constant reward (the micro model solves nothing): even-length responses win."""
    return [float(len(t) % 2 == 0) for t in texts]


def _cfg(zoo, name, **kw):
    base = dict(
        name=name,
        zoo_dir=str(zoo),
        model="sft",
        global_steps=3,
        prompts_per_step=4,
        group_size=4,
        max_new_tokens=12,
        eval_every=2,
        eval_max_problems=8,
        checkpoint_every=2,
        lr=1e-3,
        rollout_precision="fp8",
        max_sampling_rounds=2,
    )
    base.update(kw)
    return RunConfig(**base)


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def _num_layers(zoo):
    return json.loads((zoo / "sft" / "config.json").read_text())["num_hidden_layers"]


def _strip_time(rec):
    return {k: v for k, v in rec.items() if not k.startswith(TIME_KEYS)}


@pytest.mark.parametrize("train_engine", ["hf", pytest.param("megatron", marks=pytest.mark.megatron)])
def test_three_step_loop_writes_the_run_directory(micro_zoo, tmp_path, train_engine):
    if train_engine == "megatron":
        pytest.importorskip("megatron.core")
    cfg = _cfg(micro_zoo, f"loop-{train_engine}", train_engine=train_engine, replay=True, tis=True)
    man = run_cell(cfg, tmp_path / cfg.name, progress=False, reward_fn=parity_reward)
    d = tmp_path / cfg.name
    m = _lines(d / "metrics.jsonl")
    assert [r["step"] for r in m] == [1, 2, 3]
    for key in (
        "rollout/reward_mean",
        "actor/grad_norm",
        "actor/entropy",
        "mismatch/k3_kl",
        "mismatch/extreme_frac@2",
        "routing/pair_disagreement",
        "actor/tis_weight_mean",
        "time/sync",
    ):
        assert key in m[0], key
    assert m[0]["actor/grad_norm"] > 0  # the parity reward gives nonzero advantages
    # routing disagreement per MoE layer; the pair share is their mean over layers
    per_layer = [m[0][f"routing/layer{i}_disagreement"] for i in range(_num_layers(micro_zoo))]
    assert f"routing/layer{len(per_layer)}_disagreement" not in m[0]
    assert sum(per_layer) / len(per_layer) == pytest.approx(m[0]["routing/pair_disagreement"], rel=1e-5, abs=1e-7)
    assert [e["step"] for e in _lines(d / "eval.jsonl")] == [0, 2, 3]
    assert (d / "eval" / "step_2.jsonl").exists()
    assert man["status"] == "complete" and man["steps"] == 3
    assert json.loads((d / "manifest.json").read_text()) == man
    assert run_cell(cfg, d, progress=False) == man  # complete: skipped


def test_gspo_multi_mini_step(micro_zoo, tmp_path):
    cfg = _cfg(micro_zoo, "gspo", algorithm="gspo", mini_steps=2, global_steps=2, loss_agg="seq-mean-token-mean")
    run_cell(cfg, tmp_path / "gspo", progress=False, reward_fn=parity_reward)
    m = _lines(tmp_path / "gspo" / "metrics.jsonl")
    qualifying = [r for r in m if r["rollout/kept_groups"] >= 2]
    assert qualifying, "no step kept two groups: the check below would pass vacuously"
    assert all(r["actor/mini_steps"] == 2 for r in qualifying)


class Killed(Exception):
    pass


def test_killed_run_resumes_to_identical_metrics(micro_zoo, tmp_path):
    cfg = _cfg(micro_zoo, "resume", global_steps=4, replay=True)
    run_cell(cfg, tmp_path / "a", progress=False, reward_fn=parity_reward)

    b = tmp_path / "b"
    # run the first 2 steps (checkpoint at 2), then die in step 3
    with pytest.raises(Killed):
        run_cell(cfg, b, progress=False, reward_fn=_dies_after(2, b))
    assert (b / "checkpoints" / "step_2" / "COMPLETE").exists()
    assert len(_lines(b / "metrics.jsonl")) == 2
    man = run_cell(cfg, b, progress=False, reward_fn=parity_reward)
    ma, mb = _lines(tmp_path / "a" / "metrics.jsonl"), _lines(b / "metrics.jsonl")
    assert [r["step"] for r in mb] == [1, 2, 3, 4]
    for ra, rb in zip(ma, mb):
        sa, sb = _strip_time(ra), _strip_time(rb)
        assert sa.keys() == sb.keys()
        for k in sa:
            assert sb[k] == pytest.approx(sa[k], rel=1e-6, abs=1e-9), (ra["step"], k)
    ea, eb = _lines(tmp_path / "a" / "eval.jsonl"), _lines(b / "eval.jsonl")
    assert [e["step"] for e in eb] == [0, 2, 4]
    assert [e["scores"] for e in ea] == [e["scores"] for e in eb]
    assert man["steps"] == 4


def _dies_after(steps_ok: int, run_dir):
    """A reward function that raises once metrics.jsonl holds `steps_ok` lines (a kill mid-step)."""

    def fn(texts, golds):
        p = run_dir / "metrics.jsonl"
        if p.exists() and len(p.read_text().splitlines()) >= steps_ok:
            raise Killed
        return parity_reward(texts, golds)

    return fn


def test_non_finite_loss_stops_without_checkpointing_the_step_and_resumes_without_a_gap(
    micro_zoo, tmp_path, monkeypatch
):
    """The failing step is not checkpointed (a resubmission would resume past it and leave a gap in
    metrics.jsonl); its metrics go to log.txt; a resumed run redoes it from the last good checkpoint."""
    from experiments import step as run_mod

    real = run_mod.policy_update
    calls = {"n": 0}

    def nan_at_step_2(*a, **kw):
        m = real(*a, **kw)
        calls["n"] += 1
        if calls["n"] == 2:
            m["actor/loss"] = float("nan")
        return m

    monkeypatch.setattr(run_mod, "policy_update", nan_at_step_2)
    cfg = _cfg(micro_zoo, "nan", global_steps=3, checkpoint_every=1)
    run_dir = tmp_path / "nan"
    with pytest.raises(NonFiniteError, match=r"actor/loss=nan at global step 2; the run stopped without checkpointing"):
        run_cell(cfg, run_dir, progress=False, reward_fn=parity_reward)
    assert [s for s, _ in checkpoint.checkpoint_dirs(run_dir)] == [1]
    assert "non-finite ['actor/loss'] at step 2" in (run_dir / "log.txt").read_text()
    assert not (run_dir / "manifest.json").exists()
    monkeypatch.setattr(run_mod, "policy_update", real)
    run_cell(cfg, run_dir, progress=False, reward_fn=parity_reward)
    assert [r["step"] for r in rundir.read_jsonl(run_dir / "metrics.jsonl")] == [1, 2, 3]


def test_replay_without_routing_capture_fails_at_start():
    """The check reads the engines' declared capabilities (DESIGN.md invariant 3)."""
    from r3.engines.base import RolloutCapabilities

    class Rollout:
        def __init__(self, capture, sync=True):
            self.capabilities = RolloutCapabilities(captures_routing=capture, weight_sync=sync)

    class Train:
        is_moe = True

    cfg = RunConfig(name="x", replay=True)
    with pytest.raises(ValueError, match=r"replay=True but the 'hf' rollout engine .* does not capture routing"):
        check_engines(cfg, Rollout(False), Train())
    check_engines(cfg.replace(replay=False), Rollout(False), Train())  # fine without replay
    with pytest.raises(ValueError, match="--enable-return-routed-experts"):
        check_engines(cfg.replace(rollout_engine="sglang", preset="paper"), Rollout(False), Train())
    with pytest.raises(ValueError, match="cannot take weight syncs"):
        check_engines(cfg, Rollout(True, sync=False), Train())


def test_other_config_in_run_dir_is_refused(micro_zoo, tmp_path):
    cfg = _cfg(micro_zoo, "cfg")
    (tmp_path / "cfg").mkdir()
    cfg.replace(lr=5.0).save(tmp_path / "cfg" / "config.json")
    with pytest.raises(ValueError, match=r"different config \(fields differ: \['lr'\]\)"):
        run_cell(cfg, tmp_path / "cfg", progress=False)


def test_metrics_mirror_to_tensorboard_and_wandb_offline(micro_zoo, tmp_path, monkeypatch):
    """log_to mirrors every metrics.jsonl line to TensorBoard event files and an offline W&B run."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _cfg(micro_zoo, "tracked", global_steps=2, log_to=("tensorboard", "wandb"), eval_every=2)
    run_dir = tmp_path / "tracked"
    run_cell(cfg, run_dir, progress=False, reward_fn=parity_reward)
    lines = _lines(run_dir / "metrics.jsonl")
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    kl = acc.Scalars("mismatch/k3_kl")
    assert [e.step for e in kl] == [1, 2]
    assert [e.value for e in kl] == pytest.approx([r["mismatch/k3_kl"] for r in lines], rel=1e-6)
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_unknown_tracking_backend_is_refused():
    with pytest.raises(ValueError, match=r"log_to has unknown backends \['mlflow'\]"):
        RunConfig(name="x", log_to=("mlflow",))


def test_engine_configs_route_server_urls_to_the_named_engine(tmp_path):
    """vLLM servers (launched by the Slurm job) get a client with a weight-sync directory; without
    URLs the vLLM engine runs in-process; SGLang always syncs through the run directory."""
    from experiments.step import engine_configs

    urls = ("http://h:30000",)
    ro, _ = engine_configs(RunConfig(name="v", rollout_engine="vllm", rollout_precision="bf16", rollout_urls=urls),
                           tmp_path / "ckpt", tmp_path / "run")  # fmt: skip
    assert ro.name == "vllm" and ro.urls == urls and ro.weight_sync_dir == str(tmp_path / "run" / "weight_sync")
    ro, _ = engine_configs(RunConfig(name="v", rollout_engine="vllm", rollout_precision="bf16"), tmp_path, tmp_path)
    assert ro.urls == ()
    ro, _ = engine_configs(RunConfig(name="s", rollout_engine="sglang", preset="paper", rollout_urls=urls),
                           tmp_path / "ckpt", tmp_path / "run")  # fmt: skip
    assert ro.name == "sglang" and ro.weight_sync_dir == str(tmp_path / "run" / "weight_sync")


def test_config_json_of_an_older_version_with_sglang_urls_still_loads(tmp_path):
    """`rollout_urls` was written as `sglang_urls` by older versions: both readers map it."""
    from r3 import rundir

    old = RunConfig(name="old", rollout_engine="vllm").to_dict()
    old.pop("rollout_urls")
    old["sglang_urls"] = ["http://h:30000"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert rundir.read_config(tmp_path, RunConfig).config.rollout_urls == ("http://h:30000",)
    assert RunConfig.load(tmp_path / "config.json").rollout_urls == ("http://h:30000",)


@pytest.mark.parametrize("replay", [False, True])
def test_fp32_cell_at_temperature_07_has_no_mismatch(micro_zoo, tmp_path, replay):
    """An fp32 rollout against the fp32 trainer at T = 0.7: the trainer scores at the sampler's
    temperature, so k3 KL stays at the fp32 floor at every step (at temperature 1 scoring it was 2.9e-3)."""
    cfg = _cfg(micro_zoo, f"t07-{replay}", global_steps=2, rollout_precision="fp32", temperature=0.7, replay=replay)
    run_cell(cfg, tmp_path / "t07", progress=False, reward_fn=parity_reward)
    lines = rundir.read_jsonl(tmp_path / "t07" / "metrics.jsonl")
    assert [r["step"] for r in lines] == [1, 2]
    for r in lines:
        assert r["mismatch/k3_kl"] < 1e-6, r
