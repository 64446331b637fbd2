"""How the IPython kernel runs foreground tasks and routes background output.

- :class:`KernelForegroundRunner` is the engine's ``ForegroundRunner`` in an IPython
  shell: the main thread owns the foreground.  A foreground task started from a cell runs
  inline (the engine does that); one requested from another thread (the control channel, a
  panel, a Python thread) is scheduled on the kernel's asyncio loop and runs on the main
  thread when the kernel is idle, with SIGINT armed so that ■ / Ctrl-C and
  ``Worker.kernel_interrupt`` stop it.  ``user_busy()`` is driven by the
  ``pre_run_cell`` / ``post_run_cell`` events.
- :class:`CellOutputHook` is an engine ``ContextHook``: it pins the output of a background
  task to the cell that started it.

Without a kernel loop (a terminal IPython, an in-process shell), foreground requests from
other threads are refused with a clear message: there is no safe way to run code on the
main thread while it waits at the prompt.  Foreground tasks started in a cell still run.
"""

from __future__ import annotations

import _thread
import asyncio
import contextlib
import logging
import signal
import threading
from typing import Any, Callable, Iterator

from .errors import RequestRefused

__all__ = ["KernelForegroundRunner", "CellOutputHook", "MSG_NO_KERNEL_LOOP"]

log = logging.getLogger("qmagic")

MSG_NO_KERNEL_LOOP = (
    "Error: Failed to start the task: this IPython session has no kernel event loop, so a "
    "foreground task cannot be started from another thread (only from a cell). "
    "Start it in the background (run_in_background=True), or use a Jupyter kernel."
)


class KernelForegroundRunner:
    """Foreground owner for an IPython shell: the main thread.

    ``call_soon(fn)`` schedules ``fn`` on the kernel's asyncio loop (thread-safe).  While
    such a handed-over call runs, SIGINT raises ``KeyboardInterrupt`` (an idle kernel
    ignores SIGINT); the previous handler is restored afterwards.
    """

    def __init__(self, shell: Any) -> None:
        self.shell = shell
        self._owner = threading.main_thread().ident
        self._busy = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._remember_running_loop()

    # -- ForegroundRunner protocol ---------------------------------------------------------
    def owns_current_thread(self) -> bool:
        """True on the main thread (where cells run)."""
        return threading.get_ident() == self._owner

    def user_busy(self) -> bool:
        """True while a user's cell runs (between pre_run_cell and post_run_cell)."""
        return self._busy > 0

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn()`` on the main thread as soon as the kernel is free.

        Raises :class:`qmagic.RequestRefused` when there is no kernel loop to schedule on.
        """
        if self._closed:
            raise RequestRefused(
                "Error: Failed to start the task: the qmagic extension was unloaded."
            )
        loop = self._kernel_loop()
        if loop is None:
            raise RequestRefused(MSG_NO_KERNEL_LOOP)
        loop.call_soon_threadsafe(self._run_handed_over, fn)

    def close(self) -> None:
        """Stop accepting handed-over calls (already scheduled ones still run)."""
        self._closed = True

    # -- events ----------------------------------------------------------------------------
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

    # -- interrupts ------------------------------------------------------------------------
    def interrupt_main(self) -> None:
        """Deliver SIGINT to the main thread, as the ■ button does.

        Unlike ``_thread.interrupt_main`` a real signal also wakes a ``time.sleep`` in
        progress.  An idle kernel ignores it, exactly like ■.
        """
        handler = signal.getsignal(signal.SIGINT)
        if hasattr(signal, "pthread_kill") and handler not in (signal.SIG_DFL, None):
            signal.pthread_kill(self._owner, signal.SIGINT)
        else:
            _thread.interrupt_main()

    # -- internals -------------------------------------------------------------------------
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
        loop = getattr(io_loop, "asyncio_loop", None)
        if loop is None:
            loop = self._loop
        if loop is None or loop.is_closed():
            return None
        return loop

    def _run_handed_over(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the main thread with SIGINT armed; never let an interrupt escape."""
        on_main = threading.get_ident() == self._owner
        previous: Any = None
        try:
            try:
                if on_main:
                    current = signal.getsignal(signal.SIGINT)
                    if current is not None and current is not signal.default_int_handler:
                        previous = current
                        signal.signal(signal.SIGINT, signal.default_int_handler)
                fn()
            finally:
                if previous is not None:
                    signal.signal(signal.SIGINT, previous)
        except KeyboardInterrupt:
            # Landed after the task was recorded; the kernel's loop must not see it.
            log.debug("qmagic: interrupt after a handed-over foreground task ignored")
        except BaseException:  # noqa: BLE001 - the kernel's loop must survive anything
            log.exception("qmagic: error while running a foreground task on the main thread")


