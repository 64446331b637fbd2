"""Spool segment files: appending lines, reading them back, and one session's files.

**Segments.**  A segment is a file opened ``O_APPEND`` that takes up to
:data:`SEGMENT_BYTES`.  Appending a line is one ``write(2)`` made through ``ctypes.PyDLL``
(:class:`AppendFile`): one C call that keeps the GIL (no convoy of threads waiting for it
in a burst) — so appends of several threads never interleave, the kernel places each one
at the end, and an asynchronous exception lands before or after a line, never inside one.
Once ``write`` returned, the line is in the page cache and survives the death of the
process (not a power cut: ``fsync=True`` adds an ``fsync``).  Nothing is memory-mapped: a
spool file truncated or changed by another process can never crash the kernel (SIGBUS);
what was cut away is lost at worst, and lines written after a cut are still read
(:meth:`Segment.read_new` starts again from the file's start).  A short write (disk full)
is followed by a newline, so the next line starts clean; readers skip what does not parse,
and the half line a short write leaves at the end of a segment that takes no more lines.
Zero bytes another process added (``truncate -s +N``, a recovery tool's padding) are skipped
with the half line before them, if any: the lines appended after them are read
(:func:`complete_lines`, the one rule of every reader, applied by :func:`read_lines` in
pieces of at most 2 MiB however large the padding).  Bytes without a newline another
process appended glue themselves to our next line: readers keep our line at its end
(:mod:`qmagic.store.lines`).
The first line of each segment is a header naming the session (host, pid, versions).

:class:`SessionFiles` holds the session's lock file (its flock says the session is alive)
and creates and removes its segment files.  Used by :mod:`qmagic.store.spool`.

This module does not import IPython, ipykernel, ipywidgets or zmq.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import re
from collections.abc import Collection, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

from .files import fsync_dir, open_state_file
from .lines import our_line
from .records import MAX_LINE

__all__ = ["SEGMENT_BYTES", "AppendFile", "Segment", "SessionFiles", "complete_lines", "read_lines", "uid_of"]

#: Size of one spool segment.  A line is at most a quarter of it (the encoder's limits).
SEGMENT_BYTES = 4 << 20
_READ_CHUNK = 1 << 20
_LOCK_ATTEMPTS = 5  # a session's lock file is made this many times at most (see SessionFiles.lock)


_libc = ctypes.PyDLL(None, use_errno=True)  # PyDLL: the call keeps the GIL
_c_write = _libc.write  # write(int fd, bytes, int length): ctypes converts these itself
_c_write.restype = ctypes.c_ssize_t  # (declared argtypes would cost 0.3 µs more per call)


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
        """Append ``line`` (one write, holding the GIL); raises OSError on failure."""
        size = len(line)
        if self.closed or self.written + size > self.size:
            raise ValueError(f"the spool segment is {'closed' if self.closed else 'full'}")
        if self.torn:
            line, size = b"\n" + line, size + 1
        n = _c_write(self.fd, line, size)  # (-1 once closed: see close())
        if n != size:
            if self.closed:  # (closed by a rotation since the check above)
                raise ValueError("the spool segment is closed")
            self.torn = True
            if n < 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
            raise OSError("short write to the spool (disk full?)")
        self.torn = False  # (only now: an exception before the write leaves it set)
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
        """Refuse further writes (the descriptor belongs to the Segment).  A write that
        passed its check before this then fails on descriptor -1 (no switch to another
        thread can fall between reading ``fd`` and the GIL-holding call): it never lands in a
        segment being deleted, nor in a file that took the descriptor's number after it."""
        self.fd = -1
        self.closed = True


#: A line in a segment's index: its offset and its size in one integer, a uid's lines one
#: after the other in one (a list of tuples took 490 bytes per task: 49 MB for the index of
#: 100,000 tasks waiting in a database fault; ~170 bytes now).
_SIZE_BITS, _LINE_BITS = 24, 64  # (a line is at most 1 MiB; a segment far below 2**40 bytes)
_SIZE_MASK, _LINE_MASK = (1 << _SIZE_BITS) - 1, (1 << _LINE_BITS) - 1


def uid_of(line: bytes) -> bytes:
    """The uid of a spool line (``[rank,"uid",...]``: its first string; uids hold no quote)."""
    start = line.find(b'"') + 1
    return line[start:line.find(b'"', start)]


