"""The background threads: at most ``max_threads`` run jobs; the rest wait in FIFO order.

Threads start lazily.  When no thread is idle, a new one starts only if the job is still
waiting ``spawn_delay`` seconds later: short jobs free a thread within microseconds, and
more threads would only fight over the GIL; long jobs still run in parallel after about a
millisecond.  Idle threads leave after ``idle_timeout`` seconds, except the last one.

No lock on the way of a job: a submitter and the threads share only the queue (C code,
whose ``put`` never blocks) and single dictionary operations, which the GIL makes atomic.
A lock that a submitter and a thread both took for every job would turn into a convoy
under the GIL — every acquisition a hand-over between threads, two context switches each —
and cost more than the job.  The pool's lock is taken only to start and stop threads.

No job is ever stranded: the first thread never leaves, so a queued job always has a thread
that will take it (an idle one, woken by ``put``, or a busy one, when it comes back).
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
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
        self._lock = threading.Lock()  # starting and stopping threads only
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = 0
        self._idle: dict[int, bool] = {}  # threads waiting for a job nobody claimed, by ident
        self._put_seq = itertools.count(1)  # numbers the queued jobs (next() is atomic)
        self._last_put = 0
        self._taken_seq = itertools.count(1)
        self._taken = 0  # jobs taken by threads so far (never runs ahead of the truth)
        self._check_pending = False
        self._closed = False
        #: Jobs whose thread is blocked where nothing stops it (see :meth:`leave_to`): their
        #: threads are not counted against ``max_threads`` until they come back.
        self._stuck: dict[Any, bool] = {}

    @property
    def threads(self) -> int:
        """Threads alive now."""
        return self._threads

    @property
    def idle(self) -> int:
        """Threads waiting for a job that no submitter has claimed yet."""
        return len(self._idle)

    @property
    def waiting(self) -> int:
        """Jobs queued that no thread has taken yet."""
        return self._jobs.qsize()

    def submit(self, job: Any) -> None:
        """Queue ``job``; a thread runs it as soon as one is free (FIFO)."""
        if self._closed:
            raise RuntimeError("the thread pool is closed")
        self._last_put = seq = next(self._put_seq)
        self._jobs.put(job)
        if self._idle:
            try:
                self._idle.popitem()  # claim an idle thread: woken by this put, it is busy
                return
            except KeyError:  # claimed by another submitter meanwhile
                pass
        if self._threads == 0:
            with self._lock:
                if self._threads == 0 and not self._closed:
                    self._spawn_locked()
            return
        if not self._check_pending and self._threads - len(self._stuck) < self.max_threads:
            with self._lock:
                arm = not self._check_pending
                self._check_pending = True
            if arm:
                self._schedule_check(seq)

    def _spawn_locked(self) -> None:
        thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
        counted = False
        try:
            # Counted before it starts (readers never see a running thread uncounted), in
            # one statement with the flag: an interrupt lands before both or after both.
            self._threads, counted = self._threads + 1, True
            thread.start()
        except BaseException:  # an interrupt (or no thread could start): count what exists
            if counted and not _exists(thread):
                self._threads -= 1
            raise

    def _spawn_if_waiting(self, seq: int) -> None:
        """Timer: if job number ``seq`` is still waiting, start threads for the jobs that
        wait, within ``max_threads``; if it was taken but others wait, look again later."""
        rearm = None
        with self._lock:
            self._check_pending = False
            waiting = self._jobs.qsize() - len(self._idle)
            if self._closed or waiting <= 0:
                return
            if self._taken < seq:
                for _ in range(min(waiting, self.max_threads - self._threads + len(self._stuck))):
                    self._spawn_locked()
            if self._threads - len(self._stuck) < self.max_threads:
                self._check_pending = True
                rearm = self._last_put  # the newest job queued so far
        if rearm is not None:
            self._schedule_check(rearm)

    def _schedule_check(self, seq: int) -> None:
        """In ``spawn_delay``: is job number ``seq`` still waiting?  (The caller set
        ``_check_pending``: one check planned at a time.)"""
        self._timers.schedule(self._spawn_delay, lambda: self._spawn_if_waiting(seq))

    def _loop(self) -> None:
        get_nowait = self._jobs.get_nowait
        me = threading.get_ident()
        taken = self._taken_seq
        while True:
            try:
                job = get_nowait()
            except queue.Empty:
                job = self._wait_for_job(me)
                if job is _LEAVE:
                    return
            if job is None:  # close()
                return
            if job is _SHRINK:  # resize() lowered the limit while this thread was idle
                if self._leave_if_beyond_limit():
                    return
                continue
            self._taken = next(taken)
            try:
                self._run(job)
            except BaseException:  # noqa: BLE001 - e.g. a forced cancel landing late
                log.debug("qmagic: stray exception after a job ended", exc_info=True)
            if self._stuck:
                self._stuck.pop(job, None)  # (back: counted again)
            del job
            if self._threads > self.max_threads and self._leave_if_beyond_limit():  # (stuck: fewer)
                return

    def _leave_if_beyond_limit(self) -> bool:
        """Whether this thread leaves: more threads than ``max_threads`` take jobs (the limit
        was lowered).  At least ``max_threads`` (>= 1) stay, so no queued job is stranded."""
        with self._lock:
            if self._closed or self._threads - len(self._stuck) <= max(self.max_threads, 1):
                return False
            self._threads -= 1
            return True

    def resize(self, max_threads: int) -> None:
        """Let at most ``max_threads`` threads run jobs from now on.  A raised limit starts
        threads for the jobs that wait (they waited for a job to end, or a submit); a
        lowered one stops no job: the threads beyond it leave, a busy one once its job
        returns, an idle one at once (else each took the next job, and as many ran as
        before for as long as jobs came)."""
        with self._lock:
            self.max_threads = max_threads
            beyond = self._threads - len(self._stuck) - max_threads
            arm = (not self._closed and not self._check_pending and self._jobs.qsize() > 0
                   and beyond < 0)
            self._check_pending = self._check_pending or arm
            shrink = min(beyond, len(self._idle)) if not self._closed else 0
        for _ in range(shrink):  # (each put wakes one idle thread; one that is no longer
            self._jobs.put(_SHRINK)  # beyond the limit takes it and goes on)
        if arm:
            self._schedule_check(self._last_put)

    def leave_to(self, job: Any) -> None:
        """``job``'s thread is blocked where nothing can stop it (a forced cancel did not
        land): leave the thread to it and let the jobs that wait have another one; it counts
        again once its job returns."""
        with self._lock:
            if job in self._stuck or self._closed:
                return
            self._stuck[job] = True
            arm = not self._check_pending and self._jobs.qsize() > 0
            self._check_pending = self._check_pending or arm
        if arm:
            self._schedule_check(self._last_put)

    def _wait_for_job(self, me: int) -> Any:
        """Idle: wait for the next job; after ``idle_timeout`` leave, unless this is the
        last thread or a job came meanwhile."""
        idle = self._idle
        while True:
            idle[me] = True
            try:
                return self._jobs.get(timeout=self._idle_timeout)
            except queue.Empty:
                with self._lock:
                    if self._threads > 1 and self._jobs.empty():
                        self._threads -= 1
                        return _LEAVE
            finally:
                idle.pop(me, None)

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


_LEAVE = object()
_SHRINK = object()  # queued by resize(): an idle thread beyond the limit leaves


def _exists(thread: threading.Thread, wait_s: float = 0.05) -> bool:
    """Whether ``thread`` runs, after its ``start()`` was cut short: a thread the system made
    names itself within moments (an interrupt may land after it was made, before it did)."""
    deadline = time.monotonic() + wait_s
    while thread.ident is None and time.monotonic() < deadline:
        time.sleep(0.001)
    return thread.ident is not None
