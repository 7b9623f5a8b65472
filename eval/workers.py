"""Run a picklable function over items in worker processes, each item under a SIGALRM timeout.

Why processes: math-verify (and sympy under it) can take unbounded time on a pathological
expression, and its own timeouts use `signal.alarm`, which only works in a process's main
thread (math_verify/utils.py `timeout`; `parse`/`verify` raise ValueError "signal only works in
main thread" elsewhere). So every item runs in the main thread of a worker process with a
per-item SIGALRM alarm. SIGALRM interrupts Python bytecode only: a computation stuck inside C
(a huge integer power, say) cannot be interrupted, so the parent also keeps a hard deadline
(timeout + grace) per item and SIGKILLs a worker that overruns it, then starts a fresh one. A
worker that dies (segfault, os._exit, OOM kill) is replaced too. No item can hang or kill the batch.

Dispatch: items go to workers in chunks (one message ~MESSAGE_S of work, not one per item),
each item still under its own alarm and answered by its own small reply, so the parent always
knows which item a worker is on. Items are first split into one share per worker (`partition`);
a worker takes chunks from the front of its share and, once it is empty, steals from the back
of the largest other share. Chunks shrink as the work runs out (at most 1/(2*workers) of what
is left: guided self-scheduling), so workers finish together. With `affinity`, items sharing
cache keys go to one worker's share: the grader keys a pair by its (extracted, gold) answer
strings, so each string's math-verify parse (~4 ms, lru_cached per process) is done by one
worker instead of by every worker (measured: the main CPU overhead of the pool before).

Outcome per item: `(result, timed_out)`; `(None, True)` for a timeout (soft or hard), and
`(None, False)` for a worker crash (counted in `WorkerPool.stats["crashes"]`). An exception
raised by `fn` itself is re-raised in the parent (`on_error="raise"`, default: a bug should be
loud) or turned into `(None, False)` (`on_error="none"`, counted in stats["errors"]).
"""

from __future__ import annotations

import collections
import gc
import itertools
import logging
import math
import multiprocessing as mp
import signal
import threading
import time
import traceback
from collections.abc import Callable, Hashable, Iterable, Sequence
from multiprocessing.connection import Connection, wait
from multiprocessing.reduction import ForkingPickler
from typing import Any, Literal

from tqdm.auto import tqdm

OnError = Literal["raise", "none"]
Outcome = tuple[Any, bool]

INIT_TIMEOUT_S = 300.0
"""A worker initializer (e.g. imports and cache warm-up) that runs longer than this is a bug."""
DEFAULT_GRACE_S = 2.0
"""Extra wall time past the SIGALRM timeout before the parent SIGKILLs a worker: long enough for
a handled alarm to unwind and report, short enough that a C-level hang costs little."""
MESSAGE_S = 0.05
"""Work per message, from the measured mean item time: amortises a message's pickling and
wake-ups (~0.1 ms) while keeping the unstealable work queued in a worker small."""
LOW_WATER_S = 0.02
"""A worker is sent its next chunk when less than this much work is queued in it: covers the
parent's wake-up latency (a scheduler slice on a loaded machine) so the worker never idles."""
PIPE_BUDGET_BYTES = 32 * 1024
"""Bytes of not-yet-finished messages the parent may leave queued to a busy worker. A send that
does not fit the socket buffer (Pipe(duplex=True) is an AF_UNIX socketpair: ~200 KB on Linux,
net.core.wmem_default) would block the parent until the worker reads, and a worker stuck in C
never reads: the parent could then not enforce any deadline. Staying well under it, and sending
a larger message only to an idle worker (blocked in recv), keeps every send non-blocking."""


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


