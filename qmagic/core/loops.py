"""The event loop that coroutine tasks run on.

ophyd-async devices live on bluesky's event loop (``bluesky.run_engine``'s
``get_bluesky_event_loop()``, which a ``RunEngine`` starts in a thread of its own); awaiting
their signals on any other loop fails.  So by default (``"auto"``) a coroutine task runs on
bluesky's loop when bluesky is imported and that loop is running, and otherwise on an event
loop that qmagic runs in a thread of its own (started on first use).  ``"bluesky"`` insists
on bluesky's loop (a task started without it fails with a clear message); ``"qmagic"``
always uses qmagic's own loop.  bluesky is never imported here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
from typing import Any

__all__ = ["EventLoops", "LOOP_POLICIES", "bluesky_loop"]

log = logging.getLogger("qmagic")

#: Values of ``QMagic.async_loop``.
LOOP_POLICIES = ("auto", "bluesky", "qmagic")

MSG_NO_BLUESKY_LOOP = (
    "Coroutine tasks are set to run on bluesky's event loop (QMagic.async_loop = 'bluesky'), "
    "but it is not running: create the RunEngine first (RE = RunEngine()), or set "
    "QMagic.async_loop = 'auto'."
)


def bluesky_loop() -> asyncio.AbstractEventLoop | None:
    """bluesky's running event loop, or None (bluesky not imported, or its loop not running)."""
    run_engine = sys.modules.get("bluesky.run_engine")
    getter = getattr(run_engine, "get_bluesky_event_loop", None)
    if getter is None:
        return None
    try:
        loop = getter()
    except Exception:  # noqa: BLE001 - a broken bluesky must not break qmagic
        return None
    if loop is None or loop.is_closed() or not loop.is_running():
        return None
    return loop


class EventLoops:
    """Picks the loop for each coroutine task and owns qmagic's own loop thread."""

    def __init__(self, policy: str = "auto") -> None:
        self.policy = policy
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closing: threading.Event | None = None  # set by close(): the loop may end

    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop a coroutine task starting now runs on (see the module docstring).

        Raises RuntimeError (with what to do) when the policy requires bluesky's loop and it
        is not running.
        """
        if self.policy != "qmagic":
            loop = bluesky_loop()
            if loop is not None:
                return loop
            if self.policy == "bluesky":
                raise RuntimeError(MSG_NO_BLUESKY_LOOP)
        return self.own_loop()

    def own_loop(self) -> asyncio.AbstractEventLoop:
        """qmagic's own event loop, running in a daemon thread (started on first use)."""
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                ready, closing = threading.Event(), threading.Event()
                thread = threading.Thread(
                    target=self._run, args=(loop, ready, closing), name="qmagic-asyncio", daemon=True
                )
                thread.start()
                ready.wait(10.0)
                self._loop, self._thread, self._closing = loop, thread, closing
            return self._loop

    @staticmethod
    def _run(loop: asyncio.AbstractEventLoop, ready: threading.Event, closing: threading.Event) -> None:
        """The loop thread: runs the loop until :meth:`close`.  Code on the loop that stops
        it (``loop.stop()``), or an asyncio task that raises SystemExit or KeyboardInterrupt
        (asyncio lets those out of the loop), would end every coroutine task for good: the
        loop runs on, with a warning."""
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        let_out: list[BaseException] = []  # (while closing: see _wind_up)
        try:
            while True:
                try:
                    loop.run_forever()
                except (SystemExit, KeyboardInterrupt) as exc:
                    if closing.is_set():  # (its stop may have been taken: it ends now)
                        let_out.append(exc)
                        break
                    log.warning("qmagic: %r raised on qmagic's event loop (in an asyncio task a "
                                "coroutine task started?) was dropped; the loop and its coroutine "
                                "tasks run on.", exc)
                    continue
                if closing.is_set():
                    break
                log.warning("qmagic: qmagic's event loop was stopped by code running on it "
                            "(loop.stop()); it runs on, as its coroutine tasks need it.")
        finally:
            try:
                EventLoops._wind_up(loop, let_out)
            finally:
                loop.close()

    @staticmethod
    def _wind_up(loop: asyncio.AbstractEventLoop, let_out: list[BaseException]) -> None:
        """The loop thread, closing: cancel the asyncio tasks left on the loop and run it
        until they have ended (and those they start meanwhile), then its async generators'
        cleanup.  Their code may stop the loop again, or an asyncio task raise SystemExit or
        KeyboardInterrupt out of it: that cut this short ("Event loop stopped before Future
        completed" from the thread, tasks destroyed pending); it goes on, saying nothing (the
        loop is ending; ``let_out``: what tasks let out, which asyncio would report again as
        "never retrieved").  Code that never ends keeps this daemon thread, as it would a task."""
        default = loop.get_exception_handler()

        def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            if any(context.get("exception") is exc for exc in let_out):
                return
            if default is not None:
                default(loop, context)
            else:
                loop.default_exception_handler(context)

        loop.set_exception_handler(handler)
        for _ in range(_WIND_UP_ROUNDS):  # (a task that starts a new one as it ends: not forever)
            pending = asyncio.all_tasks(loop)
            if not pending or loop.is_closed():
                break
            for task in pending:
                task.cancel()
            _run_to_end(loop, asyncio.gather(*pending, return_exceptions=True), let_out)
        else:
            left = len(asyncio.all_tasks(loop))
            if left:
                log.warning("qmagic: %d asyncio task(s) kept starting new ones while qmagic's event "
                            "loop closed; they are left behind, not run.", left)
        if not loop.is_closed():
            _run_to_end(loop, loop.shutdown_asyncgens(), let_out)

    def close(self, timeout: float = 5.0) -> None:
        """Stop qmagic's own loop (its remaining asyncio tasks are cancelled) and its thread."""
        with self._lock:
            loop, thread, closing = self._loop, self._thread, self._closing
            self._loop = self._thread = self._closing = None
        if closing is not None:
            closing.set()
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # (closed meanwhile by its own thread)
                loop.call_soon_threadsafe(loop.stop)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)


#: Rounds of cancelling what is left on a closing loop (each round's tasks may start others).
_WIND_UP_ROUNDS = 3


def _run_to_end(loop: asyncio.AbstractEventLoop, awaitable: Any, let_out: list[BaseException]) -> None:
    """Run ``loop`` until ``awaitable`` is done, whatever stops the loop meanwhile (see
    :meth:`EventLoops._wind_up`); ``let_out`` gets what asyncio tasks let out of it."""
    future = asyncio.ensure_future(awaitable, loop=loop)
    while not future.done():
        try:
            loop.run_until_complete(future)
        except (RuntimeError, SystemExit, KeyboardInterrupt) as exc:  # (stopped, or let out of a task)
            if loop.is_closed():  # (by another thread: nothing runs there again)
                return
            if not isinstance(exc, RuntimeError):
                let_out.append(exc)
            log.debug("qmagic: %r while qmagic's event loop was closing; it goes on.", exc)
    if not future.cancelled():
        future.exception()  # (read: never "exception was never retrieved")
