"""Reading the namespace's objects with a deadline, for threads that must always answer.

Objects in the namespace run their own code when they are read: a property (``RE.state``),
a ``__getattr__``, a ``__repr__``.  Such code may block (an object that asks a device, a lock
held elsewhere).  The control channel's thread and the info socket's thread must answer in
milliseconds whatever the namespace holds, so they read through :func:`read`: the reading
runs on one helper thread, ``qmagic-probe``; past the deadline the caller goes on without
the value (:class:`ProbeTimeout`).  While one read is stuck, later reads give up at once:
a blocking object never piles up threads, and the next read after it returns works again.

No IPython, widgets or zmq here.
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Any, Callable

__all__ = ["ProbeTimeout", "read"]

#: Deadline of a read unless the caller gives one (seconds).
DEFAULT_TIMEOUT_S = 0.5

_lock = threading.Lock()
_jobs: queue.SimpleQueue = queue.SimpleQueue()
_thread: threading.Thread | None = None
_stuck = False  # a caller gave up on the read now running: later reads give up at once


class ProbeTimeout(Exception):
    """A read of the namespace did not finish in time (an object in it blocks)."""


def _after_fork_in_child() -> None:  # the probe thread does not exist in a child
    global _lock, _jobs, _thread, _stuck
    _lock, _jobs, _thread, _stuck = threading.Lock(), queue.SimpleQueue(), None, False


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _serve() -> None:
    global _stuck
    while True:
        fn, box, done = _jobs.get()
        try:
            box.append((True, fn()))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box.append((False, exc))
        finally:
            with _lock:  # (with the caller's check below: never stuck while idle)
                _stuck = False
                done.set()


def read(fn: Callable[[], Any], timeout: float = DEFAULT_TIMEOUT_S) -> Any:
    """``fn()`` run on the probe thread: its value, or its exception raised here.  Raises
    :class:`ProbeTimeout` after ``timeout`` seconds (``fn`` goes on; its value is dropped),
    or at once, without running ``fn``, while an earlier read is still stuck."""
    global _thread, _stuck
    with _lock:
        if _thread is None or not _thread.is_alive():  # first use, after a fork, or it died
            _thread, _stuck = threading.Thread(target=_serve, name="qmagic-probe", daemon=True), False
            _thread.start()
        stuck = _stuck
    if stuck:
        raise ProbeTimeout("an earlier read is still blocked")
    box: list = []
    done = threading.Event()
    _jobs.put((fn, box, done))
    if not done.wait(timeout):
        with _lock:
            stuck = _stuck = not done.is_set()
        if stuck:
            raise ProbeTimeout(f"it did not finish within {timeout:g} s")
    ok, value = box[0]
    if ok:
        return value
    raise value
