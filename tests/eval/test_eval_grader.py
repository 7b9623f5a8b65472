"""Answer extraction and grading: tables of cases, timeouts, the worker pool's failure modes."""

from __future__ import annotations

import faulthandler
import os
import signal
import threading
import time

import pytest

from eval.grader import GradeResult, extract_answer, grade, grade_detailed, grade_many, make_pool
from eval.workers import WorkerError, WorkerPool, map_in_workers, partition

# (response, extracted answer): the documented rules of eval.grader, in order.
EXTRACTION = [
    ("so the answer is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("first \\boxed{1}, then corrected: \\boxed{2}", "2"),  # several boxes: the last
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),  # nested braces
    ("\\boxed{4} and a truncated \\boxed{\\frac{1", "4"),  # an unclosed last box is skipped
    ("\\boxed{\\frac{1", None),  # truncated, nothing else
    ("\\fbox{8}", "8"),
    ("hence \\boxed 7.", "7"),  # brace-less form
    ("\\boxed{  }", None),  # empty box and no other rule
    ("Final Answer: The final answer is $\\frac{3}{4}$. I hope it is correct.", "\\frac{3}{4}"),
    ("The answer is 12.", "12"),
    ("Answer: $-5$", "-5"),
    ("I am not sure how to solve this.", None),
    ("The value 42 appears in step 3 but nothing is boxed.", None),  # no last-number fallback
    ("", None),
]


@pytest.mark.parametrize("response,expected", EXTRACTION)
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


# (response, gold, correct)
GRADING = [
    # fractions and \dfrac
    ("\\boxed{\\frac{1}{2}}", "\\frac12", True),
    ("\\boxed{0.5}", "\\frac{1}{2}", True),
    ("\\boxed{\\dfrac{14}{3}}", "\\frac{14}{3}", True),
    ("\\boxed{\\frac{14}{4}}", "\\frac{14}{3}", False),
    # degrees
    ("\\boxed{30^\\circ}", "30", True),
    ("\\boxed{30}", "30^{\\circ}", True),
    ("\\boxed{31^\\circ}", "30^\\circ", False),
    # intervals
    ("\\boxed{[2, 5)}", "[2,5)", True),
    ("\\boxed{(2,5]}", "[2,5)", False),
    ("\\boxed{(-\\infty, 3)}", "(-\\infty,3)", True),
    # multiple answers (one box, compared as a set)
    ("\\boxed{3, 2}", "2,3", True),
    ("\\boxed{2}", "2, 3", False),
    ("\\boxed{2} and \\boxed{3}", "2, 3", False),  # documented: only the last box counts
    # units and \text{}
    ("\\boxed{5\\text{ cm}}", "5", True),
    ("\\boxed{5}", "5 \\text{ inches}", True),
    ("\\boxed{\\text{(C)}}", "C", True),
    ("\\boxed{\\text{Devon}}", "\\text{Devon}", True),
    ("\\boxed{\\text{east}}", "\\text{west}", False),
    # thousands separators
    ("\\boxed{1,000}", "1000", True),
    ("\\boxed{1{,}000}", "1000", True),
    ("\\boxed{1\\,000}", "1000", True),
    ("\\boxed{10\\,080}", "10080", True),
    # negative numbers
    ("\\boxed{-3}", "-3", True),
    ("\\boxed{3}", "-3", False),
    ("\\boxed{-\\frac{1}{2}}", "-0.5", True),
    # expressions, percentages, money, equations
    ("\\boxed{1+x^2}", "x^2+1", True),
    ("\\boxed{10\\%}", "10", True),
    ("\\boxed{\\$18.90}", "18.90", True),
    ("\\boxed{x=3}", "3", True),
    ("\\boxed{\\frac{\\sqrt2}{2}}", "\\sqrt{2}/2", True),
    # no answer, several boxes, fallbacks
    ("I give up.", "3", False),
    ("\\boxed{4} wait no \\boxed{5}", "5", True),
    ("\\boxed{5} wait no \\boxed{4}", "5", False),
    ("The final answer is $7$. I hope it is correct.", "7", True),
    # the embedded task's format
    ("6*2=12.76+12=88.88-1=87.\\boxed{87}", "87", True),
    ("6*2=12.76+12=88.88-1=86.\\boxed{86}", "87", False),
]


@pytest.fixture(scope="module")
def pool():
    with make_pool(workers=2, timeout_s=5) as p:
        yield p


def test_grading_table_inline():
    results = grade_detailed([(r, g) for r, g, _ in GRADING], workers=0)
    wrong = [(r, g, want) for (r, g, want), got in zip(GRADING, results) if got.correct != want]
    assert not wrong, wrong
    assert not any(x.timed_out for x in results)


def test_grading_table_pool_matches_inline(pool):
    pairs = [(r, g) for r, g, _ in GRADING]
    assert grade_many(pairs, pool=pool) == [want for *_, want in GRADING]
    assert grade_many(pairs, workers=2) == [want for *_, want in GRADING]


