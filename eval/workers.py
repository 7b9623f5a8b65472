"""Run a picklable function over items in worker processes, each item under a SIGALRM timeout.

Why processes: math-verify (and sympy under it) can take unbounded time on a pathological
expression, and its own timeouts use `signal.alarm`, which only works in a process's main
thread (math_verify/utils.py `timeout`; `parse`/`verify` raise ValueError "signal only works in
main thread" elsewhere). So every item runs in the main thread of a worker process with a
per-item SIGALRM alarm. SIGALRM interrupts Python bytecode only: a computation stuck inside C
(a huge integer power, say) cannot be interrupted, so the parent also keeps a hard deadline
(timeout + grace) and SIGKILLs a worker that overruns it, then starts a fresh one. A worker that
dies (segfault, os._exit, OOM kill) is replaced too. No item can hang or kill the batch.

Outcome per item: `(result, timed_out)`; `(None, True)` for a timeout (soft or hard), and
`(None, False)` for a worker crash (counted in `WorkerPool.stats["crashes"]`). An exception
raised by `fn` itself is re-raised in the parent (`on_error="raise"`, default: a bug should be
loud) or turned into `(None, False)` (`on_error="none"`, counted in stats["errors"]).
"""

from __future__ import annotations

import collections
import logging
import multiprocessing as mp
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any, Literal

from tqdm.auto import tqdm

OnError = Literal["raise", "none"]
Outcome = tuple[Any, bool]

DEFAULT_GRACE_S = 2.0
"""Extra wall time past the SIGALRM timeout before the parent SIGKILLs a worker: long enough for
a handled alarm to unwind and report, short enough that a C-level hang costs little."""


class ItemTimeout(BaseException):
    """Raised by the SIGALRM handler. A BaseException (like math_verify's TimeoutException) so
    library code's `except Exception:` blocks cannot swallow it."""


class WorkerError(RuntimeError):
    """fn raised in a worker; carries the remote traceback."""


def call_with_alarm(fn: Callable[[Any], Any], item: Any, timeout_s: float) -> Any:
    """fn(item) in the calling (main) thread, interrupted by SIGALRM after timeout_s seconds.

    Raises ItemTimeout on timeout; ValueError (from `signal.signal`) outside the main thread.
    """
    def _on_alarm(signum, frame):  # noqa: ARG001
        raise ItemTimeout(f"item exceeded {timeout_s} s")

    old = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)  # float seconds, unlike signal.alarm
    try:
        return fn(item)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _worker_main(conn: Connection, fn: Callable[[Any], Any], timeout_s: float) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        idx, item = msg
        try:
            reply = (idx, "ok", call_with_alarm(fn, item, timeout_s))
        except ItemTimeout:
            reply = (idx, "timeout", None)
        except Exception:  # noqa: BLE001  reported to the parent, which decides
            reply = (idx, "error", traceback.format_exc())
        try:
            conn.send(reply)
        except Exception:  # noqa: BLE001  e.g. an unpicklable result
            conn.send((idx, "error", traceback.format_exc()))


class _Worker:
    def __init__(self, ctx, fn, timeout_s: float):
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child, fn, timeout_s), daemon=True)
        self.proc.start()
        child.close()  # the parent keeps only its end, so a dead child reads as EOF
        self.job: tuple[int, float] | None = None  # (item index, hard deadline)

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()


