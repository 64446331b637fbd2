"""The experiment log's observer of the engine: it feeds the log with every task's records,
and lets a log that is switched off (or replaced after a change of one of its settings)
finish the records of its tasks before it closes.

Closing a log marks its unfinished tasks "kernel stopped while the task was running" --
right when the kernel stops, wrong when the scientist only switched the log off, or changed
one of its settings, while a scan ran.  So the worker does not close the old log at once: it
*drains* it.  Its observer stays with the engine; new tasks are no longer logged there (the
new log, if any, takes them), the tasks it logged go on being logged there until they end,
then it closes (on a thread of its own: never on a task's thread before its waiters wake).
A worker that closes meanwhile closes it too.  (The new log records their ends as well: in
one database the two records of a task agree.  Not their starts: a start alone makes a row of
the new log's session, which its close would mark "kernel stopped".)
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from . import probe
from .core.task import Task

__all__ = ["LogObserver", "VALUE_REPR_S", "run_value_code"]

#: How long the log waits for a value's repr (a result JSON cannot hold) before it records
#: that it did not finish: a repr that blocks (an object asking a device) must not hold up
#: the task's end, nor the kernel whose cell runs a foreground task (■ waits for the record).
VALUE_REPR_S = 1.0


#: The log's own deadline thread: a read stuck in the doors' (``qmagic-probe``) never makes
#: it give up, nor the other way round.
_REPRS = probe.Prober("qmagic-log-repr")


def run_value_code(fn: Callable[[], Any]) -> Any:
    """``fn()`` with a deadline (on the log's own probe thread, :mod:`qmagic.probe`): the
    experiment log's way to run a value's own code.  Raises TimeoutError past
    :data:`VALUE_REPR_S`, or at once while the repr of an earlier value is still blocked."""
    try:
        return _REPRS.read(fn, VALUE_REPR_S)
    except probe.ProbeTimeout as exc:
        raise TimeoutError(str(exc) if exc.tried else
                           "not tried: an earlier value's repr is still blocked") from None


#: how long :meth:`LogObserver.close` waits for a close already under way (a log's close
#: waits at most 5 s for a disk in a fault, then leaves what is spooled to the next process)
CLOSE_WAIT_S = 30.0


class LogObserver:
    """Feeds ``journal`` (a :class:`qmagic.store.journal.Journal`) from the engine; an
    observer of :class:`qmagic.core.engine.Engine` (records are plain dicts).

    ``live`` holds the uids of the tasks it logged that have not ended (set operations are
    atomic: no lock on the task path).  :meth:`task_submitted` adds before it checks
    ``draining`` and :meth:`drain` sets it before it checks ``live``: a task submitted while
    the drain begins is either logged here to its end or goes to the log in force (none when
    the log was switched off)."""

    def __init__(self, journal: Any) -> None:
        self.journal = journal
        self.live: set[str] = set()
        self.draining = False
        self._once = threading.Lock()  # taken by the one close
        self._done = threading.Event()  # set once it is over
        self._closed: Callable[[LogObserver], None] | None = None
        self._newest: Callable[[], LogObserver | None] = lambda: None  # the log in force
        self._thread: threading.Thread | None = None  # the drain's, once it closes the log

    # -- the engine's observer interface ------------------------------------------------------
    def task_submitted(self, task: Task) -> None:
        uid = task.uid
        self.live.add(uid)  # (first: a drain that begins now waits for this task)
        if self.draining:  # not logged here: by the log in force, if any
            self._forget(uid)
            newest = self._newest()
            if newest is not None and uid not in newest.live:  # it was not told: the engine's
                newest.task_submitted(task)  # list was read before the swap (it comes first)
            return
        try:
            self.journal.submitted(task.to_dict())
        except Exception:  # the engine leaves no trace of the task: nor does the log
            self._forget(uid)
            raise
        # (An interrupt or a forced cancel, which may land after the record was written, keeps
        # the uid: the engine ends that task with a record, logged here too, draining or not.)

    def task_started(self, task: Task) -> None:
        if task.uid in self.live:  # (a start alone makes a row of this session, without a
            self.journal.started(task.uid, task.started_at)  # record, that its close fails)

    def task_finished(self, task: Task, record: dict) -> None:
        uid = task.uid
        try:  # (a closing log has none of its tasks left: the task's uid was noted for the
            # drain's race by a submit cut short, and the log never had it)
            if (not self.draining or uid in self.live) and not self._once.locked():
                self.journal.finished(record)
        finally:
            self._forget(uid)

    # -- draining -----------------------------------------------------------------------------
    def drain(self, closed: Callable[[LogObserver], None],
              newest: Callable[[], LogObserver | None]) -> None:
        """Stop logging new tasks; once the tasks it logged have ended, close the log on a
        thread of its own, then call ``closed(self)`` (the worker takes the observer off the
        engine).  ``newest()``: the observer of the log in force (None: off), which comes
        before this one in the engine's observers; a task announced to this one alone (from
        the list of before the swap) goes to it.  Never waits: the caller has swapped logs,
        and an interrupt (■) landing in a wait here undid the setting although the swap was
        done."""
        self._closed, self._newest = closed, newest
        self.draining = True
        if not self.live:
            self._close_soon()

    def close(self) -> None:
        """Close the log now (its tasks still running end "kernel stopped": the worker is
        closing); returns once it is closed, by this call or by the drain's own thread."""
        if self._once.acquire(blocking=False):  # (else the drain's thread has it)
            self._shut()
        self._done.wait(CLOSE_WAIT_S)
        thread = self._thread
        if thread is not None:  # (it has closed the log; it ends once the worker forgot it)
            thread.join(CLOSE_WAIT_S)

    def _forget(self, uid: str) -> None:
        self.live.discard(uid)
        if self.draining and not self.live:
            self._close_soon()

    def _close_soon(self) -> None:
        """Close on a thread of its own (a task's thread: the close may wait on the disk)."""
        if self._once.acquire(blocking=False):  # (one thread, for the one close)
            self._thread = threading.Thread(target=self._shut, name="qmagic-log-drain", daemon=True)
            try:
                self._thread.start()
            except BaseException:
                self._once.release()
                raise

    def _shut(self) -> None:
        """The one close (the caller holds ``_once``, for good)."""
        try:
            self.journal.close()
        finally:
            self._done.set()
        closed = self._closed
        if closed is not None:
            closed(self)
