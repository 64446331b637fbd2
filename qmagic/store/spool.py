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

**Segments.**  A segment is a file opened ``O_APPEND`` that takes up to
:data:`SEGMENT_BYTES`.  Appending a line is one ``write(2)`` made through ``ctypes.PyDLL``
(:class:`AppendFile`): one C call that keeps the GIL (no convoy of threads waiting for it
in a burst) — so appends of several threads never interleave, the kernel places each one
at the end, and an asynchronous exception lands before or after a line, never inside one.
Once ``write`` returned, the line is in the page cache and survives the death of the
process (not a power cut: ``fsync=True`` adds an ``fsync``).  Nothing is memory-mapped: a
spool file truncated or changed by another process can never crash the kernel (SIGBUS);
lines then go missing from that file at worst.  A short write (disk full) is followed by a
newline, so the next line starts clean; readers skip what does not parse.  The first line
of each segment is a header naming the session (host, pid, versions).

When a segment is full the next one (prepared ahead by the writer thread) takes over and
the full one is *closed* (a late write raises ValueError and is retried on the new
segment).  A segment is deleted once its content is in SQLite.  Lines that cannot
be spooled (disk full, read-only folder) wait in a bounded in-memory queue (``held``).

This module does not import IPython, ipykernel, ipywidgets or zmq.
"""

from __future__ import annotations

import collections
import ctypes
import itertools
import os
import select
import threading
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

from ..errors import StateFileError
from .files import ensure_state_dir, fsync_dir, open_state_file
from .records import warn_once

__all__ = ["SEGMENT_BYTES", "Segment", "SessionFiles", "Spool", "Waker", "read_whole"]

#: Size of one spool segment.  A line is at most a quarter of it (the encoder's limits).
SEGMENT_BYTES = 4 << 20
_READ_CHUNK = 1 << 20
_SPOOL_RETRY_S = 0.5  # callers do not retry a failed segment creation more often than this


def read_whole(path: Path, limit: int) -> bytes | None:
    """The content of a state file (at most ``limit`` bytes; None if it does not exist),
    opened safely; reads what the file holds instead of asking for ``limit`` bytes."""
    try:
        fd = open_state_file(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        size = min(os.fstat(fd).st_size, limit)
        chunks, got = [], 0
        while got < size:
            chunk = os.read(fd, min(size - got, 16 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise StateFileError(f"Cannot read the qmagic state file {str(path)!r}: {exc}.") from exc
    finally:
        os.close(fd)


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


_libc = ctypes.PyDLL(None, use_errno=True)  # PyDLL: the call keeps the GIL
_c_write = _libc.write
_c_write.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t)
_c_write.restype = ctypes.c_ssize_t


class AppendFile:
    """Appends lines to a segment file with one GIL-holding ``write(2)`` each.

    ``write`` raises ValueError when the segment is closed or full (the spool then rotates)
    and OSError when the disk refuses (the line then waits in memory).
    """

    __slots__ = ("fd", "size", "written", "torn", "closed")

    def __init__(self, fd: int, size: int, written: int) -> None:
        self.fd, self.size, self.written = fd, size, written
        self.torn = False  # the last write was short: start the next line on a new line
        self.closed = False

    def write(self, line: bytes) -> None:
        """Append ``data`` (one write, holding the GIL); raises OSError on failure."""
        if self.closed:
            raise ValueError("the spool segment is closed")
        if self.written + len(line) > self.size:
            raise ValueError("the spool segment is full")
        if self.torn:
            line = b"\n" + line
        n = _c_write(self.fd, line, len(line))
        if n != len(line):
            self.torn = True
            if n < 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
            raise OSError("short write to the spool (disk full?)")
        self.torn = False
        self.written += n

    def tell(self) -> int:
        """Bytes in the file now (the written lines end here)."""
        if self.closed:
            raise ValueError("the spool segment is closed")
        return os.fstat(self.fd).st_size

    def flush(self) -> None:
        """Make the written lines survive a power cut too."""
        if not self.closed:
            os.fsync(self.fd)

    def close(self) -> None:
        """Refuse further writes (the descriptor belongs to the Segment)."""
        self.closed = True


@dataclass(eq=False)
class Segment:
    """One spool segment; ``mm`` (its writer) is None once it is closed for writing."""

    number: int
    path: Path
    fd: int
    mm: AppendFile | None
    size: int
    consumed: int = 0  # bytes already in SQLite (advanced by the writer thread only)
    cut: bool = False  # the last read_new stopped at its limit with more lines after it

    def read_new(self, limit: int, start: int | None = None) -> bytes:
        """Complete lines from ``start`` (default: ``consumed``), about ``limit`` bytes at most."""
        begin = self.consumed if start is None else start
        # The file's size, not the nominal one: appends from several threads may pass the
        # "segment full" check together and end a segment a little past ``size``.
        end = os.fstat(self.fd).st_size
        out, offset, chunk_size = [], begin, 64 << 10
        while offset < end and offset - begin < limit:
            chunk = os.pread(self.fd, min(chunk_size, end - offset), offset)
            if not chunk:
                break
            nul = chunk.find(b"\0")
            if nul >= 0:
                chunk = chunk[:nul]
            out.append(chunk)
            offset += len(chunk)
            if nul >= 0:
                break
            chunk_size = min(chunk_size * 2, _READ_CHUNK)
        data = b"".join(out)
        self.cut = offset < end and offset - begin >= limit
        return data[: data.rfind(b"\n") + 1]

    def at_end(self) -> bool:
        """True when nothing follows ``consumed`` (the next byte is NUL or the end)."""
        return os.pread(self.fd, 1, self.consumed) in (b"", b"\0")

    def close(self) -> None:
        """Stop writing and close the descriptor (the file stays)."""
        mm, self.mm = self.mm, None
        if mm is not None:
            mm.close()
        fd, self.fd = self.fd, -1
        if fd >= 0:
            with suppress(OSError):
                os.close(fd)


class SessionFiles:
    """The lock file and the segment files of one session (see the module docstring).
    Methods raise OSError or StateFileError when the folder cannot be used."""

    def __init__(self, folder: Path, env: str, session: str, header: bytes,
                 segment_bytes: int | None = None, fsync: bool = False) -> None:
        self.folder, self.env, self.session, self.header = folder, env, session, header
        self.fsync = fsync  # new files reach the disk's folder entry too
        self.segment_bytes = segment_bytes or SEGMENT_BYTES
        self.lock_path = folder / f"{env}.journal.{session}.lock"
        self.lock_fd: int | None = None
        self._next = itertools.count()

    def lock(self) -> None:
        """Create and lock the lock file (locked before it is visible under its name)."""
        if self.lock_fd is not None or fcntl is None:
            return
        tmp = self.folder / f".{self.lock_path.name}.tmp"
        fd = open_state_file(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.replace(tmp, self.lock_path)
        except BaseException:
            os.close(fd)
            with suppress(OSError):
                os.unlink(tmp)
            raise
        self.lock_fd = fd

    def lock_intact(self) -> bool:
        """True if the file under the lock's name is the one this session holds."""
        if self.lock_fd is None:
            return False
        try:
            a, b = os.lstat(self.lock_path), os.fstat(self.lock_fd)
        except OSError:
            return False
        return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)

    def unlock(self, remove: bool) -> None:
        """Release the lock, deleting the lock file first when ``remove``."""
        intact = remove and self.lock_intact()
        fd, self.lock_fd = self.lock_fd, None
        if fd is None:
            return
        if intact:
            with suppress(OSError):
                os.unlink(self.lock_path)
        os.close(fd)

    def new_segment(self) -> Segment:
        """A new segment file, open for appending, starting with the header line."""
        number = next(self._next)
        path = self.folder / f"{self.env}.journal.{self.session}.{number}.spool"
        fd = open_state_file(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND)
        try:
            mm = AppendFile(fd, self.segment_bytes, 0)
            mm.write(self.header)
            if self.fsync:
                mm.flush()
                fsync_dir(self.folder)
        except BaseException:
            os.close(fd)
            with suppress(OSError):
                os.unlink(path)
            raise
        return Segment(number, path, fd, mm, self.segment_bytes)

    def remove_segments(self) -> None:
        """Delete every segment file of this session (after a clean close)."""
        prefix = f"{self.env}.journal.{self.session}."
        with suppress(OSError):
            for name in os.listdir(self.folder):
                if name.startswith(prefix) and name.endswith(".spool"):
                    with suppress(FileNotFoundError):
                        os.unlink(self.folder / name)