def test_grade_single_and_from_a_thread():
    assert grade("so \\boxed{\\frac{2}{4}}", "\\frac12") is True
    assert grade("so \\boxed{3}", "4") is False
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("v", grade("\\boxed{0.25}", "\\frac14")))
    t.start()
    t.join(60)
    assert out == {"v": True}  # SIGALRM cannot run in a thread: grade() used a worker process


def test_grade_result_fields():
    r = grade_detailed([("x \\boxed{2}", "2"), ("none", "2")], workers=0)
    assert r == [GradeResult(correct=True, extracted="2"), GradeResult(correct=False, extracted=None)]


def test_bad_pairs_are_refused():
    with pytest.raises(ValueError, match="gold answer must be a non-empty string"):
        grade_many([("\\boxed{1}", "")], workers=0)
    with pytest.raises(ValueError, match=r"pair 0 must be \(response, gold\)"):
        grade_many(["\\boxed{1}"], workers=0)


def test_pathological_input_times_out_and_batch_survives(pool):
    pairs = [("\\boxed{2}", "2"), ("\\boxed{9^{9^{9^{9}}}}", "5"), ("\\boxed{3}", "3")]
    t0 = time.monotonic()
    res = grade_detailed(pairs, workers=2, timeout_s=1.0)
    assert time.monotonic() - t0 < 30
    assert [r.correct for r in res] == [True, False, True]
    assert [r.timed_out for r in res] == [False, True, False]
    assert res[1].extracted == "9^{9^{9^{9}}}"


def test_repeated_pairs_graded_once(pool):
    pairs = [("\\boxed{2}", "2"), ("so \\boxed{2}", "2"), ("\\boxed{3}", "2"), ("\\boxed{2}", "2"), ("none", "2")]
    before = pool.stats["items"]
    res = grade_detailed(pairs, pool=pool)
    assert [r.correct for r in res] == [True, True, False, True, False]
    assert [r.extracted for r in res] == ["2", "2", "3", "2", None]
    assert pool.stats["items"] - before == 2  # ("2", "2") and ("3", "2")


def test_pathological_input_inline_times_out():
    res = grade_detailed([("\\boxed{9^{9^{9^{9}}}}", "5"), ("\\boxed{1}", "1")], workers=0, timeout_s=1.0)
    assert [(r.correct, r.timed_out) for r in res] == [(False, True), (True, False)]


# --- the generic worker pool -----------------------------------------------------------------


def _square(x):
    return x * x


def _crash_on_3(x):
    if x == 3:
        os._exit(7)  # the worker process dies without replying
    return x


def _segfault_on_2(x):
    if x == 2:
        faulthandler.disable()  # pytest's faulthandler would print this expected crash
        os.kill(os.getpid(), signal.SIGSEGV)
    return x


def _stuck_in_c_on_1(x):
    if x == 1:  # SIGALRM blocked: the soft timeout cannot fire, only the parent's hard kill helps
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(60)
    return x


def _slow_python(x):
    if x == 0:
        while True:
            pass
    return x


def _raise_on_2(x):
    if x == 2:
        raise KeyError("boom")
    return x


def test_map_in_workers_order_and_results():
    assert map_in_workers(_square, list(range(20)), workers=2, timeout_s=5) == [(i * i, False) for i in range(20)]
    assert map_in_workers(_square, [], workers=2, timeout_s=5) == []


def test_worker_crash_is_survived():
    with WorkerPool(_crash_on_3, workers=2, timeout_s=5) as pool:
        out = pool.map(list(range(6)))
        assert out == [(0, False), (1, False), (2, False), (None, False), (4, False), (5, False)]
        assert pool.stats["crashes"] == 1
        assert pool.map([10, 11]) == [(10, False), (11, False)]  # the pool was repaired
    out = map_in_workers(_segfault_on_2, [1, 2, 3], workers=1, timeout_s=5)
    assert out == [(1, False), (None, False), (3, False)]


def test_hard_kill_when_sigalrm_cannot_fire():
    t0 = time.monotonic()
    with WorkerPool(_stuck_in_c_on_1, workers=2, timeout_s=0.5, grace_s=0.5) as pool:
        out = pool.map([0, 1, 2, 3])
        assert pool.stats["hard_kills"] == 1
    assert out == [(0, False), (None, True), (2, False), (3, False)]
    assert time.monotonic() - t0 < 20


def test_soft_timeout_in_python_loop():
    with WorkerPool(_slow_python, workers=1, timeout_s=0.5) as pool:
        assert pool.map([0, 1]) == [(None, True), (1, False)]
        assert pool.stats["hard_kills"] == 0 and pool.stats["timeouts"] == 1


