"""The spool of one writer session: where every event of the experiment log goes first.

Every :class:`~qmagic.store.journal.Journal` is one *session* with a random id and files in
the state folder::

    <env>.journal.<session>.lock          held with flock(LOCK_EX) for the session's life
    <env>.journal.<session>.<n>.spool     spool segments n = 0, 1, 2 ...

**Death detection.**  The lock file appears only once it is locked (created under a
temporary name, locked, then renamed into place), so a lock file whose flock can be taken
belongs to a session that is gone: its process died (the kernel released the lock) or it
closed without finishing.  No pid, start time or host guesswork.  flock belongs to the open
file description, so another Journal of the same process cannot take it either.

**Segments** (:mod:`qmagic.store.segments`): files opened ``O_APPEND``, one GIL-holding
``write(2)`` per line, nothing memory-mapped; a line that was written survives the death of
the process.

When a segment is full the next one (prepared ahead by the writer thread) takes over and
the full one is *closed* (a late write raises ValueError and is retried on the new
segment).  A segment is deleted once its content is in SQLite.  Lines that cannot
be spooled (disk full, read-only folder) wait in a bounded in-memory queue (``held``).

This module does not import IPython, ipykernel, ipywidgets or zmq.
"""

from __future__ import annotations

import collections
import itertools
import os
import select
import threading
import time
from collections.abc import Collection
from contextlib import suppress

from ..errors import StateFileError
from .files import ensure_state_dir
from .records import warn_once
from .segments import SEGMENT_BYTES, AppendFile, Segment, SessionFiles, uid_of

__all__ = ["SEGMENT_BYTES", "Segment", "SessionFiles", "Spool", "Waker"]

_SPOOL_RETRY_S = 0.5  # callers do not retry a failed segment creation more often than this


