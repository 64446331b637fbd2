"""Noticing that a state file changed, without a system call on the reader's side.

:class:`ChangeSignal` is a generation counter: a reader remembers the value it read a file
at and later compares it with the current value (two attribute loads; no system call, so
the GIL is kept).  :class:`DirectoryWatcher` is the thread that advances it: it waits on a
Linux inotify descriptor (through ctypes) for events about some names in one folder, and
wakes every ``recheck_s`` seconds to call a safety-net function (the owner ``stat``-s its
file there: network filesystems deliver no events for changes made on other machines).

Where inotify is missing (not Linux, ``fs.inotify.max_user_instances`` exhausted, the folder
deleted) the signal is not *live*: :meth:`ChangeSignal.token` returns ``-1`` and readers
must look at the file themselves on every read.  A watch lost at run time (folder deleted or
renamed) is retried at every safety-net tick.  After ``fork()`` the child has no watcher
thread: every signal of the parent is marked not live in the child.

Nothing here imports IPython, ipykernel, ipywidgets or zmq.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import select
import struct
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from contextlib import suppress

__all__ = ["ChangeSignal", "DirectoryWatcher", "inotify_available"]

log = logging.getLogger(__name__)

IN_MODIFY = 0x2
IN_ATTRIB = 0x4
IN_CLOSE_WRITE = 0x8
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_UNMOUNT = 0x2000
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x01000000
#: Events about a name in the folder.  IN_MODIFY is left out on purpose: the experiment log
#: writes to its SQLite files in the same folder on every task, and waking for each write
#: would cost the task threads the GIL.  An in-place write by another program ends with
#: IN_CLOSE_WRITE; a bare truncate(2) by path is seen by the safety net.
NAME_EVENTS = IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
_LOST = IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT | IN_IGNORED
_EVENT = struct.Struct("iIII")
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)

_libc_cache: list = []


def _libc():
    """libc with the inotify functions, or None (not Linux / not found)."""
    if not _libc_cache:
        lib = None
        if sys.platform.startswith("linux"):
            try:
                lib = ctypes.CDLL(None, use_errno=True)  # the process's own symbols: libc
                if not hasattr(lib, "inotify_init1"):
                    lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
                lib.inotify_init1.argtypes = [ctypes.c_int]
                lib.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
                lib.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
            except (OSError, AttributeError):
                lib = None
        _libc_cache.append(lib)
    return _libc_cache[0]


def inotify_available() -> bool:
    """True when this platform offers inotify (it may still fail for lack of instances)."""
    return _libc() is not None


class ChangeSignal:
    """A generation counter that readers compare without a system call.

    ``gen`` advances on every change (``bump``); ``live`` is True while a watcher guarantees
    that a change of the watched file advances it.
    """

    __slots__ = ("gen", "live", "_lock", "__weakref__")

    def __init__(self) -> None:
        self.gen = 0
        self.live = False
        self._lock = threading.Lock()

    def bump(self, live: bool | None = None) -> None:
        """Advance the counter (and set ``live`` first, when given)."""
        with self._lock:
            if live is not None:
                self.live = live
            self.gen += 1

    def token(self) -> int:
        """The value to remember with a read: the current ``gen``, or -1 when not live
        (a reader that remembers -1 never matches ``gen`` and looks again next time)."""
        gen = self.gen  # read before ``live``: a watcher that stops sets live, then bumps
        return gen if self.live else -1


_all_watchers: weakref.WeakSet[DirectoryWatcher] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for watcher in list(_all_watchers):
        watcher._forget_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class DirectoryWatcher:
    """A daemon thread that bumps ``signal`` when one of ``names`` in ``folder`` changes.

    ``tick`` is called every ``recheck_s`` seconds from the thread (the owner's safety net:
    it may bump the signal itself).  :meth:`start` returns False when inotify cannot be used
    (the signal then stays not live).  :meth:`stop` ends the thread and closes its two
    descriptors (the inotify instance and an eventfd to wake it).  The thread holds no
    reference to the owner of the signal.
    """

    def __init__(self, folder: str | os.PathLike[str], names: Iterable[str], signal: ChangeSignal,
                 *, recheck_s: float = 0.5, tick: Callable[[], None] | None = None) -> None:
        self.folder = os.fsencode(folder)
        self.names = frozenset(os.fsencode(n) for n in names)
        self.signal = signal
        self.recheck_s = recheck_s
        self.tick = tick
        self._fd = -1
        self._wake = -1
        self._wd = -1
        self._fds_lock = threading.Lock()  # guards closing of the two descriptors
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> bool:
        """Open inotify, watch the folder, start the thread; False if inotify is unusable."""
        lib = _libc()
        if lib is None or not hasattr(os, "eventfd"):
            return False
        fd = lib.inotify_init1(_NONBLOCK | _CLOEXEC)
        if fd < 0:
            log.debug("qmagic: inotify unavailable (%s); state files are stat-ed on every read",
                      os.strerror(ctypes.get_errno()))
            return False
        self._fd = fd
        try:
            self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        except OSError:
            os.close(fd)
            self._fd = -1
            return False
        if not self._add_watch():
            self._close_fds()
            return False
        _all_watchers.add(self)
        self.signal.bump(live=True)
        self._thread = threading.Thread(target=self._run, name="qmagic-state-watch", daemon=True)
        self._thread.start()
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """End the thread and release its descriptors (idempotent)."""
        with self._fds_lock:
            self._stopping = True
            if self._wake >= 0:
                with suppress(OSError):
                    os.eventfd_write(self._wake, 1)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        if thread is None:
            self._close_fds()
        self.signal.bump(live=False)

    # ---- the thread -------------------------------------------------------------------

    def _add_watch(self) -> bool:
        lib = _libc()
        wd = lib.inotify_add_watch(self._fd, self.folder, NAME_EVENTS | _LOST | IN_ONLYDIR)
        if wd < 0:
            log.debug("qmagic: cannot watch %r: %s", self.folder, os.strerror(ctypes.get_errno()))
            return False
        self._wd = wd
        return True

    def _run(self) -> None:
        try:
            poller = select.poll()
            poller.register(self._fd, select.POLLIN)
            poller.register(self._wake, select.POLLIN)
            next_tick = time.monotonic() + self.recheck_s
            while not self._stopping:
                wait_ms = max(0, int((next_tick - time.monotonic()) * 1000) + 1)
                try:
                    ready = poller.poll(wait_ms)
                except InterruptedError:  # pragma: no cover - PEP 475 retries
                    continue
                if self._stopping:
                    break
                for fd, _ in ready:
                    if fd == self._fd:
                        self._read_events()
                if time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + self.recheck_s
                    if self._wd < 0 and self._add_watch():
                        self.signal.bump(live=True)  # watched again: readers look once more
                    if self.tick is not None:
                        self.tick()
        except BaseException:  # pragma: no cover - never let the watcher kill anything
            log.debug("qmagic: the state watcher stopped", exc_info=True)
        finally:
            self.signal.bump(live=False)
            self._close_fds()

    def _read_events(self) -> None:
        try:
            data = os.read(self._fd, 65536)
        except BlockingIOError:
            return
        changed = False
        offset = 0
        while offset + _EVENT.size <= len(data):
            wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
            name = data[offset + _EVENT.size: offset + _EVENT.size + length].split(b"\0", 1)[0]
            offset += _EVENT.size + length
            if mask & IN_Q_OVERFLOW:
                changed = True
            elif wd == self._wd and mask & _LOST and not name:
                if not mask & IN_IGNORED:  # moved (or unmounted): drop the old watch
                    _libc().inotify_rm_watch(self._fd, wd)
                self._wd = -1  # the folder is gone or moved: readers stat until it is back
                self.signal.bump(live=False)
            elif wd == self._wd and name in self.names:
                changed = True
        if changed:
            self.signal.bump()

    def _close_fds(self) -> None:
        with self._fds_lock:
            for attr in ("_fd", "_wake"):
                fd = getattr(self, attr)
                if fd >= 0:
                    setattr(self, attr, -1)
                    with suppress(OSError):
                        os.close(fd)

    def _forget_after_fork(self) -> None:
        """In a forked child: no thread runs; close the inherited descriptors."""
        self._stopping = True
        self._thread = None
        self.signal._lock = threading.Lock()  # another thread may have held it at fork()
        self.signal.bump(live=False)
        self._fds_lock = threading.Lock()
        self._close_fds()

