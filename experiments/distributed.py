"""One driver per run: rank 0 runs the RL loop, the other training ranks follow its train engine.

    python -m torch.distributed.run --nproc-per-node 2 -m experiments.distributed --config C.json --run-dir D
    (under Slurm, slurm.job calls `run_cell` below on every training task with RANK/WORLD_SIZE/... set)

Inputs: a RunConfig and a run directory, as experiments.run; the torch.distributed environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Outputs: the run directory, written by
rank 0 only (one metrics line per step, one eval file, one manifest); every rank writes its own
train-engine checkpoint file inside the checkpoint directory rank 0 creates.

Process model (DESIGN.md): rank 0 is the driver: rollout, grading, metrics, evaluation, every file
of the run directory; it calls experiments.run.run_cell with `DriverEngine`, a proxy of its train
engine. Every call the loop makes on the train engine (compute_logprobs, train_step,
rollout_state_dict, save, load) is first broadcast to the other ranks, which run the same call on
their engine (`follow`), so the collectives inside the engine (EP token gathers, DP gradient
all-reduce, row all-gathers) line up; the batch reaches them inside that broadcast (tensors by
`dist.broadcast` on the default group, the rest, including the loss function's closure, by
cloudpickle).

Control plane: call headers, a receive acknowledgement per call (a follower that cannot unpickle or
allocate a call says so before any rank enters its collectives) and an error exchange after each call
travel on a separate gloo group whose timeout (`Timeouts.control_s`, hours) outlasts the driver's
longest phase without a call (waiting for the servers, evaluation, rollout); the default group's
collectives wait `Timeouts.collective_s`. A failure on any rank, or a SystemExit on the driver
(submitit's requeue), is raised on the driver, which writes the FAILED marker (not for SystemExit)
and stops the followers; being a barrier, `save` is complete on every rank before rank 0 marks the
checkpoint COMPLETE. docs/cluster.md ("Timeouts and failures") lists each case and its bound.

With no WORLD_SIZE, or WORLD_SIZE=1, this is experiments.run.run_cell unchanged.
Departures: a follower that dies inside an NCCL collective is seen by the driver only through NCCL's
watchdog (after `collective_s`, which ends the process without a FAILED marker); srun's
--kill-on-bad-exit (slurm.submit) ends the step sooner.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import io
import json
import logging
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist

from experiments import run as run_mod
from experiments.config import RunConfig
from experiments.step import engine_configs
from r3 import rundir

log = logging.getLogger(__name__)
T = TypeVar("T")

FORWARDED = ("compute_logprobs", "train_step", "rollout_state_dict", "save", "load")
"""TrainEngine methods the driver forwards to the followers (r3.engines.base.TrainEngine)."""

CONTROL_TIMEOUT_ENV = "R3_CONTROL_TIMEOUT_S"
COLLECTIVE_TIMEOUT_ENV = "R3_COLLECTIVE_TIMEOUT_S"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Timeouts:
    """How long a rank waits for the others, in seconds (environment: R3_CONTROL_TIMEOUT_S,
    R3_COLLECTIVE_TIMEOUT_S; slurm.job exports them from its JobSpec)."""

    control_s: float = 4 * 3600.0
    """The control group (gloo): the rendezvous, a follower waiting for the driver's next call, the
    per-call acknowledgement and error exchange. Must exceed the driver's longest phase without a
    call: waiting for the rollout servers (slurm.job, 30 min by default), the step-0 evaluation and
    one step's rollout (paper scale: 1024 responses of up to 8192 tokens)."""
    collective_s: float = 1800.0
    """The default group (NCCL on GPU, gloo on CPU): one collective inside a train-engine call, where
    every rank runs the same work, so it waits only for the slowest rank's share. 30 min, as megatron's
    own groups (parallel_state.initialize_model_parallel, distributed_timeout_minutes=30)."""

    def __post_init__(self) -> None:
        if not (self.control_s > 0 and self.collective_s > 0):
            raise ValueError(f"timeouts must be > 0 s, got control {self.control_s}, collective {self.collective_s}")

    @classmethod
    def from_env(cls) -> Timeouts:
        kw = {}
        for field, key in (("control_s", CONTROL_TIMEOUT_ENV), ("collective_s", COLLECTIVE_TIMEOUT_ENV)):
            if os.environ.get(key):
                try:
                    kw[field] = float(os.environ[key])
                except ValueError:
                    raise ValueError(f"{key} must be a number of seconds, got {os.environ[key]!r}") from None
        return cls(**kw)

    def env(self) -> dict[str, str]:
        """The environment that makes `from_env` return these timeouts (slurm.job exports it)."""
        return {CONTROL_TIMEOUT_ENV: repr(self.control_s), COLLECTIVE_TIMEOUT_ENV: repr(self.collective_s)}


