"""The synthetic task: arithmetic, determinism, splits, tokenizer, grading by the project's grader."""

from __future__ import annotations

import pytest

from experiments import task


@pytest.mark.parametrize(
    "operands, ops, value, cot",
    [
        ([76, 6, 2, 1], ["+", "*", "-"], 87, "6*2=12.76+12=88.88-1=87."),  # the example
        ([3, 4, 5], ["*", "*"], 60, "3*4=12.12*5=60."),
        ([2, 30], ["-"], -28, "2-30=-28."),
        ([5, 2, 3, 4], ["*", "-", "*"], -2, "5*2=10.3*4=12.10-12=-2."),
    ],
)
def test_solve_products_first_then_left_to_right(operands, ops, value, cot):
    v, sol = task.solve(operands, ops)
    assert v == value
    assert sol == cot + f"\\boxed{{{value}}}"
    expr = str(operands[0]) + "".join(f"{o}{x}" for o, x in zip(ops, operands[1:]))
    assert eval(expr) == value  # Python's precedence agrees


def test_problems_are_deterministic_and_consistent():
    a = [task.make_problem(3, i, 2) for i in range(50)]
    b = [task.make_problem(3, i, 2) for i in range(50)]
    assert a == b
    assert a != [task.make_problem(4, i, 2) for i in range(50)]
    for p in a:
        assert eval(p.problem) == int(p.answer)
        assert p.solution.endswith(f"\\boxed{{{p.answer}}}")
        assert 2 <= sum(p.problem.count(c) for c in "+-*") + 1 <= 4


def test_train_stream_skips_heldout_and_resumes_from_position():
    held = {p.problem for p in task.heldout_problems(512, difficulty=1)}
    s = task.TrainStream(seed=0, difficulty=1)  # difficulty 1: a small space, collisions happen
    first = s.take(300)
    assert not held & {p.problem for p in first}
    pos = s.position
    assert pos > 300  # some held-out expressions were skipped
    nxt = s.take(5)
    again = task.TrainStream(seed=0, difficulty=1, position=pos).take(5)
    assert nxt == again


@pytest.mark.parametrize("seed", range(5))
def test_training_never_sees_the_evaluated_problems_for_any_seed(seed):
    """The run loop evaluates benchmark `synthetic`; the training
    stream of every run seed must avoid all of it (it used to avoid the held-out set of its own
    seed only, so seeds 1 and 2 trained on 82 and 59 evaluated problems over 3,840 prompts)."""
    from eval import benchmarks

    task.register_benchmark(difficulty=2)
    evaluated = {r["problem"] for r in benchmarks.load("synthetic")}
    assert len(evaluated) > 400
    trained = {p.problem for p in task.TrainStream(seed=seed, difficulty=2).take(3840)}
    assert not trained & evaluated


def test_bad_difficulty_says_what_is_allowed():
    with pytest.raises(ValueError, match=r"difficulty must be one of \[1, 2, 3, 4, 5\], got 9"):
        task.make_problem(0, 0, 9)


def test_tokenizer_round_trip_and_boxed_token():
    tok = task.build_tokenizer()
    p = task.make_problem(0, 7, 2)
    text = task.format_prompt(p.problem) + p.solution
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert ids.count(tok.convert_tokens_to_ids(task.BOXED)) == 1
    assert tok.unk_token_id not in ids


def test_solutions_grade_correct_with_the_project_grader():
    from eval.grader import grade

    for p in task.heldout_problems(20):
        assert grade(p.solution, p.answer)
        assert not grade(p.solution.replace(f"{{{p.answer}}}", f"{{{int(p.answer) + 1}}}"), p.answer)


def test_heldout_rows_register_as_benchmark():
    from eval import benchmarks

    task.register_benchmark(n=16, difficulty=2)
    rows = benchmarks.load("synthetic")
    assert len(rows) == 16 and rows[0]["problem"] == task.heldout_problems(1)[0].problem


def test_rewritten_chains_reach_the_same_value_and_keep_their_steps():
    """From task.REWRITE_FROM on, each step is followed by the remaining expression; the value and
    the bare steps are those of the plain chain, and the project's grader accepts the solution."""
    from eval.grader import grade

    v, sol = task.solve([12, 34, 5, 7], ["+", "-", "*"], rewrite=True)
    assert v == 12 + 34 - 5 * 7
    assert sol == "5*7=35.12+34-35\n12+34=46.46-35\n46-35=11.\\boxed{11}"
    assert task.solution_steps(sol) == ["5*7=35.", "12+34=46.", "46-35=11."]
    lengths = []
    for i in range(200):
        p = task.make_problem(0, i, task.REWRITE_FROM)
        plain = task.solve(*_parse(p.problem))
        assert p.answer == str(plain[0]) and task.solution_steps(p.solution) == task.solution_steps(plain[1])
        assert grade(p.solution, p.answer)
        lengths.append(len(task.build_tokenizer()(p.solution, add_special_tokens=False)["input_ids"]))
    assert 40 <= min(lengths) and max(lengths) <= 230 and 95 <= sum(lengths) / len(lengths) <= 130


def _parse(expr: str) -> tuple[list[int], list[str]]:
    import re

    parts = re.findall(r"\d+|[+\-*]", expr)
    return [int(x) for x in parts[::2]], parts[1::2]


def test_direct_solution_is_the_boxed_answer_alone():
    from eval.grader import grade

    p = task.make_problem(0, 0, 5)
    assert task.direct_solution(p) == f"\\boxed{{{p.answer}}}" and grade(task.direct_solution(p), p.answer)
