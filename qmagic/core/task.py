"""A tracked task: a :class:`concurrent.futures.Future` with status, progress and output.

A :class:`Task` *is* a ``concurrent.futures.Future`` (``concurrent.futures.wait``,
``as_completed`` and ``asyncio.wrap_future`` accept it, and ``await task`` works in a cell
and in coroutines).  As in CPython's executors, the state lives in the future: the runner
that executes a task moves it along the transition table (:data:`TRANSITIONS`) through a
small protocol (:meth:`Task._start`, :meth:`Task._claim_end`, :meth:`Task._finish`), always
under the task's one lock (``_mutex``, the lock of the Future's ``_condition``; critical
sections take the C-level lock itself, so an interrupt or a forced cancel landing on any
bytecode can never leave it held).  Who runs a task, on which thread
or event loop, and what it costs, is the engine's business (:mod:`qmagic.core.engine`).
"""

from __future__ import annotations

import functools
import threading
import time
from collections import deque
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures._base import CANCELLED_AND_NOTIFIED, FINISHED, PENDING, RUNNING
from concurrent.futures._base import LOGGER as _futures_log
from typing import TYPE_CHECKING, Any, Callable

from ..errors import InvalidTransition, TaskCancelled
from .capture import TextBuffer
from .status import TRANSITIONS, Progress, TaskStatus

if TYPE_CHECKING:  # pragma: no cover
    from .events import EventBus, Subscription

__all__ = ["Task", "exception_text"]

#: Longest single lock wait of the main thread (see :meth:`Task._wait_until`).
MAIN_THREAD_WAIT_SLICE = 0.05

#: Why a task stopped by ■ / KeyboardInterrupt was cancelled.
INTERRUPTED = "Task was interrupted (■ or KeyboardInterrupt)"

#: Called by :meth:`Task.cancel`: ``(task, force, reason) -> bool`` (set by the engine).
CancelHook = Callable[["Task", bool, str], bool]


def exception_text(exc: BaseException) -> str:
    """``str(exc)``, or the exception's class name when that is empty."""
    try:
        text = str(exc)
    except Exception:  # noqa: BLE001 - a broken __str__ must not lose the record
        text = ""
    return text or type(exc).__name__


