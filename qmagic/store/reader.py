"""Queries of the experiment log: task records by uid, uid prefix, status list or filters.

:class:`LogReader` answers from the SQLite database alone (indexed queries; rows that do not
validate are skipped with one warning); :class:`~qmagic.store.journal.Journal` adds what its
own session has not committed yet (merged by :func:`qmagic.store.pending.merge_state`).

This module does not import IPython, ipykernel, ipywidgets or zmq.
"""

from __future__ import annotations

import fnmatch
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import orjson

from ..errors import StateFileError, one_line
from ..texts import notebook_file_name, safe_repr
from .database import connect, file_id, select_rows, uid_bounds
from .faults import damaged
from .records import (
    FINAL_STATUSES,
    RANKS,
    clean_name,
    record_from_row,
    warn_once,
)
from .times import parse_time

__all__ = ["FILTER_NAMES", "WILDCARDS", "Filters", "LogReader"]

#: The wildcards of the ``name`` and ``notebook`` filters: ``*`` matches any run of
#: characters, ``?`` one character; every other character matches itself, brackets
#: included (a notebook named ``scan[2].ipynb``).  A filter without them is an exact match.
WILDCARDS = frozenset("*?")


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


#: Longest text filter, in characters (a notebook path; SQLite refuses GLOB patterns over
#: 50,000 bytes, and a bracket takes 3 once escaped).
FILTER_CHARS = 4096


def _check_text(key: str, value: Any) -> None:
    """A text filter must be a str SQLite can store and match like Python: UTF-8 (no lone
    surrogates), no NUL (GLOB stops there: it matched everything), at most FILTER_CHARS;
    else a one-line ValueError that says so."""
    if value is None:
        return
    if isinstance(value, str) and len(value) <= FILTER_CHARS and "\0" not in value:
        try:
            value.encode("utf-8")
            return
        except UnicodeEncodeError:
            pass
    raise ValueError(f"The {key} filter must be text: up to {FILTER_CHARS:,} characters, no NUL or "
                     f"lone surrogates (got {safe_repr(value, 40)}).")


#: The filters every history door takes (:class:`Filters`).
FILTER_NAMES = ("status", "user", "name", "notebook", "since", "until", "uid", "limit")


def _statuses(status: Any) -> set[str] | None:
    """The ``status`` filter as a set of str: one status, or several (a list, tuple, set
    or other iterable of str); else a one-line ValueError."""
    if status is None:
        return None
    if isinstance(status, str):
        return {status}
    try:
        found = set(status) if not isinstance(status, (bytes, bytearray)) else None
    except TypeError:  # (not iterable, or unhashable items)
        found = None
    if found is not None and all(isinstance(s, str) for s in found):
        return found
    raise ValueError(f"The status filter must be a status or a list of them, such as \"failed\" or "
                     f"[\"failed\", \"cancelled\"] (got {safe_repr(status, 40)}).")


