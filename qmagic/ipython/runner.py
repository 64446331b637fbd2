"""The kernel's foreground runner: the main thread owns the foreground.

- A foreground task started from a cell runs inline on the main thread; one requested from
  another thread (the control channel, a panel, a Python thread) is scheduled on the
  kernel's event loop and runs on the main thread when the kernel is idle.
- ``interrupt()`` sends the main thread the same SIGINT as ■.
- ``guard()`` is the interrupt guard around every foreground task: while it is active a
  SIGINT raises KeyboardInterrupt only inside the task's own code; one that arrives during
  qmagic's bookkeeping is held back and raised when the guard ends (as one line, only if
  the task itself was not interrupted), so an interrupt can never break a task's record;
  one that lands where raising would break a lock — a ``threading.Condition`` or a
  ``logging`` handler that took, gives back or signals its lock, ``Thread.is_alive()``
  looking at a thread's lock (behind every ``print`` and log call of a task) — is
  delivered again a moment later, by one helper thread at a time, with a growing delay
  while it keeps landing there (:func:`qmagic.core.foreground.breaks_a_lock`).
  A storm is one interrupt: SIGINTs that follow the previous one within
  :data:`COALESCE_S` are dropped, inside the task and — in a cell — after it, until the
  storm is over, so that no late SIGINT lands in IPython's or ipykernel's own code (where
  it would lose the cell's reply or end the kernel).  (An idle kernel ignores SIGINT; the
  guard also arms SIGINT for a handed-over task, and restores the kernel's handler
  afterwards.)

Without a kernel loop (a terminal IPython) foreground requests from other threads are
refused with a clear message; foreground tasks started in a cell still run.
"""

from __future__ import annotations

import _thread
import asyncio
import contextlib
import functools
import logging
import signal
import threading
import time
import traceback
from typing import Any, Callable, ContextManager, Iterator

from ..core.foreground import NO_GUARD, breaks_a_lock, interrupts_held

__all__ = ["KernelForegroundRunner", "HeldInterrupt", "MSG_KERNEL_STARTING", "MSG_NO_KERNEL_LOOP", "COALESCE_S",
           "StopHold", "held_sigint", "pass_on", "interrupts_held", "REQUEST_HANDLERS", "is_request_handler"]

log = logging.getLogger("qmagic")

MSG_NO_KERNEL_LOOP = (
    "Error: Failed to start the task: this IPython session has no kernel event loop, so a "
    "foreground task cannot be started from another thread (only from a cell). Start it in "
    "the background (run_in_background=True), or use a Jupyter kernel."
)

MSG_KERNEL_STARTING = (
    "Error: Failed to start the task: the kernel is still starting (running its start-up code), "
    "so a foreground task cannot be handed to it yet. Ask again once it is ready, or start it in "
    "the background."
)

#: SIGINTs closer than this (seconds) to the previous one are one interrupt (a storm of ■
#: or of remote kernel_interrupt requests); a person pressing ■ again is slower than this.
COALESCE_S = 0.5


#: A SIGINT that lands where raising would break a lock is delivered again this many
#: seconds later; while it keeps landing there (code waiting for a lock it took), twice as
#: late each time, up to REDELIVER_MAX_S.
REDELIVER_S = 0.001
REDELIVER_MAX_S = 0.05

#: Code of the guard's SIGINT handler (see :func:`_interrupted_frame`).
_HANDLER_CODES: set[Any] = set()

#: SIGINT handlers a kernel has while it handles a request, besides Python's default one
#: (:class:`qmagic.ipython.request_interrupts.RequestInterrupts` adds its own).
REQUEST_HANDLERS: list[Callable[[int, Any], Any]] = []


def is_request_handler(handler: Any) -> bool:
    """True for the SIGINT handler a kernel has while it handles a request (a cell)."""
    return handler is signal.default_int_handler or handler in REQUEST_HANDLERS


class _RedeliveryWindow:
    """A guard's redelivery: whether the guard still takes a redelivered SIGINT (``open``,
    closed as it ends; checked and sent under ``lock``), whether a helper thread is on its
    way (``scheduled``: one at a time, however many SIGINTs arrive meanwhile), and its
    next delay."""

    __slots__ = ("lock", "open", "scheduled", "delay")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.open = True
        self.scheduled = False
        self.delay = REDELIVER_S


class HeldInterrupt(KeyboardInterrupt):
    """An interrupt that arrived while qmagic recorded a foreground task's end; raised
    once the record is complete (shown as one line)."""

    def _render_traceback_(self) -> list[str]:
        return [f"KeyboardInterrupt: {self}"]


