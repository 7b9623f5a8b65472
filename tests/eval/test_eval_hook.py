"""eval.hook.evaluate_step: the run directory's eval.jsonl and eval/step_<N>.jsonl."""

from __future__ import annotations

import json

import pytest
from eval_test_helpers import FakeEngine, char_tokenizer

from eval import benchmarks
from eval.grader import make_pool
from eval.hook import evaluate_step

ROWS = [{"id": f"h{i}", "problem": f"{i}+{i}", "answer": str(2 * i)} for i in range(1, 6)]


@pytest.fixture(scope="module", autouse=True)
def toy_benchmark():
    benchmarks.register("toy_hook", lambda: ROWS)


def test_evaluate_step_writes_run_format(tmp_path):
    tok = char_tokenizer()  # no chat template: the default template is "plain"
    engine = FakeEngine(tok, {r["problem"]: (r["answer"], 1) for r in ROWS})
    with make_pool(workers=1) as pool:
        kw = dict(
            run_dir=tmp_path, n_samples=2, temperature=1.0, max_new_tokens=32, seed=0, grader_pool=pool, progress=False
        )
        line0 = evaluate_step(engine, tok, ["toy_hook"], step=0, max_problems=4, **kw)
        line5 = evaluate_step(engine, tok, ["toy_hook"], step=5, max_problems=4, **kw)
        calls = engine.calls
        again = evaluate_step(engine, tok, ["toy_hook"], step=5, max_problems=4, **kw)
    assert engine.calls == calls and again == line5  # a step already in eval.jsonl is not redone
    lines = [json.loads(x) for x in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 5]
    for x in lines:
        assert {"step", "time", "scores", "pass", "avg", "n_samples", "template"} <= set(x)
        assert x["scores"] == {"toy_hook": 0.5} and x["pass"] == {"toy_hook": 1.0} and x["avg"] == 0.5
        assert x["n_samples"] == 2 and x["template"] == "plain"
    assert line0["problems"] == {"toy_hook": 4}
    recs = (tmp_path / "eval" / "step_5.jsonl").read_text().splitlines()
    assert len(recs) == 8
    assert json.loads(recs[0])["seed"] == 5  # seed + step


def test_torn_eval_jsonl_line_is_dropped(tmp_path):
    tok = char_tokenizer()
    engine = FakeEngine(tok, {r["problem"]: (r["answer"], 1) for r in ROWS})
    (tmp_path / "eval.jsonl").write_text('{"step": 0, "avg": 0.1}\n{"step": 5, "sco')
    line = evaluate_step(
        engine,
        tok,
        ["toy_hook"],
        step=5,
        run_dir=tmp_path,
        n_samples=1,
        temperature=1.0,
        max_new_tokens=32,
        max_problems=2,
        seed=0,
        grader_workers=1,
        progress=False,
    )
    lines = [json.loads(x) for x in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 5] and lines[1] == line


def test_chat_tokenizer_defaults_to_qwen_math_template(tmp_path):
    tok = char_tokenizer(chat=True)
    engine = FakeEngine(tok, {r["problem"]: (r["answer"], 1) for r in ROWS})
    line = evaluate_step(
        engine,
        tok,
        ["toy_hook"],
        step=0,
        run_dir=tmp_path,
        n_samples=1,
        temperature=1.0,
        max_new_tokens=32,
        max_problems=1,
        seed=0,
        grader_workers=1,
        progress=False,
    )
    assert line["template"] == "qwen-math-boxed" and line["avg"] == 1.0
