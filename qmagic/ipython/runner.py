"""The kernel's foreground runner: the main thread owns the foreground.

- A foreground task started from a cell runs inline on the main thread; one requested from
  another thread (the control channel, a panel, a Python thread) is scheduled on the
  kernel's event loop and runs on the main thread when the kernel is idle.
- ``interrupt()`` sends the main thread the same SIGINT as ■.
- ``guard()`` is the interrupt guard around every foreground task: while it is active a
  SIGINT raises KeyboardInterrupt only inside the task's own code; one that arrives during
  qmagic's bookkeeping is held back and raised when the guard ends, so an interrupt —
  even a storm of them — can never break a task's record or escape into the kernel's own
  loop.  (An idle kernel ignores SIGINT; the guard also arms SIGINT for a handed-over
  task, and restores the kernel's handler afterwards.)

Without a kernel loop (a terminal IPython) foreground requests from other threads are
refused with a clear message; foreground tasks started in a cell still run.
"""

from __future__ import annotations

import _thread
import asyncio
import contextlib
import logging
import signal
import threading
from typing import Any, Callable, Iterator

__all__ = ["KernelForegroundRunner", "MSG_NO_KERNEL_LOOP"]

log = logging.getLogger("qmagic")

MSG_NO_KERNEL_LOOP = (
    "Error: Failed to start the task: this IPython session has no kernel event loop, so a "
    "foreground task cannot be started from another thread (only from a cell). Start it in "
    "the background (run_in_background=True), or use a Jupyter kernel."
)


class KernelForegroundRunner:
    """Foreground owner for an IPython shell: the main thread (see the module docstring)."""

    def __init__(self, shell: Any) -> None:
        self.shell = shell
        self._owner = threading.main_thread().ident
        self._busy = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._remember_running_loop()

    # -- the ForegroundRunner protocol ------------------------------------------------------------
    def owns_current_thread(self) -> bool:
        """True on the main thread (where cells run)."""
        return threading.get_ident() == self._owner

    def user_busy(self) -> bool:
        """True while a user's cell runs (between pre_run_cell and post_run_cell)."""
        return self._busy > 0

    def unavailable(self) -> str | None:
        if self._closed:
            return "Error: Failed to start the task: the qmagic extension was unloaded."
        if self._kernel_loop() is None:
            return MSG_NO_KERNEL_LOOP
        return None

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn()`` on the main thread as soon as the kernel is free."""
        loop = self._kernel_loop()
        if loop is None or self._closed:
            from ..errors import RequestRefused

            raise RequestRefused(self.unavailable() or MSG_NO_KERNEL_LOOP)
        loop.call_soon_threadsafe(self._run_handed_over, fn)

    def interrupt(self) -> None:
        """Deliver SIGINT to the main thread, as ■ does (it also wakes a ``time.sleep``)."""
        if hasattr(signal, "pthread_kill"):
            signal.pthread_kill(self._owner, signal.SIGINT)
        else:  # pragma: no cover - not POSIX
            _thread.interrupt_main()

    @contextlib.contextmanager
    def guard(self, in_user_code: Callable[[], bool]) -> Iterator[None]:
        """The interrupt guard (see the module docstring); main thread only."""
        if threading.get_ident() != self._owner:
            yield
            return
        pending = [False]

        def handler(signum: int, frame: Any) -> None:
            if in_user_code():
                raise KeyboardInterrupt
            pending[0] = True  # raised when the guard ends

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)
        if pending[0]:
            raise KeyboardInterrupt

    def close(self) -> None:
        """Stop accepting handed-over calls (already scheduled ones still run)."""
        self._closed = True

    # -- cell events ---------------------------------------------------------------------------
    def cell_started(self, *_: Any) -> None:
        """``pre_run_cell`` handler."""
        with self._lock:
            self._busy += 1
        if self._loop is None:
            self._remember_running_loop()

    def cell_finished(self, *_: Any) -> None:
        """``post_run_cell`` handler."""
        with self._lock:
            self._busy = max(0, self._busy - 1)

    # -- internals ---------------------------------------------------------------------------------
    def _remember_running_loop(self) -> None:
        if threading.get_ident() != self._owner:
            return
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            pass

    def _kernel_loop(self) -> asyncio.AbstractEventLoop | None:
        kernel = getattr(self.shell, "kernel", None)
        io_loop = getattr(kernel, "io_loop", None)
        loop = getattr(io_loop, "asyncio_loop", None) or self._loop
        if loop is None or loop.is_closed():
            return None
        return loop

    def _run_handed_over(self, fn: Callable[[], None]) -> None:
        """Run a handed-over task on the main thread; nothing may escape into the kernel loop."""
        try:
            fn()
        except KeyboardInterrupt:
            log.debug("qmagic: an interrupt after a handed-over foreground task was dropped")
        except BaseException:  # noqa: BLE001 - the kernel's loop must survive anything
            log.exception("qmagic: error while running a foreground task on the main thread")
