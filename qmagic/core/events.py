"""Task events: ordered delivery to subscribers on one dispatcher thread.

Events follow the Tango long-running-command convention: each callback is called as
``callback(task_uid=..., <one of> status=/progress=/result=/error=)``.  Events are put on a
queue under the task's lock at the moment the state changes, so per task they arrive in the
order the changes happened; one dispatcher thread calls the callbacks, so a slow or failing
callback never slows or breaks a task.  Progress reported faster than the callbacks take it
is merged: while a task's latest queued event is a progress that was not delivered yet, a new
progress replaces its value (at most one waits per task between other events, so a tight
``report_progress`` loop never piles up the queue; the order stays as it was).
"""

from __future__ import annotations

import inspect
import logging
import queue
import threading
from typing import TYPE_CHECKING, Any, Callable

from ..errors import TaskCancelled

if TYPE_CHECKING:  # pragma: no cover
    from .task import Task

__all__ = ["Subscription", "EventBus"]

log = logging.getLogger("qmagic")

_STOP = object()


def _check_callback(callback: Callable[..., Any]) -> None:
    if not callable(callback):
        raise ValueError(f"Event callback must be callable, got {callback!r}.")
    try:
        params = inspect.signature(callback).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature
        raise ValueError(
            f"Cannot inspect the signature of {callback!r}; subscribe a Python function "
            "defined as `def callback(**kwargs): ...`."
        ) from None
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        raise ValueError(
            f"Event callback {getattr(callback, '__name__', callback)!r} must accept **kwargs: "
            "events are delivered as callback(task_uid=..., status=... | progress=... | "
            "result=... | error=...). Define it as `def callback(**kwargs): ...`."
        )


class Subscription:
    """An active event subscription.  Ends only by :meth:`unsubscribe` (or leaving a
    ``with`` block); dropping the object does not end it."""

    def __init__(self, bus: EventBus, callback: Callable[..., Any], task: Task | None) -> None:
        self.callback = callback
        self.task = task
        self.active = True
        self._bus = bus

    def unsubscribe(self) -> None:
        """Stop receiving events (idempotent)."""
        if self.active:
            self.active = False
            self._bus._remove(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.unsubscribe()

    def __repr__(self) -> str:
        what = f"task {self.task.uid[:8]}" if self.task is not None else "all tasks"
        state = "active" if self.active else "ended"
        return f"<Subscription to {what}, {state}>"


class EventBus:
    """Queues events under task locks and delivers them from one dispatcher thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._global: tuple[Subscription, ...] = ()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False

    # -- subscribing ---------------------------------------------------------------------
    def subscribe(self, callback: Callable[..., Any]) -> Subscription:
        """Subscribe to the events of every task."""
        _check_callback(callback)
        sub = Subscription(self, callback, None)
        with self._lock:
            self._global = self._global + (sub,)
        self._ensure_thread()
        return sub

    def subscribe_task(self, task: Task, callback: Callable[..., Any]) -> Subscription:
        """Subscribe to one task: its current state first, then every later event."""
        _check_callback(callback)
        sub = Subscription(self, callback, task)
        self._ensure_thread()
        with task._mutex:
            task._subscribers = task._subscribers + (sub,)
            status = task.status
            if status.finished:
                if status.value == "completed":
                    self._queue.put((task, {"result": task._result}, sub))
                else:
                    error = task._error
                    if error is None or status.value == "cancelled":
                        error = TaskCancelled(task.cancel_reason)
                    self._queue.put((task, {"error": error}, sub))
            self._queue.put((task, {"status": status.value}, sub))
            if not status.finished and task._progress is not None:
                self._queue.put((task, {"progress": task._progress}, sub))
        return sub

    def _remove(self, sub: Subscription) -> None:
        if sub.task is None:
            with self._lock:
                self._global = tuple(s for s in self._global if s is not sub)
        else:
            with sub.task._mutex:
                sub.task._subscribers = tuple(s for s in sub.task._subscribers if s is not sub)

    # -- emitting ---------------------------------------------------------------------------
    def listening(self, task: Task) -> bool:
        """Whether anyone would receive an event of ``task`` now (any thread, no lock)."""
        return bool(self._global or task._subscribers)

    def emit(self, task: Task, **event: Any) -> None:
        """Queue one event of ``task`` for every current subscriber (cheap if none); called
        with the task's lock held, so that its events keep their order (a progress merges
        into one still waiting: see the module docstring)."""
        if not (self._global or task._subscribers):
            return
        if "progress" in event:
            waiting = task._progress_waiting
            if waiting is not None:
                waiting[0] = event["progress"]
                return
            task._progress_waiting = waiting = [event["progress"]]
            self._queue.put((task, waiting, None))
            return
        task._progress_waiting = None  # (a later progress queues behind this event)
        self._queue.put((task, event, None))

    def flush(self, timeout: float | None = 5.0) -> bool:
        """Wait until every event queued so far has been delivered; True on success."""
        if self._thread is None:
            return True
        done = threading.Event()
        self._queue.put((None, done, None))
        return done.wait(timeout)

    # -- dispatcher ----------------------------------------------------------------------------
    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(
                    target=self._run, name="qmagic-events", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        get = self._queue.get
        while True:
            task, event, only = get()
            if task is None:
                if event is _STOP:
                    return
                event.set()  # a flush marker
                continue
            if isinstance(event, list):  # a progress, perhaps merged: its latest value
                with task._mutex:
                    if task._progress_waiting is event:
                        task._progress_waiting = None
                    event = {"progress": event[0]}
            subs = (only,) if only is not None else self._global + task._subscribers
            for sub in subs:
                if not sub.active:
                    continue
                try:
                    sub.callback(task_uid=task.uid, **event)
                except BaseException:  # noqa: BLE001 - never let a callback stop the others
                    log.exception(
                        "qmagic: event callback %r raised; the task and other callbacks "
                        "are not affected.",
                        sub.callback,
                    )

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued, then stop the dispatcher thread."""
        with self._lock:
            self._closed = True
            thread = self._thread
        if thread is not None:
            self._queue.put((None, _STOP, None))
            thread.join(timeout)