class Waker:
    """Wakes the writer thread: a byte into a pipe.  Unlike ``threading.Event`` (whose
    ``set()`` runs Python code holding a Condition's lock, which an asynchronous exception
    can leave held forever), ``set()`` is one C-level lock and one ``os.write``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._r, self._w = os.pipe()
        for fd in (self._r, self._w):
            os.set_blocking(fd, False)
            os.set_inheritable(fd, False)

    def set(self) -> None:
        """Wake the writer (never blocks; after close() it does nothing)."""
        with self._lock:
            if self._w >= 0:
                with suppress(OSError):  # (a full pipe: the writer is awake anyway)
                    os.write(self._w, b"x")

    def wait(self, timeout: float) -> None:
        """Wait until woken or ``timeout`` seconds passed (the writer thread only)."""
        if self._r < 0:
            return
        with suppress(OSError, ValueError):
            select.select([self._r], [], [], max(0.0, timeout))
            while os.read(self._r, 4096):
                pass

    def close(self) -> None:
        """Close the pipe (later set() calls do nothing)."""
        with self._lock:
            r, w, self._r, self._w = self._r, self._w, -1, -1
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)


class Spool:
    """The live spool of a session: the current segment (``out``, written by callers), the
    next one (``spare``), segments not yet in SQLite, and the ``held`` queue.

    ``lock`` guards the segment bookkeeping; callers take it only when the current segment
    is full or missing, never for longer than a few system calls.  Counts and lookups read
    the spool under ``read_lock`` (one at a time: each segment keeps one count and one
    index), taking ``lock`` only to copy the list of segments: a first read of a long
    backlog takes a second, and a task switching to the next segment never waits for it.
    Descriptors are closed under both locks.  ``fault`` is the text of the latest failure
    to make a segment (None when the spool works).
    """

    def __init__(self, files: SessionFiles, pending_limit: int) -> None:
        self.files = files
        self.lock = threading.Lock()
        self.read_lock = threading.Lock()  # (taken before ``lock``, never while holding it)
        self.out: AppendFile | None = None
        self.current: Segment | None = None
        self.spare: Segment | None = None
        self.segments: list[Segment] = []  # oldest first, the current one last
        self.held: collections.deque[bytes] = collections.deque()
        self.pending_limit = pending_limit
        self.dropped = itertools.count()  # next() when a line is dropped (bounded queue full)
        self.fault: str | None = None
        self.retry_at = 0.0  # monotonic time before which callers do not make segments
        self.wake: Waker | None = None  # set when the writer should look
        self.closed = False  # no new segments, lines are dropped

    def dropped_count(self) -> int:
        """How many lines were dropped so far."""
        return self.dropped.__reduce__()[1][0]

    def open(self) -> None:
        """Lock the session and make the first segment (raises on failure)."""
        self.files.lock()
        with self.lock:
            if self.current is None:
                self._install(self.files.new_segment())

    def _install(self, seg: Segment) -> None:
        """Make ``seg`` current and close the previous one (caller holds the lock)."""
        old = self.current
        self.segments.append(seg)
        self.current = seg
        self.out = seg.out
        if old is not None:
            old.stop_writing()

    def put_slow(self, line: bytes) -> None:
        """Append ``line`` when the fast ``out.write`` failed: rotate to the next segment (the
        line goes into it before other threads can fill it), or keep it in ``held`` when no
        segment can be made (or drop it when ``held`` is full: ``pending_limit`` lines, and
        as many again for tasks' ends)."""
        with self.lock:
            if self.closed:
                next(self.dropped)
                warn_once("closed", "qmagic: the experiment log is closed (or belongs to the parent "
                          "of this forked process); task records are not logged.")
                return
            out = self.out
            disk_refused = False
            if out is not None:
                try:
                    out.write(line)
                    return
                except ValueError:  # full (or closed by a rotation that raced us)
                    pass
                except OSError as exc:  # disk full, I/O error: hold lines until the writer
                    self.fault = f"{type(exc).__name__}: {exc}"  # has a segment that takes them
                    self.retry_at = time.monotonic() + _SPOOL_RETRY_S
                    self.out = None  # (callers no longer try the disk meanwhile)
                    disk_refused = True
            if not disk_refused and self._rotate(line):
                return
            # A task's end may use as much room again: it completes a record whose earlier
            # lines are kept (dropping it turned a task that ended into one "the kernel
            # stopped while it ran"), and alone it is a whole record.
            first = not self.held
            if len(self.held) < self.pending_limit * (2 if line.startswith(b"[3,") else 1):
                # (a copy: each of orjson's lines kept pinned about 8 kB of the heap, whatever
                # its size: 100,000 held lines of 500 bytes took 778 MB, their copies 52 MB)
                self.held.append(memoryview(line).tobytes())
            else:
                next(self.dropped)
            # The writer is woken when lines start to wait; then it retries on its own clock
            # (its back-off, IDLE_POLL_S at most).  A wake-up per line made it and the task
            # threads switch thousands of times a second during a fault: 3-6x the calls' CPU.
            if self.wake is not None and (first or disk_refused):
                self.wake.set()  # (under the lock: close() closes the waker after it)

    def _rotate(self, line: bytes | None = None, force: bool = False) -> bool:
        """Switch to the spare segment, or make one (callers not while a fault's back-off
        runs; the writer thread with ``force``), writing ``line`` into it first.  Caller
        holds the lock.  False if no segment could be had."""
        if self.closed:
            return False
        spare, self.spare = self.spare, None
        if spare is None:
            if time.monotonic() < self.retry_at and not force:
                self.out = None
                return False
            try:
                spare = self.files.new_segment()
            except (OSError, StateFileError) as exc:
                self.fault = f"{type(exc).__name__}: {exc}"
                self.retry_at = time.monotonic() + _SPOOL_RETRY_S
                self.out = None  # (the writer installs a segment when it can)
                return False
        self._install(spare)
        if line is not None:
            try:
                spare.out.write(line)  # type: ignore[union-attr]  (a line is at most a quarter of it)
            except OSError as exc:  # the new segment is there, but the disk refuses the line
                self.fault = f"{type(exc).__name__}: {exc}"
                self.retry_at = time.monotonic() + _SPOOL_RETRY_S
                self.out = None
                return False
        if self.wake is not None:
            self.wake.set()  # (prepare the next spare)
        return True

    # ---- for the writer thread ------------------------------------------------------------------
    def prepare(self) -> bool:
        """Make sure a segment is current and a spare is ready when the current one is half
        full; move held lines into the spool (where a SIGKILL cannot lose them; a line takes
        less room there than in the database).  True when the spool's files were found
        deleted (by hand?): what they hold survives no crash, so the caller stores it at
        once.  Raises OSError/StateFileError on failure."""
        if self.closed:
            return False
        deleted = False
        if not self.files.lock_intact():
            deleted = self.files.lock_fd is not None  # (held, and its file is gone)
            self.files.unlock(remove=False)
            ensure_state_dir(self.files.folder)
            self.files.lock()
        current = self.current
        if current is not None and current.fd >= 0 and os.fstat(current.fd).st_nlink == 0:
            deleted = True
            with self.lock:  # its file was deleted (by hand?): what is written there would not
                self.out = None  # survive a crash; the next lines go to a new segment
        out, current = self.out, self.current  # (read once: a task thread may rotate meanwhile)
        try:
            filling = out is None or current is None or out.tell() > current.size // 2
        except ValueError:  # (closed by that rotation, which used the spare)
            filling = True
        need_spare = self.spare is None and filling
        if need_spare:
            seg = self.files.new_segment()
            with self.lock:
                if self.closed:
                    seg.close()
                    os.unlink(seg.path)
                    return deleted
                if self.current is None or self.out is None:
                    self._install(seg)
                elif self.spare is None:
                    self.spare = seg
                else:
                    seg.close()
                    os.unlink(seg.path)
        while self.held:
            with self.lock:
                for _ in range(min(len(self.held), 1000)):
                    line = self.held[0]
                    try:
                        self.out.write(line)  # type: ignore[union-attr]
                    except (ValueError, AttributeError):
                        if not self._rotate(line, force=True):
                            raise OSError(f"cannot write the spool: {self.fault}") from None
                    self.held.popleft()
        self.fault, self.retry_at = None, 0.0
        return deleted

    def close_full(self) -> list[Segment]:
        """Close every segment that is not current for writing; return all segments."""
        with self.lock:
            for seg in self.segments:
                if seg is not self.current:
                    seg.stop_writing()
            return list(self.segments)

    def retire(self, seg: Segment) -> None:
        """Delete a segment whose content is all in SQLite (not the current one).  Checked
        again here: a task thread that passed the segment's checks before the rotation may
        have written a line into it after the writer found it stored (none can now: under
        the lock, a segment that is not current is closed for writing)."""
        with self.read_lock, self.lock:
            if seg is self.current or seg not in self.segments or not seg.at_end():
                return
            self.segments.remove(seg)
            with suppress(FileNotFoundError):
                os.unlink(seg.path)
            seg.close()

    def _readable(self) -> tuple[list[Segment], list[bytes]]:
        """The open segments and a copy of ``held`` (one C call: the writer takes lines off
        it unlocked), at one moment: a line moved from ``held`` into a segment is in one of
        them.  The caller holds ``read_lock`` (no descriptor is closed meanwhile)."""
        with self.lock:
            return [seg for seg in self.segments if seg.fd >= 0], list(self.held)

    def unstored_lines(self) -> int:
        """How many lines are not in SQLite yet: in the spool (counted incrementally, see
        :meth:`Segment.unstored_lines`) and in ``held``, at one moment (the writer moves lines
        from ``held`` into a segment under the lock: each is counted in one place, once)."""
        with self.read_lock:
            with self.lock:  # (one fstat per segment: no read under the lock)
                views = [(seg, seg.view()) for seg in self.segments if seg.fd >= 0]
                held = len(self.held)
            return sum(seg.unstored_lines(view) for seg, view in views) + held

    def uncommitted(self) -> list[bytes]:
        """Lines not yet in SQLite (spool and held)."""
        with self.read_lock:
            segments, held = self._readable()
            chunks = [seg.read_new()[0] for seg in segments]
        return [data for data in chunks if data] + ([b"".join(held)] if held else [])

    def lines_of(self, uids: Collection[bytes] | None = None, needle: bytes = b"") -> list[bytes]:
        """Lines not yet in SQLite of the uids in ``uids`` (else of the uids containing
        ``needle``): indexed, see :meth:`Segment.lines_of`."""
        with self.read_lock:
            segments, held = self._readable()
            chunks = [seg.lines_of(uids, needle) for seg in segments]
        held = [line for line in held if (uid_of(line) in uids if uids is not None else needle in uid_of(line))]
        return [data for data in chunks if data] + ([b"".join(held)] if held else [])

    def close(self, unlink_spare: bool = True) -> None:
        """Close every segment (files stay) and the spare (deleted)."""
        with self.read_lock, self.lock:
            segs, self.segments = self.segments, []
            spare, self.spare = self.spare, None
            self.current, self.out = None, None
        for seg in segs + ([spare] if spare is not None else []):
            seg.close()
        if spare is not None and unlink_spare:
            with suppress(FileNotFoundError):
                os.unlink(spare.path)
