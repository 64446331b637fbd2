"""The tasks an engine knows: lookups by uid or prefix, listing, counts, retention of finished ones.

:class:`TaskRegistry` is the part of :class:`~qmagic.core.engine.Engine` that holds the jobs
by uid.  Jobs are added and looked up by single dict operations (atomic under the GIL);
the engine's lock (``_lock``) serialises only the trimming, sweeps and lookups by prefix,
and a finishing task never waits for it.  Finished tasks stay
``retention_s`` seconds and at most ``max_finished`` of them (the oldest go first); a timer
sweeps them even when no new task arrives.

Finished tasks that carry a size (``Task.payload_bytes``: the memory the data of the remote
request that sent their arguments takes, as the control channel counts it) also leave
memory, oldest first, while their sizes sum above ``max_finished_bytes``; the newest of
them always stays (its client may be about to read the result), so what they hold is
bounded by about the budget plus one request. The sizes are added up without a blocking
lock: a finishing task appends ``(uid, size)`` to a deque (an atomic append), and whoever
holds the lock drains it into the total (``_sized`` and ``_retained_bytes`` change only
under the lock). Sized tasks waiting or running are counted too: a new one is refused when
with it they would hold more than ``max_queued_bytes`` (alone, it passes).

It also keeps the results uid (queueserver's ``task_results_uid``).
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import threading
import time
import uuid
from collections import OrderedDict, deque
from typing import TYPE_CHECKING, Any, Callable

from ..errors import RequestRefused, TaskNotFound
from .context import current_task

if TYPE_CHECKING:  # pragma: no cover
    from .jobs import Job
    from .task import Task
    from .timers import Timers

__all__ = ["MIN_UID_PREFIX", "UID_LENGTH", "TaskRegistry", "new_uid", "uid_spellings"]

log = logging.getLogger("qmagic")

#: Shortest uid prefix accepted by lookups (a full uid is always accepted).
MIN_UID_PREFIX = 4
#: Length of a uid made by :func:`new_uid` (a UUID string); shorter strings are prefixes.
UID_LENGTH = 36

_HEX_TEXT = frozenset("0123456789abcdefABCDEF-")  # (the characters of a uid qmagic makes, any case)
_uid_random = random.Random(os.urandom(32))
_UUID4_CLEAR = ~(0xF000 << 64 | 0xC000 << 48) & (1 << 128) - 1
_UUID4_SET = 0x4000 << 64 | 0x8000 << 48


def uid_spellings(typed: str) -> tuple[str, ...]:
    """The uids (or uid prefixes) a typed one may mean, in the order lookups try them: as
    typed, then -- for hexadecimal text with capitals (a uid read off a screen or a paper
    log: ``A5ED0265``) -- in lower case, as :func:`new_uid` makes them.  Stored uids are
    never changed: a remote client's uid is kept exactly and its exact spelling wins, so
    two tasks that differ only in case are not made ambiguous by one lookup."""
    if typed != typed.lower() and _HEX_TEXT.issuperset(typed):
        return typed, typed.lower()
    return (typed,)


def new_uid() -> str:
    """A random version-4 UUID string (seeded from os.urandom; no system call per uid)."""
    h = "%032x" % (_uid_random.getrandbits(128) & _UUID4_CLEAR | _UUID4_SET)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class TaskRegistry:
    """Jobs by uid and the finished ones kept for a while (see the module docstring)."""

    retention_s: float
    max_finished: int
    max_finished_bytes: int
    max_queued_bytes: int
    timers: Timers
    # (the engine's, read by counts())
    _fg: Any
    _waiting: dict
    _running_threads: dict
    _running_coros: dict
    _pool: Any
    bus: Any  # (the engine's: every task of this engine carries it)

    def _init_registry(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}
        self._finished: OrderedDict[str, Job] = OrderedDict()
        #: Sizes of finished sized tasks not yet counted: appended without the lock.
        self._sized_inbox: deque[tuple[str, int]] = deque()
        #: Counted sizes of the sized tasks in ``_finished``, oldest first, and their sum
        #: (both changed only under ``_lock``).
        self._sized: OrderedDict[str, int] = OrderedDict()
        self._retained_bytes = 0
        #: Sizes of the sized tasks waiting or running (single dict operations, no lock).
        self._live_sizes: dict[Job, int] = {}
        self._results_prefix = str(uuid.uuid4())
        self._results_seq = itertools.count(1)
        self._results_count = 0  # tasks finished so far (read without the lock: one int)
        self._last: Task | None = None
        self._here = threading.local()  # .uid: of the last task each thread submitted
        self._sweep_at: float | None = None
        #: Called with the tasks dropped from memory (retention), outside locks.
        self.on_expire: Callable[[list[Task]], None] | None = None

    @property
    def results_uid(self) -> str:
        """Changes every time a task finishes (queueserver's ``task_results_uid``)."""
        return f"{self._results_prefix}-{self._results_count}"

    def _finished_one(self) -> None:
        """After the task finished: a new results uid (queueserver clients poll it, then
        read the result, so it changes only once the result can be read)."""
        self._results_count = next(self._results_seq)

    def _hold_size(self, job: Job, size: int) -> None:
        """Count a sized task's request bytes while it waits or runs, or refuse it when they
        would take the bytes that tasks waiting or running hold above ``max_queued_bytes``
        (a task alone always passes).  First counted, then checked, like ``max_queued``:
        racing submitters never pass together.  (Called inside submit's ``try``: whatever
        stops it, the size is taken back.)"""
        if size.__class__ is not int or size < 0:
            raise ValueError(f"payload_bytes must be an int >= 0 (got {size!r}).")
        job.task.payload_bytes = size
        self._live_sizes[job] = size
        held = sum(list(self._live_sizes.values())) - size  # (one C call: an atomic copy)
        if held and held + size > self.max_queued_bytes:
            self._live_sizes.pop(job, None)
            raise RequestRefused(
                f"Error: Failed to start the task: its {size:,} bytes of request data and the "
                f"{held:,} that tasks waiting or running hold already pass "
                f"QMagic.max_queued_task_bytes ({self.max_queued_bytes:,}). Wait for some to "
                "finish or cancel some, or send less data, then try again.")

    def _retain(self, job: Job) -> None:
        """Keep a finished job; the oldest beyond ``max_finished`` (and the oldest sized ones
        beyond ``max_finished_bytes``) leave memory.

        Called for every task by the thread that ran it, so it never waits for the lock
        (see "Locks" in :mod:`qmagic.core.engine`): the job is added by one atomic dict
        operation (its size by one deque append), and the trimming is done by whoever gets
        the lock without waiting (a thread that does not get it leaves the trimming to the
        one that has it, which looks again after releasing it, or to the next task).
        """
        uid = job.task.uid
        if self._jobs.get(uid) is not job:
            return
        self._finished[uid] = job
        size = job.task.payload_bytes
        if size:
            self._sized_inbox.append((uid, size))  # after the job: a drain finds it retained
        if self._sweep_at is None:
            self._sweep_at = at = time.time() + self.retention_s
            self.timers.schedule(self.retention_s, lambda: self._sweep(at))
        while self._over_limits() and self._lock.acquire(False):
            try:
                expired = self._trim()
            finally:
                self._lock.release()
            self._expired(expired)

    def apply_limits(self) -> None:
        """``max_finished``, ``max_finished_bytes`` or ``retention_s`` changed: the finished
        tasks beyond them leave memory now (they waited for the next task's end, which may
        never come, or for the sweep planned at the old ``retention_s``)."""
        with self._lock:
            expired = self._trim()
            if self._sweep_at is not None:  # sweep now, at this retention (the sweep planned
                self._sweep_at = at = time.time()  # at the old one is then stale)
                self.timers.schedule(0, lambda: self._sweep(at))
        self._expired(expired)

    def _over_limits(self) -> bool:
        """Whether a trim has work (read without the lock; each read is atomic)."""
        return (len(self._finished) > self.max_finished or bool(self._sized_inbox)
                or (self._retained_bytes > self.max_finished_bytes and len(self._sized) > 1))

    def _count_sizes(self) -> None:
        """Add the sizes appended since the last call to the total (caller holds ``_lock``).
        A job that already left memory is skipped: it was retained before its size was
        appended, so its absence means it was dropped (and nothing was subtracted)."""
        inbox, finished = self._sized_inbox, self._finished
        while inbox:
            uid, size = inbox.popleft()
            if uid in finished:
                self._sized[uid] = size
                self._retained_bytes += size

    def _drop(self, uid: str) -> None:
        """A finished job leaves memory (caller holds ``_lock`` and took it out of
        ``_finished``)."""
        self._jobs.pop(uid, None)
        size = self._sized.pop(uid, 0)
        if size:
            self._retained_bytes -= size

    def _trim(self) -> list[Task]:
        """Apply ``max_finished`` then ``max_finished_bytes`` (caller holds ``_lock``);
        returns the tasks that left memory."""
        expired: list[Task] = []
        self._count_sizes()
        while len(self._finished) > self.max_finished:
            uid, old = self._finished.popitem(last=False)
            self._drop(uid)
            expired.append(old.task)
        while self._retained_bytes > self.max_finished_bytes and len(self._sized) > 1:
            uid = next(iter(self._sized))  # (the oldest; _sized changes only under the lock)
            old = self._finished.pop(uid, None)
            self._drop(uid)
            if old is not None:
                expired.append(old.task)
        return expired

    def finished_bytes(self) -> int:
        """The summed sizes of the finished tasks in memory that carry one (see the module
        docstring); exact once the tasks counted have finished."""
        with self._lock:
            self._count_sizes()
            return self._retained_bytes

    def _take_oldest(self) -> tuple[str, Job] | None:
        """Take the oldest finished job out, or None (caller holds ``_lock``).  ``popitem``,
        never iteration: finished jobs are added without the lock."""
        try:
            return self._finished.popitem(last=False)
        except KeyError:
            return None

    def _sweep(self, at: float | None = None) -> None:
        """Timer: forget the jobs finished more than ``retention_s`` ago.  ``at``: the time
        this sweep was planned for; one planned since in its place (``_sweep_at`` changed:
        :meth:`apply_limits`, or a second task's end racing the first) makes it stale: it
        does nothing, so one chain of sweeps goes on."""
        now = time.time()
        expired: list[Task] = []
        nxt = None
        with self._lock:
            if at is not None and self._sweep_at is not None and self._sweep_at != at:
                return
            self._sweep_at = None
            self._count_sizes()
            while (oldest := self._take_oldest()) is not None:
                uid, job = oldest
                finished_at = job.task.finished_at
                if finished_at is None or finished_at + self.retention_s > now:
                    # (None: settled, its waiters about to wake)  Back to the front.
                    self._finished[uid] = job
                    self._finished.move_to_end(uid, last=False)
                    nxt = (finished_at or now) + self.retention_s
                    break
                self._drop(uid)
                expired.append(job.task)
            if nxt is not None:
                self._sweep_at = nxt
        if nxt is not None:
            self.timers.schedule(nxt - now, lambda: self._sweep(nxt))
        self._expired(expired)

    def _expired(self, tasks: list[Task]) -> None:
        if tasks and self.on_expire is not None:
            try:
                self.on_expire(tasks)
            except Exception:  # noqa: BLE001
                log.exception("qmagic: on_expire hook failed")

    def counts(self) -> dict[str, Any]:
        """The counts for status replies and panels (each exact when read; a task that is
        starting right now may be counted both waiting and running for a moment)."""
        fg = self._fg
        return {
            "running_background": len(self._running_threads) + len(self._running_coros),
            "queued_background": len(self._waiting),
            "foreground": fg.task if fg is not None else None,
            "foreground_handed_over": bool(fg is not None and fg.handed_over),
            "results_uid": self.results_uid,
            "finished": len(self._finished),
            "threads": self._pool.threads,
        }


    # -- lookups --------------------------------------------------------------------------
    def find(self, uid_or_prefix: str) -> Task:
        """The task with this uid, or with this unique uid prefix (at least 4 characters)."""
        if not isinstance(uid_or_prefix, str) or not uid_or_prefix:
            raise TaskNotFound(f"Task uid must be a non-empty string, got {uid_or_prefix!r}.", "invalid")
        spellings = uid_spellings(uid_or_prefix)
        with self._lock:
            for typed in spellings:  # (an exact uid first, in any of its spellings)
                job = self._jobs.get(typed)
                if job is not None:
                    return job.task
            if len(uid_or_prefix) < MIN_UID_PREFIX:
                raise TaskNotFound(
                    f"Task uid prefix {uid_or_prefix!r} is too short: give at least "
                    f"{MIN_UID_PREFIX} characters of the uid (see %tasks).", "short"
                )
            items, matches = list(self._jobs.items()), []
            for typed in spellings:  # (the first spelling that some uid starts with)
                matches = matches or [j.task for uid, j in items if uid.startswith(typed)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise TaskNotFound(f"No task with uid {uid_or_prefix!r} in this kernel's memory.")
        raise TaskNotFound(
            f"Task uid prefix {uid_or_prefix!r} matches {len(matches)} tasks; give more characters.",
            "ambiguous",
        )

    def get(self, uid: str) -> Task | None:
        """The task with exactly this uid, or None."""
        job = self._jobs.get(uid)
        return job.task if job is not None else None

    def running_own_task(self) -> Task | None:
        """The task of this engine whose code calls now (None: none, or a task of another
        engine).  Also one recorded as ended while its code runs on (left to end on its
        own: a cancel it did not obey in time, its event loop stopped under it), an asyncio
        task it spawned included, even once it left memory: that code is the task's still."""
        task = current_task()
        return task if task is not None and task._bus is self.bus else None

    def tasks(self) -> list[Task]:
        """Every task in memory, oldest submission first."""
        items = [job.task for job in list(self._jobs.values())]  # (one atomic copy)
        items.sort(key=lambda t: t.submitted_at)
        return items

    @property
    def last_task(self) -> Task | None:
        """The most recently submitted task still in memory."""
        last = self._last
        return last if last is not None and last.uid in self._jobs else None

    def submitted_here(self) -> str | None:
        """The uid of the last task submitted on this thread by code that is no task's
        (announced: the log may hold it), or None; what a caller interrupted midway compares
        (the magics: a foreground task's code, on the same thread, may submit its own)."""
        return getattr(self._here, "uid", None)

    def _note_last(self, task: Task) -> None:
        """``task`` was just announced: the last task, and this thread's (:meth:`submitted_here`)."""
        self._last = task
        if current_task() is None:
            self._here.uid = task.uid

    def clear_finished(self) -> int:
        """Forget every finished task kept in memory; returns how many."""
        removed: list[Task] = []
        with self._lock:
            self._count_sizes()
            while (oldest := self._take_oldest()) is not None:
                uid, job = oldest
                self._drop(uid)
                removed.append(job.task)
        self._expired(removed)
        return len(removed)
