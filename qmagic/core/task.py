"""A tracked task: a :class:`concurrent.futures.Future` with status, progress and output.

A :class:`Task` *is* a ``concurrent.futures.Future`` (``concurrent.futures.wait``,
``as_completed`` and ``asyncio.wrap_future`` accept it, and ``await task`` works in a cell
and in coroutines).  As in CPython's executors, the state lives in the future: the runner
that executes a task moves it along the transition table (:data:`TRANSITIONS`) through a
small protocol (:mod:`qmagic.core.task_state`); this module is the handle users hold:
views, waiting, ``await``, cancel, events and plain-data snapshots.  Who runs a task, on
which thread or event loop, and what it costs, is the engine's business
(:mod:`qmagic.core.engine`).
"""

from __future__ import annotations

import math
import numbers
import threading
import time
from concurrent.futures import CancelledError
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any, Callable

from ..errors import one_line
from ..texts import safe_repr
from .status import Progress, TaskStatus
from .task_state import INTERRUPTED, CancelHook, TaskState, exception_text

if TYPE_CHECKING:  # pragma: no cover
    from .events import Subscription

__all__ = ["INTERRUPTED", "CancelHook", "Task", "call_texts", "exception_text"]

#: Longest single lock wait of the main thread (see :meth:`Task._wait_until`).
MAIN_THREAD_WAIT_SLICE = 0.05
#: Longest sleep of a main-thread event loop while ``await task`` waits (see :class:`_Beat`).
AWAIT_BEAT_S = 0.1


