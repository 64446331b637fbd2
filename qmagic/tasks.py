"""Tasks: one tracked call of a namespace function (or of an uploaded script).

A :class:`Task` is a ``concurrent.futures.Future``-like handle with status, progress,
captured output and log, timestamps, cancellation and event subscriptions.  Its state
changes only through :meth:`Task._transition`, under the task's one lock, checked against
one table (:data:`TRANSITIONS`).  Tasks are created and run by :mod:`qmagic.engine`.
"""

from __future__ import annotations

import enum
import threading
import time
import traceback as _tb
from collections import deque
from concurrent.futures import CancelledError
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

from .errors import InvalidTransition, TaskCancelled

if TYPE_CHECKING:  # pragma: no cover
    from .events import EventBus, Subscription

__all__ = ["TaskStatus", "Progress", "Task", "TRANSITIONS"]


class TaskStatus(str, enum.Enum):
    """Life cycle of a task.  ``wire`` is what the queueserver protocol shows."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        """True for completed, failed and cancelled."""
        return self in _FINISHED

    @property
    def wire(self) -> str:
        """'running' for queued/running, 'completed' for every finished status."""
        return "completed" if self in _FINISHED else "running"

    def __str__(self) -> str:
        return self.value


_FINISHED = frozenset({TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED})

#: The only allowed status changes.
TRANSITIONS: dict[TaskStatus, frozenset[TaskStatus]] = {
    TaskStatus.QUEUED: frozenset({TaskStatus.RUNNING, TaskStatus.CANCELLED, TaskStatus.FAILED}),
    TaskStatus.RUNNING: frozenset({TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED}),
    TaskStatus.COMPLETED: frozenset(),
    TaskStatus.FAILED: frozenset(),
    TaskStatus.CANCELLED: frozenset(),
}


class Progress(NamedTuple):
    """Last progress reported by a task: ``value`` of ``total`` (either may be None)."""

    value: float | None
    total: float | None
    message: str | None

    @property
    def fraction(self) -> float | None:
        """value/total clipped to [0, 1], or None when unknown."""
        if self.value is None or not self.total:
            return None
        return max(0.0, min(1.0, float(self.value) / float(self.total)))


class _TextBuffer:
    """Bounded text: keeps the newest ``limit`` characters, marks what was dropped."""

    __slots__ = ("_chunks", "_size", "_dropped", "limit")

    def __init__(self, limit: int) -> None:
        self._chunks: deque[str] = deque()
        self._size = 0
        self._dropped = 0
        self.limit = limit

    def write(self, text: str) -> None:
        if not text:
            return
        self._chunks.append(text)
        self._size += len(text)
        while self._size > self.limit and self._chunks:
            excess = self._size - self.limit
            head = self._chunks[0]
            if len(head) <= excess:
                self._chunks.popleft()
                self._size -= len(head)
                self._dropped += len(head)
            else:
                self._chunks[0] = head[excess:]
                self._size -= excess
                self._dropped += excess

    def getvalue(self) -> str:
        text = "".join(self._chunks)
        if self._dropped:
            return f"[... {self._dropped} earlier characters dropped ...]\n" + text
        return text


def _exc_text(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


class Task:
    """Handle of one tracked call.  Created by the worker; never instantiate directly.

    Behaves like :class:`concurrent.futures.Future` (``result``, ``exception``, ``done``,
    ``add_done_callback``, ``cancelled``, ``running``) and adds status, progress,
    timestamps, captured ``output`` and ``log``, ``cancel(force=...)`` and ``subscribe``.
    """

    def __init__(
        self,
        *,
        uid: str,
        name: str,
        call: Callable[[], Any],
        args: tuple | list = (),
        kwargs: dict | None = None,
        user: str,
        user_group: str,
        background: bool,
        origin: str = "python",
        kind: str = "function",
        strict_json: bool = False,
        output_limit: int = 100_000,
        bus: EventBus | None = None,
    ) -> None:
        self.uid = uid
        self.name = name
        self.args = args if type(args) is tuple else tuple(args)
        self.kwargs = kwargs if type(kwargs) is dict else dict(kwargs or {})
        self.user = user
        self.user_group = user_group
        self.background = background
        self.origin = origin
        self.kind = kind
        self.strict_json = strict_json
        self.submitted_at: float = time.time()
        self._call = call
        self._mutex = threading.Lock()  # the task's one lock
        self._output_limit = output_limit
        self._bus = bus

    # Defaults shared by every task until a task sets its own (keeps creation cheap).
    started_at: float | None = None
    finished_at: float | None = None
    #: For script tasks: the names the script added, changed and removed.
    namespace_changes: dict[str, list[str]] | None = None
    _cond_: threading.Condition | None = None  # waits on _mutex; made on first use
    _status = TaskStatus.QUEUED
    _result: Any = None
    _exception: BaseException | None = None
    _traceback: str | None = None
    _progress: Progress | None = None
    _output: _TextBuffer | None = None  # created on first write
    _log: _TextBuffer | None = None
    _log_records: deque[dict] | None = None
    _cancel_requested = False
    _cancel_reason = "Task was cancelled"
    _thread_ident: int | None = None
    _in_queue = False
    _after_done = False
    _end_told = False  # observers (the journal) heard the final record
    _retained = False  # the engine put it on its finished list
    _finish_time: float | None = None  # set just before the final transition
    _ended = False  # the engine released the task's thread / foreground slot
    _hook_tokens: list | None = None
    _in_user_code = False
    _done_callbacks: tuple[Callable[[Task], Any], ...] = ()
    _subscribers: tuple[Subscription, ...] = ()
    _json_checked: tuple[bool, str] | None = None

    # -- read-only views ---------------------------------------------------------------
    @property
    def status(self) -> TaskStatus:
        """Current :class:`TaskStatus`."""
        return self._status

    @property
    def progress(self) -> Progress | None:
        """Last reported :class:`Progress`, or None."""
        return self._progress

    @property
    def elapsed(self) -> float:
        """Seconds spent running so far (or in total, once finished); 0 while queued."""
        start = self.started_at
        if start is None:
            return 0.0
        return (self.finished_at or time.time()) - start

    @property
    def traceback(self) -> str | None:
        """Formatted traceback of a failed or cancelled task, else None."""
        return self._traceback

    @property
    def output(self) -> str:
        """Text the task printed (stdout and stderr), newest ``task_output_limit`` characters."""
        with self._mutex:
            return self._output.getvalue() if self._output is not None else ""

    @property
    def log(self) -> list[dict]:
        """Logging records emitted while the task ran: dicts with time, level, logger, message."""
        with self._mutex:
            return list(self._log_records or ())

    @property
    def log_text(self) -> str:
        """The captured log records as text (bounded like ``output``)."""
        with self._mutex:
            return self._log.getvalue() if self._log is not None else ""

    @property
    def cancel_requested(self) -> bool:
        """True once ``cancel()`` was called (the task may still be finishing)."""
        return self._cancel_requested

    # -- Future API ----------------------------------------------------------------------
    def done(self) -> bool:
        """True when the task finished (completed, failed or cancelled)."""
        return self._status.finished

    def running(self) -> bool:
        """True while the task runs."""
        return self._status is TaskStatus.RUNNING

    def cancelled(self) -> bool:
        """True when the task ended as cancelled."""
        return self._status is TaskStatus.CANCELLED

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the task finishes or ``timeout`` seconds pass; True if it finished."""
        if self._status.finished:
            return True
        with self._mutex:
            return self._condition().wait_for(self.done, timeout)

    def result(self, timeout: float | None = None) -> Any:
        """Return the function's return value, waiting up to ``timeout`` seconds.

        Raises ``TimeoutError`` if it is still running, ``concurrent.futures.CancelledError``
        if it was cancelled, or the function's own exception if it failed.
        """
        if not self.wait(timeout):
            raise FutureTimeout(
                f"Task {self.uid} ({self.name}) is still {self._status.value} after {timeout} s; "
                "call result() again later, or task.cancel() to stop it."
            )
        if self._status is TaskStatus.CANCELLED:
            raise CancelledError(f"Task {self.uid} ({self.name}) was cancelled: {self._cancel_reason}")
        if self._exception is not None:
            raise self._exception
        return self._result

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The exception of a failed task (None if it completed); waits like ``result``."""
        if not self.wait(timeout):
            raise FutureTimeout(f"Task {self.uid} ({self.name}) is still {self._status.value}.")
        if self._status is TaskStatus.CANCELLED:
            raise CancelledError(f"Task {self.uid} ({self.name}) was cancelled.")
        return self._exception

    def add_done_callback(self, fn: Callable[[Task], Any]) -> None:
        """Call ``fn(task)`` when the task finishes (at once if it already has).

        Like ``Future.add_done_callback``: it runs in the thread that finished the task;
        an exception in ``fn`` is logged and ignored.
        """
        with self._mutex:
            if not self.done():
                self._done_callbacks = self._done_callbacks + (fn,)
                return
        _call_logged(fn, self)

    def cancel(self, force: bool = False) -> bool:
        """Ask the task to stop.  Returns False if it had already finished.

        A queued task is cancelled at once without running.  A running task is cancelled
        cooperatively: ``qmagic.raise_if_cancelled()``, ``qmagic.cancellable_sleep()`` and
        ``qmagic.report_progress()`` raise :class:`qmagic.TaskCancelled` inside it.  With
        ``force=True``, a task still running ``cancel_grace_s`` seconds later gets
        ``TaskCancelled`` raised asynchronously in its thread (this cannot interrupt a C call
        in progress such as a blocking ``socket.recv`` or ``lock.acquire()`` without timeout;
        ``time.sleep`` is interrupted only when it returns).
        """
        if self._bus is not None and self._bus.engine is not None:
            return self._bus.engine.cancel_task(self, force=force)
        return self._request_cancel("Task was cancelled") is not None

    # -- subscriptions -------------------------------------------------------------------
    def subscribe(self, callback: Callable[..., Any]) -> Subscription:
        """Receive this task's events as ``callback(**kwargs)``.

        Delivers the current status (and progress) first, then every later event, in
        order: status, progress..., result or error, final status.  See
        :meth:`qmagic.Worker.subscribe` for the keyword names.
        """
        if self._bus is None:
            raise RuntimeError("This task is not attached to a worker; it has no events.")
        return self._bus.subscribe_task(self, callback)

    # -- plain data ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A snapshot as plain data: the call, who, where, times, status, progress, the
        result (the object itself), the error text and the traceback."""
        with self._mutex:
            return self.to_dict_locked()

    def to_dict_locked(self) -> dict[str, Any]:
        """:meth:`to_dict` for a caller that holds the task's lock."""
        progress = self._progress._asdict() if self._progress is not None else None
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
            "status": self._status.value,
            "submitted_at": self.submitted_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "progress": progress,
            "result": self._result,
            "error": self._error_text(),
            "error_type": (
                type(self._exception).__name__ if self._exception is not None
                else "TaskCancelled" if self._status is TaskStatus.CANCELLED else None
            ),
            "traceback": self._traceback,
            "namespace_changes": self.namespace_changes,
        }

    def final_record(
        self,
        status: TaskStatus,
        result: Any,
        exc: BaseException | None,
        tb: str | None,
        finished_at: float,
    ) -> dict[str, Any]:
        """:meth:`to_dict` as it will read once the task ends with this outcome."""
        record = self.to_dict()
        if exc is None:
            error = error_type = None
        else:
            error = _exc_text(exc)
            error_type = "TaskCancelled" if status is TaskStatus.CANCELLED else type(exc).__name__
        record.update(
            status=status.value, result=result, error=error, error_type=error_type,
            traceback=tb, finished_at=finished_at,
        )
        return record

    def _error_text(self) -> str | None:
        if self._exception is not None:
            return _exc_text(self._exception)
        if self._status is TaskStatus.CANCELLED:
            return self._cancel_reason
        return None

    def call_text(self, width: int = 60) -> str:
        """``name(arg, ..., key=value)`` shortened to about ``width`` characters."""
        parts = [_short_repr(a) for a in self.args]
        parts += [f"{k}={_short_repr(v)}" for k, v in self.kwargs.items()]
        text = f"{self.name}({', '.join(parts)})"
        return text if len(text) <= width else text[: width - 4] + "...)"

    def __repr__(self) -> str:
        # Deterministic (no uid, no times): notebooks compare it with nbval.
        where = "background" if self.background else "foreground"
        return f"<Task {self.call_text()} {where} {self._status.value}>"

    # -- engine side (private) -------------------------------------------------------------
    def _transition(self, new: TaskStatus) -> None:
        """Change status (caller holds ``self._mutex``); raises InvalidTransition if forbidden."""
        if new not in TRANSITIONS[self._status]:
            raise InvalidTransition(
                f"Task {self.uid} cannot go from {self._status.value} to {new.value}."
            )
        self._status = new
        if new.finished:
            self._notify()

    def _request_cancel(self, reason: str) -> TaskStatus | None:
        """Set the cancel flag; cancel a queued task at once.  Returns the status seen,
        or None if the task had already finished."""
        with self._mutex:
            if self.done():
                return None
            if not self._cancel_requested:
                self._cancel_reason = reason
                self._cancel_requested = True
                self._notify()  # wakes cancellable_sleep
            status = self._status
            if status is TaskStatus.QUEUED:
                self._finish_locked(TaskStatus.CANCELLED, exc=TaskCancelled(reason), tb=None)
        if status is TaskStatus.QUEUED:
            self._after_finish()
        return status

    def _finish_locked(
        self,
        status: TaskStatus,
        *,
        result: Any = None,
        exc: BaseException | None = None,
        tb: str | None = None,
        finished_at: float | None = None,
    ) -> None:
        """Record the outcome and emit result/error then the final status (lock held)."""
        self._transition(status)  # checked first: nothing is set when it is refused
        self._result = result
        self._exception = None if status is TaskStatus.CANCELLED else exc
        self._traceback = tb
        self.finished_at = finished_at or time.time()
        if self._bus is not None and self._bus.engine is not None:
            self._bus.engine._result_added()  # after the transition: clients then see it done
        if status is TaskStatus.CANCELLED and exc is not None:
            self._cancel_reason = _exc_text(exc)
        if self._bus is not None:
            if status is TaskStatus.COMPLETED:
                self._bus.emit(self, result=result)
            else:
                self._bus.emit(self, error=exc if exc is not None else TaskCancelled())
            self._bus.emit(self, status=status.value)

    def _after_finish(self) -> None:
        """Bookkeeping after the final transition, without the task lock (idempotent)."""
        with self._mutex:
            if self._after_done:
                return
            self._after_done = True
        if self._bus is not None and self._bus.engine is not None:
            self._bus.engine._task_finished(self)
        # No callback can be added once the task is done (add_done_callback checks under
        # the lock), so the list is final here.
        callbacks, self._done_callbacks = self._done_callbacks, ()
        for fn in callbacks:
            _call_logged(fn, self)

    def _write_output(self, text: str) -> None:
        with self._mutex:
            if self._output is None:
                self._output = _TextBuffer(self._output_limit)
            self._output.write(text)

    def _add_log_record(self, record: dict, line: str) -> None:
        with self._mutex:
            if self._log is None:
                self._log = _TextBuffer(self._output_limit)
                self._log_records = deque(maxlen=1000)
            self._log_records.append(record)
            self._log.write(line)

    def _condition(self) -> threading.Condition:
        """The condition on ``_mutex`` that waiters use (caller holds ``_mutex``)."""
        if self._cond_ is None:
            self._cond_ = threading.Condition(self._mutex)
        return self._cond_

    def _notify(self) -> None:
        if self._cond_ is not None:
            self._cond_.notify_all()

    def _wait_cancel(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for a cancel request; True if one came."""
        with self._mutex:
            return self._condition().wait_for(lambda: self._cancel_requested, timeout)

    def _set_progress(self, progress: Progress) -> None:
        with self._mutex:
            if self.done():
                return
            self._progress = progress
            if self._bus is not None:
                self._bus.emit(self, progress=progress)


def _short_repr(value: Any, limit: int = 24) -> str:
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a broken __repr__ must not break listings
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_exception(exc: BaseException) -> str:
    """Full traceback text of ``exc``."""
    return "".join(_tb.format_exception(type(exc), exc, exc.__traceback__))


def _call_logged(fn: Callable[..., Any], *args: Any) -> None:
    try:
        fn(*args)
    except Exception:  # noqa: BLE001 - a user's callback must never break a task
        import logging

        logging.getLogger("qmagic").exception("Error in task callback %r", fn)
