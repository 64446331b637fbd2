"""What the coroutine-task tests share: bluesky's event loop for one test, waiting for task
events, and small async functions.

``run_engine`` creates a real ``bluesky.RunEngine`` (which starts bluesky's event loop in a
thread of its own, ``get_bluesky_event_loop()``) and, after the test, cancels what is left
on that loop, stops it, joins its thread and unsets it, so that the next test starts
without a bluesky loop (coroutine tasks then run on qmagic's own loop).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import pytest

from qmagic.core.loops import bluesky_loop

__all__ = ["TIMEOUT", "EventLog", "in_loop", "no_bluesky_loop", "run_engine", "stop_bluesky_loop"]

#: Upper bound of every wait (they normally take milliseconds).
TIMEOUT = 10.0


class EventLog:
    """A ``worker.subscribe`` callback that keeps the events and wakes waiters."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self._cond = threading.Condition()

    def __call__(self, **event: Any) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def of(self, uid: str) -> list[dict]:
        """The events of one task, without the task uid."""
        with self._cond:
            return [{k: v for k, v in e.items() if k != "task_uid"}
                    for e in self.events if e["task_uid"] == uid]

    def wait_for(self, predicate: Callable[[list[dict]], bool], timeout: float = TIMEOUT) -> list[dict]:
        """Wait until ``predicate(events)`` holds; returns the events."""
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self.events), timeout):
                raise AssertionError(f"events never matched; got {self.events}")
            return list(self.events)

    def wait_final(self, uid: str, timeout: float = TIMEOUT) -> list[dict]:
        """Wait for a task's final status event; returns its events."""
        final = {"completed", "failed", "cancelled"}
        self.wait_for(lambda evs: any(e["task_uid"] == uid and e.get("status") in final for e in evs),
                      timeout)
        return self.of(uid)


def in_loop(loop: asyncio.AbstractEventLoop, coro: Any, timeout: float = TIMEOUT) -> Any:
    """Run ``coro`` on ``loop`` (another thread's) and return its result."""
    return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)


async def _cancel_the_rest() -> None:
    me = asyncio.current_task()
    rest = [t for t in asyncio.all_tasks() if t is not me]
    for t in rest:
        t.cancel()
    await asyncio.gather(*rest, return_exceptions=True)


def stop_bluesky_loop() -> None:
    """Stop bluesky's event loop (its tasks cancelled), join its thread, unset it."""
    from bluesky import run_engine as bre

    loop = bre.get_bluesky_event_loop()
    if loop is None:
        return
    if loop.is_running():
        in_loop(loop, _cancel_the_rest())
        thread = bre._ensure_event_loop_running.loop_to_thread.get(loop)
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(TIMEOUT)
            assert not thread.is_alive(), "bluesky's event loop did not stop"
    bre.set_bluesky_event_loop(None)
    if not loop.is_closed():
        loop.close()


@pytest.fixture
def no_bluesky_loop():
    """The test starts (and must end) without a running bluesky event loop."""
    assert bluesky_loop() is None, "a bluesky event loop leaked from another test"
    yield
    assert bluesky_loop() is None, "the test left a bluesky event loop running"


@pytest.fixture
def run_engine():
    """A real RunEngine (bluesky's loop runs in its thread); stopped after the test."""
    import bluesky  # noqa: F401 - a test dependency
    from bluesky import RunEngine

    assert bluesky_loop() is None, "a bluesky event loop leaked from another test"
    RE = RunEngine({}, call_returns_result=True, context_managers=[])
    try:
        assert bluesky_loop() is not None
        yield RE
    finally:
        stop_bluesky_loop()