class Task(Future):
    """Handle of one tracked call.  Made by the worker; never instantiate it yourself.

    Beyond the ``Future`` API (``result``, ``exception``, ``done``, ``running``,
    ``cancelled``, ``add_done_callback``): ``status``, ``progress``, timestamps,
    ``elapsed``, captured ``output`` and ``log``, ``traceback``, ``wait``,
    ``cancel(force=...)``, ``subscribe`` and ``to_dict``.  ``await task`` waits without
    blocking the event loop.
    """

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
    #: For script tasks: the names the script added, changed and removed.
    namespace_changes: dict[str, list[str]] | None = None
    _status = TaskStatus.QUEUED
    _traceback: str | None = None
    _error: BaseException | None = None  # what ended a failed or cancelled task
    _exception_tb: Any = None  # a failed task's traceback from the user's first frame on
    _progress: Progress | None = None
    _output: TextBuffer | None = None
    _log: TextBuffer | None = None
    _log_records: deque | None = None
    _cancel_requested = False
    _cancel_reason = "Task was cancelled"
    _ending = False  # a runner claimed the right to finish the task
    _subscribers: tuple[Subscription, ...] = ()

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

    # -- read-only views -----------------------------------------------------------------
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
        """Traceback text of a failed or cancelled task (user frames only), else None."""
        return self._traceback

    @property
    def error(self) -> str | None:
        """One line saying why a failed or cancelled task ended, else None."""
        if self._status is TaskStatus.CANCELLED:
            return self._cancel_reason
        if self._error is not None:
            return exception_text(self._error)
        return None

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

    @property
    def cancel_reason(self) -> str:
        """Why the task was (or is being) cancelled."""
        return self._cancel_reason

    # -- Future API ------------------------------------------------------------------------
    def wait(self, timeout: float | None = None) -> bool:
        """Block until the task finishes or ``timeout`` seconds pass; True if it finished."""
        if self._status.finished:
            return True
        return self._wait_until(self._is_done, timeout)

    def _is_done(self) -> bool:
        return self._status.finished

    def _wait_until(self, predicate: Callable[[], bool], timeout: float | None) -> bool:
        """Wait on the task's condition until ``predicate()`` or ``timeout``.

        On the main thread the wait is cut into slices of :data:`MAIN_THREAD_WAIT_SLICE`:
        CPython can record a SIGINT (■) while the main thread goes to sleep on a lock and
        then not act on it until the lock wait returns; a short slice acts on it at once.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        on_main = threading.current_thread() is threading.main_thread()
        with self._mutex:
            while not predicate():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                if on_main:
                    left = MAIN_THREAD_WAIT_SLICE if left is None else min(left, MAIN_THREAD_WAIT_SLICE)
                self._condition.wait(left)
            return True

    def result(self, timeout: float | None = None) -> Any:
        """Return the function's return value, waiting up to ``timeout`` seconds.

        Raises ``TimeoutError`` if it is still running, ``concurrent.futures.CancelledError``
        if it was cancelled, or the function's own exception if it failed.
        """
        __tracebackhide__ = True  # noqa: F841 - IPython shows the task's own frames only
        self._wait_or_raise(timeout)
        if self._exception is not None:
            # Raised from the task's own frames each time (raising the same object again
            # would otherwise pile up every earlier caller's frames in its traceback).
            raise self._exception.with_traceback(self._exception_tb)
        return self._result

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The exception of a failed task (None if it completed); waits like ``result``."""
        self._wait_or_raise(timeout)
        return self._exception

    def _wait_or_raise(self, timeout: float | None) -> None:
        __tracebackhide__ = True  # noqa: F841
        if not self.wait(timeout):
            raise _one_line(FutureTimeout(
                f"{self.call_text()} is still {self._status.value} after {timeout} s; "
                "wait longer, or cancel it with task.cancel()."
            ))
        if self._status is TaskStatus.CANCELLED:
            raise _one_line(CancelledError(f"{self.call_text()} was cancelled: {self._cancel_reason}"))

    def cancel(self, force: bool = False) -> bool:
        """Ask the task to stop.  Returns False if it had already finished.

        A queued task is cancelled at once without running.  A running task stops at its
        next ``qmagic.report_progress()``, ``raise_if_cancelled()`` or
        ``cancellable_sleep()`` (a coroutine task at its next ``await``).  With
        ``force=True``, a thread task still running ``cancel_grace_s`` seconds later gets
        :class:`qmagic.TaskCancelled` raised inside its thread; that cannot interrupt a
        call blocked in C (``time.sleep`` ends first; ``lock.acquire()`` without timeout
        never returns).
        """
        if self._on_cancel is not None:
            return self._on_cancel(self, force, "Task was cancelled")
        return self._request_cancel("Task was cancelled") is not None

    def __await__(self):
        """``await task``: wait without blocking the event loop; like ``task.result()``.

        Cancelling the awaiting coroutine stops the waiting only, never the task
        (``task.cancel()`` does that).
        """
        __tracebackhide__ = True  # noqa: F841 - IPython shows the task's own frames only
        if not self._status.finished:
            import asyncio

            loop = asyncio.get_running_loop()
            waiter = loop.create_future()

            def wake(_: Task) -> None:  # any thread
                if not loop.is_closed():
                    try:
                        loop.call_soon_threadsafe(_wake_waiter, waiter)
                    except RuntimeError:  # the loop closed meanwhile: nobody waits
                        pass

            self.add_done_callback(wake)
            yield from waiter.__await__()
        # The outcome is raised here, not through the waiter: no asyncio frames in the way.
        return self.result(0)

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
            return self._record(self._status, self._result, self._error, self._traceback,
                                self.finished_at)

    def _record(self, status: TaskStatus, result: Any, error: BaseException | None,
                tb: str | None, finished_at: float | None) -> dict[str, Any]:
        progress = self._progress
        if status is TaskStatus.CANCELLED:
            error_text, error_type = self._cancel_reason, "TaskCancelled"
        elif error is not None:
            error_text, error_type = exception_text(error), type(error).__name__
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
            "status": status.value,
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

    def call_text(self, width: int = 60) -> str:
        """``name(arg, ..., key=value)`` shortened to about ``width`` characters."""
        from ..format import call_text

        return call_text(self.name, self.args, self.kwargs, width, kind=self.kind)

    def __repr__(self) -> str:
        # Deterministic (no uid, no times): notebooks compare it with nbval.
        where = "background" if self.background else "foreground"
        return f"<Task {self.call_text()} {where} {self._status.value}>"

    # =====================================================================================
    # The runner protocol (engine side).  Like Future.set_running_or_notify_cancel and
    # set_result in CPython's executors; nothing else changes a task's state.
    # =====================================================================================
    def _start(self) -> bool:
        """queued -> running; False when the task was cancelled (or claimed) meanwhile."""
        with self._mutex:
            if self._status is not TaskStatus.QUEUED or self._ending:
                return False
            self._check(TaskStatus.RUNNING)
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
        user_tb = _user_traceback(error) if error is not None and status is TaskStatus.FAILED else None
        with self._mutex:
            self._check(status)
            self._status = status
            self._traceback = tb
            self.finished_at = finished_at or time.time()
            if status is TaskStatus.CANCELLED:
                self._state = CANCELLED_AND_NOTIFIED
                if isinstance(error, KeyboardInterrupt) and not self._cancel_requested:
                    self._cancel_reason = INTERRUPTED
                elif error is not None and not self._cancel_requested:
                    self._cancel_reason = exception_text(error)
                self._error = error
                for waiter in self.__dict__.get("_waiter_list", ()):
                    waiter.add_cancelled(self)
            else:
                self._state = FINISHED
                self._result = result
                self._exception = self._error = error
                self._exception_tb = user_tb
                for waiter in self.__dict__.get("_waiter_list", ()):
                    if error is None:
                        waiter.add_result(self)
                    else:
                        waiter.add_exception(self)
            self._notify_waiters()
            bus = self._bus
            if bus is not None:
                if status is TaskStatus.COMPLETED:
                    bus.emit(self, result=result)
                else:
                    bus.emit(self, error=error if error is not None else TaskCancelled(self._cancel_reason))
                bus.emit(self, status=status.value)
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

    def _check(self, new: TaskStatus) -> None:
        if new not in TRANSITIONS[self._status]:
            raise InvalidTransition(f"Task {self.uid} cannot go from {self._status.value} to {new.value}.")

    def _wait_cancel(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for a cancel request; True if one came."""
        return self._wait_until(lambda: self._cancel_requested, timeout)

    def _set_progress(self, progress: Progress) -> None:
        with self._mutex:
            if self._status.finished:
                return
            self._progress = progress
            if self._bus is not None:
                self._bus.emit(self, progress=progress)

    def _write_output(self, text: str) -> None:
        with self._mutex:
            if self._output is None:
                self._output = TextBuffer(self._output_limit)
            self._output.write(text)

    def _add_log_record(self, record: dict, line: str) -> None:
        with self._mutex:
            if self._log is None:
                self._log = TextBuffer(self._output_limit)
                self._log_records = deque(maxlen=1000)
            self._log_records.append(record)
            self._log.write(line)

    # Future's own state setters would bypass the status table: runners use the protocol above.
    def set_running_or_notify_cancel(self) -> bool:  # noqa: D102
        raise RuntimeError("qmagic tasks are started by the qmagic engine only.")

    def set_result(self, result: Any) -> None:  # noqa: D102
        raise RuntimeError("qmagic tasks are finished by the qmagic engine only.")

    def set_exception(self, exception: BaseException | None) -> None:  # noqa: D102
        raise RuntimeError("qmagic tasks are finished by the qmagic engine only.")


def _wake_waiter(waiter: Any) -> None:
    """The task finished: wake ``await task`` (on the waiter's loop)."""
    if not waiter.done():  # else the awaiting coroutine was cancelled: nobody waits
        waiter.set_result(None)


def _one_line(exc: BaseException) -> BaseException:
    """``exc``, shown by IPython as one line (its traceback holds qmagic's frames only).
    A partial of a module function, not a lambda: the exception stays picklable."""
    exc._render_traceback_ = functools.partial(_lines, f"{type(exc).__name__}: {exc}")  # type: ignore[attr-defined]
    return exc


def _lines(*lines: str) -> list[str]:
    return list(lines)


def _user_traceback(error: BaseException) -> Any:
    from ..format import user_traceback

    return user_traceback(error)
