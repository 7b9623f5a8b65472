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

INIT_TIMEOUT_S = 300.0
"""A worker initializer (e.g. imports and cache warm-up) that runs longer than this is a bug."""
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


def _worker_main(conn: Connection, fn: Callable[[Any], Any], timeout_s: float,
                 initializer: Callable[[], None] | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    if initializer is not None:  # before the first item, outside its time limit
        initializer()
    conn.send((-1, "ready", None))
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
    def __init__(self, ctx, fn, timeout_s: float, initializer):
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child, fn, timeout_s, initializer), daemon=True)
        self.proc.start()
        child.close()  # the parent keeps only its end, so a dead child reads as EOF
        self.ready = False  # set by the worker's "ready" message, after its initializer
        self.init_deadline = time.monotonic() + INIT_TIMEOUT_S
        self.queue: collections.deque[int] = collections.deque()  # indices sent, in order
        self.deadline: float | None = None  # hard deadline of queue[0] once it runs

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()


class WorkerPool:
    """A persistent pool of worker processes applying `fn` with a per-item timeout.

    `workers=0` runs inline in the calling thread (which must be the main thread, for SIGALRM);
    it has the soft timeout only (no hard kill). `initializer()` runs once in each worker before
    its first item, outside the time limit (warm caches, so a cold start is not a timeout). Reuse one pool across calls: starting workers
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
        initializer: Callable[[], None] | None = None,
        prefetch: int = 2,
    ):
        if workers < 0:
            raise ValueError(f"workers must be >= 0 (0 = inline), got {workers}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s}")
        if on_error not in ("raise", "none"):
            raise ValueError(f"on_error must be 'raise' or 'none', got {on_error!r}")
        self.fn, self.workers, self.timeout_s, self.grace_s = fn, workers, float(timeout_s), float(grace_s)
        self.on_error = on_error
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {prefetch}")
        # Items queued per worker: 2 hides the parent round trip (which costs a scheduler slice
        # on a loaded machine). Items and replies must stay small (pipe buffers are ~64 KB).
        self.prefetch = prefetch
        self.initializer = initializer  # run once per worker (and before inline use), untimed
        self._initialized_inline = False
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
        return _Worker(self._ctx, self.fn, self.timeout_s, self.initializer)

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
        if self.initializer is not None and not self._initialized_inline:
            self.initializer()
            self._initialized_inline = True
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
        pending = collections.deque(range(len(items)))
        remaining = len(items)
        limit = self.timeout_s + self.grace_s

        def settle(w: _Worker, outcome: Outcome) -> None:
            nonlocal remaining
            results[w.queue.popleft()] = outcome
            remaining -= 1
            self.stats["items"] += 1
            bar.update(1)
            # The worker starts its next queued item as soon as it has replied.
            w.deadline = time.monotonic() + limit if (w.ready and w.queue) else None

        def replace(w: _Worker) -> None:
            pending.extendleft(reversed(w.queue))  # items queued behind the lost one go back first
            w.kill()
            self._pool[self._pool.index(w)] = self._spawn()

        def lost(w: _Worker, outcome: Outcome, stat: str) -> None:
            if not w.ready:
                w.kill()
                raise RuntimeError(f"a worker process died during its initializer (exit code "
                                   f"{w.proc.exitcode}); see its traceback on stderr")
            self.stats[stat] += 1
            settle(w, outcome)
            replace(w)

        while remaining:
            now = time.monotonic()
            for w in self._pool:  # keep `prefetch` items queued per worker: no idle round trip
                while len(w.queue) < self.prefetch and pending:
                    idx = pending.popleft()
                    w.conn.send((idx, items[idx]))
                    w.queue.append(idx)
                    if w.ready and len(w.queue) == 1:
                        w.deadline = now + limit
            busy = [w for w in self._pool if w.queue]
            deadlines = [w.deadline if w.ready else w.init_deadline for w in busy]
            handles = [w.conn for w in busy] + [w.proc.sentinel for w in busy]
            ready = set(wait(handles, timeout=max(0.0, min(deadlines) - time.monotonic())))
            for w in busy:
                if w.conn in ready:
                    try:
                        idx, status, payload = w.conn.recv()
                    except (EOFError, OSError):  # died mid-item
                        lost(w, (None, False), "crashes")
                        continue
                    if status == "ready":
                        w.ready = True
                        w.deadline = time.monotonic() + limit
                        continue
                    if idx != w.queue[0]:  # pragma: no cover - a protocol bug, not an input problem
                        raise RuntimeError(f"worker replied for item {idx}, expected {w.queue[0]}")
                    if status == "ok":
                        settle(w, (payload, False))
                    elif status == "timeout":
                        self.stats["timeouts"] += 1
                        settle(w, (None, True))
                    else:
                        settle(w, self._record_error(idx, payload))
                elif w.proc.sentinel in ready:  # exited without replying
                    lost(w, (None, False), "crashes")
                elif not w.ready and time.monotonic() >= w.init_deadline:
                    w.kill()
                    raise RuntimeError(f"a worker's initializer did not finish in {INIT_TIMEOUT_S} s")
                elif w.ready and time.monotonic() >= w.deadline:  # stuck where SIGALRM cannot reach
                    self.stats["hard_kills"] += 1
                    lost(w, (None, True), "timeouts")
        return results  # type: ignore[return-value]


def map_in_workers(
    fn: Callable[[Any], Any],
    items: Sequence[Any],
    *,
    workers: int,
    timeout_s: float,
    on_error: OnError = "raise",
    progress: bool | str = False,
    initializer: Callable[[], None] | None = None,
) -> list[Outcome]:
    """One-shot `WorkerPool(fn, ...).map(items)`: [(result | None, timed_out)] in item order.

    fn must be picklable (a module-level function) when the start method is not fork.
    """
    with WorkerPool(fn, workers=min(workers, max(1, len(items))) if workers else 0,
                    timeout_s=timeout_s, on_error=on_error, initializer=initializer) as pool:
        return pool.map(items, progress=progress)
