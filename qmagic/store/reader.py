"""Queries of the experiment log: task records by uid, uid prefix, status list or filters.

:class:`LogReader` answers from the SQLite database alone (indexed queries; rows that do not
validate are skipped with one warning); :class:`~qmagic.store.journal.Journal` adds what its
own session has not committed yet (merged by :func:`qmagic.store.pending.merge_state`).

This module does not import IPython, ipykernel, ipywidgets or zmq.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import orjson

from ..errors import StateFileError
from ..history_text import PAGE_ROWS
from .database import connect, file_id, select_rows, uid_bounds
from .faults import damaged, forget_old_wal, wal_ids
from .filters import FILTER_NAMES, WILDCARDS, Filters, sort_time
from .records import RANKS, record_from_row, warn_once

__all__ = ["FILTER_NAMES", "WILDCARDS", "Filters", "LogReader", "sort_time"]  # (the filters: re-exported)


def _lenient_text(value: bytes) -> str:  # (a TEXT value as str, invalid UTF-8 replaced: U+FFFD)
    return value.decode("utf-8", "replace")


def _meta_text(value: Any) -> str | None:
    """A session's host or a task's session column as str or None, whatever the row holds
    (a BLOB written by another tool must not break a view, e.g. ``--json``)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return _lenient_text(value)
    return str(value) if isinstance(value, (int, float)) else None


