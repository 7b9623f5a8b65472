"""bench_trl: --model (a run's checkpoint made into a model directory) and --doses (loops of ours at named doses)."""

import pytest

from benchmarks.bench_trl import checkpoint_with_tokenizer, our_rollouts
from experiments.doses import NOISE_STDS


def test_checkpoint_gets_the_zoo_tokenizer_and_drops_the_optimizer_state(tmp_path):
    ckpt, sft = tmp_path / "ckpt", tmp_path / "sft"
    ckpt.mkdir()
    sft.mkdir()
    for name in ("config.json", "model.safetensors", "train_state.pt"):
        (ckpt / name).write_text(name)
    for name in ("tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        (sft / name).write_text("sft " + name)
    out = checkpoint_with_tokenizer(ckpt, sft, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
    ]  # fmt: skip
    assert (out / "model.safetensors").read_text() == "model.safetensors"  # the checkpoint's weights


def test_a_directory_without_config_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="expected a model directory with config.json"):
        checkpoint_with_tokenizer(tmp_path, tmp_path, tmp_path / "out")


def test_named_doses_add_loops_with_the_ladders_fields():
    rollouts = our_rollouts(["hf", "vllm"], "bf16", ["router-10x"], "study")
    assert list(rollouts) == ["hf rollout", "vllm rollout", "hf, router-10x"]
    assert rollouts["vllm rollout"] == {"rollout_engine": "vllm", "rollout_precision": "bf16"}
    dosed = rollouts["hf, router-10x"]
    assert (dosed["rollout_precision"], dosed["rollout_router_noise"]) == ("fp32", NOISE_STDS["study"]["router-10x"])


def test_a_dose_not_in_the_zoos_ladder_is_refused_with_the_choices():
    with pytest.raises(SystemExit, match=r"router-30x: not in the tiny zoo's ladder; expected some of .*router-10x"):
        our_rollouts(["hf"], "bf16", ["router-30x"], "tiny")
