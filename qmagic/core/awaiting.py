"""The coroutine side of the :class:`~qmagic.core.jobs.JobRunner`: coroutine tasks run on
their event loop (:mod:`qmagic.core.loops`), and a thread task's awaitable result is awaited
there; asyncio's cancellation of them is the task's cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import threading
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Callable

from ..errors import TaskCancelled, one_line
from .context import _current
from .status import TaskStatus
from .task import INTERRUPTED, Task, call_texts

if TYPE_CHECKING:  # pragma: no cover
    from .engine import Engine
    from .jobs import Job

__all__ = ["LOOP_CHECK_S", "MSG_LOOP_STOPPED", "CoroutineJobs", "LoopWatch", "awaitable_result", "awaited_value",
           "cancel_atask", "cancel_atasks", "cancel_error", "coroutine_name", "returned_coroutine",
           "wait_uninterrupted"]

log = logging.getLogger("qmagic")

#: How often the event loop of a running coroutine task (or awaited result) is looked at:
#: found stopped at two looks in a row, the task ends failed (:class:`LoopWatch`).
LOOP_CHECK_S = 1.0
MSG_LOOP_STOPPED = "The event loop this task ran on was stopped, so it could not go on: run it again."


#: Said once when an interrupted foreground coroutine task's event loop has not run for
#: :data:`LOOP_HELD_S` (a cell that ■ could not end, and no word why; the beamtime tester),
#: and when a forced cancel finds it so (a Force stop that did nothing, and no word why).
LOOP_HELD_S = 1.0
MSG_LOOP_HELD = ("qmagic: %s waits for its event loop, which code on it holds (a call that does not "
                 "await: time.sleep, a blocking read, RE(...) in a coroutine); the %s lands "
                 "once that call returns. If it never does, restart the kernel.")


class _LoopProbe:
    """Whether ``loop`` runs: a callback sent to it, not run within :data:`LOOP_HELD_S`,
    means code on it holds it.  :meth:`held` is True once, then never again."""

    def __init__(self, loop: Any) -> None:
        self._ran = threading.Event()
        self._sent = time.monotonic()
        self._told = loop is None
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self._ran.set)
            except RuntimeError:  # (closed: the loop watch ends its tasks)
                self._told = True

    def held(self, after: float = LOOP_HELD_S) -> bool:
        if self._told or self._ran.is_set() or time.monotonic() - self._sent < after:
            return False
        self._told = True
        return True


class LoopWatch:
    """Looks at the event loops of running coroutine tasks (and awaited results) every
    :data:`LOOP_CHECK_S`, with one timer whatever their number (a timer of each task's own
    cost ~15 us a look: 14 % of a core with 5,000 tasks waiting; found by a hostile test).
    An event loop stopped (not closed: bluesky's) under running tasks would leave them
    running for good: a loop found stopped at two looks in a row hands each of its tasks
    still running to ``on_stopped``."""

    def __init__(self, timers: Any, on_stopped: Callable[[Job], None]) -> None:
        self._timers = timers
        self._on_stopped = on_stopped
        self._lock = threading.Lock()
        self._jobs: dict[Any, list[Job]] = {}  # loop -> its jobs (the ended ones dropped at each look)
        self._stopped: set[Any] = set()  # the loops found stopped at the last look
        self._looking = False  # a look is scheduled

    def add(self, job: Job) -> None:
        """Watch ``job.loop`` while ``job``'s task runs."""
        with self._lock:
            self._jobs.setdefault(job.loop, []).append(job)
            if self._looking:
                return
            self._looking = True
        self._timers.schedule(LOOP_CHECK_S, self._look)

    def _look(self) -> None:
        """Timer: one look at every watched loop."""
        found: list[Job] = []
        with self._lock:
            for loop, jobs in list(self._jobs.items()):
                jobs[:] = [job for job in jobs if not job.task.done()]
                stopped = loop.is_closed() or not loop.is_running()
                if not jobs or (stopped and loop in self._stopped):
                    found += jobs
                    del self._jobs[loop]
                    self._stopped.discard(loop)
                elif stopped:
                    self._stopped.add(loop)
                else:
                    self._stopped.discard(loop)
            self._looking = bool(self._jobs)
        if self._looking:
            self._timers.schedule(LOOP_CHECK_S, self._look)
        for job in found:
            self._on_stopped(job)


class CoroutineJobs:
    """Mixin of :class:`~qmagic.core.jobs.JobRunner`: coroutine jobs and awaited results."""

    engine: Engine
    loop_watch: LoopWatch

    def _await_in_loop(self, job: Job, awaitable: Any) -> Any:
        """A thread task returned an awaitable: run it on the event loop, wait here."""
        box: dict[str, Any] = {}
        done = threading.Event()

        async def run() -> None:
            try:
                if job.task.cancel_requested or "stopped" in box:  # (before it could start)
                    _close(awaitable)
                    raise TaskCancelled(job.task.cancel_reason or INTERRUPTED)
                job.task._own_code = asyncio.current_task()  # (its thread only waits now)
                value = await awaitable
                missed = returned_coroutine(value, coroutine_name(awaitable, job.task.name))
                box["error" if missed is not None else "result"] = missed or value
            except BaseException as exc:  # noqa: BLE001
                box["error"] = exc
            finally:
                job.task._own_code = None
                done.set()

        handed = False
        try:
            self._start_on_loop(job, run)
            handed = True
            while not done.wait(0.5):
                if job.task.done():  # (ended meanwhile: its loop stopped, or the worker closed)
                    return None
        except BaseException:  # interrupted or forced: stop the awaitable too
            box["stopped"] = True  # (run() still to start never awaits the awaitable)
            if job.loop is not None:
                job.cancel_sent = True
                self._send_cancel(job)
            if handed:  # (then run() ends, whatever happens)
                wait_uninterrupted(done)
            elif job.loop is None:  # (no loop to run it: no "never awaited" warning)
                _close(awaitable)
            raise
        if "error" in box:
            raise cancel_error(job.task, box["error"])
        return box.get("result")

    # -- coroutines ---------------------------------------------------------------------------
    def _start_on_loop(self, job: Job, make: Callable[[], Any]) -> None:
        """Start ``make()`` (a coroutine that reads the task's cancel flag first and records
        every outcome) as an asyncio task on the loop.  It is never cancelled before it
        starts (:func:`cancel_atask`): asyncio would then skip its body, and the task would
        never end."""
        loop = self.engine.loops.loop()
        job.loop = loop
        job.task._run_on(loop)  # (the task refuses blocking waits on that loop, from now on)

        def create() -> None:
            job.atask = loop.create_task(make())

        loop.call_soon_threadsafe(create)
        self.loop_watch.add(job)

    def _loop_stopped(self, job: Job) -> None:
        """The loop under a running task was found stopped (see :class:`LoopWatch`): the task
        ends failed (:data:`MSG_LOOP_STOPPED`), and its coroutine is cancelled should that
        loop ever run again."""
        task, loop = job.task, job.loop
        if loop is not None and task._claim_end():
            with contextlib.suppress(RuntimeError):  # (closed: nothing runs it again)
                loop.call_soon_threadsafe(cancel_atask, job, MSG_LOOP_STOPPED)
            self.end(job, None, RuntimeError(MSG_LOOP_STOPPED))

    def _schedule_coroutine(self, job: Job) -> None:
        try:
            self._start_on_loop(job, lambda: self._run_coroutine_job(job))
        except BaseException as exc:  # noqa: BLE001 - e.g. bluesky's loop required but absent
            if job.task._claim_end():
                self.end(job, None, exc)

    async def _run_coroutine_job(self, job: Job) -> None:
        task = job.task
        if not task._start():
            return
        self.engine._started(job)
        self.engine.notify("task_started", task)
        result: Any = None
        error: BaseException | None = None
        token = _current.set(task)
        task._own_code = asyncio.current_task()
        # (``job.in_user_code`` is the owner thread's alone: it marks its wait, where ■ may
        # land; the loop thread only says when the code is done.)
        try:
            if task.cancel_requested:
                raise TaskCancelled(task.cancel_reason)
            if job.interrupted_early:  # ■ before it started: it never starts
                raise TaskCancelled(INTERRUPTED)
            with self._hooks(job):
                if job.tokens:
                    task._work_context = contextvars.copy_context()
                result = await job.call()
        except BaseException as exc:  # noqa: BLE001 - every outcome is recorded
            error = cancel_error(task, exc)
        finally:
            job.code_done = True
            task._own_code = task._work_context = None
            _current.reset(token)
        if error is None:
            error = returned_coroutine(result, task.name)
            if error is not None:
                result = None
        if task._claim_end():
            self.end(job, result, error)

    def _wait_for_coroutine(self, job: Job) -> None:
        """Owner thread: a foreground coroutine task holds the cell until it ends; an
        interrupt (■) cancels it, and the wait goes on until it has ended.  A task that
        completes anyway (it caught the CancelledError, or ■ came as it ended) still stops
        the call: raises a one-line KeyboardInterrupt (so a cell stops there)."""
        self._schedule_coroutine(job)
        task = job.task
        interrupted = False
        probe: _LoopProbe | None = None
        while not task.done():
            if job.interrupted_early:  # (■ before the wait began: taken by the guard)
                interrupted = True  # (the cancel flag first: the coroutine reads one as it starts)
                self.engine.cancel(task, reason=INTERRUPTED)
                job.interrupted_early = False
            if interrupted and probe is None:
                probe = _LoopProbe(job.loop)
            try:
                job.in_user_code = True  # the interrupt guard lets ■ through while waiting
                task.wait(0.5)
            except KeyboardInterrupt:
                interrupted, again = True, job.cancel_sent
                self.engine.cancel(task, reason=INTERRUPTED)
                if again:  # ■ again reaches the code, as in a thread task (its cleanup too)
                    self._send_cancel(job)
            finally:
                job.in_user_code = False
            if probe is not None and probe.held() and not task.done():
                log.warning(MSG_LOOP_HELD, task.call_text(60), "interrupt")
        if job.interrupted_early:  # (■ taken before it started, but it had ended by then)
            job.interrupted_early, interrupted = False, True
        if interrupted and task.status is TaskStatus.COMPLETED:  # (a failure shows itself)
            raise one_line(KeyboardInterrupt(
                f"{task.call_text(60)} did not stop for the interrupt: it completed and is "
                "recorded so (see %task_result)."))

    # -- cancelling ------------------------------------------------------------------------------
    def cancel_awaitables(self, jobs: list[Job], force: bool) -> None:
        """asyncio's cancel of the running tasks' awaitables, once each: a second
        CancelledError would land in its cleanup (``finally:`` parking a motor) and cut it
        short.  The jobs of one loop go there in one hop (a close with thousands of waiting
        tasks sent one hop each, and fell behind its timeout).  ``force``: one more after
        ``cancel_grace_s`` to those that have not ended by then (code that swallowed the
        first), in one batch too (:meth:`_cancel_again`)."""
        first: dict[Any, list[Job]] = {}
        planned: list[Job] = []
        for job in jobs:
            with job.gate:
                send, job.cancel_sent = not job.cancel_sent, True
                plan = force and not job.force_planned and not job.exception_sent
                if plan:
                    job.force_planned = True
            if send and job.loop is not None:
                first.setdefault(job.loop, []).append(job)
            if plan:
                planned.append(job)
        for loop, batch in first.items():
            _send(loop, cancel_atasks, batch)
        if planned:  # (one timer for them all)
            self.engine.timers.schedule(self.engine.cancel_grace_s, lambda: self._cancel_again(planned))

    def _cancel_again(self, jobs: list[Job]) -> None:
        """Timer: the forced cancel of awaitables (see :meth:`cancel_awaitables`), decided on
        their loop, in one hop per loop: there, every first cancel sent before has been
        delivered and its task has had its step (no warning about a task the loop had not yet
        reached: :meth:`_cancel_again_on_loop`)."""
        by_loop: dict[Any, list[Job]] = {}
        for job in jobs:
            with job.gate:
                job.force_planned = False
                if job.task.done() or job.exception_sent or job.loop is None:
                    continue
            by_loop.setdefault(job.loop, []).append(job)
        for loop, batch in by_loop.items():
            _send(loop, self._cancel_again_on_loop, batch)
            probe = _LoopProbe(loop)  # (held: that second cancel, and its warning, wait; say so)
            self.engine.timers.schedule(LOOP_HELD_S, lambda b=batch, p=probe: _warn_if_held(b, p))

    def _cancel_again_on_loop(self, jobs: list[Job]) -> None:
        """On the loop: one step later (a first cancel delivered just now, by a hop queued
        before this one, has then had its task's step), :meth:`_cancel_stubborn`."""
        asyncio.get_running_loop().call_soon(self._cancel_stubborn, jobs)

    def _cancel_stubborn(self, jobs: list[Job]) -> None:
        """On the loop: cancel again the tasks that did not stop at their first cancel, with
        one warning for them all; a task whose first cancel has not reached its coroutine yet
        (it had not started) is looked at again after another grace time."""
        again: list[Job] = []
        later: list[Job] = []
        for job in jobs:
            with job.gate:
                if job.task.done() or job.exception_sent:
                    continue
                if not job.cancel_delivered:
                    if not job.force_planned:
                        job.force_planned = True
                        later.append(job)
                    continue
                job.exception_sent = True
            again.append(job)
        if later:
            self.engine.timers.schedule(self.engine.cancel_grace_s, lambda: self._cancel_again(later))
        if not again:
            return
        log.warning("qmagic: %s did not stop within %.1f s; cancelling again.",
                    call_texts([job.task for job in again]), self.engine.cancel_grace_s)
        cancel_atasks(again)

    @staticmethod
    def _send_cancel(job: Job) -> None:
        if job.loop is not None:
            job.loop.call_soon_threadsafe(cancel_atask, job, job.task.cancel_reason)


def _warn_if_held(jobs: list[Job], probe: _LoopProbe) -> None:
    """Timer: the forced cancel of ``jobs`` found their loop held (:data:`MSG_LOOP_HELD`)."""
    left = [job.task for job in jobs if not job.task.done()]
    if left and probe.held(0.0):
        log.warning(MSG_LOOP_HELD, left[0].call_text(60) if len(left) == 1 else call_texts(left), "cancel")


def _send(loop: Any, fn: Callable[[list[Job]], None], jobs: list[Job]) -> None:
    """``fn(jobs)`` on ``loop``; nothing if the loop is closed (nothing runs there again)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, jobs)


#: Result types that are never awaitable (checked first: ``isawaitable`` is an ABC check).
_PLAIN_RESULTS = frozenset({type(None), bool, int, float, complex, str, bytes, tuple, list, dict, set})


def awaitable_result(value: Any) -> bool:
    """A coroutine or other awaitable returned by a thread task's function (awaited on the
    loop) — but not a Future such as another Task, which is a result like any other."""
    if type(value) in _PLAIN_RESULTS:
        return False
    return inspect.isawaitable(value) and not isinstance(value, Future)


def returned_coroutine(value: Any, outer: str) -> BaseException | None:
    """``value``, what the coroutine ``outer`` returned, is a coroutine (``return g()`` meant
    as ``return await g()``): g never ran, and a task that "completed" with it would hide
    that.  It is closed (no "never awaited" warning) and the TypeError the task fails with is
    returned, shown in one line wherever it is raised (its frames are qmagic's); None for any
    other value.  (A plain function that returns a coroutine is not this mistake: that
    coroutine is the function's work, awaited once; what *it* returns is looked at here.)"""
    if type(value) in _PLAIN_RESULTS or not inspect.iscoroutine(value):
        return None
    inner = coroutine_name(value, "the coroutine")
    value.close()
    return one_line(TypeError(f"{outer}() returned a coroutine instead of its value ({inner} was never run): "
                              f"write `return await {inner}(...)`."))


def awaited_value(value: Any, outer: str) -> Any:
    """``value``, what the coroutine ``outer`` returned; raises :func:`returned_coroutine`'s
    error for a coroutine."""
    error = returned_coroutine(value, outer)
    if error is not None:
        raise error
    return value


def coroutine_name(awaitable: Any, default: str) -> str:
    """The name of a coroutine's function as its code spells it (``Scan.run``, ``f`` for a
    function defined in another one), or ``default``."""
    name = getattr(awaitable, "__qualname__", None)
    return name.rsplit("<locals>.", 1)[-1] if isinstance(name, str) and name else default


def _close(awaitable: Any) -> None:
    """An awaitable that will never be awaited: a coroutine is closed (no "never awaited"
    warning, its ``finally`` runs)."""
    if inspect.iscoroutine(awaitable):
        awaitable.close()


def cancel_atask(job: Job, reason: str) -> None:
    """On the loop: asyncio's cancel of the job's asyncio task, once its coroutine has
    started (a cancel before its first step would skip its body, which records the end:
    then it comes again after that step)."""
    atask = job.atask
    if atask is None or atask.done():
        return
    if inspect.getcoroutinestate(atask.get_coro()) == inspect.CORO_CREATED:
        asyncio.get_running_loop().call_soon(cancel_atask, job, reason)
        return
    job.cancel_delivered = True
    atask.cancel(reason)


def cancel_atasks(jobs: list[Job]) -> None:
    """On the loop: :func:`cancel_atask` of each job, with its task's cancel reason."""
    for job in jobs:
        cancel_atask(job, job.task.cancel_reason)


def cancel_error(task: Task, exc: BaseException) -> BaseException:
    """asyncio's cancellation of a task's coroutine is the task's cancellation."""
    if isinstance(exc, asyncio.CancelledError):
        reason = (task.cancel_reason if task.cancel_requested
                  else "Task was cancelled (its event loop cancelled it)")
        err = TaskCancelled(reason)
        err.__traceback__ = exc.__traceback__
        return err
    return exc


def wait_uninterrupted(event: threading.Event) -> None:
    """Wait for ``event``; further interrupts while waiting are ignored (the task is
    already being stopped)."""
    while True:
        try:
            if event.wait(0.5):
                return
        except BaseException:  # noqa: BLE001
            continue