class Spool:
    """The live spool of a session: the current segment (``mm``, written by callers), the
    next one (``spare``), segments not yet in SQLite, and the ``held`` queue.

    ``lock`` guards the segment bookkeeping; callers take it only when the current segment
    is full or missing.  ``fault`` is the text of the latest failure to make a segment
    (None when the spool works).
    """

    def __init__(self, files: SessionFiles, pending_limit: int) -> None:
        self.files = files
        self.lock = threading.Lock()
        self.mm: AppendFile | None = None
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
        self.mm = seg.mm
        if old is not None and old.mm is not None:
            mm, old.mm = old.mm, None
            mm.close()

    def put_slow(self, line: bytes) -> None:
        """Append ``line`` when the fast ``mm.write`` failed: rotate to the next segment (the
        line goes into it before other threads can fill it), or keep it in ``held`` when no
        segment can be made (or drop it when ``held`` is full)."""
        with self.lock:
            if self.closed:
                next(self.dropped)
                warn_once("closed", "qmagic: the experiment log is closed (or belongs to the parent "
                          "of this forked process); task records are not logged.")
                return
            mm = self.mm
            disk_refused = False
            if mm is not None:
                try:
                    mm.write(line)
                    return
                except ValueError:  # full (or closed by a rotation that raced us)
                    pass
                except OSError as exc:  # disk full, I/O error: hold lines until the writer
                    self.fault = f"{type(exc).__name__}: {exc}"  # has a segment that takes them
                    self.retry_at = time.monotonic() + _SPOOL_RETRY_S
                    self.mm = None  # (callers no longer try the disk meanwhile)
                    disk_refused = True
            if not disk_refused and self._rotate(line):
                return
            if len(self.held) < self.pending_limit:
                self.held.append(line)
            else:
                next(self.dropped)
            if self.wake is not None:  # (under the lock: close() closes the waker after it)
                self.wake.set()

    def _rotate(self, line: bytes | None = None, force: bool = False) -> bool:
        """Switch to the spare segment, or make one (callers not while a fault's back-off
        runs; the writer thread with ``force``), writing ``line`` into it first.  Caller
        holds the lock.  False if no segment could be had."""
        if self.closed:
            return False
        spare, self.spare = self.spare, None
        if spare is None:
            if time.monotonic() < self.retry_at and not force:
                self.mm = None
                return False
            try:
                spare = self.files.new_segment()
            except (OSError, StateFileError) as exc:
                self.fault = f"{type(exc).__name__}: {exc}"
                self.retry_at = time.monotonic() + _SPOOL_RETRY_S
                self.mm = None  # (the writer installs a segment when it can)
                return False
        self._install(spare)
        if line is not None:
            try:
                spare.mm.write(line)  # type: ignore[union-attr]  (a line is at most a quarter of it)
            except OSError as exc:  # the new segment is there, but the disk refuses the line
                self.fault = f"{type(exc).__name__}: {exc}"
                self.retry_at = time.monotonic() + _SPOOL_RETRY_S
                self.mm = None
                return False
        if self.wake is not None:
            self.wake.set()  # (prepare the next spare)
        return True

    # ---- for the writer thread ------------------------------------------------------------------
    def prepare(self) -> None:
        """Make sure a segment is current and a spare is ready when the current one is half
        full; move held lines into the spool.  Raises OSError/StateFileError on failure."""
        if self.closed:
            return
        if not self.files.lock_intact():
            self.files.unlock(remove=False)
            ensure_state_dir(self.files.folder)
            self.files.lock()
        current = self.current
        if current is not None and current.fd >= 0 and os.fstat(current.fd).st_nlink == 0:
            with self.lock:  # its file was deleted (by hand?): what is written there would not
                self.mm = None  # survive a crash; the next lines go to a new segment
        need_spare = self.spare is None and (
            self.current is None or self.mm is None or self.mm.tell() > self.current.size // 2)
        if need_spare:
            seg = self.files.new_segment()
            with self.lock:
                if self.closed:
                    seg.close()
                    os.unlink(seg.path)
                    return
                if self.current is None or self.mm is None:
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
                        self.mm.write(line)  # type: ignore[union-attr]
                    except (ValueError, AttributeError):
                        if not self._rotate(line, force=True):
                            raise OSError(f"cannot write the spool: {self.fault}") from None
                    self.held.popleft()
        self.fault, self.retry_at = None, 0.0

    def close_full(self) -> list[Segment]:
        """Close every segment that is not current for writing; return all segments."""
        with self.lock:
            for seg in self.segments:
                if seg is not self.current and seg.mm is not None:
                    mm, seg.mm = seg.mm, None
                    mm.close()
            return list(self.segments)

    def retire(self, seg: Segment) -> None:
        """Delete a segment whose content is all in SQLite (not the current one)."""
        with self.lock:
            if seg is self.current or seg not in self.segments:
                return
            self.segments.remove(seg)
            with suppress(FileNotFoundError):
                os.unlink(seg.path)
            seg.close()

    def uncommitted(self, needle: bytes | None = None) -> list[bytes]:
        """Lines not yet in SQLite (spool and held); with ``needle``, only chunks that
        contain it.  Reads under the lock (segments are closed under it too)."""
        out = []
        with self.lock:
            for seg in self.segments:
                if seg.fd >= 0:
                    data = seg.read_new(seg.size)
                    if data and (needle is None or needle in data):
                        out.append(data)
            held = list(self.held)
        if held:
            data = b"".join(held)
            if needle is None or needle in data:
                out.append(data)
        return out

    def close(self, unlink_spare: bool = True) -> None:
        """Close every segment (files stay) and the spare (deleted)."""
        with self.lock:
            segs, self.segments = self.segments, []
            spare, self.spare = self.spare, None
            self.current, self.mm = None, None
        for seg in segs + ([spare] if spare is not None else []):
            seg.close()
        if spare is not None and unlink_spare:
            with suppress(FileNotFoundError):
                os.unlink(spare.path)
