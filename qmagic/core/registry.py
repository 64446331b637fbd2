"""The tasks an engine knows: lookups by uid or prefix, listing, retention of finished ones.

:class:`TaskRegistry` is the part of :class:`~qmagic.core.engine.Engine` that holds the jobs
by uid.  It shares the engine's lock (``_lock``), so settling a finished task — freeing its
thread and keeping it for lookups — is one critical section.  Finished tasks stay
``retention_s`` seconds and at most ``max_finished`` of them (the oldest go first); a timer
sweeps them even when no new task arrives.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Callable

from ..errors import TaskNotFound

if TYPE_CHECKING:  # pragma: no cover
    from .jobs import Job
    from .task import Task
    from .timers import Timers

__all__ = ["MIN_UID_PREFIX", "TaskRegistry", "new_uid"]

log = logging.getLogger("qmagic")

#: Shortest uid prefix accepted by lookups (a full uid is always accepted).
MIN_UID_PREFIX = 4

_uid_random = random.Random(os.urandom(32))
_UUID4_CLEAR = ~(0xF000 << 64 | 0xC000 << 48) & (1 << 128) - 1
_UUID4_SET = 0x4000 << 64 | 0x8000 << 48


def new_uid() -> str:
    """A random version-4 UUID string (seeded from os.urandom; no system call per uid)."""
    h = "%032x" % (_uid_random.getrandbits(128) & _UUID4_CLEAR | _UUID4_SET)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class TaskRegistry:
    """Jobs by uid and the finished ones kept for a while (see the module docstring)."""

    retention_s: float
    max_finished: int
    timers: Timers

    def _init_registry(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}
        self._finished: OrderedDict[str, Job] = OrderedDict()
        self._last: Task | None = None
        self._sweep_at: float | None = None
        #: Called with the tasks dropped from memory (retention), outside locks.
        self.on_expire: Callable[[list[Task]], None] | None = None

    def _retain_locked(self, job: Job, expired: list[Task]) -> float | None:
        """Keep a finished job (caller holds ``_lock``); the oldest beyond ``max_finished``
        go to ``expired``.  Returns when a sweep must run, if none is planned yet."""
        uid = job.task.uid
        if self._jobs.get(uid) is job:
            self._finished[uid] = job
            while len(self._finished) > self.max_finished:
                _, old = self._finished.popitem(last=False)
                self._jobs.pop(old.task.uid, None)
                expired.append(old.task)
        if self._sweep_at is None and self._finished:
            self._sweep_at = time.time() + self.retention_s
            return self._sweep_at
        return None

    def _after_retain(self, schedule: float | None, expired: list[Task]) -> None:
        """Outside the lock: plan the sweep, tell ``on_expire``."""
        if schedule is not None:
            self.timers.schedule(schedule - time.time(), self._sweep)
        if expired:
            self._expired(expired)

    def _sweep(self) -> None:
        now = time.time()
        expired: list[Task] = []
        with self._lock:
            while self._finished:
                uid, job = next(iter(self._finished.items()))
                finished_at = job.task.finished_at
                if finished_at is None or finished_at + self.retention_s > now:
                    break  # (None: settled, its waiters about to wake)
                self._finished.popitem(last=False)
                self._jobs.pop(uid, None)
                expired.append(job.task)
            nxt = None
            if self._finished:
                first = next(iter(self._finished.values())).task
                nxt = (first.finished_at or now) + self.retention_s
            self._sweep_at = nxt
        if nxt is not None:
            self.timers.schedule(nxt - now, self._sweep)
        self._expired(expired)

    def _expired(self, tasks: list[Task]) -> None:
        if tasks and self.on_expire is not None:
            try:
                self.on_expire(tasks)
            except Exception:  # noqa: BLE001
                log.exception("qmagic: on_expire hook failed")

    # -- lookups --------------------------------------------------------------------------
    def find(self, uid_or_prefix: str) -> Task:
        """The task with this uid, or with this unique uid prefix (at least 4 characters)."""
        if not isinstance(uid_or_prefix, str) or not uid_or_prefix:
            raise TaskNotFound(f"Task uid must be a non-empty string, got {uid_or_prefix!r}.")
        with self._lock:
            job = self._jobs.get(uid_or_prefix)
            if job is not None:
                return job.task
            if len(uid_or_prefix) < MIN_UID_PREFIX:
                raise TaskNotFound(
                    f"Task uid prefix {uid_or_prefix!r} is too short: give at least "
                    f"{MIN_UID_PREFIX} characters of the uid (see %tasks)."
                )
            matches = [j.task for uid, j in self._jobs.items() if uid.startswith(uid_or_prefix)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise TaskNotFound(f"No task with uid {uid_or_prefix!r} in this kernel's memory.")
        raise TaskNotFound(
            f"Task uid prefix {uid_or_prefix!r} matches {len(matches)} tasks; give more characters."
        )

    def get(self, uid: str) -> Task | None:
        """The task with exactly this uid, or None."""
        job = self._jobs.get(uid)
        return job.task if job is not None else None

    def tasks(self) -> list[Task]:
        """Every task in memory, oldest submission first."""
        with self._lock:
            items = [job.task for job in self._jobs.values()]
        items.sort(key=lambda t: t.submitted_at)
        return items

    @property
    def last_task(self) -> Task | None:
        """The most recently submitted task still in memory."""
        with self._lock:
            last = self._last
            return last if last is not None and last.uid in self._jobs else None

    def clear_finished(self) -> int:
        """Forget every finished task kept in memory; returns how many."""
        with self._lock:
            removed = [job.task for job in self._finished.values()]
            self._finished.clear()
            for task in removed:
                self._jobs.pop(task.uid, None)
        self._expired(removed)
        return len(removed)
