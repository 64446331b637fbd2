"""■ stops a cell's code, never the kernel's handling of a request.

ipykernel installs Python's default SIGINT handler around every shell request it handles
(``pre_handler_hook``; ``post_handler_hook`` puts the idle kernel's SIG_IGN back).  A ■
that lands while the kernel reads a request or answers it — before a cell's code starts,
after it has ended, during a completion or a widget's message — raised KeyboardInterrupt in
ipykernel's own code: the request's reply was lost ("KeyboardInterrupt caught in kernel";
the cell showed ``[*]`` until another one ended: 26 of 80 ■ pressed within 10 ms of running
``x = 1``), and one landing while a reply was being sent cut that message in two (the
client then failed on "Invalid Signature").

While qmagic is loaded in a kernel, the handler around a request raises KeyboardInterrupt
only while a cell's code runs on the main thread (from its ``pre_run_cell`` event to its
``post_run_cell``, within IPython's run of the cell, which catches it: not in the triggering
of the cell's end events after that run, where it escaped and the reply was lost), and while
a widget message's handler runs on the main thread (a button's ``on_click``, a slider's
observer: the user's code, which ■ stops as in a kernel without qmagic; a press in
ipykernel's own code around that handler's call is ignored); elsewhere a ■ is ignored, as on
an idle kernel: nothing of the user's is running then (a cell that has ended has nothing
left to stop, and in a "run all" the next cell takes the next ■; a cell that unloads qmagic
keeps this handler to its end, its end event gone, and is no exception).  Handlers qmagic
installs within a cell (the foreground task guard, held interrupts) hand SIGINTs on to this
one as they did to the default.

A cell with a top-level ``await`` runs under ipykernel's own handler, which cancels the cell
at its ``await`` but did not wake the event loop to do it (■ took effect only when the await
ended by itself): it is wrapped for that cell to wake the loop.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from typing import Any

from .runner import REQUEST_HANDLERS, pass_on

__all__ = ["RequestInterrupts"]

log = logging.getLogger("qmagic")


def _wake_after_cancel_on_sigint() -> None:
    """A cell with a top-level ``await`` runs under ipykernel's own SIGINT handler, which
    schedules the cell's cancellation on the event loop without waking it: ■ during
    ``await asyncio.sleep(15)`` (or a motor's move) took effect only once that await ended
    by itself.  That handler is wrapped here, for this cell, so that the loop wakes at once
    to cancel the cell (the cell then ends with its CancelledError, as ipykernel means it to).
    ipykernel puts back its own handler's predecessor when the cell ends."""
    handler = signal.getsignal(signal.SIGINT)
    if not callable(handler) or "_cancel_on_sigint" not in getattr(handler, "__qualname__", ""):
        return
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # (no loop runs this cell: the handler's callback has none to wake)
        return

    def cancel_on_sigint(signum: int, frame: Any) -> None:
        handler(signum, frame)
        try:
            loop.call_soon_threadsafe(_nothing)  # (wakes the loop: the cancellation runs now)
        except RuntimeError:  # (closed: nothing to wake; never raise into the cell)
            pass

    signal.signal(signal.SIGINT, cancel_on_sigint)


def _nothing() -> None:
    """A callback that only wakes an event loop."""


#: Requests whose handling runs the user's code outside any cell (widgets' callbacks).
_COMM_REQUESTS = frozenset({"comm_open", "comm_msg", "comm_close"})


def _comm_handler(kernel: Any) -> Any:
    """The code of the handler of the request ``kernel`` is about to handle if that is a comm
    message (its handler runs the user's callbacks, a button's ``on_click``), else None."""
    try:
        msg_type = kernel.get_parent("shell")["header"]["msg_type"]
        return kernel.shell_handlers[msg_type].__func__.__code__ if msg_type in _COMM_REQUESTS else None
    except Exception:  # noqa: BLE001 - (no parent, another kernel's shape: none)
        return None


def _within(frame: Any, code: Any) -> bool:
    """Whether ``frame`` runs within a call of ``code`` (a KeyboardInterrupt raised there ends
    that call, which ipykernel catches; the kernel's own reading and answering of the request
    around it are outside)."""
    while frame is not None and code is not None:
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


def _cell_run() -> Any:
    """The code of IPython's ``InteractiveShell.run_cell_async``, a cell's run: IPython catches
    whatever it raises (a KeyboardInterrupt there is the cell's error, its reply sent), but not
    what is raised after it, as the cell's end events are triggered (the reply was lost)."""
    try:
        from IPython.core.interactiveshell import InteractiveShell
    except ImportError:  # pragma: no cover - IPython is what runs this
        return None
    return InteractiveShell.run_cell_async.__code__


def _kernel_hook() -> Any:
    """ipykernel's own ``Kernel.pre_handler_hook`` (None where it cannot be imported)."""
    try:
        from ipykernel.kernelbase import Kernel
    except ImportError:  # pragma: no cover - ipykernel is what runs this
        return None
    return Kernel.pre_handler_hook


class RequestInterrupts:
    """Installed on one ipykernel kernel (see the module docstring).  ``cell_started`` and
    ``cell_finished`` are the shell's ``pre_run_cell`` and ``post_run_cell`` events; only
    the main thread's cells count (a subshell's run on their own threads, ■ never reaches
    them, and their requests leave it alone).  The count of cells running is the main
    thread's own (no lock)."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self._cells = 0  # cells whose code runs on the main thread now (nested: %run)
        self._comm: Any = None  # the code of the comm message's handler running now, if any
        self._cell_run = _cell_run()
        self._replaced: Any = None  # the instance attribute it replaced, if any

    @classmethod
    def install(cls, shell: Any) -> RequestInterrupts | None:
        """Install on ``shell``'s kernel; None where there is no ipykernel kernel."""
        kernel = getattr(shell, "kernel", None)
        original = getattr(kernel, "pre_handler_hook", None)
        if kernel is None or not callable(original):
            return None
        self = cls(kernel)
        self._replaced = vars(kernel).get("pre_handler_hook")
        self._original = original
        REQUEST_HANDLERS.append(self._sigint)  # (the guard's storm absorber keeps a cell's ■ in it)
        kernel.pre_handler_hook = self._pre_handler_hook
        return self

    def uninstall(self) -> None:
        """Put the kernel's own hook back (the handler of a request under way stays until
        its end: ipykernel then restores the idle handler)."""
        if vars(self.kernel).get("pre_handler_hook") == self._pre_handler_hook:
            if self._replaced is None:
                del self.kernel.pre_handler_hook
            else:
                self.kernel.pre_handler_hook = self._replaced
        if self._sigint in REQUEST_HANDLERS:  # (a request under way keeps it until its end)
            REQUEST_HANDLERS.remove(self._sigint)

    # -- the kernel's hook and the shell's events ----------------------------------------------
    def _pre_handler_hook(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            # A subshell's request (a panel click while a cell runs): SIGINT never reaches its
            # thread, and the main thread's cell, if one runs, keeps its count and its ■.
            self._original()
            return
        self._cells = 0
        self._comm = _comm_handler(self.kernel)
        if getattr(self._original, "__func__", None) is _kernel_hook():
            # ipykernel's own hook saves the idle handler (for post_handler_hook to put back)
            # and installs the default one: done here in one call, installing this one (a ■
            # between the two would land in the kernel's code, the case this module is for)
            self.kernel.saved_sigint_handler = signal.signal(signal.SIGINT, self._sigint)
            return
        self._original()  # (another's hook: this one replaces the default handler it installs)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, self._sigint)

    def cell_started(self, *_: Any) -> None:
        if threading.current_thread() is threading.main_thread():
            self._cells += 1
            _wake_after_cancel_on_sigint()

    def cell_finished(self, *_: Any) -> None:
        if threading.current_thread() is threading.main_thread():
            self._cells = max(0, self._cells - 1)

    def _sigint(self, signum: int, frame: Any) -> None:
        in_cell = self._cells > 0 and (self._cell_run is None or _within(frame, self._cell_run))
        if in_cell or _within(frame, self._comm):
            # a cell's code runs, or a widget's callback: it stops, as with the default handler
            pass_on(signal.default_int_handler, signum, frame)
        else:
            log.debug("qmagic: an interrupt outside a cell's code was ignored (nothing to stop)")