_CONTROL: dist.ProcessGroup | None = None
"""The gloo group of the driver's control messages (call headers, acknowledgements, error flags)."""


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _init_process_group(timeouts: Timeouts | None = None) -> None:
    """torch.distributed from the environment (env://), NCCL on GPU and gloo on CPU, plus the control
    group. The rendezvous waits `control_s` (a follower may arrive long before the driver, which first
    waits for the rollout servers); the default group's collectives wait `collective_s` (torch would
    give NCCL 10 min, gloo 30 min: distributed_c10d._get_default_timeout)."""
    t = timeouts or Timeouts.from_env()
    if not dist.is_initialized():
        from r3.engines.megatron.compat import require_cuda_if_asked, set_local_device

        cuda = require_cuda_if_asked()
        if cuda:
            set_local_device()  # before any allocation: else every rank of a node uses cuda:0
        store, rank, world = next(dist.rendezvous("env://", timeout=datetime.timedelta(seconds=t.control_s)))
        dist.init_process_group(
            backend="nccl" if cuda else "gloo",
            store=store,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=t.collective_s),
        )
    _control_group(t)


def _control_group(timeouts: Timeouts | None = None) -> dist.ProcessGroup:
    """The control group, created on first use (a collective: every rank reaches it in the same order,
    before the first message: `_init_process_group`, `DriverEngine()` and `follow()` call it)."""
    global _CONTROL
    if _CONTROL is None:
        t = timeouts or Timeouts.from_env()
        _CONTROL = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=t.control_s))
    return _CONTROL


def _wire_device() -> torch.device:
    """Where broadcast tensors travel: the rank's GPU under NCCL, else the CPU (gloo)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"[:2000]


def _gather_errors(err: BaseException | str | None) -> list[str | None]:
    """Every rank's error message (None: fine), over the control group."""
    msgs: list = [None] * dist.get_world_size()
    dist.all_gather_object(
        msgs, None if err is None else err if isinstance(err, str) else _describe(err), group=_CONTROL
    )
    return msgs


def _failed_ranks(msgs: list[str | None]) -> str:
    return ", ".join(f"{r}: {m}" for r, m in enumerate(msgs) if m)


class CallNotReceived(RuntimeError):
    """A follower could not receive a call (nothing ran on any rank)."""


# --- messages: a picklable structure whose tensors travel by dist.broadcast -------------------------
# Per message: the header (pickled structure + tensor shapes) on the control group; an acknowledgement
# exchange on the control group (a follower that cannot allocate the tensors or unpickle the structure
# says so here, and no rank enters the call's collectives); then the tensors on the default group.
def _send(obj) -> None:
    import cloudpickle

    tensors: list[torch.Tensor] = []

    class _Pickler(cloudpickle.Pickler):
        def persistent_id(self, o):
            if isinstance(o, torch.Tensor):
                tensors.append(o.detach())
                return len(tensors) - 1
            return None

    buf = io.BytesIO()
    _Pickler(buf).dump(obj)
    meta = [(tuple(t.shape), t.dtype, t.device.type) for t in tensors]
    dist.broadcast_object_list([buf.getvalue(), meta], src=0, group=_control_group())
    msgs = _gather_errors(None)
    if any(msgs):
        name = obj[0] if isinstance(obj, tuple) else "close"
        raise CallNotReceived(
            f"train_engine.{name} ran on no rank: rank(s) could not receive it: {_failed_ranks(msgs)}"
        )
    wire = _wire_device()
    for t in tensors:
        dist.broadcast(t.contiguous().to(wire), src=0)


