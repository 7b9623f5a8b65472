"""Run-directory states (r3.rundir) from files alone."""

from __future__ import annotations

import json
import os
import time

from r3.rundir import (
    FAILED,
    JOB_JSON,
    RUNNING,
    STALE_S,
    RunningMarker,
    RunState,
    run_status,
    static_status,
    write_json_atomic,
)


def _metrics(run_dir, steps, torn=False):
    run_dir.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps({"step": s, "time": 0.0}) + "\n" for s in steps)
    (run_dir / "metrics.jsonl").write_text(text + ('{"step": 9' if torn else ""))


def test_states_in_order(tmp_path):
    d = tmp_path / "cell"
    assert run_status(d).state == RunState.NOT_STARTED
    write_json_atomic(d / JOB_JSON, {"job_id": "12_3"})
    st = run_status(d)
    assert st.state == RunState.QUEUED and "12_3" in st.detail
    _metrics(d, [1, 2, 3], torn=True)
    st = run_status(d)
    assert st.state == RunState.INCOMPLETE and st.last_step == 3  # torn last line ignored
    write_json_atomic(d / RUNNING, {"host": "n1", "job_id": "12_3"})
    assert run_status(d).state == RunState.RUNNING
    assert run_status(d, now=time.time() + STALE_S + 1).state == RunState.INCOMPLETE  # dead job, stale heartbeat
    write_json_atomic(d / FAILED, {"error": "ValueError: boom"})
    st = run_status(d)
    assert st.state == RunState.FAILED and st.detail == "ValueError: boom"
    (d / "manifest.json").write_text(json.dumps({"steps": 3, "best_score": 0.5, "collapse_step": None}))
    st = run_status(d)
    assert (st.state, st.last_step, st.best_score) == (RunState.COMPLETE, 3, 0.5)
    (d / "manifest.json").write_text(json.dumps({"steps": 3, "best_score": 0.5, "collapse_step": 2}))
    assert run_status(d).state == RunState.COLLAPSED and run_status(d).collapse_step == 2


def test_running_collapse_from_eval_jsonl(tmp_path):
    d = tmp_path / "cell"
    _metrics(d, [1])
    write_json_atomic(d / RUNNING, {"host": "n1", "job_id": "1"})
    (d / "config.json").write_text(json.dumps({"collapse_frac": 0.5, "collapse_patience": 2}))
    rows = [(0, 0.5), (5, 0.6), (10, 0.2), (15, 0.1)]
    (d / "eval.jsonl").write_text("".join(json.dumps({"step": s, "avg": a}) + "\n" for s, a in rows))
    st = run_status(d)
    assert st.state == RunState.RUNNING and st.collapse_step == 10


def test_running_marker_heartbeat_and_cleanup(tmp_path, monkeypatch):
    import r3.rundir as state

    monkeypatch.setattr(state, "HEARTBEAT_S", 0.05)
    with RunningMarker(tmp_path, "7") as m:
        info = json.loads(m.path.read_text())
        assert info["job_id"] == "7" and info["pid"] == os.getpid()
        os.utime(m.path, (0, 0))
        time.sleep(0.3)
        assert m.path.stat().st_mtime > time.time() - 5  # touched again by the heartbeat
    assert not (tmp_path / RUNNING).exists()


def test_static_status(tmp_path):
    d = tmp_path / "static" / "fp8"
    assert static_status(d).state == RunState.NOT_STARTED
    d.mkdir(parents=True)
    (d / "static.json").write_text("{}")
    assert static_status(d).state == RunState.COMPLETE
