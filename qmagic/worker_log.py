"""The worker's experiment log: the engine's observer that feeds the log with every task's
records and lets a log that is switched off (or replaced after a change of one of its
settings) finish the records of its tasks before it closes; and the worker's side of it
(:class:`LogMixin`: opening, swapping, health).

Closing a log marks its unfinished tasks "kernel stopped while the task was running" --
right when the kernel stops, wrong when the scientist only switched the log off, or changed
one of its settings, while a scan ran.  So the worker does not close the old log at once: it
*drains* it.  Its observer stays with the engine; new tasks are no longer logged there (the
new log, if any, takes them), the tasks it logged go on being logged there until they end,
then it closes (on a thread of its own: never on a task's thread before its waiters wake).
A worker that closes meanwhile closes it too.  A task belongs to the log it was submitted in:
its start and end go there, once; a log opened later (another ``environment_name`` or
``state_dir``) never gets a partial copy (an end alone reads as a task it had), nor a task
submitted while the log was off.  Within one database (another retention or size setting)
the new log records the end too: its reads (the worker's lookups) see it at once, as the
old log's writer may not have stored it yet.  Never the start: a start alone makes a row of
the new log's session, which its close would mark "kernel stopped".
"""

from __future__ import annotations

import logging
import platform
import threading
import time
from collections.abc import Callable
from typing import Any, ContextManager, Mapping

from traitlets import HasTraits, observe

from . import probe
from .core.engine import CLOSED_HINT
from .core.task import Task
from .errors import LOG_OFF, LogUnavailable, StateFileError
from .history_text import log_health_note

__all__ = ["LogMixin", "LogObserver", "VALUE_REPR_S", "run_value_code"]

log = logging.getLogger("qmagic")

#: Why there is no log, when the worker was closed (its records stay readable).
LOG_CLOSED = ("The experiment log was closed with the qmagic worker: it records no new task (what it "
              f"holds stays readable: %tasks --history, qmagic.history()); {CLOSED_HINT}.")
#: Why there is no log, when it is on but could not be opened (a warning said why).
LOG_NOT_OPENED = ("The experiment log could not be opened (a warning in the kernel's log said why: a "
                  "state folder that cannot be written, say): choose a folder you can write "
                  "(QMagic.state_dir or $QMAGIC_STATE_DIR).")


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
                           "an earlier value's repr is still blocked") from None


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
            if uid in self.live and not self._once.locked():
                self.journal.finished(record)
                if self.draining:  # (the log in force reads the same database: it sees the end)
                    newest = self._newest()
                    if newest is not None and newest is not self:
                        newest._same_database_end(self.journal, record)
        finally:
            self._forget(uid)

    def _same_database_end(self, journal: Any, record: dict) -> None:
        """Record the end of a task ``journal`` (a draining log's) logged, if this log writes
        to the same database and is not closing; a log elsewhere never gets a partial copy."""
        if self.journal.path == journal.path and not self.draining and not self._once.locked():
            self.journal.finished(record)

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

    def close(self, timeout: float | None = None) -> None:
        """Close the log now (its tasks still running end "kernel stopped": the worker is
        closing); returns once it is closed, by this call or by the drain's own thread, or
        within ``timeout`` (see :meth:`qmagic.store.journal.Journal.close`)."""
        wait = CLOSE_WAIT_S if timeout is None else timeout
        deadline = time.monotonic() + wait
        if self._once.acquire(blocking=False):  # (else the drain's thread has it)
            self._shut(timeout)
        self._done.wait(max(0.0, deadline - time.monotonic()))
        thread = self._thread
        if thread is not None:  # (it has closed the log; it ends once the worker forgot it)
            thread.join(max(0.0, deadline - time.monotonic()))

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

    def _shut(self, timeout: float | None = None) -> None:
        """The one close (the caller holds ``_once``, for good)."""
        try:
            self.journal.close(timeout)
        finally:
            self._done.set()
        closed = self._closed
        if closed is not None:
            closed(self)