class Filters:
    """The filters of :meth:`LogReader.records`, checked and turned into SQL (a bad one
    raises a one-line ValueError before anything is read), and matched in Python for
    records not in the database yet.  Every door (``Journal.records``, ``Worker.history``,
    ``qmagic.history``, ``qmagic.timeline``, ``qmagic-history``) reads ``name`` and
    ``notebook`` here, by one rule: :data:`WILDCARDS`."""

    def __init__(self, *, status: str | Iterable[str] | None = None, user: str | None = None,
                 name: str | None = None, notebook: str | None = None, since: Any = None,
                 until: Any = None, uid: str | None = None, limit: int | None = None,
                 **unknown: Any) -> None:
        try:
            self._take(status, user, name, notebook, since, until, uid, limit, unknown)
        except ValueError as exc:  # (its own line in a cell, no frames of the log's code)
            raise one_line(exc) from None

    def _take(self, status: Any, user: Any, name: Any, notebook: Any, since: Any, until: Any,
              uid: Any, limit: Any, unknown: dict[str, Any]) -> None:
        if unknown:
            raise ValueError(f"Unknown history filter {', '.join(map(repr, sorted(unknown)))}: use "
                             f"{', '.join(FILTER_NAMES[:-1])} or {FILTER_NAMES[-1]}.")
        self.statuses = _statuses(status)
        if self.statuses is not None and not self.statuses <= set(RANKS):
            bad = sorted(clean_name(s, 40) for s in self.statuses - set(RANKS))
            raise ValueError(f"Unknown task status {', '.join(bad)}: use queued, running, completed, "
                             "failed or cancelled.")
        for key, value in (("user", user), ("name", name), ("notebook", notebook), ("uid", uid)):
            _check_text(key, value)
        self.user, self.name, self.notebook, self.uid = user, name, notebook, uid
        self.since, self.until = parse_time(since), parse_time(until)
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool)):
            raise ValueError(f"limit must be a whole number (got {limit!r}).")
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be 0 or more: the number of newest tasks to keep (got {limit}).")
        self.limit = limit

    def sql(self) -> tuple[str, list[Any]]:
        """WHERE clause and parameters."""
        terms, params = ["t.record IS NOT NULL"], []
        if self.statuses is not None:
            terms.append(f"t.status IN ({', '.join('?' * len(self.statuses))})")
            params += sorted(self.statuses)
        if self.user is not None:
            terms.append("t.user = ?")
            params.append(self.user)
        if self.name is not None:
            wild = _wild(self.name)
            terms.append("t.name GLOB ?" if wild else "t.name = ?")
            params.append(_glob(self.name) if wild else self.name)
        if self.notebook is not None:
            if _wild(self.notebook):
                terms.append("(t.notebook GLOB ? OR t.notebook_name GLOB ?)")
                params += [_glob(self.notebook)] * 2
            elif notebook_file_name(self.notebook) != self.notebook:  # (a path)
                tail = _relative_tail(self.notebook)
                if tail is None:
                    terms.append("t.notebook_name = ? AND t.notebook = ?")
                    params += [notebook_file_name(self.notebook), self.notebook]
                else:  # (also the end of a recorded path: the folders above the one named)
                    terms.append("t.notebook_name = ? AND (t.notebook = ? OR "
                                 "substr('/' || replace(t.notebook, '\\', '/'), -?) = ?)")
                    params += [notebook_file_name(self.notebook), self.notebook, len(tail), tail]
            else:
                terms.append("t.notebook_name = ?")
                params.append(self.notebook)
        if self.uid is not None:
            low, high = uid_bounds(self.uid) if self.uid else ("", "\U0010ffff")
            terms.append("t.uid >= ? AND t.uid < ?")
            params += [low, high]
        if self.until is not None:
            terms.append("t.sort_time <= ?")
            params.append(self.until)
        if self.since is not None:  # active at some time after `since` (three index lookups;
            # an unfinished task is active until now, as in match(): a future `since` keeps none)
            unfinished = " UNION SELECT id FROM tasks WHERE rank < 3" if self.since <= time.time() else ""
            terms.append("t.id IN (SELECT id FROM tasks WHERE sort_time >= ? UNION SELECT id FROM "
                         f"tasks WHERE finished_at >= ?{unfinished})")
            params += [self.since, self.since]
        return "WHERE " + " AND ".join(terms), params

    def match(self, rec: Mapping[str, Any], now: float) -> bool:
        """The same filters in Python, for records not in the database yet."""
        if self.statuses is not None and rec.get("status") not in self.statuses:
            return False
        if self.user is not None and rec.get("user") != self.user:
            return False
        if self.name is not None:
            name = rec.get("name")  # (a record without a name matches none: NULL in SQL)
            if not isinstance(name, str) or not _matches(name, self.name):
                return False
        if self.notebook is not None:
            nb = (rec.get("provenance") or {}).get("notebook") if isinstance(rec.get("provenance"), dict) else None
            if not isinstance(nb, str):
                return False
            if not (_matches(nb, self.notebook) or _matches(notebook_file_name(nb), self.notebook)):
                tail = None if _wild(self.notebook) else _relative_tail(self.notebook)
                if tail is None or not ("/" + nb.replace("\\", "/")).endswith(tail):
                    return False
        if self.uid is not None and not str(rec.get("uid")).startswith(self.uid):
            return False
        begin = sort_time(rec)
        if self.until is not None and begin > self.until:
            return False
        if self.since is not None:
            end = rec.get("finished_at")
            if rec.get("status") not in FINAL_STATUSES:
                end = now
            if begin < self.since and not (isinstance(end, (int, float)) and end >= self.since):
                return False
        return True


def _wild(pattern: str) -> bool:
    """True if ``pattern`` has a wildcard (see :data:`WILDCARDS`)."""
    return not WILDCARDS.isdisjoint(pattern)


def _relative_tail(path: str) -> str | None:
    """For a relative notebook path with folders (``2026-12/scan.ipynb``, as JupyterLab shows
    it, relative to its root), the end a recorded path must have to match it:
    ``/2026-12/scan.ipynb`` (kernels record the full path); None for an absolute path."""
    path = path.replace("\\", "/")
    if path.startswith(("/", "~")) or re.match(r"[A-Za-z]:/", path):
        return None
    while path.startswith("./"):
        path = path[2:]
    return "/" + path


def _glob(pattern: str) -> str:
    """``pattern`` for SQLite's GLOB and :func:`fnmatch.fnmatchcase` alike (both read
    ``[[]`` as a literal ``[``; a lone ``]`` is literal in both)."""
    return pattern.replace("[", "[[]")


def _matches(value: str, pattern: str) -> bool:
    """``value`` matches a ``name`` or ``notebook`` filter (exact, or with wildcards)."""
    return fnmatch.fnmatchcase(value, _glob(pattern)) if _wild(pattern) else value == pattern


def sort_time(rec: Mapping[str, Any]) -> float:
    """The time a record is sorted by: submitted, else started, else finished."""
    for key in ("submitted_at", "started_at", "finished_at"):
        v = rec.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return 0.0


# ---- the database -----------------------------------------------------------------------------------
class LogReader:
    """Read access to one environment's database (thread-safe; one connection, opened on
    first use).  Missing database: no records.  Unreadable: StateFileError."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._conn_id: tuple[int, int] | None = None  # the file self._conn reads
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
                self._conn.close()
                self._conn = None
            if self._conn is None:
                try:
                    self._conn = connect(self.path, readonly=True)
                except FileNotFoundError:
                    return fn(None)
                self._conn_id = now
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
    def _records(rows: sqlite3.Cursor, limit: int | None = None) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        infos: dict[Any, Any] = {}
        with closing(rows):  # (an interrupt left the cursor in its traceback: a stale snapshot)
            for uid, status, started, finished, orphaned, record, session, host, pid, info in rows:
                if limit is not None and len(out) >= limit:
                    break  # (checked before a record is added: limit=0 gives none)
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
        where, params = filters.sql()
        skip = list(exclude)
        if skip:
            where += " AND t.uid NOT IN (SELECT value FROM json_each(?))"
            params.append(orjson.dumps(skip).decode())
        return self._query(lambda c: [] if c is None else self._records(
            select_rows(c, where, params, "ORDER BY t.sort_time DESC, t.id DESC"), filters.limit))
