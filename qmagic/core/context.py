"""What code running inside a task can ask for: the current task, progress, cancellation.

Every helper is a harmless no-op outside a task, so the same measurement function works
when called directly in a cell and when started as a tracked task.
"""

from __future__ import annotations

import contextvars
import threading
import time
from typing import TYPE_CHECKING

from ..errors import TaskCancelled

if TYPE_CHECKING:  # pragma: no cover
    from .task import Task

__all__ = ["current_task", "report_progress", "raise_if_cancelled", "cancellable_sleep"]

_current: contextvars.ContextVar[Task | None] = contextvars.ContextVar(
    "qmagic_current_task", default=None
)


def current_task() -> Task | None:
    """The :class:`qmagic.Task` whose code is running here (in this thread, or in this
    coroutine task on its event loop), or None outside any task.

    Code the task started that inherits its context -- an asyncio task it created with
    ``asyncio.create_task``, a thread of ``asyncio.to_thread`` -- gets that task too, also
    once it has ended (check ``task.done()``): so ``raise_if_cancelled()`` there still stops
    when the task was cancelled.  What such code prints or logs after the task ended goes
    where output goes outside tasks, never into the finished task's ``output`` or ``log``."""
    return _current.get()


def task_here() -> Task | None:
    """The task the helpers below act for: the current task, else the task whose work
    started this thread (a ``ThreadPoolExecutor`` reading detectors for a scan), while that
    task runs (a pool's thread lives on and later runs other work); else None.  The note on
    the thread is made by :mod:`qmagic.core.capture` while it is installed."""
    task = _current.get()
    if task is not None:
        return task
    started_by = getattr(threading.current_thread(), "_qmagic_started_by", None)
    task = started_by() if started_by is not None else None
    return None if task is None or task._ending else task


def raise_if_cancelled() -> None:
    """Raise :class:`qmagic.TaskCancelled` if the current task was asked to stop.

    Call it between steps of a long loop (also in threads the task's code started, such as
    a ``ThreadPoolExecutor`` reading detectors, while the task runs).  Outside a task it does
    nothing.
    """
    task = task_here()
    if task is not None and task.cancel_requested:
        raise TaskCancelled(task.cancel_reason)


def report_progress(
    value: float | None, total: float | None = None, message: str | None = None
) -> None:
    """Report how far the current task got (e.g. ``report_progress(i, n, "point 3 of 10")``).

    Panels and subscribers see it live.  It also checks for a cancel request, raising
    :class:`qmagic.TaskCancelled` if the task was asked to stop.  In a thread the task's
    code started (a pool reading detectors) it reports for the task while the task runs.
    Outside a task it does nothing.
    """
    task = task_here()
    if task is None:
        return
    from .status import Progress

    if task.cancel_requested:
        raise TaskCancelled(task.cancel_reason)
    # (an exact str: a subclass's own methods would run wherever the message is shown)
    task._set_progress(Progress(value, total, None if message is None else str.__str__(str(message))))


def cancellable_sleep(seconds: float) -> None:
    """Sleep ``seconds``, waking at once with :class:`qmagic.TaskCancelled` on cancel.

    Outside a task it is ``time.sleep`` (a thread the task's code started counts as the
    task's while the task runs).  In a coroutine (``async def``) task use
    ``await asyncio.sleep(seconds)`` instead: it is cancelled at once too, and does not
    block the event loop.
    """
    task = task_here()
    if task is None:
        time.sleep(seconds)
        return
    if task.kind == "coroutine" and _in_event_loop():
        raise RuntimeError(
            "cancellable_sleep() would block the event loop of this coroutine task: "
            "use `await asyncio.sleep(seconds)` instead (it is cancelled at once too)."
        )
    if task._wait_cancel(max(0.0, seconds)):
        raise TaskCancelled(task.cancel_reason)


def _in_event_loop() -> bool:
    import asyncio

    return asyncio._get_running_loop() is not None