def _die_with_parent() -> None:
    """Linux: ask the kernel to SIGKILL this worker when its parent dies (prctl(2),
    PR_SET_PDEATHSIG). Without it a parent killed by SIGTERM leaves its workers blocked in
    recv() forever, since forked siblings keep the pipe ends open. No-op elsewhere."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return


def _worker_main(
    conn: Connection, fn: Callable[[Any], Any], timeout_s: float, initializer: Callable[[], None] | None
) -> None:
    """Receive chunks [(idx, item)]; reply (idx, status, payload, seconds) once per item."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    # Slurm's preemption / time-limit signal (submitit listens for SIGUSR2) is the job's to
    # handle: a forked worker must not run the parent's inherited handler and requeue twice.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    _die_with_parent()
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    if initializer is not None:  # before the first item, outside its time limit
        initializer()
    conn.send((-1, "ready", None, 0.0))
    while True:
        try:
            chunk = conn.recv()
        except (EOFError, OSError):
            return
        if chunk is None:
            return
        for idx, item in chunk:
            t0 = time.perf_counter()
            try:
                reply = (idx, "ok", call_with_alarm(fn, item, timeout_s))
            except ItemTimeout:
                reply = (idx, "timeout", None)
            except Exception:  # noqa: BLE001  reported to the parent, which decides
                reply = (idx, "error", traceback.format_exc())
            dt = time.perf_counter() - t0
            try:
                conn.send((*reply, dt))
            except Exception:  # noqa: BLE001  e.g. an unpicklable result
                conn.send((idx, "error", traceback.format_exc(), dt))


