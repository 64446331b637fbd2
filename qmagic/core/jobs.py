"""Running one task: on a pool thread, on the foreground owner, or on an event loop.

The :class:`JobRunner` executes a :class:`Job` (the engine's bookkeeping for one task) and
records its outcome, whatever happens:

- The task's own code runs between two marks (``job.in_user_code``), set under the job's
  gate (a C lock).  A forced cancel (an asynchronous ``TaskCancelled``) and an interrupt
  are aimed only inside that window; one that lands just after the code returned is
  caught and dropped (:meth:`JobRunner._leave_user_code`), so qmagic's bookkeeping never
  sees it.
- On the foreground owner thread the whole run happens inside the runner's interrupt
  guard: a ■ that arrives during bookkeeping is held back until the record is complete.
- The final record goes to the observers (the experiment log) before the task's waiters
  wake; the thread or slot is released before that too (exact accounting).

Coroutine jobs, and the awaitables thread tasks return, are run by its mixin
:class:`~qmagic.core.awaiting.CoroutineJobs`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, ContextManager

from .. import tracebacks
from ..errors import TaskCancelled
from . import capture
from .awaiting import CoroutineJobs, LoopWatch, awaitable_result
from .context import _current
from .foreground import force_step, raise_in_thread
from .status import TaskStatus
from .task import INTERRUPTED, Task

if TYPE_CHECKING:  # pragma: no cover
    from .engine import Engine
    from .timers import TimerHandle

__all__ = ["CLOSED_REASON", "STILL_RUNNING", "STOPPED_BEFORE_START", "Job", "JobRunner", "own_code_ended"]

log = logging.getLogger("qmagic")

#: Why the tasks still queued or running when the worker closes are cancelled.
CLOSED_REASON = "Task was cancelled: the qmagic worker was closed"
#: Added to the reason of a task whose code could not be stopped (blocked in C) when the
#: worker closed: the log must not read as if the scan stopped there (after an %unload_ext
#: mid-scan it ran on to its end).
STILL_RUNNING = "; its code ran on, unlogged (nothing could stop it)"
#: Why a task ends when the call that started it was stopped (a forced cancel of the task
#: that called ``submit``, or an interrupt) after the log may have recorded it.
STOPPED_BEFORE_START = "Task was cancelled: the call that started it was stopped before it could start"

#: A forced cancel that finds its thread in a lock's Python code tries again this much later,
#: and after this long (or the grace time) there on every try, the thread waits for a lock:
#: it is left to it, like code blocked in C.
FORCE_RETRY_S, FORCE_GIVE_UP_S = 0.001, 0.5

#: The job whose call runs on this thread (``job``), while it runs (:func:`own_code_ended`).
_here = threading.local()


def own_code_ended() -> None:
    """Called by a thread task's call once the user's code in it has ended, before qmagic's
    own work that follows (a script's restoring or reporting of the namespace): from here on
    no ■ or forced cancel lands in the call, as after it returns -- a ■ is held until the
    task is recorded, then reported in one line.  One already sent raises here, before
    that work (the caller treats it as the code's own).  Elsewhere (a coroutine task,
    outside a task) nothing happens."""
    job = getattr(_here, "job", None)
    if job is not None:
        with job.gate:
            job.in_user_code = False
            job.code_done = True


class Job:
    """The engine's bookkeeping for one task (never shown to users)."""

    __slots__ = (
        "task", "call", "coroutine", "tokens", "ident", "in_user_code", "handed_over",
        "deadline", "atask", "loop", "interrupt_sent", "gate", "code_done", "force_planned",
        "exception_sent", "recorded", "interrupted_early", "lock_wait_since", "cancel_sent", "cancel_delivered",
        "deadline_passed",
    )

    def __init__(self, task: Task, call: Callable[[], Any], coroutine: bool) -> None:
        self.task = task
        self.call = call
        self.coroutine = coroutine
        self.tokens: list | None = None  # context hooks' tokens (output routing)
        self.ident: int | None = None  # thread running the task's code
        self.in_user_code = False
        self.handed_over = False  # a foreground task requested from another thread
        self.deadline: TimerHandle | None = None
        self.atask: asyncio.Task | None = None  # the asyncio task awaiting the task's code
        self.loop: asyncio.AbstractEventLoop | None = None
        self.interrupt_sent = False
        self.code_done = False  # the task's own code has run (set with in_user_code = False)
        self.force_planned = False  # a forced stop is scheduled (at most one at a time)
        #: A forced ``TaskCancelled`` went to the task's thread.  Never a second one: it would
        #: land in the task's own cleanup (``finally:`` parking a motor) and cut it short.
        #: An interrupt (■, at most one too) may come before it: code that survives ■ can
        #: still be forced after the grace time (``environment_destroy`` does both).
        self.exception_sent = False
        #: asyncio's cancel went to the task's awaitable (a coroutine): a cancel request sends
        #: it once; only a forced cancel (or ■ again) sends another (``CoroutineJobs``).
        self.cancel_sent = False
        #: asyncio's first cancel reached the task's coroutine (on its loop; ``CoroutineJobs``).
        self.cancel_delivered = False
        self.recorded = False  # every observer (the log) was told of the submit
        #: Its deadline passed while it ran (a result that comes later is kept, said: ``end``).
        self.deadline_passed = False
        #: ■ came before the task's code started: it never starts (read as it would).
        self.interrupted_early = False
        #: Since when every forced-cancel try found the thread in a lock's code (or None).
        self.lock_wait_since: float | None = None
        #: Guards ``in_user_code`` against the interrupter and the forcer.  A C lock: a
        #: ``with`` on it cannot be split by an interrupt or a forced cancel landing between
        #: taking and entering (a Condition's Python-level ``__enter__`` can, and leaves the
        #: lock held for good).
        self.gate = threading.Lock()


class JobRunner(CoroutineJobs):
    """Executes jobs for an :class:`~qmagic.core.engine.Engine` (see the module docstring)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.loop_watch = LoopWatch(engine.timers, self._loop_stopped)

    # -- entry points --------------------------------------------------------------------
    def start_background(self, job: Job) -> None:
        """Start a background job: a coroutine on its loop, a thread task on the pool."""
        if job.coroutine:
            self._schedule_coroutine(job)
            return
        try:
            self.engine._pool.submit(job)
        except RuntimeError:  # closed meanwhile: recorded, never lost
            if not self.engine._closed:
                raise
            if job.task._claim_end():
                self.end(job, None, TaskCancelled(CLOSED_REASON))

    def run_background(self, job: Job) -> None:
        """Pool thread: run a background thread task."""
        self._run_thread_job(job)

    def run_foreground(self, job: Job, guarded: bool = True) -> None:
        """On the owner thread: run the task inside its guard (False: the caller's)."""
        with task_guard(self.engine.foreground, job) if guarded else _NO_HOOKS:
            if job.coroutine:
                self._wait_for_coroutine(job)
            else:
                self._run_thread_job(job)

    def hand_over(self, job: Job) -> None:
        """Another thread asked for a foreground task: the owner runs it when free."""
        try:
            self.engine.foreground.call_soon(lambda: self.run_foreground(job))
        except Exception as exc:  # noqa: BLE001 - recorded: the uid is already out
            if job.task._claim_end():
                self.end(job, None, exc)

    # -- threads ---------------------------------------------------------------------------
    def _run_thread_job(self, job: Job) -> None:
        task = job.task
        if not task._start():  # cancelled while it waited (already recorded)
            return
        self.engine._started(job)
        if self.engine.observers:
            self.engine.notify("task_started", task)
        result, error = self._execute(job)
        if task._claim_end():  # (else the worker closed and ended it meanwhile: Engine.close)
            self.end(job, result, error)

    def _execute(self, job: Job) -> tuple[Any, BaseException | None]:
        """Run the task's code in this thread; return (result, exception).  The context
        hooks (output routing) are entered and left outside the window in which forced
        cancels and interrupts may land."""
        result: Any = None
        error: BaseException | None = None
        capture.ensure_streams()
        token = _current.set(job.task)
        job.ident = job.task._own_code = threading.get_ident()
        outer, _here.job = getattr(_here, "job", None), job
        try:
            with self._hooks(job):
                if job.tokens:
                    job.task._work_context = contextvars.copy_context()
                result, error = self._run_user_code(job)
        except BaseException as exc:  # noqa: BLE001 - a hook failed: recorded, never lost
            if error is None:
                result, error = None, exc
        _here.job = outer
        job.task._own_code = job.task._work_context = None
        _current.reset(token)
        return result, error

    def _run_user_code(self, job: Job) -> tuple[Any, BaseException | None]:
        task = job.task
        result: Any = None
        error: BaseException | None = None
        try:
            with job.gate:
                job.in_user_code = True
            if task.cancel_requested:
                raise TaskCancelled(task.cancel_reason)
            if job.interrupted_early:
                raise TaskCancelled(INTERRUPTED)
            result = job.call()
            if awaitable_result(result):
                result = self._await_in_loop(job, result)
        except BaseException as exc:  # noqa: BLE001 - every outcome is recorded
            error = exc
        while True:
            try:
                self._leave_user_code(job)
                break
            except (TaskCancelled, KeyboardInterrupt):  # aimed at code that has returned
                continue
        return result, error

    @staticmethod
    def _leave_user_code(job: Job) -> None:
        """End the window in which forced cancels and interrupts may land.  Idempotent.

        A forced cancel still pending (sent while the code ran, aimed at code that has
        returned) is raised when the ``with`` below ends — the call to the gate's C
        ``__exit__`` checks for it — i.e. inside the caller's retry loop, which drops it.
        (It must not be cleared with ``PyThreadState_SetAsyncExc(ident, NULL)``: on CPython
        3.11 that leaves the interpreter's asynchronous-exception flag set for good, and the
        next ``cProfile`` / ``%prun`` in the kernel hangs.)
        """
        with job.gate:
            job.in_user_code = False
            job.code_done = True

    def _hooks(self, job: Job) -> contextlib.AbstractContextManager:
        if not job.tokens:
            return _NO_HOOKS
        stack = contextlib.ExitStack()
        for hook, token in job.tokens:
            stack.enter_context(hook.apply(job.task, token))
        return stack

    # -- the end ------------------------------------------------------------------------------
    def end(self, job: Job, result: Any, error: BaseException | None) -> None:
        """Record the outcome (the caller holds the task's end claim)."""
        task = job.task
        if (isinstance(error, TaskCancelled) and task.cancel_requested
                and str(error) != task.cancel_reason):  # a forced stop raised the bare class
            error = TaskCancelled(task.cancel_reason).with_traceback(error.__traceback__)
        if error is None and job.deadline_passed:  # it caught every cancel, and returned late
            log.warning("qmagic: %s (task %s) returned after its deadline of %g s instead of stopping; "
                        "its result is kept (as asyncio.wait_for keeps it).", task.call_text(40),
                        task.uid[:8], task.timeout)
        if error is None:
            status, tb = TaskStatus.COMPLETED, None
        else:
            status = (TaskStatus.CANCELLED if isinstance(error, (TaskCancelled, KeyboardInterrupt))
                      else TaskStatus.FAILED)
            tb = tracebacks.traceback_text(error)
        finished_at = time.time()
        if self.engine.observers:
            record = task._final_record(status, result if error is None else None, error, tb, finished_at)
            self.engine.notify("task_finished", task, record)
        self.engine._settle(job)
        task._finish(status, result=result if error is None else None, error=error, tb=tb,
                     finished_at=finished_at)
        self.engine._finished_one()

    def end_left_running(self, job: Job, never: Callable[[], bool]) -> None:
        """End, cancelled, a task whose code the closing worker could not stop (blocked in C),
        unless its code ended it first: its reason says the code ran on (STILL_RUNNING)."""
        if job.task._claim_end():
            job.task._add_to_cancel_reason(STILL_RUNNING)
            with self.engine.foreground.guard(never):
                self.end(job, None, TaskCancelled(job.task.cancel_reason))

    # -- cancel and interrupt ---------------------------------------------------------------
    def cancel(self, tasks: list[Task], force: bool, reason: str) -> list[bool]:
        """:meth:`Engine.cancel` of each task (False: it had already finished); the running ones
        are stopped together (one hop per event loop: a close with thousands of coroutine tasks
        fell behind its timeout)."""
        cancelled, running = [], []
        for task in tasks:
            job = self.engine._jobs.get(task.uid)
            status = task._request_cancel(reason)
            cancelled.append(status is not None)
            if status is None or job is None:  # (not, or no longer, in this engine: the flag is all)
                continue
            if status is TaskStatus.QUEUED and task._claim_end(queued_only=True):
                self.end(job, None, TaskCancelled(task.cancel_reason))
            else:
                running.append(job)
        self.cancel_running(running, force)
        return cancelled

    def cancel_running(self, jobs: list[Job], force: bool) -> None:
        """The tasks run (their cancel flags are set): stop their awaitables now (one hop
        per loop: :meth:`cancel_awaitables`); force threads."""
        awaiting = [job.atask is not None and job.loop is not None for job in jobs]
        self.cancel_awaitables([job for job, aw in zip(jobs, awaiting) if aw], force)
        for job, aw in zip(jobs, awaiting):
            if aw or not force:
                continue
            with job.gate:
                planned, job.force_planned = job.force_planned, True
            if not planned:
                self.engine.timers.schedule(self.engine.cancel_grace_s, lambda job=job: self._force_stop(job))

    def _force_stop(self, job: Job) -> None:
        task = job.task
        sent = False
        with job.gate:
            job.force_planned = False
            if (not job.in_user_code or job.ident is None or task._status.finished
                    or job.exception_sent):
                return
            step, job.lock_wait_since = force_step(
                job.ident, job.lock_wait_since, max(FORCE_GIVE_UP_S, self.engine.cancel_grace_s))
            if step == "retry":
                job.force_planned = True
            elif step == "send":
                sent = job.exception_sent = raise_in_thread(job.ident, TaskCancelled)
        if step == "retry":
            self.engine.timers.schedule(FORCE_RETRY_S, lambda: self._force_stop(job))
        elif step == "blocked" and task.background and not job.coroutine:
            self._left_to(job)
        elif sent:
            log.warning(
                "qmagic: %s (task %s) did not stop within %.1f s; stopping it by force.",
                task.call_text(40), task.uid[:8], self.engine.cancel_grace_s,
            )
            if task.background and not job.coroutine:
                self.engine.timers.schedule(self.engine.cancel_grace_s, lambda: self._left_to(job))

    def _left_to(self, job: Job) -> None:
        """A forced cancel did not land (the code is blocked in C, or waits for a lock): its
        thread is left to it."""
        if not job.task.done():
            log.warning("qmagic: %s (task %s) is blocked where it cannot be stopped; its thread is "
                        "left to it and other tasks get another one.", job.task.call_text(40),
                        job.task.uid[:8])
            self.engine._pool.leave_to(job)

    def interrupt(self, job: Job) -> str:
        """KeyboardInterrupt into the foreground task's code (at most one per task)."""
        task = job.task
        if job.coroutine:
            if job.interrupt_sent:
                return "pending"
            job.interrupt_sent = True
            self.engine.cancel(task, reason=INTERRUPTED)
            return "interrupted"
        with job.gate:
            if job.interrupt_sent:
                return "pending"
            if task._status.finished:
                return "idle"
            if job.code_done:
                return "pending"  # its code has returned: the task ends now
            job.interrupt_sent = True
            if job.in_user_code:
                if job.exception_sent:  # a forced stop got there first
                    return "pending"
                self.engine.foreground.interrupt()
                return "interrupted"
            # Its code has not started yet: it never will (the flag is read as it starts).
            task._request_cancel(INTERRUPTED)
        self.engine.cancel(task, reason=INTERRUPTED)  # ends it now if it still waits
        return "interrupted"


_NO_HOOKS = contextlib.nullcontext()  # reusable


def task_guard(foreground: Any, job: Job) -> ContextManager[None]:
    """A foreground task's interrupt guard: ■ reaches its code only; one before it started
    takes the task (it ends interrupted, its code never runs)."""
    return foreground.guard(lambda: job.in_user_code, lambda: _interrupt_early(job))


def _interrupt_early(job: Job) -> bool:
    """The guard's ``before_code``: an interrupt before the task's code started takes the
    task (it is read as the code would start).  Runs in a signal handler on the owner
    thread, which may hold any lock: it only sets a flag."""
    if job.code_done or job.in_user_code:
        return False
    job.interrupted_early = True
    return True

