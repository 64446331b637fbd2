"""What a session has not stored in SQLite yet, folded per task and kept up to date as lines
are appended: :class:`PendingIndex`, the pending half of a Journal's reads.

Reads of a :class:`~qmagic.store.journal.Journal` merge the events still in its spool (and
in the spool's ``held`` queue) over the database.  Folding them anew for every lookup made
a lookup cost as much as everything pending: during a long fault (the database locked by
another process, a full disk), when nothing is stored and the spool only grows, every
``get`` read and parsed all of it again (70 ms with 30,000 tasks waiting).

The index remembers what it folded: per spool segment, where the lines it folded begin and
end; of ``held``, its first line and how many.  A lookup folds only what was appended since
(nothing when nothing was).  Whatever else changed — the writer stored lines (a segment's
committed offset moved, a segment was retired, ``held`` lost lines at its head), a file
was cut — makes it fold everything pending again: the writer stored, so that is little.

Thread-safe: its own lock guards the folded state (lookups take it, the task path never
does).  The spool's lock is held only for a snapshot — file sizes, duplicated descriptors,
the new lines of ``held``: no disk I/O — so the task path's slow path (it takes that lock
during a fault) never waits for a read of the disk.

This module does not import IPython, ipykernel, ipywidgets or zmq.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Collection

from .database import rows_from_lines
from .segments import Segment, read_lines
from .spool import Spool

__all__ = ["PendingIndex"]

_SPOOL_HEADER = b'{"spool"'


class PendingIndex:
    """The pending events of one session's spool, per task uid (see the module docstring)."""

    _marks: dict[Segment, tuple[int, int]]  # segment -> (begin, end) of what was folded
    _head: bytes | None  # the first line of ``held`` when it was folded
    _held: int  # lines of ``held`` folded
    _rows: dict[str, tuple]  # uid -> folded row (see rows_from_lines)
    _started: dict[str, float]  # uid -> start time, of starts without a row

    def __init__(self, spool: Spool, session: str) -> None:
        self._spool, self._session = spool, session
        self._lock = threading.Lock()
        self._forget()

    def events(self, uids: Collection[str] | None = None,
               prefix: str | None = None) -> dict[str, list[tuple]]:
        """``{uid: [row and/or (uid, start time)]}`` of pending tasks (the events
        :func:`~qmagic.store.reader.merge_state` applies): of ``uids``, else of uids that
        start with ``prefix``, else of all."""
        with self._lock:
            self._refresh()
            rows, started = self._rows, self._started
            if uids is not None:
                wanted = [u for u in uids if u in rows or u in started]
            elif prefix is not None:
                wanted = [u for u in itertools.chain(rows, started) if u.startswith(prefix)]
            else:
                wanted = itertools.chain(rows, started)
            out: dict[str, list[tuple]] = {}
            for uid in wanted:
                if uid not in out:
                    row, t = rows.get(uid), started.get(uid)
                    out[uid] = ([row] if row is not None else []) + ([(uid, t)] if t is not None else [])
            return out

    def count(self) -> int:
        """How many event lines are pending (about 3 per task).  Counted, not folded:
        ``health()`` is polled, and folding all that a burst left on every poll was Python
        work that starved the writer (benchmarks/journal.py counted stalls of over 10 s)."""
        spool, reads = self._spool, []
        with spool.lock:  # (a snapshot: no disk I/O under it)
            for seg in spool.segments:
                if seg.fd >= 0:
                    begin, end = seg.unread()
                    if end > begin:
                        reads.append((os.dup(seg.fd), begin, end))
            lines = len(spool.held)
        for fd, begin, end in reads:
            try:
                data = read_lines(fd, begin, end, end - begin)[0]
            finally:
                os.close(fd)
            lines += data.count(b"\n") - data.startswith(_SPOOL_HEADER)
        return lines

    def _forget(self) -> None:
        """Drop what was folded (the next refresh folds everything pending)."""
        self._rows, self._started, self._marks = {}, {}, {}
        self._head, self._held = None, 0

    def _refresh(self) -> None:
        """Fold what was appended since the last call, or everything again (see the module
        docstring).  The caller holds ``self._lock``."""
        reads: list[tuple[Segment, int, int, int, int]] = []
        try:
            new_held = self._snapshot(reads)
            for seg, fd, begin, start, end in reads:
                data = read_lines(fd, start, end, end - start)[0] if fd >= 0 else b""
                self._fold(data)
                self._marks[seg] = (begin, start + len(data))
            self._fold(b"".join(new_held))
        except BaseException:
            self._forget()  # (half folded: start again next time)
            raise
        finally:
            for _, fd, *_ in reads:
                if fd >= 0:
                    os.close(fd)

    def _snapshot(self, reads: list[tuple[Segment, int, int, int, int]]) -> list[bytes]:
        """Under the spool's lock (no disk I/O): forget what was folded if it is stale, add
        to ``reads`` what to read of each segment, ``(segment, descriptor or -1, begin,
        start, end)`` (a duplicated descriptor, closed by the caller), note ``held``'s head
        and length, and return its lines not folded yet."""
        spool = self._spool
        with spool.lock:
            live = {seg: seg.unread() for seg in spool.segments if seg.fd >= 0}
            held = spool.held
            head = next(iter(held), None)  # (then the length: a pop between changes the head)
            n = len(held)
            if any(seg not in live or live[seg][0] != begin or live[seg][1] < end
                   for seg, (begin, end) in self._marks.items()) or (
                    self._held and (head is not self._head or n < self._held)):
                self._forget()  # (the writer stored lines, or a file was cut)
            for seg, (begin, end) in live.items():
                start = self._marks.get(seg, (begin, begin))[1]
                reads.append((seg, os.dup(seg.fd) if end > start else -1, begin, start, end))
            # (the writer pops stored lines from the left without this lock: the newest
            # lines stay where they are; appends take the lock)
            new_held = list(itertools.islice(reversed(held), n - self._held))[::-1]
            self._head, self._held = head, n
        return new_held

    def _fold(self, data: bytes) -> None:
        if data:
            rows_from_lines(data, self._session, time.time(), self._rows, [], self._started)
