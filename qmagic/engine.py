"""The task engine: runs tasks on background threads or on the foreground owner thread.

It knows nothing about namespaces, protocols or IPython.  It owns

- the background pool: at most ``max_background`` threads run tasks, the rest wait in a
  FIFO as ``queued`` (bounded by ``max_queued``);
- the foreground slot: one foreground task at a time, run inline when the caller is the
  foreground owner thread, otherwise handed to the owner (:class:`ForegroundRunner`);
- retention: finished tasks stay ``retention_s`` seconds and at most ``max_finished``,
  swept by a timer thread;
- cancellation: cooperative first, escalated to an asynchronous ``TaskCancelled`` after
  ``cancel_grace_s`` when forced.

Lock order: a task's lock may be held while taking the engine lock, never the reverse.
"""

from __future__ import annotations

import ctypes
import heapq
import itertools
import json
import logging
import os
import queue
import random
import threading
import time
import uuid
from collections import OrderedDict
from contextlib import ExitStack
from typing import Any, Callable, Iterable, Protocol

from . import capture
from .context import _current
from .errors import RequestRefused, TaskCancelled, TaskNotFound
from .events import EventBus
from .tasks import Task, TaskStatus, format_exception

__all__ = [
    "Engine",
    "TaskObserver",
    "ForegroundRunner",
    "ThreadForegroundRunner",
    "ContextHook",
    "MSG_NOT_IDLE",
    "MSG_KERNEL_BUSY",
    "MIN_UID_PREFIX",
]

log = logging.getLogger("qmagic")

MSG_NOT_IDLE = (
    "Error: Failed to start the task: RE Manager must be in idle state. "
    "Current state: 'executing_task'"
)
MSG_KERNEL_BUSY = "Error: Failed to start the task: IPython kernel (RE Worker) is busy."
#: Shortest uid prefix accepted by lookups (a full uid is always accepted).
MIN_UID_PREFIX = 4
_IDLE_THREAD_TIMEOUT_S = 30.0
#: How long a background task may wait for a busy thread before a new thread starts.
_SPAWN_DELAY_S = 0.001
_uid_random = random.Random(os.urandom(32))


_UUID4_CLEAR = ~(0xF000 << 64 | 0xC000 << 48) & (1 << 128) - 1
_UUID4_SET = 0x4000 << 64 | 0x8000 << 48


def _new_uid() -> str:
    """A random version-4 UUID string, without a system call per uid (os.urandom seeds)."""
    h = "%032x" % (_uid_random.getrandbits(128) & _UUID4_CLEAR | _UUID4_SET)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class ForegroundRunner(Protocol):
    """Where foreground tasks run.  In a kernel: the main thread (see qmagic.extension)."""

    def owns_current_thread(self) -> bool:
        """True when called on the thread that runs foreground tasks."""

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn()`` on the owner thread as soon as it is free."""

    def user_busy(self) -> bool:
        """True while a user's own code (a cell) occupies the owner thread."""

    def close(self) -> None:
        """Release the runner's resources."""


