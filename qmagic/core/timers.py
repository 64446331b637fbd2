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


class TimerHandle:
    """A scheduled callback; :meth:`cancel` keeps it from running (idempotent)."""

    __slots__ = ("when", "fn", "cancelled")

    def __init__(self, when: float, fn: Callable[[], None]) -> None:
        self.when = when
        self.fn = fn
        self.cancelled = False

    def cancel(self) -> None:
        """Do not run the callback (if it has not run yet)."""
        self.cancelled = True


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
        """Run ``fn()`` after ``delay`` seconds (at once if <= 0); returns its handle."""
        handle = TimerHandle(time.monotonic() + max(0.0, delay), fn)
        with self._cond:
            if self._closed:
                handle.cancelled = True
                return handle
            heapq.heappush(self._heap, (handle.when, next(self._seq), handle))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()
            elif self._heap[0][2] is handle:
                self._cond.notify()
        return handle

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
                        self._cond.wait(wait)
                    else:
                        self._cond.wait()
            if handle.cancelled:
                continue
            try:
                handle.fn()
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