class CellOutputHook:
    """Engine ``ContextHook``: a background task's output goes to the cell that started it.

    ``capture`` (in the submitting thread) takes the shell's current parent message when it
    is an ``execute_request`` (a cell); ``apply`` (in the task's thread) pins the thread's
    output to it with ``shell.set_thread_parent`` (ipykernel >= 7.4), or by setting the
    same per-thread context variables on older ipykernel 7.x.  Output written at the
    file-descriptor level (C code, subprocesses) still goes to whatever cell runs now.
    """

    def __init__(self, shell: Any) -> None:
        self.shell = shell

    def capture(self, task: Any) -> Any:
        """The submitting cell's parent message, or None (nothing to pin)."""
        if not getattr(task, "background", False):
            return None
        get_parent = getattr(self.shell, "get_parent", None)
        if get_parent is None:
            return None
        try:
            parent = get_parent()
        except Exception:  # noqa: BLE001 - routing output is best effort
            return None
        if not isinstance(parent, dict):
            return None
        if (parent.get("header") or {}).get("msg_type") != "execute_request":
            return None
        return parent

    def apply(self, task: Any, token: Any) -> contextlib.AbstractContextManager:
        """Context manager active around the task's call in its own thread."""
        if token is None:
            return contextlib.nullcontext()
        return _thread_parent(self.shell, token)


@contextlib.contextmanager
def _thread_parent(shell: Any, parent: dict) -> Iterator[None]:
    setter = getattr(shell, "set_thread_parent", None)
    resetter = getattr(shell, "reset_thread_parent", None)
    if setter is not None and resetter is not None:
        tokens = setter(parent)
        try:
            yield
        finally:
            resetter(tokens)
        return
    resets = _set_context_parents(shell, parent)
    try:
        yield
    finally:
        for var, token in reversed(resets):
            var.reset(token)


def _set_context_parents(shell: Any, parent: dict) -> list[tuple[Any, Any]]:
    """Fallback for ipykernel 7.0-7.3: set the per-thread ``_parent_header`` variables.

    Those versions keep the parent of the shell, display hook, display publisher and
    output streams in ``contextvars.ContextVar`` objects (the global value is the
    fallback), which is exactly what ``set_thread_parent`` sets in 7.4.
    """
    import contextvars
    import sys

    try:
        from jupyter_client.session import extract_header
    except ImportError:  # pragma: no cover - jupyter_client is a kernel dependency
        return []
    resets: list[tuple[Any, Any]] = []
    objects: list[tuple[Any, Any]] = [(shell, parent)]
    header = extract_header(parent)
    for name in ("displayhook", "display_pub"):
        objects.append((getattr(shell, name, None), header))
    for stream in (sys.stdout, sys.stderr):
        stream = getattr(stream, "_qmagic_wrapped", stream)  # see qmagic.capture
        objects.append((stream, header))
    for obj, value in objects:
        var = getattr(obj, "_parent_header", None) if obj is not None else None
        if isinstance(var, contextvars.ContextVar):
            resets.append((var, var.set(value)))
    return resets
