"""The task engine: starts tasks on threads, on the foreground owner or on an event loop.

It knows nothing about namespaces, protocols or IPython.  It owns

- the background pool (:mod:`qmagic.core.pool`): at most ``max_background`` threads run
  thread tasks; further tasks wait as ``queued`` (at most ``max_queued`` of them);
- the foreground slot: one foreground task at a time, run inline when the caller is the
  foreground owner thread, otherwise handed to it (:mod:`qmagic.core.foreground`);
- coroutine tasks, run on the event loop that :mod:`qmagic.core.loops` picks;
- cancellation (cooperative, then forced after ``cancel_grace_s``), deadlines, interrupts;
- retention: finished tasks stay ``retention_s`` seconds and at most ``max_finished``, and
  those carrying a request's size at most ``max_finished_bytes`` in all
  (:mod:`qmagic.core.registry`, which also answers lookups by uid).

Every task is announced to the observers (the experiment log) before its uid leaves
:meth:`Engine.submit`, and its final record is told to them before anyone waiting for the
task wakes up.  Per-task bookkeeping lives in a :class:`~qmagic.core.jobs.Job`, not in the Task.

Locks.  The engine lock guards the foreground slot, closing and the registry's sweeps; a
background task never waits for it.  Submitters and pool threads share no lock on a
task's way: its counts are sets of jobs changed by single dict operations (atomic under
the GIL).  A lock taken for every task by a submitter and a pool thread alike turns into a
convoy under the GIL (each acquisition a hand-over between threads, with two context
switches) and costs more than a short task.  A task's lock may be held while taking the
engine lock, never the reverse.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Protocol

from ..errors import RequestRefused, TaskCancelled, one_line
from . import capture
from .events import EventBus
from .foreground import ForegroundRunner, ThreadForegroundRunner
from .hooks import ContextHook, ContextHooks
from .jobs import CLOSED_REASON, STOPPED_BEFORE_START, Job, JobRunner, task_guard
from .loops import EventLoops
from .pool import ThreadPool
from .registry import MIN_UID_PREFIX, TaskRegistry, new_uid
from .status import TaskStatus
from .task import CancelHook, Task, call_texts, seconds, switch
from .timers import Timers

__all__ = [
    "Engine",
    "TaskObserver",
    "ContextHook",
    "MSG_NOT_IDLE",
    "MSG_KERNEL_BUSY",
    "MIN_UID_PREFIX",
    "MSG_CLOSE_IN_TASK",
]

log = logging.getLogger("qmagic")

MSG_NOT_IDLE = (
    "Error: Failed to start the task: RE Manager must be in idle state. "
    "Current state: 'executing_task'"
)
MSG_KERNEL_BUSY = "Error: Failed to start the task: IPython kernel (RE Worker) is busy."
#: At a close, events already queued (the tasks' last statuses) get at least this long to
#: reach subscribers, even when the tasks took the whole close time.
BUS_DRAIN_S = 0.5
#: What to do once the worker was closed (``worker.close()``, or qmagic unloaded): in a
#: kernel, %reload_ext qmagic starts a new one (%load_ext is a no-op while IPython lists
#: qmagic as loaded).
CLOSED_HINT = "run %reload_ext qmagic in the kernel (or make a new qmagic.Worker) to start a new one"
MSG_CLOSED = f"Error: Failed to start the task: the qmagic worker was closed; {CLOSED_HINT}."
#: ``close()`` called by one of the engine's own tasks (it would wait for itself).
MSG_CLOSE_IN_TASK = ("The qmagic worker cannot be closed from inside one of its tasks (it would "
                     "wait for itself): close it in a cell of its own (qmagic.get_worker().close() "
                     "or %unload_ext qmagic).")


class TaskObserver(Protocol):
    """Hears about every task synchronously, outside every lock (the experiment log)."""

    def task_submitted(self, task: Task) -> None:
        """Before the task's uid is handed to anyone (the log makes it durable here)."""

    def task_started(self, task: Task) -> None:
        """On the task's thread or loop, after it became running."""

    def task_finished(self, task: Task, record: dict) -> None:
        """The final record (``Task.to_dict()`` form), before the task's waiters wake."""


def _started_anyway(task: Task) -> str:
    """The line shown when ■ came as a background task was starting: the call that started
    it stops, the task goes on (or has ended already)."""
    return task._goes_on(f"the interrupt came as {task.call_text(40)} was starting in the background")


def _never() -> bool:
    return False


