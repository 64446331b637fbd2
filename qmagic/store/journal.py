"""The experiment log: every task's record, kept in SQLite, written without slowing tasks.

Design (issue 13).  ``submitted()`` and ``finished()`` must return only once the record
survives a SIGKILL of the process, yet a SQLite commit costs ~19 µs here against ~12 µs
for a whole no-op task.  So each call appends ONE line of JSON to this session's *spool*
(:mod:`qmagic.store.spool`) and returns; a writer thread (:mod:`qmagic.store.writer`)
moves the spool into SQLite later in large transactions, folding each task's lines into
one row, and deletes what is stored.  A spool left by a kernel that died is replayed by
the next process that opens the log (:mod:`qmagic.store.recovery`); its unfinished tasks
become failed with :data:`ORPHAN_REASON`.

How a line is appended — measured on this machine (2 vCPUs, CPU per line of ~450 bytes):

===============================================  =========  ==============================
``os.write`` on an O_APPEND descriptor            1.0 µs     releases the GIL: ~25 % of a
                                                             32-thread burst lost to GIL
                                                             convoys
``ctypes.PyDLL(None).write`` (keeps the GIL)      1.4 µs     **chosen**: ~10 % lost
``mmap.write`` into a MAP_SHARED segment          0.08 µs    refused: another process that
(zero-filled beforehand)                                     truncates the file kills the
                                                             kernel with SIGBUS
===============================================  =========  ==============================

The calling thread pays for encoding the record (~0.6 µs for a small record,
:class:`~qmagic.store.records.RecordEncoder`) and the write.  SIGKILL cannot lose a line
that was written (the page cache belongs to the kernel, not the process); a power cut can
(``fsync=True`` adds an ``fsync`` per call).  ``started()`` spools a short line too.

Group commit keeps the writer out of the way of bursts: it commits when the spool has been
quiet for 20 ms, or 2 s after the first uncommitted event, at most 2 MB per transaction.
Storing costs 8–25 µs of CPU per task (an indexed upsert per task; the random uuid index
dominates), and on this 2-vCPU machine a second thread's CPU is taken from the first, so
folding a task's lines into one row and committing after a burst matter most.

**Reads in the same process see pending records.**  :meth:`Journal.get`, ``find``,
``statuses`` and ``records`` merge what this session has not committed yet (the spool
after the committed offset, lines waiting in memory) over the database, with the
database's merge rule: a record is visible from the moment ``submitted()`` returns, so the
engine may forget a task as soon as ``finished()`` returned.

**Faults** never slow the calls (see :mod:`qmagic.store.writer`): during a fault lines
wait in the spool or, if even the spool cannot be written, in memory (at most
``pending_limit`` lines; beyond that they are dropped and counted).  :meth:`Journal.health`
shows it.  A forked child cannot use its parent's Journal (calls are dropped).

This module does not import IPython, ipykernel, ipywidgets or zmq.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import orjson

from ..core.registry import MIN_UID_PREFIX, uid_spellings
from ..errors import StateFileError
from .database import database_path, rows_from_lines
from .files import ensure_state_dir
from .paths import validate_environment_name
from .pending import PendingFold, merged_states, newest, state_record
from .reader import Filters, LogReader, sort_time
from .records import ORPHAN_QUEUED_REASON, ORPHAN_REASON, SUMMARY_KEY, RecordEncoder
from .spool import SessionFiles, Spool
from .waiting import SEARCHED, waiting_records
from .writer import Writer

__all__ = ["ORPHAN_REASON", "ORPHAN_QUEUED_REASON", "SUMMARY_KEY", "Journal"]

_READY_WAIT_S = 10.0  # reads wait this long for the first open (recovery of dead kernels)
_OPEN: weakref.WeakSet[Journal] = weakref.WeakSet()
_FORK_LEFTOVERS: list[Any] = []  # objects a forked child must neither use nor close


def _after_fork_in_child() -> None:
    for journal in list(_OPEN):
        journal._forked()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _shutdown(spool: Spool, writer: Writer, reader: LogReader, timeout: float | None = None) -> None:
    """Close a Journal's spool for callers, let the writer store what is left (returning
    within ``timeout``: see :meth:`Journal.close`), close all."""
    with spool.lock:
        spool.closed = True
        spool.out = None
        if spool.current is not None:
            spool.current.stop_writing()
    writer.stop(timeout)
    writer.wake.close()
    reader.close()


class Journal:
    """The experiment log of one environment, written by one session of this process.

    ``state_dir``: the state folder; the database is ``<environment>.journal.sqlite3``.
    ``max_age_s``/``max_bytes``: retention (ended tasks older than this, or the oldest
    while the database is larger); ``summary_chars``: ``repr`` length kept of values JSON
    cannot hold; ``fsync``: survive power loss too (an fsync per call, synchronous commits);
    ``pending_limit``: records kept in memory at most while the spool cannot be written;
    ``session_info``: stored once with the session (qmagic and Python versions ...);
    ``run_value_code(fn)``: runs ``fn`` (a value's repr, for a value JSON cannot hold) and
    returns its result -- the worker's has a deadline (default: ``fn()`` here).

    Thread-safe.  Never raises for I/O trouble (see :meth:`health`); raises ValueError for
    a record that is not a task record.  Use as a context manager or call :meth:`close`.
    """

    def __init__(self, state_dir: str | os.PathLike[str], environment_name: str = "default", *,
                 max_age_s: float = 30 * 86400.0, max_bytes: int = 200_000_000,
                 summary_chars: int = 2000, fsync: bool = False, pending_limit: int = 100_000,
                 session_info: dict | None = None,
                 run_value_code: Callable[[Callable[[], Any]], Any] | None = None) -> None:
        self.environment_name = validate_environment_name(environment_name)
        for label, value in (("max_age_s", max_age_s), ("max_bytes", max_bytes),
                             ("pending_limit", pending_limit)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"The experiment log's {label} must be a positive number (got {value!r}).")
        self.state_dir = Path(state_dir).expanduser().absolute()  # (a later chdir must not move the log)
        #: The SQLite database.
        self.path = database_path(self.state_dir, self.environment_name)
        #: Id of this writer session.
        self.session = uuid.uuid4().hex
        self.fsync = bool(fsync)
        self._encoder = RecordEncoder(summary_chars, run_value_code=run_value_code)
        info = self._encoder.value(dict(session_info or {}))
        identity = {"host": socket.gethostname(), "pid": os.getpid(), "started_at": time.time(),
                    "info": info if isinstance(info, dict) else {}}
        self._meta = {"session": self.session, "host": identity["host"], "pid": identity["pid"],
                      "orphaned": False, "pending": True, "info": identity["info"]}
        header = orjson.dumps({"spool": 1, "session": self.session, **identity},
                              option=orjson.OPT_APPEND_NEWLINE)
        files = SessionFiles(self.state_dir, self.environment_name, self.session, header, fsync=self.fsync)
        self._spool = Spool(files, int(pending_limit))
        self._fold = PendingFold(self.session)  # (records(): what waits, folded once)
        self._reader = LogReader(self.path)
        self._writer = Writer(self._spool, self.path, self.environment_name, self.session,
                              identity, max_age_s=float(max_age_s), max_bytes=int(max_bytes), fsync=self.fsync)
        self._spool.wake = self._writer.wake
        self._closed = False
        try:
            ensure_state_dir(self.state_dir)
            self._spool.open()
        except (OSError, StateFileError) as exc:
            self._writer.failed("spool", exc)
        self._writer.start()
        _OPEN.add(self)
        # a Journal that is dropped, or still open when Python exits, closes like close()
        self._finalizer = weakref.finalize(self, _shutdown, self._spool, self._writer, self._reader)

    def __repr__(self) -> str:
        return f"Journal({str(self.state_dir)!r}, {self.environment_name!r})"

    def __enter__(self) -> Journal:  # noqa: PYI034 - Python 3.10 has no typing.Self
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the task path -------------------------------------------------------------------------
    def submitted(self, record: dict) -> None:
        """Log a task's record when it is submitted (any status).  Returns once the record
        survives a SIGKILL of the process (not during a fault: see :meth:`health`).
        Calling it again with the same record changes nothing."""
        self._append(self._encoder.encode(record))
        if self.fsync:
            self._sync()

    def _append(self, line: bytes) -> None:
        """One ``write(2)`` into the spool; the slow path when the segment is full or closed,
        or during a fault (no segment: an AttributeError a line cost 2.6 µs there)."""
        out = self._spool.out
        if out is None:
            self._spool.put_slow(line)
            return
        try:
            out.write(line)
        except Exception:  # noqa: BLE001 - full, closed, refused: the slow path sorts it out
            self._spool.put_slow(line)

    def started(self, uid: str, started_at: float) -> None:
        """Note that task ``uid`` started: a short line in the spool (~0.3 µs)."""
        if uid.__class__ is not str:
            raise ValueError(f"A task uid must be a string (got {type(uid).__name__}).")
        try:
            line = orjson.dumps([2, uid, started_at], option=orjson.OPT_APPEND_NEWLINE)
        except TypeError:  # not a number: now
            line = orjson.dumps([2, uid, time.time()], option=orjson.OPT_APPEND_NEWLINE)
        self._append(line)

    def finished(self, record: dict) -> None:
        """Log a task's final record (status completed, failed or cancelled).  Returns once
        it survives a SIGKILL; calling it again with the same record changes nothing."""
        self._append(self._encoder.encode(record, final=True))
        if self.fsync:
            self._sync()

    def _sync(self) -> None:
        out = self._spool.out
        if out is not None:
            try:
                out.flush()
            except (ValueError, OSError):
                pass

    # ---- reading -------------------------------------------------------------------------------
    def _pending(self, needle: str | None = None, wanted: Sequence[str] | None = None
                 ) -> dict[str, list[tuple]]:
        """Events of this session not in SQLite yet, per uid (only uids containing
        ``needle``, or only the uids in ``wanted``, if given: then only their lines are
        read, through the spool's index)."""
        if self._closed:
            return {}
        if needle is None and wanted is None:
            chunks = self._spool.uncommitted()
        elif wanted is None:
            chunks = self._spool.lines_of(needle=str(needle).encode("utf-8", "backslashreplace"))
        else:
            chunks = self._spool.lines_of({u.encode("utf-8", "backslashreplace") for u in wanted
                                           if isinstance(u, str)})
        if needle is None and wanted is None:  # (all of them: the fold kept during a fault, extended)
            rows, started = self._fold.fold(chunks, keep=bool(self._writer.faults.kinds))
        else:
            rows, started = {}, {}
            for data in chunks:
                rows_from_lines(data, self.session, time.time(), rows, [], started)
        out = {uid: [row] for uid, row in rows.items()}  # (the index chose the uids already)
        for uid, t in started.items():
            out.setdefault(uid, []).append((uid, t))
        return out

    def _merged(self, pending: dict[str, list[tuple]]) -> dict[str, dict[str, Any]]:
        """Records (or None) of pending uids, merged over their rows in the database."""
        states = merged_states(self._reader, pending)
        return {uid: self._record(state) for uid, state in states.items()}

    def _record(self, found: tuple[dict | None, dict | None]) -> dict[str, Any] | None:
        """The record of a merged state of :func:`~qmagic.store.pending.merged_states` (None: none yet)."""
        state, base = found
        if state is None:
            return None
        own = state.get("session") in (None, self.session)
        meta = dict(self._meta, info=dict(self._meta["info"])) if own or base is None else {
            "session": base.get("session"), "host": base.get("host"), "pid": base.get("pid"),
            "orphaned": bool(state.get("orphaned")), "pending": False, "info": None}
        return state_record(state, meta)

    def _waiting(self, uids: Sequence[str] = (), prefix: str | None = None) -> dict[str, dict[str, Any]]:
        """Records that other sessions' spools hold and the database lacks (a lookup that
        missed: a killed kernel's, while another process holds the database; see
        :mod:`qmagic.store.waiting`).  Running kernels' spools too for a few uids, or
        during a fault of this log (another process holding the database, say); for many
        uids else only those of kernels that are gone (a running kernel stores its own
        within seconds): a lookup of 20,000 unknown uids stays quick."""
        live = prefix is not None or len(uids) <= SEARCHED or bool(self._writer.faults.kinds)
        return waiting_records(self._reader, self.state_dir, self.environment_name, self.session, uids, prefix,
                               live=live)

    def _wait_ready(self) -> None:
        self._writer.ready.wait(_READY_WAIT_S)

    def get(self, uid: str) -> dict[str, Any] | None:
        """The record of task ``uid`` (exact uid), or None.  Raises StateFileError if the
        database cannot be read."""
        if not isinstance(uid, str) or not uid:
            return None
        self._wait_ready()
        pending = self._pending(wanted=[uid])
        if uid in pending:
            return self._merged({uid: pending[uid]})[uid]
        # (a miss: another session's spool may hold it; else read again: stored meanwhile?)
        return self._reader.get(uid) or self._waiting([uid]).get(uid) or self._reader.get(uid)

    def find(self, uid_or_prefix: str) -> dict[str, Any] | None:
        """The record of the task with this uid, or with this uid prefix (at least
        ``MIN_UID_PREFIX`` characters) if exactly one task has it; else None."""
        return self.match(uid_or_prefix)[0]

    def match(self, uid_or_prefix: str) -> tuple[dict[str, Any] | None, bool]:
        """``(record, several)``: :meth:`find`'s record, and whether two or more tasks of the
        log have a uid starting with ``uid_or_prefix`` (then the record is None) — one
        search answers both."""
        spellings = uid_spellings(uid_or_prefix) if isinstance(uid_or_prefix, str) else ()
        found = next(filter(None, map(self.get, spellings)), None)  # (exact first, in any spelling)
        if found is not None or not spellings or len(uid_or_prefix) < MIN_UID_PREFIX:
            return found, False
        uids = next(filter(None, map(self._prefix_uids, spellings)), set())  # (then prefixes)
        return (self.get(uids.pop()) if len(uids) == 1 else None), len(uids) > 1

    def _prefix_uids(self, prefix: str) -> set[str]:
        # (what is pending first: a batch the writer stores meanwhile is then in the database)
        uids = {u for u in self._pending(prefix) if u.startswith(prefix)}
        uids |= {r["uid"] for r in self._reader.find_prefix(prefix, 2)}
        return uids or set(self._waiting(prefix=prefix))

    def statuses(self, uids: Sequence[str]) -> dict[str, str | None]:
        """``{uid: status or None}`` for every uid asked (one indexed query)."""
        self._wait_ready()
        wanted = [u for u in uids if isinstance(u, str)]
        # (pending first, as in find(): read after the database, a batch stored between the
        # two was in neither)
        pending = self._pending(wanted=wanted)
        found = self._reader.statuses(wanted)
        if pending:
            mine = {u: pending[u] for u in wanted if u in pending}
            for uid, rec in self._merged(mine).items():
                if rec is not None:
                    found[uid] = rec["status"]
        missing = [u for u in wanted if found.get(u) is None]
        if missing:  # (as in get(): other sessions' spools, then the database again)
            found.update({u: rec["status"] for u, rec in self._waiting(missing).items()})
            found.update(self._reader.statuses([u for u in missing if found.get(u) is None]))
        return {u: found.get(u) if isinstance(u, str) else None for u in uids}

    def records(self, **filters: Any) -> list[dict[str, Any]]:
        """Task records, newest first.  ``status``: one or several; ``user``: exact;
        ``name``: exact or a pattern (``"scan_*"``); ``notebook``: a path, a file name or a
        pattern (in patterns ``*`` and ``?`` are wildcards, brackets are literal:
        :data:`~qmagic.store.reader.WILDCARDS`); ``uid``: a uid prefix; ``since``/``until``: anything
        :func:`~qmagic.store.times.parse_time` reads — a task matches if it was active at
        some time in [since, until]; ``limit``: at most this many (the newest).  Any other
        filter, or one of a wrong type, raises a one-line ValueError (:class:`Filters`)."""
        chosen = Filters(**filters)
        self._wait_ready()
        pending = self._pending()
        if not pending:
            return self._reader.records(chosen)
        out = self._reader.records(chosen, exclude=pending) + newest(merged_states(self._reader, pending), self._record, chosen,
                                                                     time.time())
        out.sort(key=sort_time, reverse=True)
        return out if chosen.limit is None else out[: chosen.limit]

    # ---- state ---------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        """``{"ok", "pending", "in_memory", "dropped", "last_error", "path"}``: ok is False
        during a fault; pending counts events (about 3 per task) not in SQLite yet, in_memory
        those of them only in memory (a fault: a SIGKILL would lose them; the others are in
        the spool); dropped those lost (memory queue full, or only in memory when the log
        closed)."""
        w = self._writer
        return {"ok": not w.faults.kinds, "pending": self._spool.unstored_lines(), "in_memory": len(self._spool.held),
                "dropped": self._spool.dropped_count() + w.lost, "last_error": w.faults.last_error,
                "path": str(self.path)}

    def flush(self, timeout: float = 5.0, *, stop_at_fault: bool = False) -> bool:
        """Wait until everything logged before this call is in SQLite; False on timeout
        (a fault: see :meth:`health`), or at once during a fault with ``stop_at_fault``."""
        if self._closed:
            return not self._spool.held
        return self._writer.flush(timeout, stop_at_fault)

    def close(self, timeout: float | None = None) -> None:
        """Store what is pending (waiting up to 5 s during a fault, or returning within
        ``timeout`` seconds; what is still spooled then is stored by the next process that
        opens the log), mark this session's unfinished tasks as failed
        (:data:`ORPHAN_REASON`), stop the writer thread and close every file.  Later calls
        are dropped (counted in health()["dropped"])."""
        if self._closed:
            return
        self._closed = True
        _OPEN.discard(self)
        self._fold.clear()
        found = self._finalizer.detach()  # (None: it ran already)
        if found is not None:
            _shutdown(*found[2], timeout)

    def _forked(self) -> None:
        """In a forked child (other threads' locks may be held forever there): this session
        belongs to the parent.  Forget it without locks and without touching its files;
        reads open their own connection; calls are dropped."""
        self._closed = True
        spool = self._spool
        spool.lock, spool.read_lock = threading.Lock(), threading.Lock()
        spool.closed, spool.out = True, None
        for seg in [*spool.segments, spool.spare]:
            if seg is not None:
                seg.close()  # (our copy of the descriptor only)
        spool.segments, spool.spare, spool.current = [], None, None
        fd, spool.files.lock_fd = spool.files.lock_fd, None
        if fd is not None:  # the flock belongs to the open file description, shared with the
            with contextlib.suppress(OSError):  # parent: our copy open would keep the session
                os.close(fd)  # "alive" after the parent dies (closing it keeps the parent's lock)
        _FORK_LEFTOVERS.extend([self._reader, self._writer.conn])  # never closed by the child
        self._reader = LogReader(self.path)
        self._writer.stopping = True
        wake = self._writer.wake  # (its lock may be held by a thread of the parent: none here)
        wake._lock = threading.Lock()
        fds, wake._r, wake._w = (wake._r, wake._w), -1, -1
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._finalizer.detach()
