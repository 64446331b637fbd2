"""One thread that runs scheduled callbacks: retention sweeps, forced cancels, deadlines."""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import queue
import threading
import time
import weakref
from typing import Callable

__all__ = ["Timers", "TimerHandle"]

log = logging.getLogger("qmagic")

#: Longest single wait of the timer thread (seconds): a later deadline (or ``inf``, never)
#: is waited for in steps, below ``threading.TIMEOUT_MAX``.
_LONGEST_WAIT_S = 3600.0
#: Longest wait while timers are pending: a wake-up lost to an interrupt (Python 3.10 acts on
#: signals between almost any two instructions) delays a timer by this at most.
_PENDING_RECHECK_S = 1.0
#: Heap size from which cancelled entries are dropped (checked every 1024 schedules).
_COMPACT_AT = 4096
_ALL: weakref.WeakSet[Timers] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A forked child has none of its parent's threads, and the parent's timers are the
    parent's: each Timers starts again empty, with a new lock and thread."""
    for timers in list(_ALL):
        timers._restart_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class TimerHandle:
    """A scheduled callback; :meth:`cancel` keeps it from running (idempotent)."""

    __slots__ = ("when", "fn", "cancelled")

    def __init__(self, when: float, fn: Callable[[], None]) -> None:
        self.when = when
        self.fn = fn
        self.cancelled = False

    def cancel(self) -> None:
        """Do not run the callback (if it has not run yet); drops the reference to it, so
        what it would have used (a finished task) is freed at once."""
        self.cancelled = True
        self.fn = None


class Timers:
    """Runs callbacks at monotonic times on one daemon thread (started with the object).

    A callback that raises is logged and never stops the thread.  :meth:`close` stops the
    thread; callbacks not yet run are dropped.

    Interrupts may land anywhere in :meth:`schedule` (it runs on the main thread when an
    interrupted ``submit`` ends its task).  So the heap is guarded by a plain lock taken
    only with ``with`` (a ``threading.Condition`` takes its lock in a Python frame: an
    interrupt landing there left the lock held, and every later ``schedule`` and
    ``close`` waited for ever; found by a hostile test), and the thread is woken through a
    ``queue.SimpleQueue`` (one C call).
    """

    def __init__(self, name: str = "qmagic-timer") -> None:
        self._heap: list[tuple[float, int, TimerHandle]] = []
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._wakeups: queue.SimpleQueue[None] = queue.SimpleQueue()
        self._closed = False
        self._name = name
        self._thread: threading.Thread | None = None
        self._start_thread()  # (here, not in the first schedule(): no interrupt can leave it unstarted)
        _ALL.add(self)

    def _start_thread(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
        self._thread.start()

    def _restart_in_child(self) -> None:
        self._heap = []
        self._lock = threading.Lock()
        self._wakeups = queue.SimpleQueue()
        self._thread = None
        if not self._closed:
            self._start_thread()

    def schedule(self, delay: float, fn: Callable[[], None]) -> TimerHandle:
        """Run ``fn()`` after ``delay`` seconds (at once if <= 0, never if ``inf``); returns
        its handle.  Raises ValueError for NaN (it would break the heap's order)."""
        if delay != delay:
            raise ValueError("A timer's delay must be a number of seconds, not NaN.")
        handle = TimerHandle(time.monotonic() + max(0.0, delay), fn)
        wake = True  # (an interrupt before the decision below wakes the thread: harmless)
        try:
            with self._lock:
                if self._closed:
                    handle.cancel()
                    return handle
                if len(self._heap) >= _COMPACT_AT and len(self._heap) & 1023 == 0:
                    self._compact_locked()
                heapq.heappush(self._heap, (handle.when, next(self._seq), handle))
                # (also when the first is overdue: a wake-up lost to an interrupt is made up)
                wake = self._heap[0][2] is handle or self._heap[0][0] <= time.monotonic()
        finally:
            if wake:
                self._wakeups.put(None)
        return handle

    def _compact_locked(self) -> None:
        """Drop cancelled entries (deadlines of tasks that ended long before them) when they
        are most of the heap: it never grows with finished tasks."""
        live = [entry for entry in self._heap if not entry[2].cancelled]
        if len(live) * 2 < len(self._heap):
            heapq.heapify(live)
            self._heap[:] = live

    def _loop(self) -> None:
        while True:
            handle = None
            with self._lock:
                if self._closed:
                    return
                wait = _LONGEST_WAIT_S
                if self._heap:
                    wait = min(self._heap[0][0] - time.monotonic(), _PENDING_RECHECK_S)
                    if wait <= 0:
                        handle = heapq.heappop(self._heap)[2]
            if handle is None:
                try:
                    self._wakeups.get(timeout=wait)
                except queue.Empty:
                    pass
                continue
            fn = handle.fn
            if handle.cancelled or fn is None:
                continue
            try:
                fn()
            except Exception:  # noqa: BLE001 - a failing callback must not stop the others
                log.exception("qmagic: a scheduled callback failed")

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread (pending callbacks are dropped); idempotent."""
        with self._lock:
            self._closed = True
            self._heap.clear()
            thread, self._thread = self._thread, None
        self._wakeups.put(None)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
