"""eval.run: avg@K / pass@K, per-sample records, resumption, the CLI over a fake SGLang server."""

from __future__ import annotations

import json

import pytest
from eval_test_helpers import FakeEngine, char_tokenizer

from eval import benchmarks
from eval.run import evaluate, pass_at_k, summarize

PROBLEMS = [
    ("p0", "What is 2+3?", "5", 0),
    ("p1", "What is 4+4?", "8", 1),
    ("p2", "What is 9-2?", "7", 2),
    ("p3", "What is 3*3?", "9", 4),
]
K = 4


@pytest.fixture(scope="module", autouse=True)
def toy_benchmark():
    benchmarks.register("toy_run", lambda: [{"id": i, "problem": p, "answer": a} for i, p, a, _ in PROBLEMS])
    benchmarks.register("toy_run2", lambda: [{"id": "q0", "problem": "What is 1+6?", "answer": "7"}])


def _engine(tok, **kw):
    answers = {p: (a, c) for _, p, a, c in PROBLEMS}
    answers["What is 1+6?"] = ("7", 1)
    return FakeEngine(tok, answers, **kw)


def test_pass_at_k_golden():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)  # c/n
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(4, 0, 4) == 0.0
    assert pass_at_k(4, 1, 4) == 1.0
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # 1 - C(7,5)/C(10,5)
    with pytest.raises(ValueError, match="pass@k needs"):
        pass_at_k(3, 4, 1)


def test_avg_and_pass_at_k(tmp_path):
    tok = char_tokenizer()
    s = evaluate(
        _engine(tok),
        tok,
        ["toy_run", "toy_run2"],
        samples_path=tmp_path / "s.jsonl",
        n_samples=K,
        temperature=1.0,
        max_new_tokens=64,
        template="plain",
        batch_size=64,
        grader_workers=1,
        progress=False,
    )
    # n_correct per problem = 0, 1, 2, 4 of K=4: avg@4 = (0 + .25 + .5 + 1) / 4, pass@4 = 3/4
    assert s["scores"]["toy_run"] == pytest.approx(0.4375)
    assert s["pass"]["toy_run"] == pytest.approx(0.75)
    assert s["scores"]["toy_run2"] == pytest.approx(0.25) and s["pass"]["toy_run2"] == 1.0
    assert s["avg"] == pytest.approx((0.4375 + 0.25) / 2)
    assert s["n_samples"] == K and s["template"] == "plain" and s["problems"] == {"toy_run": 4, "toy_run2": 1}
    recs = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(recs) == 4 * K + K
    r = recs[0]
    assert set(r) >= {
        "benchmark",
        "problem_id",
        "sample",
        "response",
        "extracted",
        "gold",
        "correct",
        "timeout",
        "prompt_tokens",
        "response_tokens",
        "finish_reason",
        "template",
        "temperature",
    }
    assert r["extracted"] in ("51", "5") and r["timeout"] is False and r["response_tokens"] > 0


def test_resume_skips_done_samples_and_matches_uninterrupted(tmp_path):
    tok = char_tokenizer()
    kw = dict(
        n_samples=K,
        temperature=1.0,
        max_new_tokens=64,
        template="plain",
        batch_size=4,
        seed=3,
        grader_workers=1,
        progress=False,
    )
    full = evaluate(_engine(tok), tok, ["toy_run"], samples_path=tmp_path / "a.jsonl", **kw)
    crashing = _engine(tok, fail_after=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        evaluate(crashing, tok, ["toy_run"], samples_path=tmp_path / "b.jsonl", **kw)
    assert len((tmp_path / "b.jsonl").read_text().splitlines()) == 8  # two batches of 4 recorded
    with open(tmp_path / "b.jsonl", "a") as f:
        f.write('{"benchmark": "toy_run", "problem_id": "p2", "sam')  # a line torn by the kill
    resumed_engine = _engine(tok)
    resumed = evaluate(resumed_engine, tok, ["toy_run"], samples_path=tmp_path / "b.jsonl", **kw)
    assert resumed_engine.prompts_seen == 8  # only the two missing batches were generated
    assert resumed == full
    key = lambda r: (r["problem_id"], r["sample"])  # noqa: E731
    a = sorted((json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()), key=key)
    b = sorted((json.loads(x) for x in (tmp_path / "b.jsonl").read_text().splitlines()), key=key)
    assert a == b  # same seeds per batch: the resumed run's samples are the uninterrupted run's
    again = _engine(tok)
    evaluate(again, tok, ["toy_run"], samples_path=tmp_path / "b.jsonl", **kw)
    assert again.calls == 0  # complete: nothing regenerated


def test_settings_change_is_refused(tmp_path):
    tok = char_tokenizer()
    kw = dict(n_samples=1, max_new_tokens=64, template="plain", grader_workers=1, progress=False)
    evaluate(_engine(tok), tok, ["toy_run2"], samples_path=tmp_path / "s.jsonl", temperature=1.0, **kw)
    with pytest.raises(ValueError, match="use another output directory"):
        evaluate(_engine(tok), tok, ["toy_run2"], samples_path=tmp_path / "s.jsonl", temperature=0.6, **kw)


def test_summarize_checks_sample_counts():
    recs = [
        {
            "benchmark": "b",
            "problem_id": "x",
            "correct": True,
            "timeout": False,
            "extracted": "1",
            "response_tokens": 3,
            "finish_reason": "stop",
        }
    ]
    with pytest.raises(ValueError, match="expected 2 samples per problem"):
        summarize(recs, benchmarks=["b"], n_samples=2, template="plain")
    with pytest.raises(ValueError, match="no records for benchmark 'c'"):
        summarize(recs, benchmarks=["c"], n_samples=1, template="plain")