class Task(TaskState):
    """Handle of one tracked call.  Made by the worker; never instantiate it yourself.

    Beyond the ``Future`` API (``result``, ``exception``, ``done``, ``running``,
    ``cancelled``, ``add_done_callback``): ``status``, ``progress``, timestamps,
    ``elapsed``, captured ``output`` and ``log``, ``traceback``, ``wait``,
    ``cancel(force=...)``, ``subscribe`` and ``to_dict``.  ``await task`` waits without
    blocking the event loop.
    """

    _loop: Any = None  # the event loop its coroutine (or awaited result) runs on

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
            return self._error_text or exception_text(self._error)
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
    def cancel_reason(self) -> str | None:
        """Why the task was (or is being) cancelled; None if it never was (no cancel was
        requested and it did not end cancelled)."""
        if self._cancel_requested or self._status is TaskStatus.CANCELLED:
            return self._cancel_reason
        return None

    # -- Future API ------------------------------------------------------------------------
    def wait(self, timeout: float | None = None) -> bool:
        """Block until the task finishes or ``timeout`` seconds pass; True if it finished.

        Raises RuntimeError when called on the event loop the task runs on (from a coroutine
        task): that loop would wait for good; ``await task`` there instead.  So too, the
        moment a thread task waited for there hands the coroutine it returned to that loop;
        and at once when the task's own code waits for it."""
        if self._status.finished:
            return True
        here = _waiter_loop(self)
        if here is None:
            return self._wait_until(self._is_done, timeout)
        if self._loop is not here:
            done = self._wait_until(lambda: self._status.finished or self._loop is here, timeout)
            if done and self._status.finished:
                return True
        if self._loop is here:
            raise one_line(RuntimeError(
                f"{self.call_text()} runs on the event loop that called task.result() or wait(), "
                "which would block it for good: use `await task` there instead."))
        return False

    def _run_on(self, loop: Any) -> None:
        """The runner: the task's coroutine (or a thread task's awaitable result) is about
        to run on ``loop``; a blocking wait on that very loop gives up now (:meth:`wait`)."""
        with self._mutex:
            self._loop = loop
            self._condition.notify_all()

    def _is_done(self) -> bool:
        return self._status.finished

    def _wait_until(self, predicate: Callable[[], bool], timeout: float | None, *,
                    for_end: bool = True) -> bool:
        """Wait on the task's condition until ``predicate()`` or ``timeout``.

        On the main thread the wait is cut into slices of :data:`MAIN_THREAD_WAIT_SLICE`:
        CPython can record a SIGINT (■) while the main thread goes to sleep on a lock and
        then not act on it until the lock wait returns; a short slice acts on it at once.
        ■ stops a wait for the end with one line; else (``for_end`` False: the foreground
        task's own ``cancellable_sleep``) it is the KeyboardInterrupt that stops the task."""
        deadline = _deadline(timeout)
        on_main = threading.current_thread() is threading.main_thread()
        with self._mutex:
            while not predicate():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                if not on_main:
                    self._condition.wait(left)
                    continue
                try:
                    self._condition.wait(MAIN_THREAD_WAIT_SLICE if left is None
                                         else min(left, MAIN_THREAD_WAIT_SLICE))
                except KeyboardInterrupt:  # ■: one line that says the task goes on
                    if not for_end:
                        raise
                    raise one_line(KeyboardInterrupt(self._stopped_waiting())) from None
            return True

    def _stopped_waiting(self, *, magic: bool = False) -> str:
        """The line shown when ■ stopped a wait for this task (the task itself goes on, or
        had just ended); ``magic``: worded for a magic's ``--wait`` (magic hints only)."""
        what, call, uid = ("the background task" if magic else "the task"), self.call_text(40), self.uid[:8]
        status = self._status
        if status.finished:  # (it ended as the waiting was stopped)
            see = f"%task_result {uid}" if magic else f"task.result(), or %task_result {uid}"
            return f"stopped waiting; {what} {call} had already ended ({status.value}): see {see}."
        stop = f"%task_cancel {uid}" if magic else f"task.cancel(), or %task_cancel {uid}"
        return f"stopped waiting; {what} {call} keeps running (stop it with {stop})."

    def _goes_on(self, lead: str) -> str:
        """``lead`` (what ■ stopped: showing the task, the call that started it), then
        what became of the task: ended (where to see it) or running on (how to stop it)."""
        uid, status = self.uid[:8], self._status
        if status.finished:
            return f"{lead}; it has ended ({status.value}): see %task_result {uid}."
        return f"{lead}; it runs on (stop it with %task_cancel {uid})."

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
        """A failed task's exception (None if it completed); waits and raises like ``result``."""
        self._wait_or_raise(timeout)
        return self._exception

    def _wait_or_raise(self, timeout: float | None) -> None:
        __tracebackhide__ = True  # noqa: F841
        if not self.wait(timeout):
            raise one_line(FutureTimeout(
                f"{self.call_text()} is still {self._status.value} after {timeout} s; "
                "wait longer, or cancel it with task.cancel()."
            ))
        if self._status is TaskStatus.CANCELLED:
            raise one_line(CancelledError(self.cancelled_text()))

    def cancel(self, force: bool = False) -> bool:
        """Ask the task to stop: False if it had finished; True if asked (``cancelled()`` once it stops).

        A queued task is cancelled at once without running.  A running task stops at its
        next ``qmagic.report_progress()``, ``raise_if_cancelled()`` or
        ``cancellable_sleep()`` (a coroutine task at its next ``await``).  With
        ``force=True``, a thread task still running ``cancel_grace_s`` seconds later gets
        :class:`qmagic.TaskCancelled` raised inside its thread — once: a second one would
        land in the task's own cleanup (``finally:``).  That cannot interrupt a call blocked
        in C (``time.sleep`` ends first; ``lock.acquire()`` without timeout never returns).
        A coroutine task gets one ``CancelledError`` however often it is cancelled (its
        cleanup is never cut short); with ``force=True`` a second one after
        ``cancel_grace_s`` if it still runs.

        A task follows its worker's rules, as ``Worker.cancel(task)`` does: while another kernel
        or a remote client holds the lock, :class:`qmagic.LockRefused` (pass ``lock_key`` there).

        Unlike a plain ``Future``, a running task is asked to stop too; so is one awaited
        through ``asyncio.wrap_future(task)`` when that wrapper is cancelled (asyncio passes
        the cancel on).  To wait with a timeout without stopping the task, use
        ``task.result(timeout)``, ``await asyncio.wait_for(asyncio.shield(...), t)`` or
        ``await task`` inside ``asyncio.wait``.
        """
        reason = "Task was cancelled from Python"  # as Worker.cancel says it
        if self._on_cancel is not None:
            return self._on_cancel(self, force, reason)
        return self._request_cancel(reason) is not None

    def __await__(self):
        """``await task``: wait without blocking the event loop; like ``task.result()``.

        Cancelling the awaiting coroutine stops the waiting only, never the task
        (``task.cancel()`` does that).
        """
        __tracebackhide__ = True  # noqa: F841 - IPython shows the task's own frames only
        if not self._status.finished:
            import asyncio

            loop = _waiter_loop(self) or asyncio.get_running_loop()
            waiter = loop.create_future()

            def wake(_: Task) -> None:  # any thread
                if not loop.is_closed():
                    try:
                        loop.call_soon_threadsafe(_wake_waiter, waiter)
                    except RuntimeError:  # the loop closed meanwhile: nobody waits
                        pass

            # (on the main thread: see _Beat; started inside the try, stopped by a flag, so
            # that an interrupt anywhere here leaves neither a callback nor a beat behind)
            beat = _Beat(loop) if threading.current_thread() is threading.main_thread() else None
            try:
                self.add_done_callback(wake)
                if beat is not None:
                    beat()
                yield from waiter.__await__()
            except asyncio.CancelledError:  # (■ in a cell, a timeout): the waiting only
                raise one_line(asyncio.CancelledError(self._stopped_waiting())) from None
            finally:  # the awaiting coroutine was cancelled: no callback left behind per wait
                self._forget_done_callback(wake)
                if beat is not None:
                    beat.stop()
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

    def cancelled_text(self) -> str:
        """How the task was cancelled, in one line: ``scan(100) was cancelled from Python``,
        ``... was cancelled: time limit of 5 s reached`` (every door's wording)."""
        how = self._cancel_reason or "Task was cancelled"
        how = how[len("Task was "):] if how.startswith("Task was ") else f"cancelled: {how}"
        return f"{self.call_text(60)} was {how}"

    def call_text(self, width: int = 60) -> str:
        """``name(arg, ..., key=value)`` shortened to about ``width`` characters; made once
        per width (an argument's ``repr`` may be slow: a device's was called 8 times per
        foreground call, and the time partly counted as the task's; found by a hostile test)."""
        texts = self.__dict__.get("_call_texts")
        if texts is None:
            texts = self.__dict__.setdefault("_call_texts", {})  # (atomic: racing threads share it)
        text = texts.get(width)
        if text is None:
            from ..format import call_text

            text = texts[width] = call_text(self.name, self.args, self.kwargs, width, kind=self.kind)
        return text

    def _made_call_text(self, width: int) -> str | None:
        """:meth:`call_text` of this width if it was made already (no code runs), else None."""
        texts = self.__dict__.get("_call_texts")
        return None if texts is None else texts.get(width)

    def __repr__(self) -> str:
        # Deterministic (no uid, no times): notebooks compare it with nbval.
        where = "background" if self.background else "foreground"
        return f"<Task {self.call_text()} {where} {self._status.value}>"