def partition(keys: Sequence[Iterable[Hashable]], k: int) -> list[list[int]]:
    """Split items 0..n-1 into k runs (caller's order kept within each run) so that items
    sharing cache keys land in one run, with balanced loads.

    A streaming greedy partition (linear deterministic greedy, Stanton & Kliot, KDD 2012): item i
    goes to the run maximising shared keys * (1 - load / capacity), ties to the least loaded. An
    item's load is 1 plus 1 per key new to its run (a cache miss costs more than a hit);
    capacity = (items + distinct keys) / k, the load of a perfect split.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1 run, got {k}")
    sets = [set(ks) for ks in keys]
    capacity = max(1.0, (len(sets) + len(set().union(*sets))) / k)
    seen: list[set[Hashable]] = [set() for _ in range(k)]
    load = [0.0] * k
    runs: list[list[int]] = [[] for _ in range(k)]
    for i, ks in enumerate(sets):
        best = max(range(k), key=lambda s: (len(ks & seen[s]) * (1.0 - load[s] / capacity), -load[s]))
        runs[best].append(i)
        load[best] += 1 + len(ks - seen[best])
        seen[best] |= ks
    return runs


class _Worker:
    def __init__(self, ctx, fn, timeout_s: float, initializer):
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child, fn, timeout_s, initializer), daemon=True)
        # Children inherit the parent's heap copy-on-write; freezing it keeps their garbage
        # collector from writing to every inherited object (Python docs, gc.freeze).
        gc.freeze()
        try:
            self.proc.start()
        finally:
            gc.unfreeze()
        child.close()  # the parent keeps only its end, so a dead child reads as EOF
        self.ready = False  # set by the worker's "ready" message, after its initializer
        self.init_deadline = time.monotonic() + INIT_TIMEOUT_S
        self.queue: collections.deque[int] = collections.deque()  # indices sent, in run order
        self.msgs: collections.deque[list[int]] = collections.deque()  # [items left, bytes] per message
        self.msg_bytes = 0  # bytes of the messages in self.msgs
        self.deadline: float | None = None  # hard deadline of queue[0] once it runs
        self.dead = False  # a send to it failed (the process is gone or going)

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()


class WorkerPool:
    """A persistent pool of worker processes applying `fn` with a per-item timeout.

    `workers=0` runs inline in the calling thread (which must be the main thread, for SIGALRM);
    it has the soft timeout only (no hard kill). `initializer()` runs once in each worker before
    its first item, outside the time limit (warm caches, so a cold start is not a timeout; with
    fork, warming the parent first lets every worker, and every replacement, inherit the warm
    state). `affinity(item)` (run in the parent) lists the keys of the per-process caches an
    item will use; items sharing keys are sent to one worker where the load allows. Reuse one pool
    across calls: starting workers costs a fork each. Use as
    a context manager or call `close()`.
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
        affinity: Callable[[Any], Iterable[Hashable]] | None = None,
        max_chunk: int = 256,
    ):
        if workers < 0:
            raise ValueError(f"workers must be >= 0 (0 = inline), got {workers}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s}")
        if on_error not in ("raise", "none"):
            raise ValueError(f"on_error must be 'raise' or 'none', got {on_error!r}")
        if max_chunk < 1:
            raise ValueError(f"max_chunk must be >= 1 item per message, got {max_chunk}")
        self.fn, self.workers, self.timeout_s, self.grace_s = fn, workers, float(timeout_s), float(grace_s)
        self.on_error, self.affinity, self.max_chunk = on_error, affinity, max_chunk
        self.initializer = initializer  # run once per worker (and before inline use), untimed
        self._initialized_inline = False
        self._item_s: float | None = None  # running mean of one item's time in a worker
        # fork: workers inherit already-imported modules (math_verify/sympy take ~0.4 s to import),
        # and fn need not be importable by name. Other platforms fall back to spawn.
        if start_method is None:
            start_method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        self._ctx = mp.get_context(start_method)
        self._pool: list[_Worker] = []
        self.stats = {"items": 0, "timeouts": 0, "hard_kills": 0, "crashes": 0, "errors": 0, "messages": 0}

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

    def start(self) -> "WorkerPool":
        """Start all workers and wait until their initializers finished (otherwise map() does
        this lazily). Returns self."""
        while len(self._pool) < self.workers:
            self._pool.append(_Worker(self._ctx, self.fn, self.timeout_s, self.initializer))
        for w in self._pool:
            while not w.ready:
                if not w.conn.poll(max(0.0, w.init_deadline - time.monotonic())):
                    w.kill()
                    raise RuntimeError(f"a worker's initializer did not finish in {INIT_TIMEOUT_S} s")
                try:
                    idx, status, *_ = w.conn.recv()
                except (EOFError, OSError):
                    w.kill()
                    raise RuntimeError(
                        f"a worker process died during its initializer (exit code "
                        f"{w.proc.exitcode}); see its traceback on stderr"
                    ) from None
                if status != "ready":  # pragma: no cover - a protocol bug
                    raise RuntimeError(f"worker sent {status!r} for item {idx} before 'ready'")
                w.ready = True
        return self

    @property
    def pids(self) -> list[int]:
        """Process ids of the live workers (e.g. to account their CPU time)."""
        return [w.proc.pid for w in self._pool]

    # --- mapping --------------------------------------------------------------------------
    def map(self, items: Iterable[Any], *, progress: bool | str = False) -> list[Outcome]:
        """[(fn(item) | None, timed_out)] in item order."""
        items = list(items)
        bar = tqdm(
            total=len(items),
            desc=progress if isinstance(progress, str) else "items",
            disable=not progress or not items,
            leave=False,
        )
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

    def _shares(self, items: list[Any]) -> list[collections.deque[int]]:
        """One run of item indices per worker (see `partition`)."""
        k = len(self._pool)
        if self.affinity is None:
            n = len(items)
            return [collections.deque(range(n * s // k, n * (s + 1) // k)) for s in range(k)]
        return [collections.deque(run) for run in partition([self.affinity(x) for x in items], k)]

    def _map_pool(self, items: list[Any], bar) -> list[Outcome]:
        while len(self._pool) < self.workers:
            self._pool.append(_Worker(self._ctx, self.fn, self.timeout_s, self.initializer))
        results: list[Outcome | None] = [None] * len(items)
        shares = self._shares(items)
        unsent = len(items)  # items still in shares
        remaining = len(items)
        limit = self.timeout_s + self.grace_s

        def send_chunk(slot: int) -> bool:
            """Send `slot`'s worker its next chunk, if any and if the send cannot block."""
            nonlocal unsent
            w = self._pool[slot]
            src = shares[slot] if shares[slot] else max(shares, key=len)  # own share, else steal
            if not src:
                return False
            front = src is shares[slot]
            item_s = self._item_s if self._item_s is not None else limit  # unknown: one item
            n = max(
                1, min(self.max_chunk, int(MESSAGE_S / max(item_s, 1e-6)), math.ceil(unsent / (2 * len(self._pool))))
            )
            idxs = list(itertools.islice(src if front else reversed(src), n))
            if not front:
                idxs.reverse()
            idle = w.ready and not w.queue  # blocked in recv: any size is read as it is sent
            while True:
                data = bytes(ForkingPickler.dumps([(i, items[i]) for i in idxs]))
                if idle or w.msg_bytes + len(data) <= PIPE_BUDGET_BYTES:
                    break
                if len(idxs) == 1:  # wait until the worker drains what it has
                    return False
                idxs = idxs[: len(idxs) // 2] if front else idxs[len(idxs) - len(idxs) // 2 :]
            try:
                w.conn.send_bytes(data)
            except OSError:  # it died: the loop reads its last replies, then replaces it
                w.dead = True
                return False
            for _ in idxs:
                src.popleft() if front else src.pop()
            unsent -= len(idxs)
            if w.ready and not w.queue:
                w.deadline = time.monotonic() + limit
            w.queue.extend(idxs)
            w.msgs.append([len(idxs), len(data)])
            w.msg_bytes += len(data)
            self.stats["messages"] += 1
            return True

        def settle(w: _Worker, outcome: Outcome) -> None:
            nonlocal remaining
            results[w.queue.popleft()] = outcome
            remaining -= 1
            self.stats["items"] += 1
            bar.update(1)
            w.msgs[0][0] -= 1
            if w.msgs[0][0] == 0:
                w.msg_bytes -= w.msgs.popleft()[1]
            # The worker starts its next queued item as soon as it has replied.
            w.deadline = time.monotonic() + limit if (w.ready and w.queue) else None

        def lost(slot: int, outcome: Outcome, stat: str) -> None:
            nonlocal unsent
            w = self._pool[slot]
            if not w.ready:
                w.kill()
                raise RuntimeError(
                    f"a worker process died during its initializer (exit code "
                    f"{w.proc.exitcode}); see its traceback on stderr"
                )
            if w.queue:  # the item it was on is lost; the ones queued behind it go back first
                self.stats[stat] += 1
                settle(w, outcome)
                shares[slot].extendleft(reversed(w.queue))
                unsent += len(w.queue)
            w.kill()
            self._pool[slot] = _Worker(self._ctx, self.fn, self.timeout_s, self.initializer)

        def on_reply(slot: int, idx: int, status: str, payload: Any, seconds: float) -> None:
            w = self._pool[slot]
            if status == "ready":
                w.ready = True
                w.deadline = time.monotonic() + limit if w.queue else None
                return
            if idx != w.queue[0]:  # pragma: no cover - a protocol bug, not an input problem
                raise RuntimeError(f"worker replied for item {idx}, expected {w.queue[0]}")
            # mean item time, for chunk sizes (an exponential average: item costs drift with caches)
            self._item_s = seconds if self._item_s is None else 0.9 * self._item_s + 0.1 * seconds
            if status == "ok":
                settle(w, (payload, False))
            elif status == "timeout":
                self.stats["timeouts"] += 1
                settle(w, (None, True))
            else:
                settle(w, self._record_error(idx, payload))

        while remaining:
            for slot, w in enumerate(self._pool):  # keep LOW_WATER_S of work queued per worker
                low = 1 if self._item_s is None else max(1, math.ceil(LOW_WATER_S / max(self._item_s, 1e-6)))
                while unsent and len(w.queue) < low and send_chunk(slot):
                    pass
            watch = [s for s, w in enumerate(self._pool) if w.queue or not w.ready or w.dead]
            now = time.monotonic()
            deadlines = [
                w.init_deadline if not w.ready else w.deadline if w.queue else now + 0.1
                for w in (self._pool[s] for s in watch)
            ]
            handles = [self._pool[s].conn for s in watch] + [self._pool[s].proc.sentinel for s in watch]
            ready = set(wait(handles, timeout=max(0.0, min(deadlines) - time.monotonic())))
            for slot in watch:
                w = self._pool[slot]
                if w.conn in ready:
                    try:
                        while True:  # every reply already buffered, in one wake-up
                            on_reply(slot, *w.conn.recv())
                            if not w.conn.poll():
                                break
                    except (EOFError, OSError):  # died mid-item
                        lost(slot, (None, False), "crashes")
                elif w.proc.sentinel in ready:  # exited without replying
                    lost(slot, (None, False), "crashes")
                elif not w.ready and time.monotonic() >= w.init_deadline:
                    w.kill()
                    raise RuntimeError(f"a worker's initializer did not finish in {INIT_TIMEOUT_S} s")
                elif w.ready and w.queue and time.monotonic() >= w.deadline:  # where SIGALRM cannot reach
                    self.stats["hard_kills"] += 1
                    lost(slot, (None, True), "timeouts")
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
    affinity: Callable[[Any], Iterable[Hashable]] | None = None,
) -> list[Outcome]:
    """One-shot `WorkerPool(fn, ...).map(items)`: [(result | None, timed_out)] in item order.

    fn must be picklable (a module-level function) when the start method is not fork.
    """
    with WorkerPool(
        fn,
        workers=min(workers, max(1, len(items))) if workers else 0,
        timeout_s=timeout_s,
        on_error=on_error,
        initializer=initializer,
        affinity=affinity,
    ) as pool:
        return pool.map(items, progress=progress)