#: How long after an abandoned submit a timer makes sure its task has ended (seconds).
ABANDONED_CHECK_S = 1.0


class Engine(TaskRegistry):
    """Runs tasks; see the module docstring.  Settings are plain attributes that the
    worker keeps in step with its traits."""

    def __init__(
        self,
        *,
        max_background: int = 32,
        max_queued: int = 1000,
        retention_s: float = 600.0,
        max_finished: int = 1000,
        max_finished_bytes: int = 256_000_000,
        max_queued_bytes: int = 512_000_000,
        output_limit: int = 100_000,
        cancel_grace_s: float = 2.0,
        foreground: ForegroundRunner | None = None,
        loops: EventLoops | None = None,
        on_cancel: CancelHook | None = None,
    ) -> None:
        self.max_queued = max_queued
        self.retention_s = retention_s
        self.max_finished = max_finished
        self.max_finished_bytes, self.max_queued_bytes = max_finished_bytes, max_queued_bytes
        self.output_limit = output_limit
        self.cancel_grace_s = cancel_grace_s
        self.foreground: ForegroundRunner = foreground or ThreadForegroundRunner()
        self.loops = loops or EventLoops()
        self.bus = EventBus()
        self.timers = Timers()
        self.observers: list[TaskObserver] = []
        self.context_hooks = ContextHooks()
        self._init_registry()

        # Background accounting, as sets of jobs changed by single dict operations (atomic
        # under the GIL), never under a lock: see "Locks" in the module docstring.
        self._waiting: dict[Job, bool] = {}  # thread tasks waiting for a thread
        self._running_threads: dict[Job, bool] = {}  # background tasks on pool threads
        self._running_coros: dict[Job, bool] = {}  # background coroutine tasks running
        self._fg: Job | None = None
        self._closed = False
        self._runner = JobRunner(self)
        #: What ``Task.cancel()`` calls (the worker's: its lock rule first); one for every task.
        self._on_cancel: CancelHook = on_cancel or self._cancel_hook
        self._pool = ThreadPool(self._runner.run_background, self.timers, max_background)
        capture.install()

    @property
    def closed(self) -> bool:
        """True from :meth:`close` on: no task starts any more."""
        return self._closed

    @property
    def max_background(self) -> int:
        """Most background thread tasks running at once."""
        return self._pool.max_threads

    @max_background.setter
    def max_background(self, value: int) -> None:
        self._pool.resize(value)

    # -- starting tasks --------------------------------------------------------------------
    def submit(
        self,
        call: Callable[[], Any],
        *,
        name: str,
        user: str,
        user_group: str,
        background: bool,
        args: tuple = (),
        kwargs: dict | None = None,
        origin: str = "python",
        kind: str = "function",
        timeout: float | None = None,
        provenance: dict | None = None,
        coroutine: bool = False,
        payload_bytes: int = 0,
    ) -> Task:
        """Start ``call()`` as a task and return it.

        ``coroutine``: ``call()`` returns an awaitable that runs on the event loop.  A
        thread task whose ``call()`` returns an awaitable is awaited on the loop too.
        ``payload_bytes``: the size of the remote request that sent the arguments (0: none);
        finished tasks that carry one hold at most about ``max_finished_bytes`` in all.
        Refusals raise :class:`qmagic.RequestRefused` and leave no trace.  A foreground task
        started on the owner thread has finished when this returns.
        """
        task = Task(  # (background: a text is refused, before anything is reserved)
            new_uid(), name, args=args, kwargs=kwargs, user=user, user_group=user_group,
            background=switch(background, "background"), origin=origin, timeout=timeout,
            kind="coroutine" if coroutine else kind, provenance=provenance, output_limit=self.output_limit,
            bus=self.bus, on_cancel=self._on_cancel,
        )
        job = Job(task, call, coroutine)
        job.tokens = self.context_hooks.capture(task)
        inline = entered = handed = False
        try:
            if payload_bytes:  # (refused if the tasks waiting and running hold too much already)
                self._hold_size(job, payload_bytes)
            if task.background:
                self._reserve_background(job)
            else:
                inline = self._reserve_foreground(job)
            # On the owner thread a ■ is held back until the task is announced (recorded) and
            # handed on, then raised; an inline task runs inside the same guard, which gives a
            # ■ before its code to the task (it ends interrupted, its code never runs): no
            # moment between its record and its run lets a ■ leave it queued, holding the
            # foreground.
            # Elsewhere an interrupt or a forced cancel may land at any point: the task then
            # ends with a record if the log may have seen it.
            with task_guard(self.foreground, job) if inline else self.foreground.guard(_never):
                entered = True
                self._announce(job)
                if task.background:
                    self._runner.start_background(job)
                elif not inline:
                    self._runner.hand_over(job)
                handed = True
                if inline:
                    self._runner.run_foreground(job, guarded=False)
        except BaseException as exc:
            if not handed:
                self._abandon(job, exc, entered)
            elif task.background and isinstance(exc, KeyboardInterrupt):  # (held while it started)
                raise one_line(KeyboardInterrupt(_started_anyway(task))) from None
            raise
        return task

    def _abandon(self, job: Job, exc: BaseException, entered: bool) -> None:
        """``submit`` failed before the task was handed on.  No trace when the log cannot
        have seen it (a refusal, or the log's own error); else (the log recorded it, or an
        interrupt or forced cancel landed while it did) the task ends cancelled, with a
        record, and is never run: nothing the log saw stays "queued".  A timer ends it too
        if a second interrupt cuts this short."""
        if not (job.recorded or (entered and not isinstance(exc, Exception))):
            self._release_reservation(job)
            return
        reason = exc if isinstance(exc, KeyboardInterrupt) else TaskCancelled(STOPPED_BEFORE_START)
        self.timers.schedule(ABANDONED_CHECK_S, lambda: self._end_now(job, reason, overdue=True))
        self._end_now(job, reason)

    def _end_now(self, job: Job, reason: BaseException, *, overdue: bool = False) -> None:
        """End a task now, with ``reason``, unless it has ended (one that will never start, or
        whose code cannot be stopped).  ``overdue`` (the timer): also when its end was claimed
        but never finished (cut short)."""
        task = job.task
        if task.done():
            return
        if task._claim_end() or (overdue and task._ending and task._status is TaskStatus.QUEUED):
            with self.foreground.guard(_never):
                self._runner.end(job, None, reason)

    def _reserve_background(self, job: Job) -> None:
        """Count a thread task as waiting, unless ``max_queued`` already wait: first counted,
        then checked, so that racing submitters can never exceed the limit together."""
        if self._closed:
            raise RequestRefused(MSG_CLOSED)
        if not job.coroutine:
            self._waiting[job] = True
            waiting = len(self._waiting) + len(self._running_threads) - self.max_background
            if waiting > self.max_queued:
                self._waiting.pop(job, None)
                raise RequestRefused(
                    f"Error: Failed to start the task: {waiting - 1} background tasks are already "
                    f"waiting to start (QMagic.max_queued_tasks = {self.max_queued}). Wait for "
                    "some to finish or cancel queued tasks, then try again."
                )

    def _reserve_foreground(self, job: Job) -> bool:
        """Take the foreground slot; True when the task runs inline (owner thread)."""
        inline = self.foreground.owns_current_thread()
        with self._lock:
            if self._closed:
                raise RequestRefused(MSG_CLOSED)
            if self._fg is not None:
                raise RequestRefused(MSG_NOT_IDLE)
            if not inline:
                if self.foreground.user_busy():
                    raise RequestRefused(MSG_KERNEL_BUSY)
                why = self.foreground.unavailable()
                if why is not None:
                    raise RequestRefused(why)
            self._fg = job
            job.handed_over = not inline
        return inline

    def _release_reservation(self, job: Job) -> None:
        self._free_foreground(job)
        self._waiting.pop(job, None)
        self._live_sizes.pop(job, None)

    def _free_foreground(self, job: Job) -> None:
        if self._fg is job:
            with self._lock:
                if self._fg is job:
                    self._fg = None

    def _announce(self, job: Job) -> None:
        """Tell the observers (durably), then make the task visible."""
        task = job.task
        for observer in self.observers:
            observer.task_submitted(task)  # may raise: then the task never existed
        job.recorded = True
        self._jobs[task.uid] = job
        self._note_last(task)
        if self.bus.listening(task):  # (a subscriber that comes later is told "queued" anyway)
            with task._mutex:
                self.bus.emit(task, status="queued")

    # -- called by the job runner ---------------------------------------------------------
    def _started(self, job: Job) -> None:
        if job.task.background:  # (counted running first: the counts never miss it)
            (self._running_coros if job.coroutine else self._running_threads)[job] = True
        self._waiting.pop(job, None)
        timeout = job.task.timeout
        if timeout is not None:
            job.deadline = self.timers.schedule(timeout, lambda: self._deadline(job))

    def _settle(self, job: Job) -> None:
        """The task is about to finish (its record is written, its waiters not yet awake):
        free its thread or slot and keep it for ``retention_s``, all before its waiters wake,
        so that a waiter sees exact counts and can look the task up."""
        if job.deadline is not None:
            job.deadline.cancel()
        self._free_foreground(job)
        self._running_threads.pop(job, None)
        self._running_coros.pop(job, None)
        self._waiting.pop(job, None)  # cancelled before it started
        self._live_sizes.pop(job, None)  # (its size now counts among the finished ones)
        self._retain(job)

    def notify(self, event: str, task: Task, *args: Any) -> None:
        """Tell every observer; an observer that raises is logged, never breaks the task."""
        for observer in self.observers:
            try:
                getattr(observer, event)(task, *args)
            except Exception:  # noqa: BLE001
                log.exception("qmagic: task observer %r failed on %s", observer, event)

    # -- cancelling and interrupting --------------------------------------------------------
    def _cancel_hook(self, task: Task, force: bool, reason: str) -> bool:
        return self.cancel(task, force=force, reason=reason)

    def cancel(self, task: Task, *, force: bool = False, reason: str = "Task was cancelled") -> bool:
        """Cancel ``task`` (see :meth:`Task.cancel`); False if it had already finished (a text force: TypeError)."""
        return self._runner.cancel([task], switch(force, "force"), reason)[0]

    def _deadline(self, job: Job) -> None:  # (a late result: JobRunner.end)
        task = job.task
        if not task.done() and not job.code_done:  # (a coroutine gets one CancelledError: its cleanup runs whole)
            job.deadline_passed = True
            self.cancel(task, force=not job.coroutine, reason=f"deadline of {task.timeout:g} s passed")

    def interrupt_foreground(self) -> str:
        """Interrupt the running foreground task (KeyboardInterrupt in its code).

        Returns "interrupted", "pending" (an interrupt for this task is already on its way:
        interrupts are coalesced, at most one per task) or "idle" (no foreground task).
        """
        job = self._fg
        if job is None:
            return "idle"
        return self._runner.interrupt(job)

    # -- shutdown ---------------------------------------------------------------------------
    def close(self, timeout: float = 5.0, reason: str = CLOSED_REASON) -> None:
        """Cancel queued tasks, stop running ones (forcing after the grace time, at most half
        of ``timeout``: the cleanup the forced cancel starts gets the other half), stop every
        thread and qmagic's event loop, within ``timeout`` (events already queued get at
        least :data:`BUS_DRAIN_S` to reach subscribers); a task still running then is
        recorded cancelled and left to end on its own.  ``reason``: the tasks' cancel
        reason.  Idempotent.  Refused (:class:`RequestRefused`, nothing changed) when one of
        its own tasks calls it: it would wait for, and force, that task, or block its loop."""
        timeout = max(0.0, seconds(timeout, none=False))
        if not self._closed and self.running_own_task() is not None:
            raise one_line(RequestRefused(MSG_CLOSE_IN_TASK))
        with self._lock:
            if self._closed:
                return
            self._closed = True
            active = [job.task for job in list(self._jobs.values()) if not job.task.done()]
            self.cancel_grace_s = min(self.cancel_grace_s, timeout / 2)
        deadline = time.monotonic() + timeout
        self._runner.cancel(active, True, reason)  # (together: one hop per event loop)
        for task in active:
            task.wait(max(0.0, deadline - time.monotonic()))
        stuck = [t for t in active if not t.done()]  # blocked where nothing stops them:
        if stuck:  # (recorded now, while the log is open; Task and log agree)
            words = ("runs", "it", "it is", "its") if len(stuck) == 1 else ("run", "them", "they are", "their")
            log.warning("qmagic: %s still %s (blocked where nothing stops %s); %s recorded as "
                        "cancelled and left to end on %s own.", call_texts(stuck), *words)
        for task in stuck:
            self._runner.end_left_running(self._jobs[task.uid], _never)
        self._pool.close()
        left = lambda: max(0.0, deadline - time.monotonic())  # noqa: E731
        self.timers.close(left())  # (a timer callback or a subscriber that blocks is left behind:
        self.bus.close(max(BUS_DRAIN_S, left()))  # their threads are daemons)
        self.foreground.close()
        self.loops.close(left())
        capture.uninstall()