class WorkerPool:
    """A persistent pool of worker processes applying `fn` with a per-item timeout.

    `workers=0` runs inline in the calling thread (which must be the main thread, for SIGALRM);
    it has the soft timeout only (no hard kill). Reuse one pool across calls: starting workers
    costs a fork each. Use as a context manager or call `close()`.
    """

    def __init__(
        self,
        fn: Callable[[Any], Any],
        *,
        workers: int,
        timeout_s: float,
        grace_s: float = DEFAULT_GRACE_S,
        on_error: OnError = "raise",
        start_method: str | None = None,
    ):
        if workers < 0:
            raise ValueError(f"workers must be >= 0 (0 = inline), got {workers}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s}")
        if on_error not in ("raise", "none"):
            raise ValueError(f"on_error must be 'raise' or 'none', got {on_error!r}")
        self.fn, self.workers, self.timeout_s, self.grace_s = fn, workers, float(timeout_s), float(grace_s)
        self.on_error = on_error
        # fork: workers inherit already-imported modules (math_verify/sympy take ~0.4 s to import),
        # and fn need not be importable by name. Other platforms fall back to spawn.
        if start_method is None:
            start_method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        self._ctx = mp.get_context(start_method)
        self._pool: list[_Worker] = []
        self.stats = {"items": 0, "timeouts": 0, "hard_kills": 0, "crashes": 0, "errors": 0}

    # --- lifecycle ------------------------------------------------------------------------
    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001  interpreter shutdown
            pass

    def close(self) -> None:
        for w in self._pool:
            try:
                w.conn.send(None)
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + 2.0
        for w in self._pool:
            w.proc.join(timeout=max(0.0, deadline - time.monotonic()))
            w.kill()
        self._pool = []

    def _spawn(self) -> _Worker:
        return _Worker(self._ctx, self.fn, self.timeout_s)

    # --- mapping --------------------------------------------------------------------------
    def map(self, items: Iterable[Any], *, progress: bool | str = False) -> list[Outcome]:
        """[(fn(item) | None, timed_out)] in item order."""
        items = list(items)
        bar = tqdm(total=len(items), desc=progress if isinstance(progress, str) else "items",
                   disable=not progress or not items, leave=False)
        try:
            if self.workers == 0:
                return self._map_inline(items, bar)
            try:
                return self._map_pool(items, bar)
            except BaseException:
                # An error or Ctrl-C mid-batch leaves workers holding stale items: drop them all
                # so the next map() starts clean.
                for w in self._pool:
                    w.kill()
                self._pool = []
                raise
        finally:
            bar.close()

    def _record_error(self, idx: int, tb: str) -> Outcome:
        self.stats["errors"] += 1
        if self.on_error == "raise":
            raise WorkerError(f"fn raised on item {idx}:\n{tb}")
        return (None, False)

    def _map_inline(self, items: list[Any], bar) -> list[Outcome]:
        if threading.current_thread() is not threading.main_thread():
            raise ValueError(
                "workers=0 runs items inline under SIGALRM, which only works in the main thread; "
                f"called from thread {threading.current_thread().name!r}. Pass workers >= 1."
            )
        out: list[Outcome] = []
        for idx, item in enumerate(items):
            try:
                out.append((call_with_alarm(self.fn, item, self.timeout_s), False))
            except ItemTimeout:
                self.stats["timeouts"] += 1
                out.append((None, True))
            except Exception:  # noqa: BLE001
                out.append(self._record_error(idx, traceback.format_exc()))
            self.stats["items"] += 1
            bar.update(1)
        return out

    def _map_pool(self, items: list[Any], bar) -> list[Outcome]:
        while len(self._pool) < self.workers:
            self._pool.append(self._spawn())
        results: list[Outcome | None] = [None] * len(items)
        pending = collections.deque(enumerate(items))
        remaining = len(items)

        def finish(w: _Worker, outcome: Outcome) -> None:
            nonlocal remaining
            results[w.job[0]] = outcome
            w.job = None
            remaining -= 1
            self.stats["items"] += 1
            bar.update(1)

        def replace(w: _Worker) -> None:
            w.kill()
            self._pool[self._pool.index(w)] = self._spawn()

        while remaining:
            for w in self._pool:
                if w.job is None and pending:
                    idx, item = pending.popleft()
                    w.conn.send((idx, item))
                    w.job = (idx, time.monotonic() + self.timeout_s + self.grace_s)
            busy = [w for w in self._pool if w.job is not None]
            next_deadline = min(w.job[1] for w in busy)
            handles = [w.conn for w in busy] + [w.proc.sentinel for w in busy]
            ready = set(wait(handles, timeout=max(0.0, next_deadline - time.monotonic())))
            for w in busy:
                if w.conn in ready:
                    try:
                        idx, status, payload = w.conn.recv()
                    except (EOFError, OSError):  # died mid-item
                        self.stats["crashes"] += 1
                        finish(w, (None, False))
                        replace(w)
                        continue
                    if status == "ok":
                        finish(w, (payload, False))
                    elif status == "timeout":
                        self.stats["timeouts"] += 1
                        finish(w, (None, True))
                    else:
                        finish(w, self._record_error(idx, payload))
                elif w.proc.sentinel in ready:  # exited without replying
                    self.stats["crashes"] += 1
                    finish(w, (None, False))
                    replace(w)
                elif time.monotonic() >= w.job[1]:  # stuck where SIGALRM cannot reach
                    self.stats["timeouts"] += 1
                    self.stats["hard_kills"] += 1
                    finish(w, (None, True))
                    replace(w)
        return results  # type: ignore[return-value]


def map_in_workers(
    fn: Callable[[Any], Any],
    items: Sequence[Any],
    *,
    workers: int,
    timeout_s: float,
    on_error: OnError = "raise",
    progress: bool | str = False,
) -> list[Outcome]:
    """One-shot `WorkerPool(fn, ...).map(items)`: [(result | None, timed_out)] in item order.

    fn must be picklable (a module-level function) when the start method is not fork.
    """
    with WorkerPool(fn, workers=min(workers, max(1, len(items))) if workers else 0,
                    timeout_s=timeout_s, on_error=on_error) as pool:
        return pool.map(items, progress=progress)