class LogMixin(HasTraits):
    """The experiment log of :class:`qmagic.Worker`: opened for the settings, swapped when
    they change (the old log drains), and its health for the views.  A mix-in (with
    :class:`qmagic.worker_state.StateMixin`, whose ``_apply_setting``, ``_state_lock`` and
    ``_check_not_closed`` it uses)."""

    # -- opening and swapping ----------------------------------------------------------------------
    def _new_log(self) -> LogObserver | None:
        """Store what the log in force holds (other kernels see those tasks; an interrupt in
        this wait changes nothing yet) -- unless it is in a fault: the cell does not wait
        then; the old log, draining, stores it once the fault clears (or, if the fault
        outlasts its close, the next log to open the folder does) -- then open a log
        for the current settings: its observer, or None when the log is off or cannot be
        opened (a warning says why)."""
        from . import __version__

        current = self._journal
        if current is not None:
            current.flush(stop_at_fault=True)
        if not self.journal_enabled:
            return None
        try:
            from .store.journal import Journal

            journal = Journal(
                self._state_dir(), self.environment_name,
                max_age_s=self.journal_max_age_s, max_bytes=self.journal_max_bytes,
                summary_chars=self.journal_summary_chars, fsync=self.journal_fsync,
                pending_limit=self.journal_pending_limit,
                session_info={"qmagic_version": __version__,
                              "python_version": platform.python_version()},
                run_value_code=run_value_code,
            )
        except (StateFileError, OSError, ImportError) as exc:
            log.warning("qmagic: the experiment log is off: %s", exc)
            return None
        return LogObserver(journal)

    def _swap_log(self, observer: LogObserver | None) -> None:
        """Put ``observer``'s log in force (None: no log).  The old one drains
        (:mod:`qmagic.worker_log`): it logs no new task, its tasks' records end as the tasks
        do (never "kernel stopped" because a setting changed or the log was switched off),
        then it closes.  Never waits."""
        with self._state_lock:  # (one swap: a task submitted meanwhile is logged by one of them)
            old = self._log_observer
            if old is not None:
                self._draining.add(old)  # (stays with the engine until it has drained)
            if observer is not None:  # (newest first: see LogObserver.drain)
                self.engine.observers = [observer, *self.engine.observers]
            self._journal = observer.journal if observer is not None else None
            self._log_observer = observer
        if old is not None:
            old.drain(self._drained, lambda: self._log_observer)

    def _drained(self, observer: LogObserver) -> None:
        """A drained log has closed: the engine forgets its observer."""
        with self._state_lock:
            self._draining.discard(observer)
            self.engine.observers = [o for o in self.engine.observers if o is not observer]

    @observe("journal_enabled", "journal_max_bytes", "journal_max_age_s", "journal_fsync",
             "journal_summary_chars", "journal_pending_limit")
    def _journal_setting(self, change: Mapping[str, Any]) -> None:
        def apply(commit: Callable[[], ContextManager[None]]) -> None:
            self._check_not_closed(task=False)  # (no new log: the setting goes back)
            observer = self._new_log()
            try:
                with commit():
                    self._swap_log(observer)
            except BaseException:
                if observer is not None and self._log_observer is not observer:
                    observer.journal.close()
                raise

        self._apply_setting(change, apply)

    # -- its state, for the views ----------------------------------------------------------------
    @property
    def log_open(self) -> bool:
        """True while new tasks are logged: ``journal_enabled``, and the log could be opened
        (else a warning said why: a read-only state folder...).  A log switched off or
        replaced while its tasks run still records how they end (see :meth:`log_health`),
        but no new task."""
        return self._journal is not None

    def log_health(self) -> dict[str, Any]:
        """The experiment log's state: ok, pending and dropped records, last error, path.
        A log switched off or replaced while its tasks run counts too until it closes (its
        faults, its records waiting or lost are real); ``draining`` says how many such logs
        there are, and ``open`` whether new tasks are logged (:attr:`log_open`): False when
        only such logs are left.  Raises LogUnavailable when no log is open at all."""
        with self._state_lock:  # (one moment: ``open`` and the logs counted agree)
            journal = self._journal
            draining = [observer.journal for observer in self._draining]
        healths = [journal.health()] if journal is not None else []
        for old in draining:
            try:
                healths.append(old.health())
            except Exception:  # noqa: BLE001 - it closed meanwhile: nothing of it to count
                continue
        if not healths:
            raise self._log_unavailable()
        health = dict(healths[0], draining=len(draining), open=journal is not None)
        for other in healths[1:]:
            health["ok"] = health["ok"] and other["ok"]
            for key in ("pending", "in_memory", "dropped"):
                health[key] += other[key]
            health["last_error"] = health["last_error"] or other["last_error"]
        return health

    def _log_unavailable(self) -> LogUnavailable:
        """Why no log answers, and what to do: it is off, it closed with the worker, or it
        could not be opened."""
        if not self.journal_enabled:
            return LogUnavailable(LOG_OFF)
        return LogUnavailable(LOG_CLOSED if self.engine.closed else LOG_NOT_OPENED)

    def log_note(self) -> str | None:
        """One line when the experiment log needs attention (a fault, or records lost; see
        :func:`qmagic.history_text.log_health_note`), for the views that mention it; None while it
        is healthy or off."""
        try:
            health = self.log_health()
        except LogUnavailable:  # the log is off: nothing to say
            return None
        return log_health_note(health)
