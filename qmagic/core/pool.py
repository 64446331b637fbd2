"""The background threads: at most ``max_threads`` run jobs; the rest wait in FIFO order.

Threads start lazily.  When every thread is busy a new one starts only if the job is still
waiting ``spawn_delay`` seconds later: short jobs free a thread within microseconds, and
more threads would only fight over the GIL; long jobs still run in parallel after about a
millisecond.  Idle threads leave after ``idle_timeout`` seconds.

Accounting is exact, under one lock: every waiting job has exactly one thread that will
take it (an idle thread reserved for it, a thread being started for it, or the next busy
thread that frees up), so a job never waits while a thread idles.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any, Callable

from .timers import Timers

__all__ = ["ThreadPool"]

log = logging.getLogger("qmagic")


class ThreadPool:
    """Runs ``run(job)`` for submitted jobs on daemon threads (see the module docstring)."""

    def __init__(
        self,
        run: Callable[[Any], None],
        timers: Timers,
        max_threads: int,
        *,
        name: str = "qmagic-task",
        spawn_delay: float = 0.001,
        idle_timeout: float = 30.0,
    ) -> None:
        self._run = run
        self._timers = timers
        self.max_threads = max_threads
        self._name = name
        self._spawn_delay = spawn_delay
        self._idle_timeout = idle_timeout
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = 0
        self._idle = 0  # idle threads nobody reserved
        self._unreserved = 0  # waiting jobs no thread is reserved for yet
        self._check_pending = False
        self._closed = False

    @property
    def threads(self) -> int:
        """Threads alive now."""
        return self._threads

    def submit(self, job: Any) -> None:
        """Queue ``job``; a thread runs it as soon as one is free (FIFO)."""
        check = False
        with self._lock:
            if self._closed:
                raise RuntimeError("the thread pool is closed")
            if self._idle > 0:
                self._idle -= 1  # an idle thread will take it
            elif self._threads == 0:
                self._spawn_locked()
            else:
                self._unreserved += 1
                if self._threads < self.max_threads and not self._check_pending:
                    self._check_pending = check = True
        self._jobs.put(job)
        if check:
            self._timers.schedule(self._spawn_delay, self._spawn_if_waiting)

    def _spawn_locked(self) -> None:
        self._threads += 1
        threading.Thread(target=self._loop, name=self._name, daemon=True).start()

    def _spawn_if_waiting(self) -> None:
        """Timer: start threads for jobs that still wait, within ``max_threads``."""
        with self._lock:
            self._check_pending = False
            if self._closed:
                return
            while self._unreserved > 0 and self._threads < self.max_threads:
                self._spawn_locked()
                self._unreserved -= 1

    def _free_locked(self) -> None:
        """A thread is free: it takes a waiting job nobody was reserved for, or idles."""
        if self._unreserved > 0:
            self._unreserved -= 1
        else:
            self._idle += 1

    def _loop(self) -> None:
        get = self._jobs.get
        while True:
            try:
                job = get(timeout=self._idle_timeout)
            except queue.Empty:
                with self._lock:
                    if self._idle > 0:  # nobody counts on this thread: let it go
                        self._idle -= 1
                        self._threads -= 1
                        return
                continue
            if job is None:  # close()
                return
            try:
                self._run(job)
            except BaseException:  # noqa: BLE001 - e.g. a forced cancel landing late
                log.debug("qmagic: stray exception after a job ended", exc_info=True)
            with self._lock:
                self._free_locked()

    def close(self) -> None:
        """Stop every thread once it finishes its current job; waiting jobs are dropped
        (the engine has cancelled them)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            threads = self._threads
        for _ in range(threads):
            self._jobs.put(None)
