"""Where foreground tasks run, and how they are interrupted.

One thread owns the foreground (in a kernel: the main thread, where cells run; see
:mod:`qmagic.ipython.runner`).  A foreground task started on the owner thread runs inline;
one requested from any other thread is handed to the owner with :meth:`call_soon`.
:meth:`interrupt` raises ``KeyboardInterrupt`` in the owner thread's running code, as the
kernel's ■ button does.  :meth:`guard` protects the engine's own bookkeeping on the owner
thread: an interrupt that arrives outside the task's code is held back until the
bookkeeping is done, so no interrupt can lose or corrupt a task's record.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import queue
import signal
import sys
import threading
import time
from typing import Any, Callable, ContextManager, Iterator, Protocol

__all__ = [
    "ForegroundRunner", "ThreadForegroundRunner", "raise_in_thread", "in_lock_frame", "breaks_a_lock", "frame_of",
    "force_step", "LOCK_FRAMES", "interrupts_held", "interrupt_after",
]

log = logging.getLogger("qmagic")

# PyThreadState_SetAsyncExc keeps the GIL.  Never call it with NULL to "clear" a pending
# exception: on CPython 3.11 that leaves the interpreter's async-exception flag set for
# good, and cProfile (%prun) then hangs in every later call.
_set_async_exc = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.py_object)(
    ("PyThreadState_SetAsyncExc", ctypes.pythonapi))


def _codes(*pairs: tuple[object, str]) -> frozenset:
    return frozenset(getattr(owner, name).__code__ for owner, name in pairs
                     if hasattr(getattr(owner, name, None), "__code__"))


#: Frames that take a lock (they may wait for it): raising in one breaks the lock only once
#: the lock is taken (see :func:`breaks_a_lock`).
_TAKING = _codes((threading.Condition, "__enter__"), (threading.Condition, "_acquire_restore"),
                 (logging.Handler, "acquire"), (logging, "_acquireLock"))

#: Code of the frames in which an exception could leave a lock held or a waiter asleep for
#: good.  Python's ``threading.Condition`` takes and gives back its lock, and wakes its
#: waiters, in Python code around C calls (``with condition:`` in a task's bookkeeping,
#: behind every ``print`` and ``report_progress`` of a task, ``Event.set``, ``queue.Queue``,
#: ``Future.done``...); ``logging`` takes and gives back a handler's lock around every
#: record (a handler's lock left held freezes every later log call of every thread).
LOCK_FRAMES = _TAKING | _codes(
    (threading.Condition, "__exit__"), (threading.Condition, "_release_save"),
    (threading.Condition, "notify"), (threading.Condition, "notify_all"),
    (logging.Handler, "release"), (logging, "_releaseLock"))

#: The guard of a thread that needs none (shared: a ``nullcontext`` is reusable).
NO_GUARD: ContextManager[None] = contextlib.nullcontext()


#: ``Thread.is_alive()`` looks at the thread's lock in ``Thread._wait_for_tstate_lock``
#: (CPython up to 3.12).  An exception raised there while that thread is alive releases the
#: thread's lock and marks it dead for good (python/cpython#90882).  ipykernel asks whether
#: its IOPub thread is alive at every output; once it seems dead, every thread sends its
#: output itself, the messages interleave and the frontend rejects them ("Invalid
#: Signature").  Only the non-blocking look (``is_alive``) is guarded: an interrupt must
#: still stop a ``join()`` that waits for a thread.
_IS_ALIVE = getattr(threading.Thread.is_alive, "__code__", None)
_TSTATE_WAIT = getattr(getattr(threading.Thread, "_wait_for_tstate_lock", None), "__code__", None)


def breaks_a_lock(frame: Any, *, here: bool = False) -> bool:
    """True when an exception raised in ``frame`` now could leave a lock held, release
    another thread's lock, or lose a wake-up: a Condition or a logging handler taking,
    giving back or signalling its lock (:data:`LOCK_FRAMES`), or ``Thread.is_alive()``
    looking at a thread's lock.

    ``here``: ``frame`` runs on the calling thread (a signal handler's frame).  A frame that
    takes a lock then counts only once the lock is taken, so an interrupt still stops code
    that waits for a lock another thread holds.  (From another thread that cannot be told:
    every such frame counts.)
    """
    code = frame.f_code
    if code in LOCK_FRAMES:
        return not (here and code in _TAKING) or _taken_here(frame)
    if code is not _TSTATE_WAIT:
        return False
    caller = frame.f_back
    return caller is not None and caller.f_code is _IS_ALIVE


def _taken_here(frame: Any) -> bool:
    """Whether the lock that ``frame`` (one of :data:`_TAKING`) takes is held by this thread
    (a plain lock cannot tell who holds it: held at all)."""
    owner = frame.f_locals.get("self")
    if isinstance(owner, threading.Condition):
        lock = owner._lock
    elif isinstance(owner, logging.Handler):
        lock = owner.lock
    else:  # logging's module lock
        lock = getattr(logging, "_lock", None)
    if lock is None:
        return False
    owned = getattr(lock, "_is_owned", None)
    if owned is not None:
        return bool(owned())
    locked = getattr(lock, "locked", None)
    return bool(locked()) if locked is not None else True


def frame_of(ident: int) -> Any:
    """The frame thread ``ident`` runs now (None: no such thread), read with the garbage
    collector off.  ``sys._current_frames()`` makes frame objects while it holds the
    runtime's list of threads; on CPython 3.11 a collection that starts there and frees a
    ``threading.local`` (whose deallocation takes that lock again) stops every thread of the
    process for good (python/cpython#106883, not fixed in 3.11; seen once in the suite: the
    main thread waited forever for a thread that had started)."""
    enabled = gc.isenabled()
    if enabled:
        gc.disable()
    try:
        return sys._current_frames().get(ident)
    finally:
        if enabled:
            gc.enable()


def in_lock_frame(ident: int) -> bool:
    """True while thread ``ident`` runs code where an asynchronous exception raised now
    could break a lock (see :func:`breaks_a_lock`)."""
    frame = frame_of(ident)
    return frame is not None and breaks_a_lock(frame)


def force_step(ident: int, since: float | None, patience: float) -> tuple[str, float | None]:
    """What a forced cancel of thread ``ident`` does now, and since when its tries found
    the thread in a lock's code (``since``, None: not): "send"; "retry" while the thread
    takes, gives back or signals a lock (its own print, log call or report_progress, a
    queue...: raised there, the lock would stay held and freeze whoever waits for it; a
    moment later it is elsewhere); "blocked" once every try for ``patience`` seconds found
    it there: it waits for a lock and cannot be stopped safely."""
    if not in_lock_frame(ident):
        return "send", None
    now = time.monotonic()
    since = now if since is None else since
    return ("retry", since) if now - since < patience else ("blocked", None)


def raise_in_thread(ident: int, exc_type: type[BaseException]) -> bool:
    """Raise ``exc_type`` asynchronously in thread ``ident`` (at its next bytecode check).

    Call it only while holding the lock that guards "the thread runs user code" (a job's
    gate), so that it never lands in qmagic's own code: one still pending when the code has
    returned is raised — and dropped — when the runner leaves that window.
    """
    return _set_async_exc(ident, exc_type) == 1


class ForegroundRunner(Protocol):
    """The owner of the foreground (see the module docstring)."""

    def owns_current_thread(self) -> bool:
        """True when called on the thread that runs foreground tasks."""

    def unavailable(self) -> str | None:
        """None when :meth:`call_soon` can hand work over now; else the refusal message."""

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn()`` on the owner thread as soon as it is free."""

    def user_busy(self) -> bool:
        """True while a user's own code (a cell) occupies the owner thread."""

    def starting(self) -> bool:
        """True while the owner is not ready yet (a kernel running its start-up code)."""

    def interrupt(self) -> None:
        """Raise KeyboardInterrupt in the code the owner thread runs now."""

    def guard(self, in_user_code: Callable[[], bool],
              before_code: Callable[[], bool] | None = None) -> ContextManager[None]:
        """While active on the owner thread, interrupts raise only when ``in_user_code()``;
        others are held back and raised when the guard ends — except one that
        ``before_code()`` takes (returns True: the task's code has not started, and will
        not)."""

    def close(self) -> None:
        """Release the runner's resources."""


class ThreadForegroundRunner:
    """Foreground owner for a worker without a kernel: a thread of its own."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    def owns_current_thread(self) -> bool:
        thread = self._thread
        return thread is not None and threading.get_ident() == thread.ident

    def unavailable(self) -> str | None:
        if self._closed:
            return "Error: Failed to start the task: the qmagic worker was closed."
        return None

    def call_soon(self, fn: Callable[[], None]) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="qmagic-foreground", daemon=True)
                self._thread.start()
        self._queue.put(fn)

    def user_busy(self) -> bool:
        return False

    def starting(self) -> bool:
        return False

    def interrupt(self) -> None:
        thread = self._thread
        if thread is not None and thread.ident is not None:
            raise_in_thread(thread.ident, KeyboardInterrupt)

    def guard(self, in_user_code: Callable[[], bool],
              before_code: Callable[[], bool] | None = None) -> ContextManager[None]:
        # Interrupts reach this thread only through interrupt(), which the engine calls
        # while the task's code runs: nothing to hold back.
        return NO_GUARD

    def _loop(self) -> None:
        while True:
            fn = self._queue.get()
            if fn is None:
                return
            try:
                fn()
            except BaseException:  # noqa: BLE001 - the owner thread must survive anything
                log.exception("qmagic: error on the foreground thread")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            if thread is not threading.current_thread():
                thread.join(5.0)


@contextlib.contextmanager
def interrupts_held() -> Iterator[list[int]]:
    """Hold SIGINT (■) on the main thread: the yielded list gets one entry per SIGINT that
    came meanwhile, and the previous handler is back afterwards.  Elsewhere (or when the
    handler is not Python's) nothing is held."""
    held: list[int] = []
    previous = None
    if threading.current_thread() is threading.main_thread():
        try:
            previous = signal.getsignal(signal.SIGINT)
            if not callable(previous):  # (ignored, the default, or not Python's: as it is)
                previous = None
            else:
                signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
        except (ValueError, OSError):  # pragma: no cover - no signals here
            previous = None
    try:
        yield held
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def interrupt_after() -> Iterator[None]:
    """Hold ■ (SIGINT on the main thread) during the block and raise it (KeyboardInterrupt)
    once the block is done: a short change of state (files, sockets, a setting) is made
    whole or not at all, never cut half-way.  Also when the block fails: the ■ then ends the
    call, the block's error as its context (a loop that retries on that error stops)."""
    with interrupts_held() as held:
        try:
            yield
        finally:
            if held:
                raise KeyboardInterrupt  # noqa: B012 - the interrupt wins over the block's error