class KernelForegroundRunner:
    """Foreground owner for an IPython shell: the main thread (see the module docstring)."""

    def __init__(self, shell: Any) -> None:
        self.shell = shell
        self._owner = threading.main_thread().ident
        self._busy = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._started = False  # (once the kernel's loop runs: see starting())
        self._remember_running_loop()

    # -- the ForegroundRunner protocol ------------------------------------------------------------
    def owns_current_thread(self) -> bool:
        """True on the main thread (where cells run)."""
        return threading.get_ident() == self._owner

    def user_busy(self) -> bool:
        """True while a user's cell runs (between pre_run_cell and post_run_cell)."""
        return self._busy > 0

    def unavailable(self) -> str | None:
        """Why a foreground task cannot be handed to the kernel now (None: it can)."""
        if self._closed:
            return "Error: Failed to start the task: the qmagic extension was unloaded."
        if self.starting():
            return MSG_KERNEL_STARTING
        if self._kernel_loop() is None:
            return MSG_NO_KERNEL_LOOP
        return None

    def starting(self) -> bool:
        """True while the kernel this shell belongs to runs its start-up code (extensions,
        startup files, ``exec_lines``): ipykernel's application has made the kernel but not
        yet started its event loop, so nothing can be handed to the main thread, and the
        namespace is still being made.  False for good once the loop is there, and for a
        shell without an ipykernel application's kernel (a terminal, an in-process kernel)."""
        if self._started:
            return False
        kernel = getattr(self.shell, "kernel", None)
        if kernel is None or getattr(kernel, "io_loop", None) is not None:
            self._started = True
            return False
        try:
            from ipykernel.kernelapp import IPKernelApp
        except ImportError:  # pragma: no cover - a shell with a kernel has ipykernel
            return False
        return IPKernelApp.initialized() and getattr(IPKernelApp.instance(), "kernel", None) is kernel

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

    def guard(self, in_user_code: Callable[[], bool],
              before_code: Callable[[], bool] | None = None) -> ContextManager[None]:
        """The interrupt guard (see the module docstring); main thread only (elsewhere a
        shared no-op: background tasks are submitted from many threads).  ``before_code``:
        takes an interrupt that comes before the task's code started (it then never
        starts, and is recorded as interrupted)."""
        if threading.get_ident() != self._owner:
            return NO_GUARD
        return self._guard(in_user_code, before_code)

    @contextlib.contextmanager
    def _guard(self, in_user_code: Callable[[], bool],
               before_code: Callable[[], bool] | None) -> Iterator[None]:
        raised = pending = redelivering = False
        last: list[float] = []  # time of the last SIGINT seen (shared with the storm absorber)
        window = _RedeliveryWindow()

        def handler(signum: int, frame: Any) -> None:
            nonlocal raised, pending, redelivering
            if redelivering:
                redelivering = False
                last[:] = [time.monotonic()]
            elif _in_storm(last):
                return  # the same interrupt as the previous SIGINT
            if in_user_code():
                origin = _interrupted_frame(frame)
                if origin is not None and breaks_a_lock(origin, here=True):
                    # Raising there would break a lock for good: deliver it again once that
                    # frame is left (or, should the task end first, when the guard ends).
                    redelivering = pending = True
                    if not window.scheduled:
                        window.scheduled = True
                        try:
                            _thread.start_new_thread(self._redeliver, (window,))
                        except RuntimeError:  # no thread to be had: raised as the guard ends
                            window.scheduled = False
                    return
                raised = True
                raise KeyboardInterrupt
            if before_code is not None and before_code():
                raised = True  # (the task ends interrupted before its code starts)
                return
            pending = True  # raised when the guard ends

        _HANDLER_CODES.add(handler.__code__)
        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            window.open = False
            with window.lock:  # (waits for a redelivery being sent now)
                pass
            if last and is_request_handler(previous) and self._kernel_loop() is not None:
                # In a kernel's cell: the rest of a storm must not land in the kernel's own
                # code.  (The kernel restores its own handler when the request ends.)
                signal.signal(signal.SIGINT, _storm_absorber(last, previous))
            else:
                signal.signal(signal.SIGINT, previous)
        if pending and not raised:
            raise HeldInterrupt(
                "the interrupt came as the foreground task was ending; its record is complete "
                "(see %task_result)."
            ) from None

    def _redeliver(self, window: _RedeliveryWindow) -> None:
        """Helper thread: the deferred SIGINT, a moment later (see :meth:`guard`), only
        while that guard is still active: checked and sent under the window's lock, so a
        late redelivery never reaches the next task or cell."""
        delay = window.delay
        window.delay = min(2 * delay, REDELIVER_MAX_S)
        time.sleep(delay)
        with window.lock:
            window.scheduled = False
            if window.open:
                self.interrupt()

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