_ZEROS = re.compile(rb"\0+")
#: More bytes than this after the last newline are no line of the log still being written
#: (a line and the newline a short write may put before it).
_LONGEST = MAX_LINE + 1


def complete_lines(data: bytes, torn_end: bool = False, run: int = 0
                   ) -> tuple[list[tuple[int, bytes]], int]:
    """The complete lines in ``data`` (read from a segment) as blocks ``(offset, lines)``,
    and how many bytes of ``data`` they use up (the readers go on from there).

    A run of zero bytes (added by another process) is skipped, with the half line before
    it (cut short, never completed: our next line starts after the zeros); the bytes after
    the last newline wait for the rest of their line, unless ``torn_end`` says that this
    is the file's end and no line ever completes it (then they are used up, never read).
    Bytes after the last newline longer than any line of the log (``MAX_LINE``, another
    program's; ``run``: how many of them, used up, came just before ``data``) are used up
    too: no newline to come would make them a line (read again and again, they held the
    writer in a loop)."""
    if b"\0" not in data:  # (the common case: one block)
        end = data.rfind(b"\n") + 1
        blocks = [(0, data[:end])]
    else:
        blocks, at = [], 0
        for zeros in _ZEROS.finditer(data):
            end = data.rfind(b"\n", at, zeros.start()) + 1
            if end > at:
                blocks.append((at, data[at:end]))
            at = zeros.end()
        end = data.rfind(b"\n", at) + 1
        if end > at:
            blocks.append((at, data[at:end]))
        end = max(end, at)
    tail = len(data) - end + (run if end == 0 else 0)
    return blocks, len(data) if torn_end or tail > _LONGEST else end


def read_lines(fd: int, begin: int, end: int, torn_end: bool = False
               ) -> Iterator[tuple[list[tuple[int, bytes]], int]]:
    """The complete lines of the file ``fd`` between ``begin`` and ``end``, read in pieces
    (64 KiB growing to 1 MiB; 2 MiB for a piece without a newline): per piece, its blocks
    ``(offset in the file, lines)`` and where in the file the next piece starts (what they
    use up).  The same lines as :func:`complete_lines` over one read of it all (``torn_end``:
    ``end`` is the file's end for good), never a buffer as large: another process may
    have added a gigabyte of zero bytes (one read of it took as much of the kernel's memory).
    The one reader of every segment."""
    at, size, run = begin, 64 << 10, 0
    while at < end:
        want = min(size, end - at)
        data = os.pread(fd, want, at)
        last = len(data) < want or at + len(data) >= end  # (a file cut meanwhile ends here)
        blocks, n = complete_lines(data, torn_end and last, run)
        if n == 0 and not last:  # (half a line longer than the piece: read it whole)
            size *= 2
            continue
        before, run, carry = run, 0, 0
        if n == len(data) and not last and data[-1:] not in (b"\n", b"\0"):
            # A tail too long for a line, used up but for its last _LONGEST bytes: they start
            # the next piece (a line of ours glued to the end of the tail, its first part
            # here, is then read whole; only one byte again lost it).  Such a piece is 2 MiB
            # (a longer tail needs more than _LONGEST bytes): the next one, as long, moves on.
            start = max(data.rfind(b"\n"), data.rfind(b"\0")) + 1
            carry = min(_LONGEST, len(data) - start)
            run, n = len(data) - start + (before if start == 0 else 0) - carry, n - carry
        yield [(at + offset, lines) for offset, lines in blocks], at + n
        if last or n == 0:
            return
        at, size = at + n, size if carry else min(size * 2, _READ_CHUNK)


