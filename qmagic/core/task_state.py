"""The state of a tracked task and the protocol its runner moves it with.

:class:`TaskState` is the ``concurrent.futures.Future`` part of a :class:`~qmagic.core.task.Task`:
the fields, the transition table (:data:`~qmagic.core.status.TRANSITIONS`) and the small
protocol through which a runner changes them — :meth:`TaskState._start`,
:meth:`TaskState._claim_end`, :meth:`TaskState._finish`, cancel requests, progress and
captured output — always under the task's one lock (``_mutex``, the lock of the Future's
``_condition``; critical sections take the C-level lock itself, so an interrupt or a forced
cancel landing on any bytecode can never leave it held).  As in CPython's executors, nothing
else changes a task's state.

A task allocates little: the Future's condition and lists are made on first use, since every
object a task holds is work for the garbage collector during a burst of small tasks.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from concurrent.futures._base import CANCELLED_AND_NOTIFIED, FINISHED, PENDING, RUNNING
from concurrent.futures._base import LOGGER as _futures_log
from typing import TYPE_CHECKING, Any, Callable

from ..errors import InvalidTransition, TaskCancelled
from .capture import TextBuffer
from .status import TRANSITIONS, Progress, TaskStatus

if TYPE_CHECKING:  # pragma: no cover
    from .events import EventBus, Subscription
    from .task import Task

__all__ = ["INTERRUPTED", "CancelHook", "TaskState", "exception_text"]

#: Why a task stopped by ■ / KeyboardInterrupt was cancelled.
INTERRUPTED = "Task was interrupted (■ or KeyboardInterrupt)"

#: Called by :meth:`Task.cancel`: ``(task, force, reason) -> bool`` (the engine's, or the
#: worker's, which applies the lock rule first).
CancelHook = Callable[["Task", bool, str], bool]


def exception_text(exc: BaseException) -> str:
    """``str(exc)``, or the exception's class name when that is empty; for ``SystemExit``
    what the code did (``str`` of ``sys.exit(3)`` is a bare "3")."""
    if isinstance(exc, SystemExit):
        code = getattr(exc, "code", None)
        return "the code called sys.exit()" if code is None else f"the code called sys.exit({code!r})"
    try:
        text = str(exc)
    except Exception:  # noqa: BLE001 - a broken __str__ must not lose the record
        text = ""
    if text == _SIGNAL_OFF_MAIN and isinstance(exc, ValueError):
        return f"{text}: {_SIGNAL_HINT}"
    return text or type(exc).__name__


#: Python's words for a signal handler set by a thread other than the main one -- what
#: bluesky's ``RE(plan)`` does in a background (or coroutine) task, a common mistake that the
#: words alone do not explain (the beamtime tester).
_SIGNAL_OFF_MAIN = "signal only works in main thread of the main interpreter"
_SIGNAL_HINT = ("the code set a signal handler, which only the kernel's main thread may (bluesky's "
                "RE(...) does): run it in the foreground (without -b, from a plain def), or RE(plan) in a cell")


class _Captured:
    """What a task's code printed and logged (:mod:`qmagic.core.capture` keeps it), bounded
    to ``_output_limit`` characters each; kept only until the task's end is claimed: a
    finished task's output and log never change (code it started that inherited its context,
    an asyncio task it created, may print after it ended)."""

    _mutex: threading.Lock
    _output_limit: int
    _ending: bool
    _output: TextBuffer | None = None
    _log: TextBuffer | None = None
    _log_records: deque | None = None
    #: The context the task's code runs in (its output's cell), while it runs: what the
    #: threads its work starts print goes to the same cell (:mod:`qmagic.core.capture`).
    _work_context: Any = None

    def _write_output(self, text: str) -> bool:
        """Keep printed ``text``; False (not kept) once the end was claimed."""
        with self._mutex:
            if self._ending:
                return False
            if self._output is None:
                self._output = TextBuffer(self._output_limit)
            self._output.write(text)
            return True

    def _add_log_record(self, record: dict, line: str) -> None:
        """Keep a log record and its text line (not once the end was claimed)."""
        with self._mutex:
            if self._ending:
                return
            if self._log is None:
                self._log = TextBuffer(self._output_limit)
                self._log_records = deque(maxlen=1000)
            self._log_records.append(record)
            self._log.write(line)


class TaskState(_Captured, Future):
    """The fields of a task and the runner protocol (see the module docstring); the
    user-facing handle is :class:`~qmagic.core.task.Task`."""

    def __init__(
        self,
        uid: str,
        name: str,
        *,
        args: tuple = (),
        kwargs: dict | None = None,
        user: str,
        user_group: str,
        background: bool,
        origin: str = "python",
        kind: str = "function",
        timeout: float | None = None,
        provenance: dict | None = None,
        output_limit: int = 100_000,
        bus: EventBus | None = None,
        on_cancel: CancelHook | None = None,
    ) -> None:
        # Future.__init__'s fields, with a plain Lock (nothing here re-enters the lock); the
        # Condition over it is made on first use (most tasks are never waited on while they
        # run, and every object a task allocates is work for the garbage collector).
        self._mutex = threading.Lock()
        self._state = PENDING
        self._result = None
        self._exception = None
        self.uid = uid
        self.name = name
        self.args = args if type(args) is tuple else tuple(args)
        self.kwargs = kwargs if type(kwargs) is dict else dict(kwargs or {})
        self.user = user
        self.user_group = user_group
        self.background = background
        self.origin = origin
        self.kind = kind
        self.timeout = timeout
        self.provenance = provenance
        self.submitted_at: float = time.time()
        self._output_limit = output_limit
        self._bus = bus
        self._on_cancel = on_cancel

    # Class-level defaults: shared until a task sets its own (keeps creation cheap).
    started_at: float | None = None
    finished_at: float | None = None
    #: Bytes of the remote request that sent the arguments (0 from Python, magics, panels).
    payload_bytes: int = 0
    #: For script tasks: the names the script added, changed and removed.
    namespace_changes: dict[str, list[str]] | None = None
    _status = TaskStatus.QUEUED
    _traceback: str | None = None
    _error: BaseException | None = None  # what ended a failed or cancelled task
    #: A failed task's error text, made once as it ended, on its own thread: ``str()`` of
    #: its exception is its own code, which readers (the control channel) must not run.
    _error_text: str | None = None
    _exception_tb: Any = None  # a failed task's traceback from the user's first frame on
    _progress: Progress | None = None
    _cancel_requested = False
    _cancel_reason = "Task was cancelled"
    _ending = False  # a runner claimed the right to finish the task (never reset)
    #: While the task's code runs: its thread's ident (a thread task), or the asyncio task
    #: running its coroutine (or its function's awaitable result): see ``qmagic.core.task._waiter_loop``.
    _own_code: Any = None
    _subscribers: tuple[Subscription, ...] = ()
    _progress_waiting: list | None = None  # the bus's undelivered progress, if it is the last event

    @property
    def _condition(self) -> threading.Condition:
        """The Future's condition (over ``_mutex``), made by the first thread that needs it;
        ``setdefault`` is atomic, so racing threads all get the same one."""
        cond = self.__dict__.get("_cond")
        if cond is None:
            cond = self.__dict__.setdefault("_cond", threading.Condition(self._mutex))
        return cond

    # Future's lists of ``concurrent.futures.wait`` waiters and done callbacks, made on
    # first use too.
    @property
    def _waiters(self) -> list:
        lst = self.__dict__.get("_waiter_list")
        return lst if lst is not None else self.__dict__.setdefault("_waiter_list", [])

    @property
    def _done_callbacks(self) -> list:
        lst = self.__dict__.get("_callback_list")
        return lst if lst is not None else self.__dict__.setdefault("_callback_list", [])

    def _forget_done_callback(self, fn: Callable[..., Any]) -> None:
        """Take back a done callback of a task that has not finished (else it has run or is
        running: the list is left alone while the task's end goes through it)."""
        with self._mutex:
            if not self._status.finished:
                lst = self.__dict__.get("_callback_list")
                if lst is not None and fn in lst:
                    lst.remove(fn)

    def _invoke_callbacks(self) -> None:
        for callback in self.__dict__.get("_callback_list", ()):
            try:
                callback(self)
            except Exception:  # noqa: BLE001 - as Future does: log, never break the task
                _futures_log.exception("exception calling callback for %r", self)

    def _notify_waiters(self) -> None:
        """Wake every thread waiting on the condition (caller holds ``_mutex``).  A waiter
        makes the condition before it takes ``_mutex``, so none is missed."""
        cond = self.__dict__.get("_cond")
        if cond is not None:
            cond.notify_all()

    def _record(self, status: TaskStatus, result: Any, error: BaseException | None,
                tb: str | None, finished_at: float | None) -> dict[str, Any]:
        progress = self._progress
        if status is TaskStatus.CANCELLED:
            error_text, error_type = self._reason_for(error), "TaskCancelled"
        elif error is not None:
            text = self._error_text if error is self._error else None
            error_text, error_type = text or exception_text(error), type(error).__name__
        else:
            error_text = error_type = None
        return {
            "uid": self.uid,
            "name": self.name,
            "kind": self.kind,
            "args": list(self.args),
            "kwargs": dict(self.kwargs),
            "user": self.user,
            "user_group": self.user_group,
            "background": self.background,
            "origin": self.origin,
            "status": status._value_,  # (``.value`` is a property: two Python calls)
            "submitted_at": self.submitted_at,
            "started_at": self.started_at,
            "finished_at": finished_at,
            "progress": progress._asdict() if progress is not None else None,
            "result": result,
            "error": error_text,
            "error_type": error_type,
            "traceback": tb,
            "timeout": self.timeout,
            "namespace_changes": self.namespace_changes,
            "provenance": self.provenance,
        }

    # =====================================================================================
    # The runner protocol (engine side).  Like Future.set_running_or_notify_cancel and
    # set_result in CPython's executors; nothing else changes a task's state.
    # =====================================================================================
    def _start(self) -> bool:
        """queued -> running; False when the task was cancelled (or claimed) meanwhile."""
        with self._mutex:
            if self._status is not TaskStatus.QUEUED or self._ending:
                return False
            self._status = TaskStatus.RUNNING
            self._state = RUNNING
            self.started_at = time.time()
            if self._bus is not None:
                self._bus.emit(self, status="running")
            return True

    def _claim_end(self, *, queued_only: bool = False) -> bool:
        """Claim the right to finish this task (one claimant wins).

        Finishing is two steps so that the final record can be written without holding the
        lock: claim, write, then :meth:`_finish`.  ``queued_only``: only while queued
        (a cancel of a task that has not started).
        """
        with self._mutex:
            if self._ending or self._status.finished:
                return False
            if queued_only and self._status is not TaskStatus.QUEUED:
                return False
            self._ending = True
            return True

    def _final_record(self, status: TaskStatus, result: Any, error: BaseException | None,
                      tb: str | None, finished_at: float) -> dict[str, Any]:
        """The record as it will read once :meth:`_finish` ran with these values."""
        with self._mutex:
            return self._record(status, result, error, tb, finished_at)

    def _finish(self, status: TaskStatus, *, result: Any = None, error: BaseException | None = None,
                tb: str | None = None, finished_at: float | None = None) -> None:
        """Record the outcome, wake waiters, emit result/error and the final status, then
        run the done callbacks (the claimant calls this once)."""
        failed = error is not None and status is TaskStatus.FAILED
        user_tb = _user_traceback(error) if failed else None
        error_text = exception_text(error) if failed else None  # (the task's code: outside the lock)
        with self._mutex:
            self._check(status)
            self._traceback = tb
            self.finished_at = finished_at or time.time()
            # The outcome first, the status last: readers that skip the lock once the status
            # is final (wait, result, done...) find everything in place.
            if status is TaskStatus.CANCELLED:
                self._cancel_reason = self._reason_for(error)
                self._error = error
                self._state = CANCELLED_AND_NOTIFIED
                self._status = status
                for waiter in self.__dict__.get("_waiter_list", ()):
                    waiter.add_cancelled(self)
            else:
                self._result = result
                self._exception = self._error = error
                self._error_text = error_text
                self._exception_tb = user_tb
                self._state = FINISHED
                self._status = status
                for waiter in self.__dict__.get("_waiter_list", ()):
                    if error is None:
                        waiter.add_result(self)
                    else:
                        waiter.add_exception(self)
            bus = self._bus
            if bus is not None and bus.listening(self):
                if status is TaskStatus.COMPLETED:
                    bus.emit(self, result=result)
                else:
                    bus.emit(self, error=error if error is not None else TaskCancelled(self._cancel_reason))
                bus.emit(self, status=status.value)
            self._notify_waiters()  # last: a woken waiter finds the lock free at once
        self._invoke_callbacks()

    def _request_cancel(self, reason: str) -> TaskStatus | None:
        """Set the cancel flag (first reason wins); returns the status seen, None if the task
        had already finished.  Ending a queued task is the caller's job (:meth:`_claim_end`)."""
        with self._mutex:
            if self._status.finished:
                return None
            if not self._cancel_requested:
                self._cancel_reason = reason
                self._cancel_requested = True
                self._notify_waiters()  # wakes cancellable_sleep
            return self._status

    def _add_to_cancel_reason(self, text: str) -> None:
        """Add ``text`` to the reason of a task whose cancel was asked for, unless it ended."""
        with self._mutex:
            if self._cancel_requested and not self._status.finished:
                self._cancel_reason += text

    def _reason_for(self, error: BaseException | None) -> str:
        """Why a task ending with ``error`` was cancelled: the reason asked for, else ■ (a
        KeyboardInterrupt), else what stopped it (the record and the task agree)."""
        if self._cancel_requested or error is None:
            return self._cancel_reason
        return INTERRUPTED if isinstance(error, KeyboardInterrupt) else exception_text(error)

    def _check(self, new: TaskStatus) -> None:
        if new not in TRANSITIONS[self._status]:
            raise InvalidTransition(f"Task {self.uid} cannot go from {self._status.value} to {new.value}.")

    def _wait_cancel(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for a cancel request; True if one came."""
        return self._wait_until(lambda: self._cancel_requested, timeout, for_end=False)

    def _set_progress(self, progress: Progress) -> None:
        with self._mutex:
            if self._status.finished:
                return
            self._progress = progress
            if self._bus is not None:
                self._bus.emit(self, progress=progress)

    # Future's state questions, without the lock: one read of the status, which _finish sets
    # last.  (Future's own take the lock, and concurrent.futures.wait(...,
    # return_when=FIRST_EXCEPTION) asks cancelled() while it holds every future's lock: with
    # a lock that is not re-entrant, that would never return.)
    def cancelled(self) -> bool:
        """True if the task was cancelled."""
        return self._status is TaskStatus.CANCELLED

    def running(self) -> bool:
        """True while the task's code runs."""
        return self._status is TaskStatus.RUNNING

    def done(self) -> bool:
        """True once the task has finished (completed, failed or cancelled)."""
        return self._status.finished

    # Future's own state setters would bypass the status table: runners use the protocol above.
    def set_running_or_notify_cancel(self, *unused: Any) -> Any:
        """Not for qmagic tasks (a ``Future`` method of executors): raises RuntimeError."""
        raise RuntimeError("qmagic tasks are started and finished by the qmagic engine only.")

    set_result = set_exception = set_running_or_notify_cancel


def _user_traceback(error: BaseException) -> Any:
    from ..tracebacks import user_traceback

    return user_traceback(error)