_SKIP = object()
"""What `_recv` returns when some rank could not receive the message (no rank runs it)."""


def _recv():
    header = [None, None]
    dist.broadcast_object_list(header, src=0, group=_control_group())
    payload, meta = header
    wire = _wire_device()
    err, obj, pairs = None, None, []  # pairs: the received tensors in send order
    try:
        for shape, dtype, dev in meta:  # the final tensors, allocated before the unpickling, filled after it
            pairs.append(torch.empty(shape, dtype=dtype, device=wire if dev == wire.type else dev))

        class _Unpickler(pickle.Unpickler):
            def persistent_load(self, pid):
                return pairs[pid]

        obj = _Unpickler(io.BytesIO(payload)).load()
    except BaseException as e:  # reported on the control group; the driver raises it, naming this rank
        err = e
    if any(_gather_errors(err)):
        return _SKIP
    for final in pairs:  # a host tensor passes through one wire buffer of its own size, freed at once:
        if final.device == wire:  # the GPU holds at most the largest such tensor (the routing trace), not all
            dist.broadcast(final, src=0)
            continue
        buf = torch.empty(final.shape, dtype=final.dtype, device=wire)
        dist.broadcast(buf, src=0)
        final.copy_(buf)
        del buf
    return obj


class DriverEngine:
    """Rank 0's train engine: each TrainEngine call is broadcast to the followers, then run here."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.is_moe = engine.is_moe
        self.device = engine.device  # r3.engines.base.TrainEngine: where its results live on this rank
        self.train_step_sees_whole_batch = getattr(engine, "train_step_sees_whole_batch", False)
        self.closed = False
        _control_group()

    def _call(self, name: str, *args, **kwargs):
        if self.closed:
            raise RuntimeError(f"DriverEngine.{name} after close(): the followers have stopped")
        _send((name, args, kwargs))
        out, err = None, None
        try:
            out = getattr(self.engine, name)(*args, **kwargs)
        except BaseException as e:  # also SystemExit (submitit's requeue): the followers must hear of it
            err = e
        try:
            msgs = _gather_errors(err)
        except Exception as e:  # gloo: a follower's connection closed, or it sent nothing for control_s
            raise RuntimeError(
                f"train_engine.{name}: the followers did not report back ({_describe(e)}); a follower died or "
                "hangs (its own log has the cause); on this rank the call "
                + (f"raised {_describe(err)}" if err is not None else "succeeded")
            ) from (err or e)
        if err is not None:
            raise err
        if any(msgs):
            raise RuntimeError(f"train_engine.{name} failed on rank(s) {_failed_ranks(msgs)}")
        return out

    def compute_logprobs(self, *args, **kwargs):
        return self._call("compute_logprobs", *args, **kwargs)

    def train_step(self, *args, **kwargs):
        return self._call("train_step", *args, **kwargs)

    def rollout_state_dict(self):
        return self._call("rollout_state_dict")

    def save(self, path: str) -> None:
        self._call("save", path)

    def load(self, path: str) -> None:
        self._call("load", path)

    def close(self) -> None:
        """Tell the followers the run is over (idempotent)."""
        if not self.closed:
            self.closed = True
            _send(None)


def follow(engine) -> int:
    """A follower rank: run every call the driver broadcasts until it closes. Returns the number of calls.

    Raises when the control group fails: the driver died (gloo reports the closed connection) or sent
    nothing for `Timeouts.control_s`."""
    _control_group()
    calls = 0
    while (msg := _recv()) is not None:
        if msg is _SKIP:  # some rank could not receive it; the driver raises, then closes or goes on
            continue
        name, args, kwargs = msg
        err = None
        try:
            if name not in FORWARDED:
                raise RuntimeError(f"the driver sent {name!r}, not a forwarded TrainEngine method {FORWARDED}")
            getattr(engine, name)(*args, **kwargs)
        except BaseException as e:  # the driver raises it (and may go on, e.g. to an older checkpoint)
            err = e
        _gather_errors(err)
        if err is not None and not isinstance(err, Exception):  # KeyboardInterrupt, SystemExit: stop here
            raise err
        calls += 1
    return calls


def drive(run_dir: Path, engine, body: Callable[[DriverEngine], T]) -> T | None:
    """The driver/follower split of one run on an initialised world: rank 0 returns `body(DriverEngine(engine))`,
    the others follow its calls and return None.

    On rank 0 a failure writes the FAILED marker of `run_dir` (r3.rundir; slurm.job rewrites it
    with the job id) and the followers are told to stop; a SystemExit (submitit's requeue on
    preemption) stops them too but is no failure. Either way every rank leaves: followers return, the
    driver raises. When the followers cannot be told (one of them died), that error is logged and the
    first one raised."""
    if dist.get_rank() != 0:
        follow(engine)
        return None
    driver = DriverEngine(engine)
    try:
        out = body(driver)
    except BaseException as e:
        if isinstance(e, Exception):
            rundir.write_failed(run_dir, e, log=str(Path(run_dir) / rundir.LOG))
        log.error("driver: %s; stopping the followers", _describe(e))
        try:
            driver.close()
        except Exception as close_err:  # a follower is gone: nothing more to tell it
            log.error("driver: could not stop the followers: %s", _describe(close_err))
        raise
    driver.close()
    return out


def run_cell(cfg: RunConfig, run_dir: Path, *, progress: bool = True, reward_fn=None) -> dict | None:
    """experiments.run.run_cell on the driver (rank 0), `follow` on the other ranks. Returns the
    manifest on rank 0, None elsewhere; one process without a world: experiments.run.run_cell."""
    from r3.engines import registry
    from r3.engines.registry import build_train_engine

    if _world() <= 1:
        return run_mod.run_cell(cfg, run_dir, progress=progress, reward_fn=reward_fn)
    if not registry.multi_rank(cfg.train_engine):
        multi = [n for n in registry.train_engine_names() if registry.multi_rank(n)]
        raise ValueError(
            f"cell {cfg.name!r}: {_world()} training ranks, but train_engine={cfg.train_engine!r} runs in "
            f"one process (no gradient exchange); use a multi-rank train engine {multi} or one task"
        )
    _init_process_group()
    run_dir = Path(run_dir)
    rank = dist.get_rank()
    # the driver resolves the model (building the embedded zoo when missing) before anyone reads it;
    # on the control group, which waits as long as that may take, and a failure reaches the followers
    msg: list = [None]
    if rank == 0:
        try:
            done = rundir.read_manifest(run_dir)
            msg = [{"manifest": done} if done is not None else {"model_dir": str(run_mod.resolve_model_dir(cfg))}]
        except BaseException as e:
            dist.broadcast_object_list([{"error": _describe(e)}], src=0, group=_control_group())
            if isinstance(e, Exception):
                rundir.write_failed(run_dir, e)
            raise
    dist.broadcast_object_list(msg, src=0, group=_control_group())
    if "error" in msg[0]:
        raise RuntimeError(f"cell {cfg.name}: the driver (rank 0) failed before the train engine: {msg[0]['error']}")
    if "manifest" in msg[0]:
        _shutdown()
        return msg[0]["manifest"] if rank == 0 else None
    _, tr_cfg = engine_configs(cfg, Path(msg[0]["model_dir"]), run_dir)
    engine = build_train_engine(tr_cfg)  # collective: megatron's parallel state on every rank

    def body(driver: DriverEngine) -> dict:
        return run_mod.run_cell(cfg, run_dir, progress=progress, reward_fn=reward_fn, train_engine=driver)

    try:
        return drive(run_dir, engine, body)
    finally:
        _shutdown()  # also after a failure: a process leaving a live gloo group aborts at exit


def _shutdown() -> None:
    """Leave torch.distributed cleanly at the end of a run (a gloo process that exits without it may
    abort when its peer closes first); megatron's groups go with it."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    global _CONTROL
    if dist.is_initialized():
        dist.destroy_process_group()  # every group, the control group too
    _CONTROL = None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Run one RL cell on N training ranks (rank 0 drives).")
    ap.add_argument("--config", type=Path, required=True, help="a RunConfig JSON")
    ap.add_argument("--run-dir", type=Path, required=True)
    args = ap.parse_args(argv)
    out = run_cell(RunConfig.load(args.config), args.run_dir, progress=False)
    if out is not None:
        print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
