"""queueserver's asyncio client, called from synchronous test code.

``LoopClient(zmq_control_addr=...)`` is ``bluesky_queueserver_api.zmq.aio.REManagerAPI`` with
its coroutines run on a private event-loop thread, so a test reads ``rm.status()`` as with
the threads client (``bluesky_queueserver_api.zmq.REManagerAPI``), and every request still
goes through queueserver's own client code.

Why not the threads client everywhere: in bluesky-queueserver 0.0.25 its receive thread
(``ZMQCommSendThreads._receive_thread``) clears the "waiting for a reply" event and sets the
"reply received" event again *after* the blocking call's callback has woken the caller.  When
that thread loses the CPU in between (the test process also runs the worker's threads), the
caller's next request is woken by the late event with no reply: ``CommTimeoutError: No received
data was found``.  That is a client-side race (a reply dropped by the server reads "timeout
occurred"); it failed these tests about once per run with both cores busy.  The asyncio client
waits for its reply in one coroutine and has no such thread.  The threads client keeps the
tests where only it belongs (the README's recipe, single requests), with few requests.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from typing import Any

from bluesky_queueserver_api.zmq.aio import REManagerAPI as AsyncREManagerAPI

#: How long one call may take before the test fails (the client's own timeouts are shorter).
CALL_TIMEOUT = 120.0


class LoopClient:
    """A ``bluesky_queueserver_api.zmq.aio.REManagerAPI`` driven from plain threads."""

    def __init__(self, **kwargs: Any) -> None:
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="aio-client", daemon=True)
        thread.start()
        object.__setattr__(self, "_loop", loop)
        object.__setattr__(self, "_thread", thread)

        async def make() -> AsyncREManagerAPI:  # the client binds the running loop
            return AsyncREManagerAPI(**kwargs)

        object.__setattr__(self, "_api", self._run(make()))

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(CALL_TIMEOUT)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # (not the client's: e.g. ``_api`` before __init__ set it)
            raise AttributeError(name)
        attr = getattr(self._api, name)
        if inspect.iscoroutinefunction(attr):
            def call(*args: Any, **kwargs: Any) -> Any:
                return self._run(attr(*args, **kwargs))
            return call
        return attr

    def __setattr__(self, name: str, value: Any) -> None:  # RM.user_group = ..., RM.lock_key = ...
        setattr(self._api, name, value)

    def close(self) -> None:
        """Close the client, then its loop and thread (idempotent)."""
        if self._loop.is_closed():
            return
        async def shut() -> None:  # the client, then what it left waiting on the loop
            await self._api.close()
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in rest:
                task.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        try:
            self._run(shut())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(CALL_TIMEOUT)
            self._loop.close()
