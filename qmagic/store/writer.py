"""The writer thread of a :class:`~qmagic.store.journal.Journal`: spool to SQLite.

It owns the session's write connection and does all the slow work off the task path:

- prepares the next spool segment before the current one is full, moves lines that waited
  in memory (a fault) into the spool, keeps the session's lock file in place;
- moves spooled events into SQLite in *group commits*: when the spool has been quiet for
  :data:`QUIET_S`, at the latest :data:`MAX_DELAY_S` after the first uncommitted event,
  or at once for :meth:`Writer.flush`.  A burst of tasks is therefore stored after the
  burst, in a few large transactions, with the events of each task folded into one row;
- retention (by age and size, :data:`RETENTION_BATCH` tasks per transaction; ages by
  :mod:`qmagic.store.clock`) and the scan for sessions of dead kernels
  (:mod:`qmagic.store.recovery`), every few seconds;
- the session's heartbeat, its last sign of life (a killed kernel's unfinished tasks end
  there): every :data:`HEARTBEAT_EVERY_S`, every :data:`BUSY_HEARTBEAT_S` while a task of
  it is unfinished (a scan killed after an hour reads that it ran an hour).

**Faults** (disk full, read-only folder, the database locked by another process, a file
that is not ours) never reach the callers: the first failure of an episode logs ONE
warning, retries back off from 50 ms to 5 s, the first success logs that the log caught
up.  Events wait in the spool (or, when even the spool cannot be written, in the bounded
``held`` queue).  Nothing here ever lets an exception end the thread.

This module does not import IPython, ipykernel, ipywidgets or zmq.
"""

from __future__ import annotations

import itertools
import logging
import sqlite3
import threading
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import StateFileError
from .clock import age_limit, clock_start
from .database import (
    SCHEMA_VERSION,
    connect,
    ensure_schema,
    file_id,
    mark_orphans,
    retention,
    rows_from_lines,
    transaction,
    upsert_session,
    write_rows,
    write_started,
)
from .faults import (
    Faults,
    check_intact,
    damaged,
    disk_full,
    forget_old_wal,
    moved_aside,
    spool_deleted,
    wal_ids,
)
from .files import ensure_state_dir
from .legacy import import_legacy
from .records import warn_once
from .recovery import recover
from .spool import Spool, Waker

__all__ = ["MAX_DELAY_S", "QUIET_S", "Writer"]

_log = logging.getLogger("qmagic.store.journal")

QUIET_S = 0.02  # commit once the spool has not grown for this long ...
MAX_DELAY_S = 2.0  # ... or this long after the first uncommitted event
IDLE_POLL_S = 0.25  # how often an idle writer looks at the spool
BATCH_BYTES = 2 << 20  # spool bytes per transaction at most (short write locks for other kernels)
RETENTION_EVERY_S = 10.0
RETENTION_FIRST_S = 1.0  # the first retention pass this long after the log opens (opening stays quick)
COMMIT_SLICE_S = 0.5  # commits at most this long in a row, then the periodic work
RETENTION_BATCH = 500
RECOVERY_EVERY_S = 3.0  # a kernel that died: its tasks read failed in the others within seconds
HEARTBEAT_EVERY_S = 60.0  # this session's last_seen (an orphan's end time if it dies) ...
BUSY_HEARTBEAT_S = 5.0  # ... while a task of it is unfinished (a killed scan reads how long it ran)
CLOSE_TIMEOUT_S = 5.0
_NOT_CLOSED = ("qmagic: the experiment log was not closed in time; the next kernel that opens it "
               "stores the rest.")
FINISH_MARGIN_S = 0.2  # a bounded stop's last commits end this long before it returns
_ERRORS = (sqlite3.Error, OSError, StateFileError)