def _meta_pid(value: Any) -> int | None:
    """A session's pid as int or None, whatever the row holds."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


# ---- the database -----------------------------------------------------------------------------------
class LogReader:
    """Read access to one environment's database (thread-safe; one connection, opened on
    first use).  Missing database: no records.  Unreadable: StateFileError."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._conn_id: tuple[int, int] | None = None  # the file self._conn reads
        self._wal_ids: tuple = (None, None)  # its -wal and -shm (database.wal_ids)
        self._lock = threading.Lock()
        self._closed = False

    def close(self) -> None:
        """Close the connection; each later query opens one of its own and closes it as it
        ends (a closed log, still read, holds no file open: no descriptor, and no reader that
        holds back the checkpoints of other kernels writing the database)."""
        with self._lock:
            self._closed = True
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _query(self, fn: Any) -> Any:
        with self._lock:
            try:
                return self._query_open(fn)
            finally:
                if self._closed and self._conn is not None:
                    conn, self._conn = self._conn, None
                    conn.close()

    def _query_open(self, fn: Any) -> Any:
        """:meth:`_query` with the lock held."""
        try:
            now = file_id(self.path)
            if self._conn is not None and now != self._conn_id:  # deleted or replaced
                forget_old_wal(self._conn, self.path, self._wal_ids)  # (never read with the new one)
                self._conn.close()
                self._conn = None
            if self._conn is None:
                try:
                    self._conn = connect(self.path, readonly=True)
                except FileNotFoundError:
                    return fn(None)
                self._conn_id, self._wal_ids = now, wal_ids(self.path)
            try:
                return fn(self._conn)
            except sqlite3.OperationalError as exc:
                if "decode" not in str(exc) or self._conn.text_factory is _lenient_text:
                    raise
            except BaseException:  # (an interrupt: a cursor its traceback holds pins a snapshot)
                self._conn, conn = None, self._conn  # (the next query reads a new one)
                conn.close()
                raise
            # Text that is not UTF-8 (a row edited by hand, another tool): read it with
            # replacement characters from now on; such a row then fails to validate and
            # is skipped with a warning, the others are shown.
            self._conn.text_factory = _lenient_text
            return fn(self._conn)
        except sqlite3.Error as exc:
            if "no such table" in str(exc):
                return fn(None)  # a new database whose tables are being created
            if damaged(exc):
                raise StateFileError(
                    f"The experiment log {str(self.path)!r} is damaged ({exc}). The next kernel "
                    "that writes to it moves it aside (its records stay in that file) and "
                    "starts a new one.") from exc
            raise StateFileError(f"Cannot read the experiment log {str(self.path)!r} ({exc}). "
                                 "Check the file and the folder (QMagic.state_dir).") from exc

    @staticmethod
    def _records(rows: sqlite3.Cursor, limit: int | None = None, keys: list | None = None) -> list[dict[str, Any]]:
        """The records of ``rows``; ``keys`` gets each row's (sort_time, id), valid or not."""
        out: list[dict[str, Any]] = []
        infos: dict[Any, Any] = {}
        with closing(rows):  # (an interrupt left the cursor in its traceback: a stale snapshot)
            for uid, status, started, finished, orphaned, record, session, host, pid, info, *key in rows:
                if limit is not None and len(out) >= limit:
                    break  # (checked before a record is added: limit=0 gives none)
                if keys is not None:
                    keys.append(key)
                session, host, pid = _meta_text(session), _meta_text(host), _meta_pid(pid)
                if session not in infos:
                    try:
                        infos[session] = orjson.loads(info) if info is not None else None
                    except orjson.JSONDecodeError:
                        infos[session] = None
                meta = {"session": session, "host": host, "pid": pid, "orphaned": bool(orphaned),
                        "pending": False, "info": dict(infos[session]) if isinstance(infos[session], dict) else None}
                rec = record_from_row(uid, status, started, finished, orphaned, record, meta)
                if rec is not None:
                    out.append(rec)
        return out

    def states(self, uids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Raw states (as :func:`merge_state` uses them) and journal entries of ``uids``."""
        def run(conn: sqlite3.Connection | None) -> dict[str, dict[str, Any]]:
            if conn is None or not uids:
                return {}
            rows = conn.execute(
                "SELECT t.uid, t.rank, t.status, t.started_at, t.finished_at, t.orphaned, t.record, "
                "t.session, s.host, s.pid, t.submitted_at FROM tasks AS t LEFT JOIN sessions AS s ON s.session = t.session "
                "WHERE t.uid IN (SELECT value FROM json_each(?))", (orjson.dumps(list(uids)).decode(),))
            with closing(rows):
                return {r[0]: {"uid": r[0], "rank": r[1] if r[1] in (1, 2, 3) else 0, "status": r[2],
                               "started_at": r[3], "finished_at": r[4], "orphaned": r[5], "record": r[6],
                               "session": _meta_text(r[7]), "host": _meta_text(r[8]), "pid": _meta_pid(r[9]),
                               "submitted_at": r[10]}
                        for r in rows}
        return self._query(run)

    def last_seen(self, session: str) -> float | None:
        """When the writer ``session`` was last seen (its heartbeat), or None."""
        def run(conn: sqlite3.Connection | None) -> float | None:
            row = None if conn is None else conn.execute(
                "SELECT last_seen FROM sessions WHERE session = ?", (session,)).fetchone()
            return row[0] if row and isinstance(row[0], (int, float)) else None
        return self._query(run)

    def get(self, uid: str) -> dict[str, Any] | None:
        """The record of task ``uid`` (exact), or None."""
        if not isinstance(uid, str):
            return None
        found = self._query(lambda c: [] if c is None else self._records(
            select_rows(c, "WHERE t.uid = ? AND t.record IS NOT NULL", (uid,))))
        return found[0] if found else None

    def find_prefix(self, prefix: str, limit: int = 2) -> list[dict[str, Any]]:
        """Up to ``limit`` records whose uid starts with ``prefix`` (an index range)."""
        low, high = uid_bounds(prefix)
        return self._query(lambda c: [] if c is None else self._records(
            select_rows(c, "WHERE t.uid >= ? AND t.uid < ? AND t.record IS NOT NULL",
                        (low, high, int(limit) + 5), "ORDER BY t.uid LIMIT ?"), limit))

    def holds_tasks(self) -> bool:
        """Whether the database holds any task record (one row read, not a query of them all)."""
        return self._query(lambda c: c is not None and c.execute(
            "SELECT EXISTS (SELECT 1 FROM tasks WHERE record IS NOT NULL)").fetchone()[0] == 1)

    def statuses(self, uids: Sequence[str]) -> dict[str, str | None]:
        """Status of each uid (None: unknown), in one indexed query."""
        wanted = [u for u in dict.fromkeys(uids) if isinstance(u, str)]

        def run(conn: sqlite3.Connection | None) -> dict[str, str | None]:
            found: dict[str, str | None] = {}
            if conn is None or not wanted:
                return found
            rows = conn.execute("SELECT uid, status, orphaned FROM tasks WHERE uid IN "
                                "(SELECT value FROM json_each(?))", (orjson.dumps(wanted).decode(),))
            with closing(rows):
                for uid, status, orphaned in rows:
                    if status not in RANKS:
                        warn_once("row-status", f"qmagic experiment log: task {uid!r} has the status "
                                  f"{str(status)[:40]!r}, which is not a task status; it is reported as "
                                  "unknown (further such records silently).", stacklevel=5)
                        continue
                    found[uid] = "failed" if orphaned else status
            return found
        return self._query(run)

    def records(self, filters: Filters, exclude: Iterable[str] = ()) -> list[dict[str, Any]]:
        """Records matching ``filters``, newest first (at most ``filters.limit``); uids in
        ``exclude`` are left out."""
        where, params = _where(filters, exclude)
        return self._query(lambda c: [] if c is None else self._records(
            select_rows(c, where, params, "ORDER BY t.sort_time DESC, t.id DESC"), filters.limit))

    def pages(self, filters: Filters, exclude: Iterable[str] = (), size: int = 2000) -> Iterator[list[dict[str, Any]]]:
        """Records matching ``filters`` (all: not its limit), oldest first, a page per query
        of ``size`` rows (the first of PAGE_ROWS: shown at once), each after the last row of
        the one before (an index range; no cursor held between pages): a log of any length
        in bounded memory (``qmagic-history``).  Uids in ``exclude`` are left out."""
        where, params = _where(filters, exclude)
        after, rows = None, PAGE_ROWS
        while True:
            keys: list[list[Any]] = []
            page_where = where if after is None else where + " AND (t.sort_time, t.id) > (?, ?)"
            page_params = [*params, *(after or ()), rows]
            page = self._query(lambda c: [] if c is None else self._records(select_rows(
                c, page_where, page_params, "ORDER BY t.sort_time, t.id LIMIT ?"), keys=keys))
            if page:
                yield page
            if len(keys) < rows:
                return
            after, rows = keys[-1], size


def _where(filters: Filters, exclude: Iterable[str]) -> tuple[str, list[Any]]:
    """The WHERE clause and parameters of ``filters``, uids in ``exclude`` left out."""
    where, params = filters.sql()
    skip = list(exclude)
    if skip:
        where += " AND t.uid NOT IN (SELECT value FROM json_each(?))"
        params.append(orjson.dumps(skip).decode())
    return where, params
