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
`dist.broadcast`, the rest, including the loss function's closure, by cloudpickle). After each call
all ranks exchange an error flag: a failure on any rank raises on the driver (and, being a
barrier, `save` is complete on every rank before rank 0 marks the checkpoint COMPLETE).

With no WORLD_SIZE, or WORLD_SIZE=1, this is experiments.run.run_cell unchanged.
Departures: a failure inside a collective on one rank only (e.g. out of memory) leaves the others
waiting until torch.distributed's timeout; Slurm then ends the step.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
from pathlib import Path

import torch
import torch.distributed as dist

from experiments import run as run_mod
from experiments import rundir
from experiments.config import RunConfig

FORWARDED = ("compute_logprobs", "train_step", "rollout_state_dict", "save", "load")
"""TrainEngine methods the driver forwards to the followers (r3.engines.base.TrainEngine)."""


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _init_process_group() -> None:
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, init_method="env://")


def _wire_device() -> torch.device:
    """Where broadcast tensors travel: the rank's GPU under NCCL, else the CPU (gloo)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --- messages: a picklable structure whose tensors travel by dist.broadcast -------------------------
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
    dist.broadcast_object_list([buf.getvalue(), meta], src=0)
    wire = _wire_device()
    for t in tensors:
        dist.broadcast(t.contiguous().to(wire), src=0)


def _recv():
    header = [None, None]
    dist.broadcast_object_list(header, src=0)
    payload, meta = header
    wire = _wire_device()
    tensors = []
    for shape, dtype, dev in meta:
        t = torch.empty(shape, dtype=dtype, device=wire)
        dist.broadcast(t, src=0)
        tensors.append(t if dev == wire.type else t.to(dev if dev != "cuda" else wire))

    class _Unpickler(pickle.Unpickler):
        def persistent_load(self, pid):
            return tensors[pid]

    return _Unpickler(io.BytesIO(payload)).load()


def _exchange_errors(err: BaseException | None) -> list[str | None]:
    msgs: list = [None] * dist.get_world_size()
    dist.all_gather_object(msgs, None if err is None else f"{type(err).__name__}: {err}"[:2000])
    return msgs


class DriverEngine:
    """Rank 0's train engine: each TrainEngine call is broadcast to the followers, then run here."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.is_moe = engine.is_moe
        self.train_step_sees_whole_batch = getattr(engine, "train_step_sees_whole_batch", False)
        self.closed = False

    def _call(self, name: str, *args, **kwargs):
        if self.closed:
            raise RuntimeError(f"DriverEngine.{name} after close(): the followers have stopped")
        _send((name, args, kwargs))
        out, err = None, None
        try:
            out = getattr(self.engine, name)(*args, **kwargs)
        except Exception as e:  # reported to everyone below, then raised here
            err = e
        msgs = _exchange_errors(err)
        if err is not None:
            raise err
        bad = [(rank, m) for rank, m in enumerate(msgs) if m]
        if bad:
            raise RuntimeError(f"train_engine.{name} failed on rank(s) {', '.join(f'{r}: {m}' for r, m in bad)}")
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
    """A follower rank: run every call the driver broadcasts until it closes. Returns the number of calls."""
    calls = 0
    while (msg := _recv()) is not None:
        name, args, kwargs = msg
        if name not in FORWARDED:
            raise RuntimeError(f"the driver sent {name!r}, not a forwarded TrainEngine method {FORWARDED}")
        err = None
        try:
            getattr(engine, name)(*args, **kwargs)
        except Exception as e:  # the driver raises it (and may go on, e.g. to an older checkpoint)
            err = e
        _exchange_errors(err)
        calls += 1
    return calls


def run_cell(cfg: RunConfig, run_dir: Path, *, progress: bool = True, reward_fn=None) -> dict | None:
    """experiments.run.run_cell on the driver (rank 0), `follow` on the other ranks. Returns the
    manifest on rank 0, None elsewhere; one process without a world: experiments.run.run_cell."""
    from r3.engines.registry import build_train_engine

    if _world() <= 1:
        return run_mod.run_cell(cfg, run_dir, progress=progress, reward_fn=reward_fn)
    if cfg.train_engine != "megatron":
        raise ValueError(
            f"cell {cfg.name!r}: {_world()} training ranks, but train_engine={cfg.train_engine!r} runs in "
            "one process (no gradient exchange); use train_engine='megatron' or one task"
        )
    _init_process_group()
    run_dir = Path(run_dir)
    rank = dist.get_rank()
    # the driver resolves the model (building the embedded zoo when missing) before anyone reads it
    msg = [None]
    if rank == 0:
        done = rundir.read_manifest(run_dir)
        msg = [{"manifest": done} if done is not None else {"model_dir": str(run_mod.resolve_model_dir(cfg))}]
    dist.broadcast_object_list(msg, src=0)
    if "manifest" in msg[0]:
        return msg[0]["manifest"] if rank == 0 else None
    _, tr_cfg = run_mod.engine_configs(cfg, Path(msg[0]["model_dir"]), run_dir)
    engine = build_train_engine(tr_cfg)  # collective: megatron's parallel state on every rank
    if rank != 0:
        follow(engine)
        _shutdown()
        return None
    driver = DriverEngine(engine)
    try:
        out = run_mod.run_cell(cfg, run_dir, progress=progress, reward_fn=reward_fn, train_engine=driver)
    finally:
        driver.close()
    _shutdown()
    return out


def _shutdown() -> None:
    """Leave torch.distributed cleanly at the end of a run (a gloo process that exits without it may
    abort when its peer closes first); megatron's groups go with it."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


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