@dataclass
class _Batch:
    """What one transaction stores (see :func:`_gather`)."""

    rows: dict[str, tuple] = field(default_factory=dict)
    started: dict[str, float] = field(default_factory=dict)
    bad: list[int] = field(default_factory=list)
    reads: list[tuple[Any, int, int, int]] = field(default_factory=list)  # (segment, begin, bytes, lines)
    held: int = 0  # lines taken from the left of the spool's ``held`` queue
    complete: bool = True  # nothing uncommitted is left out


def _gather(spool: Spool, segments: list[Any], session: str, now: float, budget: int) -> _Batch:
    """Fold about ``budget`` bytes of uncommitted lines into rows: first the lines waiting
    in memory (``held``: a SIGKILL would lose them; those the spool had no room for), then
    the spool's segments, oldest first."""
    out = _Batch()
    # (a copy, in one C call: what waits stays visible to readers until it is committed)
    waiting = list(itertools.islice(spool.held, len(spool.held)))
    for line in waiting:
        if budget <= 0:
            out.complete = False
            break
        out.held += 1
        budget -= len(line)
    if out.held:
        rows_from_lines(b"".join(waiting[:out.held]), session, now, out.rows, out.bad, out.started)
    for seg in segments:
        if budget <= 0:
            out.complete = False
            break
        data, begin, n, more = seg.read_new(budget)
        if data:
            rows_from_lines(data, session, now, out.rows, out.bad, out.started)
        if n:  # (zero bytes, or a half line that never completes, are used up too)
            out.reads.append((seg, begin, n, data.count(b"\n")))
            budget -= n
        if more:  # more lines wait in this segment: this cycle is not complete
            out.complete, budget = False, 0
    return out


def _position(spool: Spool) -> Any:
    """Where the spool's writes are now: (segment number, offset), parts None if unknown."""
    seg, out = spool.current, spool.out
    try:
        return (seg.number if seg else None, out.tell() if out is not None else None)
    except ValueError:  # closed meanwhile
        return (seg.number if seg else None, None)


def _session_busy(conn: sqlite3.Connection, session: str) -> bool:
    """True while a task of ``session`` is stored unfinished (queued or running): the
    heartbeat's faster pace."""
    return conn.execute("SELECT 1 FROM tasks WHERE rank < 3 AND session = ? LIMIT 1", (session,)).fetchone() is not None


