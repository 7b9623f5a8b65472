"""bench_trl's --model: a run's checkpoint (weights, no tokenizer) made into a model directory."""

import pytest

from benchmarks.bench_trl import checkpoint_with_tokenizer


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