def seconds(timeout: Any, none: bool = True) -> float | None:
    """``timeout`` as a float number of seconds (None stays None where ``none``); anything
    else (a text, NaN, True) is one line saying what to give."""
    if timeout is None and none:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real) or math.isnan(timeout):
        allowed = " or None" if none else ""
        raise one_line(TypeError(f"timeout must be a number of seconds{allowed}, not {safe_repr(timeout, 40)}."))
    return float(timeout)


def switch(value: Any, name: str) -> bool:
    """``value`` as True or False, as Python reads it (``1``, ``0``, None, a numpy bool);
    a text is one line saying what to give: every text but ``""`` reads as true, so
    ``background="no"`` would do the opposite of what it says (the remote door refuses the
    texts that say false, for queueserver's clients; Python code has True and False)."""
    if isinstance(value, (str, bytes)):
        raise one_line(TypeError(f"{name} must be True or False, not the text {safe_repr(value, 40)}."))
    return bool(value)


def _deadline(timeout: Any) -> float | None:
    """The monotonic time a wait of ``timeout`` seconds ends (None: no end; an infinite
    timeout too)."""
    timeout = seconds(timeout)
    return None if timeout is None or timeout == math.inf else time.monotonic() + timeout


def _wake_waiter(waiter: Any) -> None:
    """The task finished: wake ``await task`` (on the waiter's loop)."""
    if not waiter.done():  # else the awaiting coroutine was cancelled: nobody waits
        waiter.set_result(None)


def _waiter_loop(task: Task) -> Any:
    """The running event loop of the code about to wait for ``task`` (None: a plain thread).
    RuntimeError (one line) when that code is the task's own (``_own_code``): it would wait
    for good (asyncio refuses ``await`` of the running task itself too).  Code the task
    started (an asyncio task, a thread) may wait for its end."""
    import asyncio

    loop = asyncio._get_running_loop()
    own = task._own_code
    if own is not None and (own == threading.get_ident() if isinstance(own, int)
                            else loop is not None and asyncio.current_task(loop) is own):
        raise one_line(RuntimeError(f"{task.call_text()} cannot wait for its own end (it would wait for good): wait for it from the notebook or another task."))
    return loop


def call_texts(tasks: list[Task], shown: int = 3) -> str:
    """How many tasks, and the first ``shown`` of them, for one warning about many:
    "2 tasks: f() (task 1a2b3c4d), g() (task 5e6f7a8b)", "... and 3 more"."""
    names = ", ".join(f"{task.call_text(40)} (task {task.uid[:8]})" for task in tasks[:shown])
    more = f" and {len(tasks) - shown} more" if len(tasks) > shown else ""
    return f"{len(tasks)} task{'s' if len(tasks) != 1 else ''}: {names}{more}"


class _Beat:
    """While ``await task`` waits on the main thread's loop (a cell), wakes that loop every
    :data:`AWAIT_BEAT_S`: the kernel's ■ handler schedules the cell's cancellation with a
    plain ``call_soon``, which does not wake a loop asleep in ``select`` (the cell would end
    only when the task did).  Call it to start; :meth:`stop` ends it (also a tick already
    scheduled: it sees the flag)."""

    __slots__ = ("loop", "handle", "stopped")

    def __init__(self, loop: Any) -> None:
        self.loop, self.handle, self.stopped = loop, None, False

    def __call__(self) -> None:
        if not self.stopped:
            self.handle = self.loop.call_later(AWAIT_BEAT_S, self)

    def stop(self) -> None:
        self.stopped = True
        if self.handle is not None:
            self.handle.cancel()