class Writer:
    """See the module docstring.  ``identity`` has host, pid, started_at and info."""

    def __init__(self, spool: Spool, path: Path, env: str, session: str,
                 identity: dict[str, Any], *, max_age_s: float, max_bytes: int, fsync: bool) -> None:
        self.spool, self.path, self.env, self.session = spool, path, env, session
        self.identity, self.max_age_s, self.max_bytes, self.fsync = identity, max_age_s, max_bytes, fsync
        self.conn: sqlite3.Connection | None = None
        self._db_id: tuple[int, int] | None = None  # the file self.conn writes to
        self._wal_ids: tuple = (None, None)  # its -wal and -shm (faults.wal_ids)
        self.wake = Waker()
        self.ready = threading.Event()
        self.cycles, self._store_by = 0, float("inf")  # commit cycles started; a stop's deadline
        self.db_full = False  # the database's last write failed for lack of space
        self.clean = 0  # the latest cycle that left nothing behind
        self.flush_wanted = 0.0  # time of the latest flush() request (monotonic)
        self._flush_served = 0.0
        self.stopping = False
        self.faults = Faults(path, spool.pending_limit)
        self.lost = 0  # lines that were only in memory when the log closed
        self.cpu = 0.0  # CPU seconds this thread used
        self._dirty_since: float | None = None
        self._last_pos: Any = None
        self._last_change = 0.0  # when the spool last grew (monotonic)
        self._committed_pos: Any = None
        self._behind = False  # the last step's commits stopped at COMMIT_SLICE_S with more to do
        self._next_retention = time.monotonic() + RETENTION_FIRST_S
        self._next_recovery = time.monotonic() + RECOVERY_EVERY_S
        self._next_heartbeat, self._next_busy = time.monotonic() + HEARTBEAT_EVERY_S, 0.0
        self._clock_start = clock_start()
        self.thread = threading.Thread(target=self._run, name=f"qmagic-log-writer-{env}", daemon=True)

    def failed(self, kind: str, exc: BaseException, db_id: tuple[int, int] | None = None) -> None:
        """Note a failure of ``kind`` (see :class:`Faults`).  A damaged database (``db_id``:
        the file found damaged, default the one this writer has open) is moved aside and a
        new one started at once, with one warning: a damaged file never heals, and every
        later kernel would fail on it too."""
        if kind == "database" and damaged(exc):
            conn, self.conn = self.conn, None
            if conn is not None:
                with suppress(sqlite3.Error):
                    conn.close()
            if moved_aside(self.path, db_id or self._db_id, exc):
                return  # (reopened by the next step, at once)
        if kind == "database" and disk_full(exc):
            self.db_full = True
        self.faults.failed(kind, exc)

    # ---- the loop --------------------------------------------------------------------------
    def start(self) -> None:
        """Start the thread."""
        self.thread.start()

    def _run(self) -> None:
        t0 = time.thread_time()
        try:
            self._open_db()
        except BaseException as exc:  # noqa: BLE001 - the thread must live on
            self.failed("database", exc)
        finally:
            self.ready.set()
        while True:
            stopping = self.stopping
            if stopping:
                break
            try:
                self._step()
            except BaseException as exc:  # noqa: BLE001 - never let the thread die
                self.failed("database", exc)
            self.cpu = time.thread_time() - t0
            self.wake.wait(self._timeout())
        try:
            self._finish()
        except BaseException as exc:  # noqa: BLE001
            _log.error("qmagic: closing the experiment log failed: %s", exc)
        self.cpu = time.thread_time() - t0

    def _timeout(self) -> float:
        now = time.monotonic()
        if self.faults.kinds:
            return max(0.005, min(self.faults.retry_at - now, IDLE_POLL_S))
        if self._behind:  # (a slice of commits left a backlog: the next slice at once)
            return 0.0
        return QUIET_S if self._dirty_since is not None or self.flush_wanted > self._flush_served else IDLE_POLL_S

    def _step(self) -> None:
        now = time.monotonic()
        flush = self._take_flush()
        retry = now >= self.faults.retry_at or flush
        if retry or "spool" not in self.faults.kinds:
            try:
                if self.spool.prepare():  # (its files were deleted: store what they hold now)
                    flush = spool_deleted(self.path.parent)
                self.faults.fixed("spool")
            except _ERRORS as exc:
                self.failed("spool", exc)
        if self.conn is None:
            if retry:
                self._open_db()
            return
        if "database" in self.faults.kinds and not retry:
            return
        # After a disk-full, room freed goes to the spool first: while records wait in memory,
        # a transaction that fails for lack of room would grow the WAL into it, and keep it.
        if self.db_full and self.spool.held:
            return
        if flush or self._behind or self._due(now):
            try:  # (a slice at a time: behind a flood, the retention and scan below never ran)
                while not self._commit() and not self.stopping:
                    if time.monotonic() - now >= COMMIT_SLICE_S:
                        self._behind = True  # (the rest in the next step, at once)
                        break
                else:
                    self._behind = self.db_full = False  # (nothing waits: whatever the episode, it is over)
                    self.faults.fixed("database")
            except _ERRORS as exc:
                self.failed("database", exc)
                return
        if now >= self._next_retention:
            wall = time.time()
            deleted = retention(self.conn, age_limit(self.max_age_s, self._clock_start, wall),
                                self.max_bytes, RETENTION_BATCH, now=wall)
            self._next_retention = now + (0.05 if deleted >= RETENTION_BATCH else RETENTION_EVERY_S)
        if now >= self._next_recovery:  # other kernels that died (a few flocks tried); the
            self._next_recovery = now + RECOVERY_EVERY_S  # imported writers at the heartbeat's pace
            recover(self.conn, self.path.parent, self.env, self.session, time.time(),
                    legacy=now >= self._next_heartbeat)
        busy = now >= self._next_busy and _session_busy(self.conn, self.session)  # (then a heartbeat now)
        self._next_busy = now + BUSY_HEARTBEAT_S if now >= self._next_busy else self._next_busy
        if now >= self._next_heartbeat or busy:
            self._next_heartbeat = now + HEARTBEAT_EVERY_S
            with transaction(self.conn):
                upsert_session(self.conn, self.session, last_seen=time.time())

    def _due(self, now: float) -> bool:
        pos = _position(self.spool)
        pending = pos != self._committed_pos or self.spool.held
        if not pending:
            self._dirty_since = None
            self._last_pos = pos
            return False
        if self._dirty_since is None:
            self._dirty_since = now
        if pos != self._last_pos:
            self._last_pos, self._last_change = pos, now
        return now - self._last_change >= QUIET_S or now - self._dirty_since >= MAX_DELAY_S

    # ---- database -------------------------------------------------------------------------------
    def _open_db(self) -> None:
        conn = db_id = None
        try:
            ensure_state_dir(self.path.parent)
            db_id = file_id(self.path)  # (the file a failure is about, if it exists)
            conn = connect(self.path, create=True, fsync=self.fsync)
            db_id = file_id(self.path)
            version = ensure_schema(conn)
            if version > SCHEMA_VERSION:
                raise StateFileError(f"The experiment log {str(self.path)!r} was made by a newer qmagic "
                                     f"(schema {version}); upgrade qmagic to write to it.")
            now = time.time()
            import_legacy(conn, self.path.parent, self.env, now)
            recover(conn, self.path.parent, self.env, self.session, now)
            with transaction(conn):
                upsert_session(conn, self.session, last_seen=now, state="live", **self.identity)
        except BaseException as exc:
            if conn is not None:
                conn.close()
            if isinstance(exc, _ERRORS):
                self.failed("database", exc, db_id)
                return
            raise
        self.conn, self._db_id, self._wal_ids = conn, db_id, wal_ids(self.path)
        if not self.db_full:  # (after a disk-full, the episode ends once what waits is stored)
            self.faults.fixed("database")

    def _same_database(self) -> None:
        """Reopen (a new database, never given the old one's WAL) when the file was deleted or replaced
        since it was opened.  StateFileError: the new one cannot be opened (retried with back-off)."""
        if self.conn is None:
            return
        if file_id(self.path) == self._db_id:
            check_intact(self.path)  # (raises DatabaseDamaged: moved aside, a new one started)
            return
        _log.warning("qmagic: the experiment log %s was deleted or replaced while this kernel ran; a "
                     "new one is started (records stored before that went with the old file).", self.path)
        conn, self.conn = self.conn, None
        forget_old_wal(conn, self.path, self._wal_ids)  # (its records stay in the old file)
        conn.close()
        self._open_db()
        if self.conn is None:
            raise StateFileError(f"Cannot start a new experiment log at {str(self.path)!r}.")

    def _commit(self) -> bool:
        """One transaction of what waits (BATCH_BYTES at most): True if none is left; raises, all kept."""
        self._same_database()
        assert self.conn is not None
        self.cycles += 1
        cycle, pos, now = self.cycles, _position(self.spool), time.time()
        segments = self.spool.close_full()
        batch = _gather(self.spool, segments, self.session, now, BATCH_BYTES)
        rows, late = batch.rows, list(batch.started.items())  # (late: rows stored already)
        if rows or late or batch.reads:
            with transaction(self.conn) as conn:
                write_rows(conn, rows.values())
                write_started(conn, late, self.session)
                upsert_session(conn, self.session, last_seen=now, state="live")
            # Only a write ends a fault (an empty cycle proves nothing); after a disk-full,
            # only once nothing waits (one episode, one warning, however many commits).
            if batch.complete or not self.db_full:
                self.db_full = False
                self.faults.fixed("database")
        for _ in range(batch.held):  # only this thread removes from the left
            self.spool.held.popleft()
        cuts = [seg.advance(begin, n, lines) for seg, begin, n, lines in batch.reads]
        batch.complete = batch.complete and not any(cuts)  # (a cut: read the file again)
        for seg in segments:
            if seg is not self.spool.current and seg.fd >= 0 and seg.at_end():
                self.spool.retire(seg)
        if batch.bad:
            warn_once("spool-lines", f"qmagic experiment log: skipped {len(batch.bad)} damaged spool line(s).")
        if batch.complete:
            self._committed_pos, self._dirty_since = pos, None
            self.clean = cycle
        return batch.complete

    # ---- flush and close ----------------------------------------------------------------------
    def _take_flush(self) -> bool:
        """True (once per request) when flush() asked for a commit."""
        requested, served = self.flush_wanted, self._flush_served
        self._flush_served = max(requested, served)
        return requested > served

    def flush(self, timeout: float, stop_at_fault: bool = False) -> bool:
        """Wait until everything written before this call is in SQLite (or ``timeout``; or,
        with ``stop_at_fault``, a fault: it would only wait out the timeout).  (Polls: no
        Condition whose lock an interrupt could leave held.)"""
        if not self.thread.is_alive():
            return not (self.spool.held or self.spool.segments)
        target = self.cycles + 1
        self.flush_wanted = time.monotonic()
        self.wake.set()
        deadline, delay = time.monotonic() + timeout, 0.0005
        while self.clean < target:
            if (time.monotonic() >= deadline or not self.thread.is_alive()
                    or (stop_at_fault and self.faults.kinds)):
                return self.clean >= target
            time.sleep(delay)
            delay = min(delay * 2, 0.01)
            if self._flush_served < self.flush_wanted:
                self.wake.set()
        return True

    def stop(self, timeout: float | None = None) -> None:
        """Finish (store what is left, close the session), end the thread: within ``timeout`` s."""
        wait = 60.0 if timeout is None else timeout
        self._store_by, self.stopping = time.monotonic() + max(0.0, wait - FINISH_MARGIN_S), True
        self.wake.set()
        if self.thread.is_alive() and (self.thread.join(wait) or self.thread.is_alive()):
            _log.error(_NOT_CLOSED)

    def _finish(self) -> None:
        """Last commits (retried for CLOSE_TIMEOUT_S during a fault), then: everything stored
        -> unfinished tasks of this session marked as failed, the session closed, its files
        deleted; else the spool stays for the next process that opens the log."""
        deadline = min(time.monotonic() + CLOSE_TIMEOUT_S, self._store_by)
        drained = False
        while True:
            try:
                if self.conn is None:
                    self._open_db()
                if self.conn is not None:  # (another kernel's write lock: waited for until the deadline)
                    self.conn.execute(f"PRAGMA busy_timeout = {max(1, int((deadline - time.monotonic()) * 1000))}")
                    while not self._commit():
                        pass
                    drained = not self.spool.held
                    if drained:
                        with transaction(self.conn) as conn:
                            mark_orphans(conn, self.session, time.time())
                            upsert_session(conn, self.session, last_seen=time.time(), state="closed")
                        break
            except _ERRORS as exc:
                self.failed("database", exc)
            if time.monotonic() >= deadline:
                break
            time.sleep(min(max(self.faults.retry_at - time.monotonic(), 0.05), max(0.0, deadline - time.monotonic())))
        files = self.spool.files
        self.lost = len(self.spool.held)
        self.spool.close()
        if drained:
            files.remove_segments()
        elif files.lock_fd is not None:
            _log.warning("qmagic: the experiment log could not store everything before closing (%s); the "
                         "next kernel that opens it will.", self.faults.last_error)
        if self.lost:
            _log.error("qmagic: %d task records that could not be written anywhere are lost (%s).",
                       self.lost, self.faults.last_error)
        files.unlock(remove=drained)
        if self.conn is not None:
            self.conn.close()
            self.conn = None
