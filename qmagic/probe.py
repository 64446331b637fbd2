"""Reading the namespace's objects with a deadline, for threads that must always answer.

Objects in the namespace run their own code when they are read: a property (``RE.state``),
a ``__getattr__``, a ``__repr__``.  Such code may block (an object that asks a device, a lock
held elsewhere).  The control channel's thread and the info socket's thread must answer in
milliseconds whatever the namespace holds, so they read through :func:`read`: the reading
runs on one helper thread, ``qmagic-probe``; past the deadline the caller goes on without
the value (:class:`ProbeTimeout`).  While one read is stuck, later reads give up at once:
a blocking object never piles up threads, and the next read after it returns works again.
The experiment log, the info socket and the panels read values through a :class:`Prober`
each (:meth:`Prober.text` for texts people read), so that a stuck read of one never makes
another give up.

No IPython, widgets or zmq here.
"""

from __future__ import annotations

import os
import queue
import re
import sys
import threading
from typing import Any, Callable, TypeVar

__all__ = ["NOT_READ", "PLAIN_TYPES", "ProbeTimeout", "Prober", "numpy_number", "read", "read_at_once"]

T = TypeVar("T")

#: Deadline of a read unless the caller gives one (seconds).
DEFAULT_TIMEOUT_S = 0.5

#: Exact types whose values run no code of their own when read (repr, JSON): no deadline needed.
PLAIN_TYPES = frozenset({str, int, float, bool, type(None)})
#: What a text made with :meth:`Prober.text` reads when the value's code did not finish in time.
NOT_READ = "<repr did not finish>"
#: Deadline of a text a display makes (a panel row, a message of the info socket; seconds).
TEXT_READ_S = 0.2
#: numpy dtype kinds whose arrays and scalars print without code of their own: bool,
#: signed and unsigned integers, floats, complex numbers
_NUMPY_KINDS = frozenset("biufc")
#: What :func:`read_at_once` accepts in all: items of containers and characters of texts.
AT_ONCE_BUDGET = 10_000
_AT_ONCE_INT_BITS = 4096  # (a larger int's decimal text takes long to make)
_EXCEPTION_READS = ("__str__", "__repr__", "__getattribute__", "args")


def read_at_once(values: Any) -> bool:
    """True when the repr and str of each of ``values`` run no code of their own and take
    microseconds, so that a thread that must always answer may make them itself: exact str,
    int, float, bool and None; lists, tuples and dicts of such values; exceptions whose class
    keeps BaseException's str, repr and args, with such args; numpy's own numbers and its
    plain arrays of numbers (a scan's positions, a reading: what tasks report and return
    most); :data:`AT_ONCE_BUDGET` items and characters in all.  Anything else goes through
    :func:`read` (a deadline): on a loaded machine a small list's repr waited there past its
    deadline, or was given up at once while the thread was busy with another read."""
    left = AT_ONCE_BUDGET
    todo = list(values)
    try:
        while todo:
            value = todo.pop()
            cls = type(value)
            if cls is str:
                left -= len(value) + 1
            elif cls is int:
                if value.bit_length() > _AT_ONCE_INT_BITS:
                    return False
                left -= 1
            elif cls in PLAIN_TYPES:
                left -= 1
            elif cls is list or cls is tuple:
                left -= len(value) + 1
                if left >= 0:
                    todo.extend(value)
            elif cls is dict:
                left -= 2 * len(value) + 1
                if left >= 0:
                    todo.extend(value.items())  # (key, value) tuples, checked as tuples
            elif (size := _numpy_size(value, cls)) is not None:
                left -= size + 1
            elif issubclass(cls, BaseException) and all(
                    getattr(cls, name) is getattr(BaseException, name) for name in _EXCEPTION_READS):
                left -= 1
                todo.append(value.args)
            else:
                return False
            if left < 0:
                return False
    except RuntimeError:  # (a dict that its task changed meanwhile)
        return False
    return True


