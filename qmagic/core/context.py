"""What code running inside a task can ask for: the current task, progress, cancellation.

Every helper is a harmless no-op outside a task, so the same measurement function works
when called directly in a cell and when started as a tracked task.
"""

from __future__ import annotations

import contextvars
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


def raise_if_cancelled() -> None:
    """Raise :class:`qmagic.TaskCancelled` if the current task was asked to stop.

    Call it between steps of a long loop.  Outside a task it does nothing.
    """
    task = _current.get()
    if task is not None and task.cancel_requested:
        raise TaskCancelled(task.cancel_reason)


def report_progress(
    value: float | None, total: float | None = None, message: str | None = None
) -> None:
    """Report how far the current task got (e.g. ``report_progress(i, n, "point 3 of 10")``).

    Panels and subscribers see it live.  It also checks for a cancel request, raising
    :class:`qmagic.TaskCancelled` if the task was asked to stop.  Outside a task it does
    nothing.
    """
    task = _current.get()
    if task is None:
        return
    from .status import Progress

    if task.cancel_requested:
        raise TaskCancelled(task.cancel_reason)
    # (an exact str: a subclass's own methods would run wherever the message is shown)
    task._set_progress(Progress(value, total, None if message is None else str.__str__(str(message))))


def cancellable_sleep(seconds: float) -> None:
    """Sleep ``seconds``, waking at once with :class:`qmagic.TaskCancelled` on cancel.

    Outside a task it is ``time.sleep``.  In a coroutine (``async def``) task use
    ``await asyncio.sleep(seconds)`` instead: it is cancelled at once too, and does not
    block the event loop.
    """
    task = _current.get()
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
