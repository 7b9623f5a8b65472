"""Failures of experiments.distributed's driver/follower protocol end every rank within a bounded time,
with the cause on rank 0 (its log and the run directory's FAILED marker): 2 ranks started as srun
starts tasks, the control group's timeout 20 s and the collectives' 5 s (production: hours and 30 min,
experiments.distributed.Timeouts). Each scenario is described in failure_worker.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dist_helpers import spawn_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # ~10-20 s each: two interpreters importing torch
WORKER = Path(__file__).with_name("failure_worker.py")
TIMEOUTS = {"R3_CONTROL_TIMEOUT_S": "20", "R3_COLLECTIVE_TIMEOUT_S": "5"}
BOUND_S = 90.0  # startup (~5-10 s per rank on 2 shared cores) + the timeouts above, with margin


def _run(tmp_path: Path, scenario: str, **kw) -> tuple[list[int | None], list[str], dict | None]:
    codes, outs, elapsed = spawn_ranks(2, WORKER, scenario, str(tmp_path / "run"), timeout=BOUND_S, env=TIMEOUTS, **kw)
    assert elapsed < BOUND_S, (
        f"{scenario}: ranks still running after {BOUND_S} s (exit codes {codes})\n" + outs[0][-3000:]
    )
    failed = tmp_path / "run" / "FAILED"
    return codes, outs, json.loads(failed.read_text()) if failed.exists() else None


def test_follower_that_cannot_receive_a_call_stops_the_run_with_its_cause(tmp_path):
    codes, outs, failed = _run(tmp_path, "recv_fails")
    assert codes == [1, 0]  # the driver raises; the follower is told to stop and returns
    cause = "train_engine.compute_logprobs ran on no rank: rank(s) could not receive it: 1: ModuleNotFoundError"
    assert cause in outs[0] and "only_on_rank_0" in outs[0]
    assert failed is not None and cause in failed["error"]
    assert "rank 1: returned" in outs[1]


def test_driver_systemexit_mid_call_stops_the_followers(tmp_path):
    codes, outs, failed = _run(tmp_path, "driver_exit")
    assert codes == [255, 0]  # SystemExit(-1) on the driver; the follower's collective timed out, it returns
    assert "driver: SystemExit: -1; stopping the followers" in outs[0]
    assert "rank 0: raised SystemExit" in outs[0] and "rank 1: returned" in outs[1]
    assert failed is None  # a requeue is no failure (slurm.job resumes the run)


def test_follower_that_stops_answering_fails_the_run_within_the_timeouts(tmp_path):
    codes, outs, failed = _run(tmp_path, "follower_hangs", kill_on_bad_exit=True)
    assert codes[0] == 1  # then srun --kill-on-bad-exit (slurm.submit) ends the hung follower
    cause = "train_engine.compute_logprobs: the followers did not report back"
    assert cause in outs[0] and failed is not None and cause in failed["error"]


def test_follower_that_dies_fails_the_run_with_the_call_named(tmp_path):
    codes, outs, failed = _run(tmp_path, "follower_dies")
    assert codes == [1, 7]
    cause = "train_engine.compute_logprobs: the followers did not report back"
    assert cause in outs[0] and "a follower died or hangs" in outs[0]
    assert failed is not None and cause in failed["error"]


def test_driver_that_dies_ends_the_followers(tmp_path):
    codes, outs, failed = _run(tmp_path, "driver_dies")
    assert codes[0] == 9 and codes[1] == 1  # the follower's wait for the next call fails
    assert "rank 1: raised" in outs[1]
