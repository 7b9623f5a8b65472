"""The check after an SGLang weight sync: every server's teacher-forced logprobs of a fixed
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
from r3.engines.sglang import SGLangRolloutConfig
from r3.engines.sglang.engine import SGLangError, SGLangRolloutEngine
from r3.engines.sync_check import SyncCheckError, train_engine_reference

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


def _one_small_step(trainer, vocab: int) -> None:
    """One AdamW step at the trainer's lr on a batch that routes tokens to every expert."""
    from r3.engines.base import TrainBatch

    ids_BS = torch.randint(3, vocab, (8, 24), generator=torch.Generator().manual_seed(0))
    mask_BT = torch.ones(8, 23)

    def loss_fn(logp_BT, entropy_BT, rows):
        return -(logp_BT * mask_BT[rows]).sum() / mask_BT.sum(), {}

    batch = TrainBatch(input_ids_BS=ids_BS, attention_mask_BS=torch.ones_like(ids_BS), loss_mask_BT=mask_BT)
    trainer.train_step(batch, loss_fn)


def test_skipped_experts_after_one_small_step_pass_the_probe_but_not_the_readback(checkpoints, tmp_path):
    """The served policy is the trainer's; one lr-1e-5 step later the test double's loader skips the
    experts: the probe against the trainer's forward passes (about 1e-4 nats), the readback of
    /get_weights_by_name names the experts as still holding the previous sync's values."""
    from r3.engines.registry import build_train_engine, train_config

    _, policy = checkpoints
    trainer = build_train_engine(train_config("hf", model_path=str(policy), lr=1e-5))
    double = ModelServer(policy, skip_experts=True)
    with double as url:
        eng = _engine(
            url,
            policy,
            tmp_path,
            sync_reference=train_engine_reference(trainer),
            readback_rows=1,
            readback_dtype=torch.float32,  # the double computes in fp32
        )
        eng.sync_weights(trainer.rollout_state_dict())  # the served weights: skipping the experts changes nothing
        assert eng.last_sync_check["readback_tensors"] > 0 and double.reads == eng.last_sync_check["readback_tensors"]
        _one_small_step(trainer, json.loads((policy / "config.json").read_text())["vocab_size"])
        sd = trainer.rollout_state_dict()
        with pytest.raises(SyncCheckError) as e:
            eng.sync_weights(sd)
        msg = str(e.value)
        layers = double.model.config.num_hidden_layers
        assert f"experts {layers * 4 * 3}/{layers * 4 * 3}" in msg and "attention 0/" in msg, msg
        assert "after weight sync v2" in msg and "still hold exactly the previous sync's values" in msg
        assert "got " in msg and "expected " in msg and "Likely cause: the reload skipped the routed experts" in msg
        # the probe alone passes the stale server (median |dlogp| far below even fp32's bound)
        probe = eng.check_sync(sd)
        assert probe["probe_median_abs_diff"] < FP32_ATOL, probe
        # and without the readback the sync passes
        eng.readback = None
        eng.sync_weights(sd)


def test_a_server_that_did_not_take_the_version_is_caught(checkpoints, tmp_path):
    base, new = checkpoints
    with ModelServer(base, version_lag=True) as url:
        eng = _engine(url, base, tmp_path, readback_rows=1, readback_dtype=torch.float32)
        with pytest.raises(SyncCheckError, match=r"reports weight version '0', expected 1. Likely cause: the reload"):
            eng.sync_weights(_new_state_dict(new))


def test_a_server_that_cannot_read_back_says_how_to_proceed(checkpoints, tmp_path):
    base, new = checkpoints

    def transport(method, url, body, timeout_s):
        if url.endswith("/update_weights_from_disk"):
            return 200, {"success": True}
        if url.endswith("/get_weights_by_name"):
            return 400, {"error": "Get parameter by name failed"}
        return 404, {"detail": "Not Found"}

    eng = SGLangRolloutEngine(
        ["http://sglang:1"], weight_sync_dir=tmp_path, base_model_path=base, transport=transport, readback_rows=1
    )
    with pytest.raises(SyncCheckError, match=r"cannot read back .*verify_readback=False"):
        eng.sync_weights(_new_state_dict(new))
    cfg = SGLangRolloutConfig(urls=("http://h:1",), model_path=str(base))
    assert SGLangRolloutEngine.from_config(cfg).readback.leading_rows == 1  # on by default
    with pytest.warns(UserWarning, match="fp8 .* readback .* is off"):
        fp8 = SGLangRolloutConfig(urls=("http://h:1",), model_path=str(base), precision="fp8")
    assert SGLangRolloutEngine.from_config(fp8).readback is None
