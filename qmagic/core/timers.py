"""One thread that runs scheduled callbacks: retention sweeps, forced cancels, deadlines."""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from typing import Callable

__all__ = ["Timers", "TimerHandle"]

log = logging.getLogger("qmagic")

#: Longest single wait of the timer thread (seconds): a later deadline (or ``inf``, never)
#: is waited for in steps, below ``threading.TIMEOUT_MAX``.
_LONGEST_WAIT_S = 3600.0
#: Heap size from which cancelled entries are dropped (checked every 1024 schedules).
_COMPACT_AT = 4096


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
    """Runs callbacks at monotonic times on one lazily started daemon thread.

    A callback that raises is logged and never stops the thread.  :meth:`close` stops the
    thread; callbacks not yet run are dropped.
    """

    def __init__(self, name: str = "qmagic-timer") -> None:
        self._name = name
        self._heap: list[tuple[float, int, TimerHandle]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None
        self._closed = False

    def schedule(self, delay: float, fn: Callable[[], None]) -> TimerHandle:
        """Run ``fn()`` after ``delay`` seconds (at once if <= 0, never if ``inf``); returns
        its handle.  Raises ValueError for NaN (it would break the heap's order)."""
        if delay != delay:
            raise ValueError("A timer's delay must be a number of seconds, not NaN.")
        handle = TimerHandle(time.monotonic() + max(0.0, delay), fn)
        with self._cond:
            if self._closed:
                handle.cancel()
                return handle
            if len(self._heap) >= _COMPACT_AT and len(self._heap) & 1023 == 0:
                self._compact_locked()
            heapq.heappush(self._heap, (handle.when, next(self._seq), handle))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()
            elif self._heap[0][2] is handle:
                self._cond.notify()
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
            with self._cond:
                while True:
                    if self._closed:
                        return
                    if self._heap:
                        wait = self._heap[0][0] - time.monotonic()
                        if wait <= 0:
                            handle = heapq.heappop(self._heap)[2]
                            break
                        self._cond.wait(min(wait, _LONGEST_WAIT_S))  # (inf: never due)
                    else:
                        self._cond.wait()
            fn = handle.fn
            if handle.cancelled or fn is None:
                continue
            try:
                fn()
            except Exception:  # noqa: BLE001 - a failing callback must not stop the others
                log.exception("qmagic: a scheduled callback failed")

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread (pending callbacks are dropped); idempotent."""
        with self._cond:
            self._closed = True
            self._heap.clear()
            thread, self._thread = self._thread, None
            self._cond.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