@dataclass(eq=False)
class Segment:
    """One spool segment; ``out`` (its writer) is None once it is closed for writing."""

    number: int
    path: Path
    fd: int
    out: AppendFile | None
    size: int
    #: (bytes already in SQLite, the lines in them): set at once by the writer thread only
    stored: tuple[int, int] = (0, 0)
    cuts: int = 0  # how many times the writer found the file cut by another process
    #: Closed for writing, and no line can land any more: bytes after the last newline (half a
    #: line a short write left, the disk full) never complete (see :meth:`stop_writing`).
    final: bool = False
    #: (cuts, offset, lines before it): unstored_lines()' count so far
    counted: tuple[int, int, int] = (0, 0, 0)
    #: (cuts, offset, {uid: its lines before offset, packed: see _LINE_BITS}): lines_of()'s index
    index: tuple[int, int, dict[bytes, int]] = field(default_factory=lambda: (0, 0, {}))

    def read_new(self, limit: int | None = None) -> tuple[bytes, int, int, bool]:
        """Complete lines not in SQLite yet, about ``limit`` bytes of them at most (None: all),
        as ``(lines, begin, n, more)``: where they start in the file, the ``n`` bytes they use
        up there (zero bytes skipped too: see :func:`complete_lines`), and whether more lines
        follow.

        A file that another process cut (``truncate``) below what was stored or written
        is read again from its start: what is left in it was written after the cut, or is
        in SQLite already (storing a line twice changes nothing)."""
        final = self.final  # (read before the size: what that size shows is then all there is)
        end, cut = self._size()
        begin = used = self._unstored_from(end, cut, self.stored)
        # The file's size, not the nominal one: appends from several threads may pass the
        # "segment full" check together and end a segment a little past ``size``.
        found, size, more = [], 0, False
        for blocks, used in read_lines(self.fd, begin, end, final):
            found.extend(lines for _, lines in blocks)
            size += sum(len(lines) for _, lines in blocks)
            if limit is not None and size >= limit and used < end:
                more = True
                break
        return b"".join(found), begin, used - begin, more

    def advance(self, begin: int, n: int, lines: int) -> bool:
        """The writer thread stored the ``n`` bytes (``lines`` lines) read from ``begin``.
        After a cut, what this process wrote is counted from the file's size again, and the
        file is read again from its start (True): the cut may have come after the read,
        and the lines written since then may reach past what was stored."""
        self.stored = (begin + n, (self.stored[1] if begin else 0) + lines)
        end, cut = self._size()
        if cut is None:
            return False
        # (what was counted or indexed of the file is wrong from here on; counted before
        # ``written`` is set: a reader that no longer sees the cut sees the new count)
        self.cuts += 1
        cut.written = end  # (appends racing this store are under-counted: harmless)
        self.stored = (0, 0)  # (lines stored twice change nothing)
        return True

    def view(self) -> tuple[int, AppendFile | None, tuple[int, int]]:
        """The file's size, its writer if it was cut (see :meth:`_size`) and what was stored
        of it, now: :meth:`unstored_lines` counts what this shows (what was stored is read
        first: it never reaches past the size)."""
        stored = self.stored
        return (*self._size(), stored)

    def unstored_lines(self, view: tuple[int, AppendFile | None, tuple[int, int]]) -> int:
        """How many complete lines were not in SQLite yet at :meth:`view`'s moment (the
        header line not counted).  Counts only what was appended since the last call (a view
        asking during a long fault read every waiting line each time: 0.28 s with 100,000
        tasks waiting).  The caller holds the spool's read lock (one counter per segment)."""
        end, cut, stored = view
        cuts, offset, lines = self.counted
        if self._read_again(cuts, offset, end, cut):
            offset, lines = 0, 0
        for blocks, used in read_lines(self.fd, offset, end):
            lines, offset = lines + sum(data.count(b"\n") for _, data in blocks), used
        self.counted = (self.cuts, offset, lines)
        before = stored[1] if self._unstored_from(end, cut, stored) else 0  # (after a cut: none)
        header = before == 0 and lines > 0 and os.pread(self.fd, 8, 0) == b'{"spool"'
        return max(0, lines - before - header)

    def lines_of(self, uids: Collection[bytes] | None = None, needle: bytes = b"") -> bytes:
        """The lines not in SQLite yet of the uids in ``uids`` (else of every uid that
        contains ``needle``), joined.  Lines are indexed by uid as lookups ask, only what was
        appended since (a lookup read every waiting line: 0.6 s with 100,000 tasks waiting
        in a database fault).  The caller holds the spool's read lock (one index per segment)."""
        cuts, offset, index = self.index
        end, cut = self._size()
        if self._read_again(cuts, offset, end, cut):
            offset, index = 0, {}
        for blocks, used in read_lines(self.fd, offset, end):
            offset = used
            for at, data in blocks:
                for line in data.split(b"\n")[:-1]:
                    size = len(line) + 1
                    glued = our_line(line)  # (not the header; ours after damage: its end)
                    if glued >= 0:
                        uid = uid_of(line[glued:] if glued else line)
                        index[uid] = ((index.get(uid, 0) << _LINE_BITS) | ((at + glued) << _SIZE_BITS)
                                      | (size - glued))
                    at += size
        self.index = (self.cuts, offset, index)
        keys = [u for u in uids if u in index] if uids is not None else [u for u in index if needle in u]
        begin = self._unstored_from(end, cut, self.stored)
        lines = []
        for key in keys:
            packed, mine = index[key], []
            while packed:
                at, n = (packed & _LINE_MASK) >> _SIZE_BITS, packed & _SIZE_MASK
                if at >= begin:
                    mine.append(os.pread(self.fd, n, at))
                packed >>= _LINE_BITS
            lines.extend(reversed(mine))  # (in the order they were written)
        return b"".join(lines)

    @staticmethod
    def _unstored_from(end: int, cut: AppendFile | None, stored: tuple[int, int]) -> int:
        """Where the lines not in SQLite yet start, for the file's size ``end``, its writer
        if it was cut (:meth:`_size`) and ``stored``: where what was stored ends, or 0 in a
        file another process cut below it (what is left was written after the cut, or is
        in SQLite already)."""
        return 0 if cut is not None or end < stored[0] else stored[0]

    def _read_again(self, cuts: int, offset: int, end: int, cut: AppendFile | None) -> bool:
        """True when a count or an index made of the file up to ``offset``, while the writer
        had found ``cuts`` cuts, must start again: the file was cut since."""
        return cut is not None or end < offset or cuts != self.cuts

    def _size(self) -> tuple[int, AppendFile | None]:
        """The file's size, and this segment's writer if another process cut the file below
        what the writer wrote.  The count is read before the size: a line reaches the file
        before it is counted, so a smaller file was cut, never an append still in flight."""
        out = self.out
        written = out.written if out is not None else -1
        end = os.fstat(self.fd).st_size
        return end, (out if end < written else None)

    def at_end(self) -> bool:
        """True when nothing follows what was stored (what :meth:`read_new` skips is used up)."""
        return os.fstat(self.fd).st_size <= self.stored[0]

    def stop_writing(self) -> None:
        """Refuse further lines (a late one raises ValueError).  Once its appender is closed
        no line lands any more (see :meth:`AppendFile.close`): half a line at the end of the
        file (a write the disk cut short) stays half, and readers skip it.  (Not the
        appender's own note of a short write: a thread switch may fall between that write
        and the note, and another thread rotate then.)"""
        out, self.out = self.out, None
        if out is not None:
            out.close()
            self.final = True

    def close(self) -> None:
        """Stop writing and close the descriptor (the file stays)."""
        self.stop_writing()
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
        """Create and lock the lock file (locked before it is visible under its name).

        Another process's recovery can take the temporary file, before it is locked, for
        that of a session that died before renaming it, and lock or delete it: then again,
        with a new one (it found two kernels that started at once)."""
        if self.lock_fd is not None or fcntl is None:
            return
        tmp = self.folder / f".{self.lock_path.name}.tmp"
        for attempt in itertools.count(1):
            fd = open_state_file(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.replace(tmp, self.lock_path)
                break
            except BaseException as exc:
                os.close(fd)
                with suppress(OSError):
                    os.unlink(tmp)
                taken = isinstance(exc, (BlockingIOError, FileNotFoundError))  # (by a recovery)
                if not taken or attempt == _LOCK_ATTEMPTS:
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
            out = AppendFile(fd, self.segment_bytes, 0)
            out.write(self.header)
            if self.fsync:
                out.flush()
                fsync_dir(self.folder)
        except BaseException:
            os.close(fd)
            with suppress(OSError):
                os.unlink(path)
            raise
        return Segment(number, path, fd, out, self.segment_bytes)

    def remove_segments(self) -> None:
        """Delete every segment file of this session (after a clean close)."""
        prefix = f"{self.env}.journal.{self.session}."
        with suppress(OSError):
            for name in os.listdir(self.folder):
                if name.startswith(prefix) and name.endswith(".spool"):
                    with suppress(FileNotFoundError):
                        os.unlink(self.folder / name)