def _numpy_size(value: Any, cls: type) -> int | None:
    """What a numpy number (1) or array (about 10 characters per item it prints) costs of
    :func:`read_at_once`'s budget, when numpy makes its text itself, without code of the
    user's: exact numpy types of :data:`_NUMPY_KINDS` (no object items, no subclass); an
    array only with numpy 2 or later and this thread's print options plain
    (:func:`_plain_print_edge`: numpy 1's options are global, and a notebook's
    ``threshold=sys.maxsize`` prints every item).  None for anything else.  numpy is not
    imported here: a value can be numpy's only if the task's code imported it."""
    np = sys.modules.get("numpy")
    if np is None:
        return None
    if cls is np.ndarray:
        edge = _plain_print_edge(np) if value.dtype.kind in _NUMPY_KINDS else None
        if edge is None:
            return None
        size = value.size  # (past 1000 items numpy prints 2 x edge items per axis)
        return 10 * (size if size <= 1000 else min(size, (2 * edge) ** value.ndim))  # (~10 chars an item)
    if cls.__module__ != "numpy":
        return None
    plain = _NUMPY_SCALARS.get(cls)
    if plain is None:  # (once per class: np.dtype() per value cost 0.3 µs)
        plain = _NUMPY_SCALARS[cls] = (
            issubclass(cls, (np.number, np.bool_)) and np.dtype(cls).type is cls
            and np.dtype(cls).kind in _NUMPY_KINDS)
    return 1 if plain else None


def numpy_number(value: Any) -> bool:
    """True for a number of numpy's own (``numpy.int64(3)``, not a subclass): its ``item()``
    is the Python number, made by numpy."""
    np = sys.modules.get("numpy")
    return np is not None and type(value) is not np.ndarray and _numpy_size(value, type(value)) == 1


#: numpy's scalar classes seen by :func:`_numpy_size`: whether numpy writes them itself
_NUMPY_SCALARS: dict[type, bool] = {}
_NUMPY_2: list[bool] = []  # (numpy 2 or later: learnt once)


def _plain_print_edge(np: Any) -> int | None:
    """``edgeitems`` of this thread's print options when they are plain (numpy 2 or later:
    options per thread; no code of the user's, a summary past 1000 items, short numbers);
    else None."""
    if not _NUMPY_2:
        major = re.match(r"\d+", str(getattr(np, "__version__", "")))
        _NUMPY_2.append(major is not None and int(major.group()) >= 2)
    if not _NUMPY_2[0]:
        return None
    options = np.get_printoptions()
    edge = options.get("edgeitems")
    plain = (options.get("formatter") is None and options.get("override_repr") is None
             and options.get("threshold", 10**9) <= 1000 and type(edge) is int and 0 <= edge <= 10
             and options.get("precision", 10**9) <= 20)
    return edge if plain else None


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
        #: how many times :meth:`text` gave its fallback (a display made with it is made again later)
        self.given_up = 0
        self._when_free: list[Callable[[], None]] = []
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
                    was_stuck, self._stuck = self._stuck, False
                    done.set()
                # (not held while waiting for the next read: the read's function and value
                # -- a task, a copy of its large result -- would live on until then)
                fn = box = done = None
            if was_stuck:
                for callback in list(self._when_free):
                    try:
                        callback()
                    except Exception:  # noqa: BLE001, S110 - a display's hook must not end the thread
                        pass

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

    def when_free(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` (on this prober's thread; it must be quick) each time a read
        that a caller gave up on has returned: displays made meanwhile with a fallback can be
        made again."""
        self._when_free.append(callback)

    def text(self, make: Callable[[], T], values: tuple, fallback: T = NOT_READ,  # type: ignore[assignment]
             timeout: float = TEXT_READ_S, keep: Callable[[T], None] | None = None) -> T:
        """``make()``, a text that reads ``values`` (their repr or str): made here when they
        run no code of their own (lone exact str, int, float, bool or None, whose text the
        caller cuts; or :func:`read_at_once`), else on this prober's thread within
        ``timeout``; ``fallback`` past it, or at once while an earlier read is stuck.  For
        threads that show values to people and must never be held up by one (a ``__repr__``
        that asks a device).  ``keep(text)``: called on this prober's thread with a text made
        there (in time or late), so that a display made again need not run the value's code
        again (a slow one would run at every remake)."""
        if all(type(v) in PLAIN_TYPES for v in values) or read_at_once(values):
            return make()
        job = make if keep is None else lambda: _kept(make(), keep)
        try:
            return self.read(job, timeout)
        except ProbeTimeout:
            self.given_up += 1
            return fallback


def _kept(text: T, keep: Callable[[T], None]) -> T:
    keep(text)
    return text


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