class ThreadForegroundRunner:
    """Foreground owner for a worker without a kernel: a thread of its own."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def owns_current_thread(self) -> bool:
        return self._thread is not None and threading.get_ident() == self._thread.ident

    def call_soon(self, fn: Callable[[], None]) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="qmagic-foreground", daemon=True
                )
                self._thread.start()
        self._queue.put(fn)

    def user_busy(self) -> bool:
        return False

    def _loop(self) -> None:
        while True:
            fn = self._queue.get()
            if fn is None:
                return
            try:
                fn()
            except BaseException:  # noqa: BLE001 - the owner thread must survive anything
                log.exception("qmagic: error on the foreground thread")

    def close(self) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join(5.0)


class ContextHook(Protocol):
    """Carries context from the submitting thread to the thread that runs a task
    (the kernel uses it to pin a background task's output to the cell that started it)."""

    def capture(self, task: Task) -> Any:
        """Called in the submitting thread; returns a token."""

    def apply(self, task: Task, token: Any) -> Any:
        """Called in the running thread; returns a context manager active around the call."""


class TaskObserver(Protocol):
    """Hears about every task synchronously, outside locks (qmagic's journal is one)."""

    def task_queued(self, task: Task) -> None:
        """A task really waits: no free thread, or handed to the busy foreground owner."""

    def task_started(self, task: Task) -> None:
        """In the task's thread, after it became running, before the function is called."""

    def task_finished(self, task: Task, record: dict) -> None:
        """The task's final record (``Task.to_dict()`` form: status, result, error,
        traceback, finished_at), told *before* waiters of the task wake, so that code which
        waited for a task finds it finished everywhere (the journal included)."""


class Engine:
    """Runs :class:`Task` objects; see the module docstring."""

    def __init__(
        self,
        *,
        max_background: int = 32,
        max_queued: int = 1000,
        retention_s: float = 600.0,
        max_finished: int = 1000,
        output_limit: int = 100_000,
        cancel_grace_s: float = 2.0,
        foreground: ForegroundRunner | None = None,
    ) -> None:
        self.max_background = max_background
        self.max_queued = max_queued
        self.retention_s = retention_s
        self.max_finished = max_finished
        self.output_limit = output_limit
        self.cancel_grace_s = cancel_grace_s
        self.foreground: ForegroundRunner = foreground or ThreadForegroundRunner()
        self.context_hooks: list[ContextHook] = []
        self.bus = EventBus()
        self.bus.engine = self
        #: Changes every time a task finishes (queueserver's task_results_uid).
        self._uid_prefix = str(uuid.uuid4())
        self._results_seq = itertools.count(1)
        self.results_uid = f"{self._uid_prefix}-0"
        #: Called with each task when it is dropped from memory (retention).
        self.on_expire: Callable[[Task], None] | None = None
        #: Told about every task synchronously (the journal): see :class:`TaskObserver`.
        self.observers: list[TaskObserver] = []

        self._lock = threading.Lock()
        self._tasks: dict[str, Task] = {}
        self._finished: OrderedDict[str, Task] = OrderedDict()
        self._pending: queue.SimpleQueue = queue.SimpleQueue()
        self._queued = 0
        self._threads = 0
        self._idle = 0
        self._spawn_check_pending = False
        self._unreserved = 0  # queued tasks no thread is reserved for yet
        self._running_bg = 0
        self._fg: Task | None = None
        self._fg_handed_over = False
        self._last: Task | None = None
        self._closed = False

        self._timer_heap: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_seq = itertools.count()
        self._timer_cond = threading.Condition(threading.Lock())
        self._timer_thread: threading.Thread | None = None
        self._sweep_at: float | None = None
        capture.install()

    # -- creating and starting tasks --------------------------------------------------------
    def new_task(self, call: Callable[[], Any], *, name: str, **fields: Any) -> Task:
        """A queued Task attached to this engine (not started)."""
        return Task(
            uid=_new_uid(),
            name=name,
            call=call,
            output_limit=self.output_limit,
            bus=self.bus,
            **fields,
        )

    def start(self, task: Task) -> Task:
        """Start ``task`` in the background or foreground (per ``task.background``).

        Refusals raise :class:`RequestRefused` and leave no trace.  A foreground task
        started on the owner thread has finished when this returns.
        """
        if self.context_hooks:
            task._hook_tokens = [(hook, hook.capture(task)) for hook in self.context_hooks]
        if task.background:
            self._start_background(task)
        else:
            self._start_foreground(task)
        return task

    def _start_background(self, task: Task) -> None:
        schedule_check = False
        with self._lock:
            self._check_open()
            # Tasks already handed to a free thread do not count as waiting.
            waiting = max(0, self._queued + self._running_bg - self.max_background)
            if waiting >= self.max_queued:
                raise RequestRefused(
                    f"Error: Failed to start the task: {waiting} background tasks are "
                    f"already waiting to start (QMagic.max_queued_tasks = {self.max_queued}). "
                    "Wait for some to finish or cancel queued tasks, then try again."
                )
            self._tasks[task.uid] = task
            self._last = task
            self._queued += 1
            task._in_queue = True
            self.bus.emit(task, status="queued")
            waits = False  # True: no thread may start for it now (the pool is full)
            if self._idle > 0:
                self._idle -= 1  # reserve an idle thread: it will take this task
            elif self._threads == 0:
                self._spawn_locked()  # a thread of its own
            else:
                self._unreserved += 1  # the next thread that frees up (or starts) takes it
                if self._threads >= self.max_background:
                    waits = True
                elif not self._spawn_check_pending:
                    # Every thread is busy. Busy threads often free up within microseconds
                    # (short tasks), and more threads would only fight over the GIL; if the
                    # task still waits a moment later, the check starts threads (long tasks
                    # still run in parallel, after at most ~1 ms).
                    self._spawn_check_pending = True
                    schedule_check = True
            if not (waits and self.observers):
                self._pending.put(task)
                if schedule_check:
                    self._schedule(_SPAWN_DELAY_S, self._spawn_if_waiting)
                return
        # A task that really waits is announced before any thread can take it, so its
        # "queued" record always comes before its "start" record.
        self._notify("task_queued", task)
        self._pending.put(task)

    def _thread_free_locked(self) -> None:
        """A thread is free again: it takes a waiting task that no thread was reserved
        for, or counts as idle (exact accounting: every queued task has one thread)."""
        if self._unreserved > 0:
            self._unreserved -= 1
        else:
            self._idle += 1

    def _spawn_locked(self) -> None:
        self._threads += 1
        threading.Thread(target=self._worker_loop, name="qmagic-task", daemon=True).start()

    def _spawn_if_waiting(self) -> None:
        """Timer: start threads for tasks that still wait while threads are allowed."""
        with self._lock:
            self._spawn_check_pending = False
            if self._closed:
                return
            while self._unreserved > 0 and self._threads < self.max_background:
                self._spawn_locked()  # the new thread takes one waiting task
                self._unreserved -= 1

    def _start_foreground(self, task: Task) -> None:
        owner = self.foreground.owns_current_thread()
        if not owner:
            self._hand_over(task)
            return
        reserved = False
        try:
            with self._lock:
                self._check_open()
                if self._fg is not None:
                    raise RequestRefused(MSG_NOT_IDLE)
                reserved = True
                self._fg = task
                self._fg_handed_over = False
                self._tasks[task.uid] = task
                self._last = task
                self.bus.emit(task, status="queued")
            self._run(task, self._end_foreground)
        except BaseException as exc:
            # An interrupt (Ctrl-C, nbval's timeout) can land on any bytecode of the owner
            # thread, even before _run's own guard: the task still gets its record and the
            # foreground slot is freed.
            if reserved:
                self._settle(task, None, exc, self._end_foreground)
            raise

    def _hand_over(self, task: Task) -> None:
        """Reserve the foreground and hand the task to the owner thread (reply at once)."""
        with self._lock:
            self._check_open()
            if self._fg is not None:
                raise RequestRefused(MSG_NOT_IDLE)
            if self.foreground.user_busy():
                raise RequestRefused(MSG_KERNEL_BUSY)
            self._fg = task
            self._fg_handed_over = True
        # The owner thread takes the task's lock before starting it, so "queued" is
        # always announced first.
        with task._mutex:
            try:
                self.foreground.call_soon(lambda: self._run(task, self._end_foreground))
            except BaseException:
                self._end_foreground(task)  # refused: leave no trace
                raise
            with self._lock:
                self._tasks[task.uid] = task
                self._last = task
            self.bus.emit(task, status="queued")
        # Outside the task's lock (observers take it); an observer sees the task still
        # queued or, if the owner thread already started it, skips the queued record.
        self._notify("task_queued", task)

    def _end_foreground(self, task: Task) -> None:
        with self._lock:
            if self._fg is task:
                self._fg = None
                self._fg_handed_over = False
            if task._finish_time is not None:
                expired, sweep_at = self._retain_locked(task)
        if task._finish_time is not None:
            self._after_retain(expired, sweep_at)

    def _end_background(self, task: Task) -> None:
        with self._lock:
            self._running_bg -= 1
            self._thread_free_locked()
            expired, sweep_at = self._retain_locked(task)
        self._after_retain(expired, sweep_at)

    def _check_open(self) -> None:
        if self._closed:
            raise RequestRefused(
                "Error: Failed to start the task: the qmagic worker was closed "
                "(extension unloaded). Load it again with %load_ext qmagic."
            )

    def _worker_loop(self) -> None:
        get = self._pending.get
        while True:
            try:
                task = get(timeout=_IDLE_THREAD_TIMEOUT_S)
            except queue.Empty:
                with self._lock:
                    if self._idle > 0:  # nobody reserved this thread: let it go
                        self._idle -= 1
                        self._threads -= 1
                        return
                continue
            if task is None:  # close()
                return
            with self._lock:
                if not task._in_queue:  # cancelled while it waited: already uncounted
                    self._thread_free_locked()
                    continue
                task._in_queue = False
                self._queued -= 1
                self._running_bg += 1
            try:
                self._run(task, self._end_background)
            except BaseException:  # noqa: BLE001 - e.g. a forced cancel landing late
                log.debug("qmagic: stray exception after a task ended", exc_info=True)

    # -- running ---------------------------------------------------------------------------------
    def _run(self, task: Task, on_end: Callable[[Task], None]) -> None:
        """Run one task in the current thread and record its outcome, whatever happens."""
        outcome: BaseException | None = None
        result: Any = None
        token = None
        try:
            with task._mutex:
                start = task._status is TaskStatus.QUEUED  # else: cancelled while waiting
                if start:
                    task._transition(TaskStatus.RUNNING)
                    task.started_at = time.time()
                    task._thread_ident = threading.get_ident()
                    task._in_user_code = True
                    self.bus.emit(task, status="running")
            if start:
                if self.observers:
                    self._notify("task_started", task)
                capture.ensure_streams()
                token = _current.set(task)
                try:
                    if task._cancel_requested:
                        raise TaskCancelled(task._cancel_reason)
                    if task._hook_tokens:
                        with ExitStack() as stack:
                            for hook, hook_token in task._hook_tokens:
                                stack.enter_context(hook.apply(task, hook_token))
                            result = task._call()
                    else:
                        result = task._call()
                finally:
                    with task._mutex:
                        task._in_user_code = False
        except BaseException as exc:  # noqa: BLE001 - every outcome is recorded
            outcome = exc
        finally:
            if token is not None:
                _current.reset(token)
        self._settle(task, result, outcome, on_end)

    def _settle(
        self, task: Task, result: Any, outcome: BaseException | None, on_end: Callable
    ) -> None:
        """Record the outcome; a second interrupt landing here must not lose the record."""
        while True:
            try:
                self._record(task, result, outcome, on_end)
                return
            except KeyboardInterrupt:
                continue

    def _record(
        self, task: Task, result: Any, outcome: BaseException | None, on_end: Callable
    ) -> None:
        """Idempotent: safe to call again after an interrupt landed inside it."""
        if task._finish_time is None:
            task._finish_time = time.time()
        if not task._ended:
            on_end(task)  # frees the thread / foreground slot, keeps the task (retention)
            task._ended = True
        if not task.done():  # (a task cancelled while queued is already recorded)
            if outcome is None and task.strict_json:
                try:
                    json.dumps(result)
                except (TypeError, ValueError, OverflowError) as exc:
                    outcome = ValueError(f"Task result can not be serialized as JSON: {exc}")
                    outcome.__cause__ = exc
            if outcome is None:
                status, tb = TaskStatus.COMPLETED, None
            elif isinstance(outcome, (TaskCancelled, KeyboardInterrupt)):
                status, tb = TaskStatus.CANCELLED, format_exception(outcome)
            else:
                status, tb = TaskStatus.FAILED, format_exception(outcome)
            value = result if outcome is None else None
            finished_at = task._finish_time
            if self.observers and not task._end_told:
                record = task.final_record(status, value, outcome, tb, finished_at)
                task._end_told = True
                self._notify("task_finished", task, record)
            with task._mutex:
                if not task.done():
                    task._finish_locked(status, result=value, exc=outcome, tb=tb, finished_at=finished_at)
        task._after_finish()

    def _notify(self, event: str, task: Task, *args: Any) -> None:
        for observer in self.observers:
            try:
                getattr(observer, event)(task, *args)
            except Exception:  # noqa: BLE001 - an observer must never break a task
                log.exception("qmagic: task observer %r failed on %s", observer, event)

    def _result_added(self) -> None:
        """A task finished: a new task_results_uid (called right after the transition)."""
        self.results_uid = f"{self._uid_prefix}-{next(self._results_seq)}"

    def _task_finished(self, task: Task) -> None:
        """Called once per task after its final transition (see Task._after_finish)."""
        if self.observers and not task._end_told:  # a task cancelled while it was queued
            task._end_told = True
            self._notify("task_finished", task, task.to_dict())
        if task._retained:  # the thread that ran it did the bookkeeping
            return
        with self._lock:
            if task._in_queue:  # cancelled while queued: no longer waiting
                task._in_queue = False
                self._queued -= 1
            expired, sweep_at = self._retain_locked(task)
        self._after_retain(expired, sweep_at)

    def _retain_locked(self, task: Task) -> tuple[list[Task], float | None]:
        """Put a finishing task on the finished list (engine lock held)."""
        task._retained = True
        expired: list[Task] = []
        if self._tasks.get(task.uid) is task:
            self._finished[task.uid] = task
            while len(self._finished) > self.max_finished:
                _, old = self._finished.popitem(last=False)
                self._tasks.pop(old.uid, None)
                expired.append(old)
        sweep_at = None
        if self._sweep_at is None:  # no sweep pending: schedule one for this task
            sweep_at = self._sweep_at = (task._finish_time or time.time()) + self.retention_s
        return expired, sweep_at

    def _after_retain(self, expired: list[Task], sweep_at: float | None) -> None:
        if sweep_at is not None:
            self._schedule(sweep_at - time.time(), self._sweep)
        if expired:
            self._notify_expired(expired)

    def _sweep(self) -> None:
        now = time.time()
        expired: list[Task] = []
        with self._lock:
            while self._finished:
                uid, task = next(iter(self._finished.items()))
                if (task._finish_time or task.finished_at or 0) + self.retention_s > now:
                    break
                self._finished.popitem(last=False)
                self._tasks.pop(uid, None)
                expired.append(task)
            sweep_at = None
            if self._finished:
                first = next(iter(self._finished.values()))
                sweep_at = (first._finish_time or first.finished_at or now) + self.retention_s
            self._sweep_at = sweep_at
        if sweep_at is not None:
            self._schedule(sweep_at - now, self._sweep)
        self._notify_expired(expired)

    def _notify_expired(self, expired: Iterable[Task]) -> None:
        if self.on_expire is not None:
            for task in expired:
                try:
                    self.on_expire(task)
                except Exception:  # noqa: BLE001
                    log.exception("qmagic: on_expire hook failed")

    # -- cancellation -----------------------------------------------------------------------------
    def cancel_task(self, task: Task, *, force: bool = False, reason: str | None = None) -> bool:
        """Cancel ``task`` (see :meth:`Task.cancel`); False if it had already finished."""
        status = task._request_cancel(reason or "Task was cancelled")
        if status is None:
            return False
        if force and status is TaskStatus.RUNNING:
            self._schedule(self.cancel_grace_s, lambda: self._force_stop(task))
        return True

    def _force_stop(self, task: Task) -> None:
        with task._mutex:
            if task.status is not TaskStatus.RUNNING or not task._in_user_code:
                return
            ident = task._thread_ident
            if ident is None:
                return
            log.warning(
                "qmagic: task %s (%s) did not stop within %.1f s; raising TaskCancelled in its thread",
                task.uid,
                task.name,
                self.cancel_grace_s,
            )
            ctypes.pythonapi.PyThreadState_SetAsyncExc(
                ctypes.c_ulong(ident), ctypes.py_object(TaskCancelled)
            )

    # -- timer thread -------------------------------------------------------------------------------
    def _schedule(self, delay: float, fn: Callable[[], None]) -> None:
        with self._timer_cond:
            if self._closed and self._timer_thread is None:
                return
            heapq.heappush(self._timer_heap, (time.monotonic() + max(0.0, delay), next(self._timer_seq), fn))
            if self._timer_thread is None:
                self._timer_thread = threading.Thread(
                    target=self._timer_loop, name="qmagic-timer", daemon=True
                )
                self._timer_thread.start()
            self._timer_cond.notify()

    def _timer_loop(self) -> None:
        while True:
            with self._timer_cond:
                while True:
                    if self._closed:
                        return
                    if self._timer_heap:
                        wait = self._timer_heap[0][0] - time.monotonic()
                        if wait <= 0:
                            _, _, fn = heapq.heappop(self._timer_heap)
                            break
                        self._timer_cond.wait(wait)
                    else:
                        self._timer_cond.wait()
            try:
                fn()
            except Exception:  # noqa: BLE001
                log.exception("qmagic: timer callback failed")

    # -- lookups ----------------------------------------------------------------------------------
    def find(self, uid_or_prefix: str) -> Task:
        """The task with this uid, or with this unique uid prefix (at least 4 characters)."""
        if not isinstance(uid_or_prefix, str) or not uid_or_prefix:
            raise TaskNotFound(f"Task uid must be a non-empty string, got {uid_or_prefix!r}.")
        with self._lock:
            task = self._tasks.get(uid_or_prefix)
            if task is not None:
                return task
            if len(uid_or_prefix) < MIN_UID_PREFIX:
                raise TaskNotFound(
                    f"Task uid prefix {uid_or_prefix!r} is too short: give at least "
                    f"{MIN_UID_PREFIX} characters of the uid (see %tasks)."
                )
            matches = [t for uid, t in self._tasks.items() if uid.startswith(uid_or_prefix)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise TaskNotFound(
                f"No task with uid {uid_or_prefix!r}: it never existed here or was removed "
                f"{self.retention_s:.0f} s after it finished (see %tasks --history)."
            )
        raise TaskNotFound(
            f"Task uid prefix {uid_or_prefix!r} matches {len(matches)} tasks; give more characters."
        )

    def tasks(self) -> list[Task]:
        """Every task in memory, oldest submission first."""
        with self._lock:
            items = list(self._tasks.values())
        items.sort(key=lambda t: t.submitted_at)
        return items

    @property
    def last_task(self) -> Task | None:
        """The most recently started task still in memory."""
        with self._lock:
            last = self._last
            return last if last is not None and last.uid in self._tasks else None

    def counts(self) -> dict[str, Any]:
        """Snapshot for the status reply."""
        with self._lock:
            return {
                "running_background": self._running_bg,
                "queued_background": self._queued,
                "foreground": self._fg,
                "foreground_handed_over": self._fg_handed_over,
                "results_uid": self.results_uid,
                "finished": len(self._finished),
            }

    def clear_finished(self) -> int:
        """Forget every finished task kept in memory; returns how many."""
        with self._lock:
            removed = list(self._finished.values())
            self._finished.clear()
            for task in removed:
                self._tasks.pop(task.uid, None)
        self._notify_expired(removed)
        return len(removed)

    # -- shutdown -----------------------------------------------------------------------------------
    def close(self, timeout: float = 5.0) -> None:
        """Cancel queued tasks, ask running ones to stop (forcing after the grace time),
        stop every thread.  Idempotent."""
        with self._lock:
            if self._closed:
                return
            queued = [t for t in self._tasks.values() if t.status is TaskStatus.QUEUED]
            running = [t for t in self._tasks.values() if t.status is TaskStatus.RUNNING]
        reason = "Task was cancelled: the qmagic worker was closed"
        for task in queued + running:
            self.cancel_task(task, force=True, reason=reason)
        deadline = time.monotonic() + timeout
        for task in running:
            task.wait(max(0.0, deadline - time.monotonic()))
        with self._lock:
            self._closed = True
            threads = self._threads
        for _ in range(threads):
            self._pending.put(None)
        with self._timer_cond:
            self._timer_cond.notify_all()
        self.bus.close()
        self.foreground.close()
        capture.uninstall()
