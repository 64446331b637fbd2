"""Reading the namespace's objects with a deadline, for threads that must always answer.

Objects in the namespace run their own code when they are read: a property (``RE.state``),
a ``__getattr__``, a ``__repr__``.  Such code may block (an object that asks a device, a lock
held elsewhere).  The control channel's thread and the info socket's thread must answer in
milliseconds whatever the namespace holds, so they read through :func:`read`: the reading
runs on one helper thread, ``qmagic-probe``; past the deadline the caller goes on without
the value (:class:`ProbeTimeout`).  While one read is stuck, later reads give up at once:
a blocking object never piles up threads, and the next read after it returns works again.
The experiment log reads its values' reprs through a :class:`Prober` of its own, so that a
stuck read of either never makes the other give up.

No IPython, widgets or zmq here.
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Any, Callable

__all__ = ["PLAIN_TYPES", "ProbeTimeout", "Prober", "read"]

#: Deadline of a read unless the caller gives one (seconds).
DEFAULT_TIMEOUT_S = 0.5

#: Exact types whose values run no code of their own when read (repr, JSON): no deadline needed.
PLAIN_TYPES = frozenset({str, int, float, bool, type(None)})


class ProbeTimeout(Exception):
    """A read of the namespace did not finish in time (an object in it blocks); ``tried``
    is False when it was not even started (an earlier read is still stuck)."""

    def __init__(self, message: str, *, tried: bool = True) -> None:
        super().__init__(message)
        self.tried = tried


class Prober:
    """One helper thread (``name``) that runs reads with a deadline: see the module
    docstring.  Each prober has its own thread, so a read stuck in one never makes the
    other's give up: the doors read through :func:`read`, the experiment log its values'
    reprs through its own (:mod:`qmagic.worker_log`)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._reset()
        _PROBERS.append(self)

    def _reset(self) -> None:  # (also in a forked child: the thread does not exist there)
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stuck = False  # a caller gave up on the read now running: later ones give up at once

    def _serve(self) -> None:
        while True:
            fn, box, done = self._jobs.get()
            try:
                box.append((True, fn()))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                box.append((False, exc))
            finally:
                with self._lock:  # (with the caller's check below: never stuck while idle)
                    self._stuck = False
                    done.set()
                # (not held while waiting for the next read: the read's function and value
                # -- a task, a copy of its large result -- would live on until then)
                fn = box = done = None

    def read(self, fn: Callable[[], Any], timeout: float = DEFAULT_TIMEOUT_S) -> Any:
        """``fn()`` run on this prober's thread: its value, or its exception raised here.
        Raises :class:`ProbeTimeout` after ``timeout`` seconds (``fn`` goes on; its value is
        dropped), or at once, without running ``fn``, while an earlier read is still stuck."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():  # first use, or it died
                self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
                self._stuck = False
                self._thread.start()
            stuck = self._stuck
        if stuck:
            raise ProbeTimeout("an earlier read is still blocked", tried=False)
        box: list = []
        done = threading.Event()
        self._jobs.put((fn, box, done))
        if not done.wait(timeout):
            with self._lock:
                stuck = self._stuck = not done.is_set()
            if stuck:
                raise ProbeTimeout(f"it did not finish within {timeout:g} s")
        ok, value = box[0]
        if ok:
            return value
        raise value


_PROBERS: list[Prober] = []


def _after_fork_in_child() -> None:
    for prober in _PROBERS:
        prober._reset()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

#: The doors' prober (the control channel, the info socket).
_DOORS = Prober("qmagic-probe")


def read(fn: Callable[[], Any], timeout: float = DEFAULT_TIMEOUT_S) -> Any:
    """``fn()`` run on the ``qmagic-probe`` thread (see :meth:`Prober.read`)."""
    return _DOORS.read(fn, timeout)