class StopHold:
    """The SIGINT handler (:func:`held_sigint`) while a magic makes the one line that ends it
    after ■ (:func:`qmagic.ipython.magics.common.interrupts_in_one_line`): another ■ then,
    or within :data:`COALESCE_S` of the last one, is the same stop (the magic ends with a
    KeyboardInterrupt all the same), never one raised in qmagic's frames or, right after,
    in IPython's.  ``active`` is set before it is installed, and the install is the first
    call the magic's handling makes: CPython takes a signal only at a call, a function's
    start or a jump back, so none comes between the first ■ and the hold.  It stays
    installed afterwards, and puts the handler it replaced back at the next SIGINT after the
    storm (which that handler then takes) or at the next magic, whichever comes first
    (ipykernel also puts its own back when the cell ends): putting it back before the
    ``raise`` would let a ■ taken right after it land in qmagic's frame."""

    active = False  # a magic is making its line
    last = 0.0  # when the last SIGINT (or stop) was
    _NONE: Any = object()
    previous: Any = _NONE  # the handler it replaced (None: not Python's; _NONE: none)

    @classmethod
    def release(cls) -> None:
        """Put the replaced handler back (main thread, not while a magic makes its line)."""
        previous = cls.previous
        if cls.active or previous is cls._NONE or signal.getsignal(signal.SIGINT) is not held_sigint:
            return
        try:
            signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
        except ValueError:  # (not the main thread)
            return
        cls.previous = cls._NONE


def held_sigint(signum: int, frame: Any) -> None:
    """SIGINT handler of :class:`StopHold`: the same stop while a magic makes its line or
    within :data:`COALESCE_S` of the last SIGINT; else the replaced handler is put back and
    takes it, as it would have."""
    now = time.monotonic()
    if StopHold.active or now - StopHold.last < COALESCE_S:
        StopHold.last = now
        return
    previous = StopHold.previous
    StopHold.release()
    if callable(previous):
        pass_on(previous, signum, frame)
    elif previous is None or previous is StopHold._NONE:  # (a handler not Python's: as Python's own)
        raise KeyboardInterrupt
    else:  # SIG_IGN, SIG_DFL: as they would have
        signal.raise_signal(signum)


def _interrupted_frame(frame: Any) -> Any:
    """The frame a SIGINT interrupted.  Usually ``frame``; but in a storm a handler can run
    nested inside the guard's own handler (at any call it makes), and what it raises then
    surfaces in the frame the outer handler interrupted."""
    origin = frame
    probe = frame
    for _ in range(16):
        if probe is None:
            break
        if probe.f_code in _HANDLER_CODES:
            origin = probe.f_back
        probe = probe.f_back
    return origin if origin is not None else frame


def _in_storm(last: list[float]) -> bool:
    """Note a SIGINT now; True when it follows the previous one within COALESCE_S."""
    now = time.monotonic()
    storm = bool(last) and now - last[0] < COALESCE_S
    last[:] = [now]
    return storm


def _storm_absorber(last: list[float], previous: Any) -> Callable[[int, Any], None]:
    """SIGINT handler for the rest of a cell after an interrupted foreground task: drops
    the SIGINTs of the same storm, then hands the next interrupt to ``previous`` (and
    re-installs it).  The kernel restores its own handler when the request ends anyway."""

    def absorb(signum: int, frame: Any) -> None:
        if _in_storm(last):
            return
        signal.signal(signal.SIGINT, previous)
        pass_on(previous, signum, frame)

    return absorb


def pass_on(handler: Callable[[int, Any], Any], signum: int, frame: Any) -> None:
    """``handler``, the one a qmagic handler replaced, takes the SIGINT: the KeyboardInterrupt
    it raises stops the user's code, shown with the user's frames only (it passed through
    qmagic's handler, whose frames IPython would show after the user's line)."""
    try:
        handler(signum, frame)
    except KeyboardInterrupt as exc:
        if not hasattr(exc, "_render_traceback_"):
            try:
                exc._render_traceback_ = functools.partial(_users_frames, exc)  # type: ignore[attr-defined]
            except (AttributeError, TypeError):  # (no __dict__: shown as it is)
                pass
        raise


def _users_frames(exc: BaseException) -> list[str]:
    """The traceback of ``exc`` as IPython shows it, without qmagic's frames."""
    from IPython import get_ipython

    from ..tracebacks import user_traceback

    formatter = getattr(get_ipython(), "InteractiveTB", None)
    tb = user_traceback(exc)
    if formatter is None:
        return traceback.format_exception(type(exc), exc, tb)
    return formatter.structured_traceback(type(exc), exc, tb)
