"""The check after an SGLang weight sync (issue 14): every server's teacher-forced logprobs of a fixed
probe vs a reference of the synced weights. Against a test double of an SGLang server that computes
with a real tiny Qwen3-MoE loaded from the synced directory (tests/r3/sglang_test_double.py): a server
that loads every tensor passes; one that skips the expert tensors (still reporting success and the new
version) stops the sync with SyncCheckError. Both references are exercised: the engine's own fp32
transformers forward of the synced state dict (small models) and the trainer's forward
(`train_engine_reference`, what a 30B run uses)."""

from __future__ import annotations

import json

import pytest
import torch
from sglang_test_double import ModelServer

from r3.engines.base import SamplingParams
from r3.engines.sglang import (
    SGLangError,
    SGLangRolloutConfig,
    SGLangRolloutEngine,
    SyncCheckError,
    train_engine_reference,
)

FP32_ATOL = 1e-3
"""The double computes in fp32, so its bound is the fp32 one (r3.engines.vllm.config: a correct fp32
engine is 2e-6 from the reference); a real bf16 server gets _DEFAULT_SYNC_ATOL["bf16"]."""


@pytest.fixture(scope="module")
def checkpoints(micro_zoo):
    """The served checkpoint (the micro zoo's pretrained Base) and the trainer's policy (its SFT model:
    experts moved by training, as after many RL steps)."""
    return micro_zoo / "base", micro_zoo / "sft"


def _engine(url, base, tmp_path, **kw):
    return SGLangRolloutEngine(
        [url], weight_sync_dir=tmp_path / "sync", base_model_path=base, sync_tolerance=FP32_ATOL, **kw
    )


def _new_state_dict(new):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(new), dtype=torch.float32).state_dict()


@pytest.mark.parametrize("reference", ["fp32-transformers", "train-engine"])
def test_a_server_that_skips_the_experts_is_caught(checkpoints, tmp_path, reference):
    base, new = checkpoints
    ref = None
    if reference == "train-engine":
        from r3.engines.registry import build_train_engine, train_config

        trainer = build_train_engine(train_config("hf", model_path=str(new), lr=1e-6))
        sd, ref = trainer.rollout_state_dict(), train_engine_reference(trainer)
    else:
        sd = _new_state_dict(new)
    # a server that loads everything: the check passes with fp32-level agreement
    double = ModelServer(base)
    with double as url:
        eng = _engine(url, base, tmp_path / "ok", sync_reference=ref)
        eng.sync_weights(sd)
        assert double.probes == 1 and double.loaded[-1]["skipped"] == 0
        assert eng.last_sync_check["probe_median_abs_diff"] < 1e-4
        assert len(eng.generate([[3, 4, 5]], SamplingParams(max_new_tokens=1))) == 1  # version 1 served
    # a server whose loader skips the expert tensors: same success answer, same version, old experts
    double = ModelServer(base, skip_experts=True)
    with double as url:
        eng = _engine(url, base, tmp_path / "skip", sync_reference=ref)
        with pytest.raises(SyncCheckError, match=r"does not compute with the new weights") as e:
            eng.sync_weights(sd)
        cfg = double.model.config
        assert double.loaded[-1]["skipped"] == cfg.num_hidden_layers * cfg.num_experts * 3  # gate, up, down
        msg = str(e.value)
        assert "expected median <= 0.001" in msg and "skipped tensors" in msg and "v000001" in msg
        med = float(msg.split(" nats per token")[0].rsplit(" ", 1)[1])
        assert med > 10 * FP32_ATOL, med  # far outside the tolerance, not a borderline call


def test_no_reference_for_a_large_model_warns_once_and_does_not_check(checkpoints, tmp_path):
    base, new = checkpoints
    double = ModelServer(base, skip_experts=True)
    with double as url:
        eng = _engine(url, base, tmp_path, reference_max_params=1000)  # "too large" for a driver forward
        sd = _new_state_dict(new)
        with pytest.warns(UserWarning, match="NOT verified.*set_sync_reference"):
            eng.sync_weights(sd)
        assert eng.last_sync_check == {} and double.probes == 0


def test_config_turns_the_check_on_with_the_precision_tolerance(checkpoints):
    base, _ = checkpoints
    cfg = SGLangRolloutConfig(urls=("http://h:1",), model_path=str(base))
    assert SGLangRolloutEngine.from_config(cfg).sync_tolerance == 0.25
    fp8 = SGLangRolloutConfig(urls=("http://h:1",), model_path=str(base), precision="fp8")
    assert SGLangRolloutEngine.from_config(fp8).sync_tolerance == 0.5
    off = SGLangRolloutConfig(urls=("http://h:1",), model_path=str(base), verify_sync=False)
    assert SGLangRolloutEngine.from_config(off).sync_tolerance is None
    with pytest.raises(ValueError, match="sync_atol must be > 0"):
        SGLangRolloutConfig(urls=("http://h:1",), model_path=str(base), sync_atol=0)


def test_probe_request_and_malformed_answers(checkpoints):
    base, _ = checkpoints
    eng = SGLangRolloutEngine(["http://h:1"], base_model_path=base)
    probe = eng.probe()
    vocab = json.loads((base / "config.json").read_text())["vocab_size"]
    assert len(probe) == 48 and max(probe) < vocab  # below the served model's vocabulary
    body = eng.probe_body(probe)
    assert body["logprob_start_len"] == 0 and body["return_logprob"] is True
    assert body["sampling_params"]["max_new_tokens"] == 1 and body["input_ids"] == [probe]
    good = [{"meta_info": {"input_token_logprobs": [[None, probe[0], None]] + [[-1.0, t, None] for t in probe[1:]]}}]
    assert torch.equal(eng.parse_probe(probe, good, url="u"), torch.full((47,), -1.0))
    with pytest.raises(SGLangError, match="returned None input_token_logprobs for a 48-token probe"):
        eng.parse_probe(probe, [{"meta_info": {}}], url="u")
    shifted = [{"meta_info": {"input_token_logprobs": good[0]["meta_info"]["input_token_logprobs"][1:]}}]
    with pytest.raises(SGLangError, match="returned 47 input_token_logprobs"):
        eng.parse_probe(probe, shifted, url="u")