def test_errors_raise_or_become_none():
    with pytest.raises(WorkerError, match="KeyError"):
        map_in_workers(_raise_on_2, [1, 2, 3], workers=2, timeout_s=5)
    out = map_in_workers(_raise_on_2, [1, 2, 3], workers=2, timeout_s=5, on_error="none")
    assert out == [(1, False), (None, False), (3, False)]
    with WorkerPool(_raise_on_2, workers=2, timeout_s=5) as pool:
        with pytest.raises(WorkerError):
            pool.map([2, 1, 3])
        assert pool.map([1, 3]) == [(1, False), (3, False)]  # no stale replies after the error


def _pid(x):
    return os.getpid()


def _stuck_in_c_on_17(x):
    _stuck_in_c_on_1(x - 16)
    return x


def _length(s):
    return len(s)


def test_items_are_sent_in_chunks():
    with WorkerPool(_square, workers=2, timeout_s=5) as pool:
        assert pool.map(range(2000)) == [(i * i, False) for i in range(2000)]
        assert pool.stats["messages"] < 100  # not one message per item


def test_hard_kill_mid_chunk_requeues_the_rest():
    with WorkerPool(_stuck_in_c_on_17, workers=2, timeout_s=0.5, grace_s=0.5) as pool:
        out = pool.map(range(60))
        assert pool.stats["hard_kills"] == 1 and pool.stats["crashes"] == 0
        assert pool.stats["messages"] < 60  # item 17 was one of a chunk
    assert out == [(None, True) if i == 17 else (i, False) for i in range(60)]
    out = map_in_workers(_crash_on_3, list(range(60)), workers=2, timeout_s=5)
    assert out == [(None, False) if i == 3 else (i, False) for i in range(60)]


def test_items_larger_than_the_pipe_budget():
    items = ["x" * (100_000 + i) for i in range(12)]  # each over PIPE_BUDGET_BYTES: one per message
    assert map_in_workers(_length, items, workers=2, timeout_s=5) == [(len(s), False) for s in items]


def test_pool_start_and_pids():
    with WorkerPool(_pid, workers=2, timeout_s=5) as pool:
        pool.start()
        assert len(set(pool.pids)) == 2 and os.getpid() not in pool.pids
        assert {pid for pid, _ in pool.map(range(50))} <= set(pool.pids)


def test_partition_keeps_shared_keys_together():
    # a chain (item i parses keys i//2 and (i+1)//2, like the benchmark's right/wrong pairs): two
    # contiguous halves, one key shared across the cut
    chain = partition([(i // 2, (i + 1) // 2) for i in range(20)], 2)
    assert chain == [list(range(10)), list(range(10, 20))]
    # groups by gold answer, interleaved in the input: each group in one run, runs balanced
    runs = partition([(f"gold{i % 3}",) for i in range(12)], 3)
    assert sorted(runs) == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]]
    # no shared keys: balanced counts, every item once
    runs = partition([(i,) for i in range(7)], 2)
    assert sorted(len(r) for r in runs) == [3, 4] and sorted(sum(runs, [])) == list(range(7))
    assert partition([], 2) == [[], []]
    with pytest.raises(ValueError, match="k must be >= 1"):
        partition([(1,)], 0)


def test_affinity_pool_results_in_order():
    keys = [(f"g{i % 5}",) for i in range(40)]
    out = map_in_workers(_square, list(range(40)), workers=2, timeout_s=5, affinity=lambda i: keys[i])
    assert out == [(i * i, False) for i in range(40)]


def test_inline_needs_main_thread():
    err = {}

    def run():
        try:
            map_in_workers(_square, [1], workers=0, timeout_s=1)
        except ValueError as e:
            err["e"] = str(e)

    t = threading.Thread(target=run)
    t.start()
    t.join(10)
    assert "main thread" in err["e"] and "workers >= 1" in err["e"]


def test_pool_argument_validation():
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        WorkerPool(_square, workers=1, timeout_s=0)
    with pytest.raises(ValueError, match="workers must be >= 0"):
        WorkerPool(_square, workers=-1, timeout_s=1)


def test_workers_die_with_a_parent_killed_by_sigterm():
    """A grading parent killed by SIGTERM (Slurm preemption, Ctrl-\\) must not leave its forked
    workers orphaned and blocked in recv() (regression: they survived before PR_SET_PDEATHSIG)."""
    import os
    import signal
    import subprocess
    import sys
    import textwrap
    import time
    from pathlib import Path

    code = textwrap.dedent("""
        import time
        from eval.grader import grade_detailed, make_pool
        pool = make_pool(workers=2)
        pool.__enter__()
        grade_detailed([("\\\\boxed{1}", "1")] * 4, pool=pool)
        print(" ".join(map(str, pool.pids)), flush=True)
        time.sleep(120)
    """)
    root = Path(__file__).resolve().parents[2]
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=root)
    workers = [int(x) for x in p.stdout.readline().split() if int(x) != p.pid]
    assert len(workers) == 2, workers
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=30)

    def alive(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.time() + 10
    while any(alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.1)
    left = [w for w in workers if alive(w)]
    for w in left:
        os.kill(w, signal.SIGKILL)
    assert not left, f"grader workers {left} outlived their SIGTERM-killed parent"
