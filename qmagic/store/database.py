"""The SQLite database of the experiment log: schema, writes and queries.

One database per environment, ``<state_dir>/<environment>.journal.sqlite3``, in WAL mode so that
readers never block the writers of several kernels (each in short ``BEGIN IMMEDIATE``
transactions).  The schema is versioned with ``PRAGMA user_version`` (:data:`SCHEMA_VERSION`);
a database of a newer qmagic is read but never written.

Table ``tasks``: one row per task; ``record`` is the task record as JSON (a BLOB), and the
columns ``status``, ``started_at``, ``finished_at`` and ``orphaned`` override it (a task's
row is updated in place as it moves on).  ``rank`` (1 queued, 2 running, 3 ended) decides
merges: a later rank always wins, an equal rank replaces (the same event written again
changes nothing), a lower rank only fills a row that has no record yet.  Indexes: uid
(unique), time, end time, (status, time), (name, time), (notebook file name, time) and
the unfinished tasks.  Table ``sessions``: one row per writer session (host, pid, versions).

SQLite opens the database itself: Python's ``sqlite3.connect`` cannot pass ``SQLITE_OPEN_NOFOLLOW``
(SQLite 3.40 has no URI parameter for it; ``?nofollow=1`` is ignored), so the database, ``-wal``
and ``-shm`` paths are checked with :func:`~qmagic.store.files.check_state_path` before
connecting and the database is created by :func:`~qmagic.store.files.open_state_file` (mode
0600), never by SQLite.

A damaged database (SQLite's "malformed" or "not a database", or a file cut short under a
running kernel) never heals: the writer moves it aside (:func:`~qmagic.store.faults.set_aside`,
kept with its records) and starts a new one.  Nothing here opens the database file other than
through SQLite: closing another descriptor of it would drop this process's POSIX locks on it.
SQLite maps the WAL index (``-shm``) into memory, shared by the kernels of the log: a ``-shm``
made unwritable under a running kernel can end it with SIGBUS (the spool is never mapped).

This module does not import IPython, ipykernel, ipywidgets or zmq.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson

from ..errors import StateFileError
from ..texts import notebook_file_name
from .files import check_state_path, open_state_file
from .lines import glued, match_line, salvage
from .records import RANKS

__all__ = ["SCHEMA_VERSION", "connect", "database_path", "file_id", "ensure_schema", "mark_orphans",
           "retention", "rows_from_lines", "upsert_session", "write_rows", "write_started"]

SCHEMA_VERSION = 1
_BUSY_MS = 250  # readers wait this long for a lock (WAL readers rarely need one)
_WRITER_BUSY_MS = 2000  # a writer waits this long for another kernel's transaction (a fault after)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    id INTEGER PRIMARY KEY,
    uid TEXT NOT NULL UNIQUE,
    rank INTEGER NOT NULL,
    status TEXT NOT NULL,
    name TEXT,
    user TEXT,
    notebook TEXT,
    notebook_name TEXT,
    sort_time REAL NOT NULL,
    submitted_at REAL,
    started_at REAL,
    finished_at REAL,
    session TEXT,
    orphaned INTEGER NOT NULL DEFAULT 0,
    record BLOB
);
CREATE INDEX IF NOT EXISTS tasks_time ON tasks (sort_time);
CREATE INDEX IF NOT EXISTS tasks_status ON tasks (status, sort_time);
CREATE INDEX IF NOT EXISTS tasks_name ON tasks (name, sort_time);
CREATE INDEX IF NOT EXISTS tasks_notebook ON tasks (notebook_name, sort_time);
CREATE INDEX IF NOT EXISTS tasks_finished ON tasks (finished_at);
CREATE INDEX IF NOT EXISTS tasks_open ON tasks (rank) WHERE rank < 3;
CREATE TABLE IF NOT EXISTS sessions (
    session TEXT PRIMARY KEY,
    host TEXT,
    pid INTEGER,
    started_at REAL,
    last_seen REAL,
    state TEXT,
    info BLOB
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""

_UPSERT = """
INSERT INTO tasks (uid, rank, status, name, user, notebook, notebook_name, sort_time,
                   submitted_at, started_at, finished_at, session, orphaned, record)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?)
ON CONFLICT (uid) DO UPDATE SET
    rank = max(rank, excluded.rank),
    status = iif(excluded.rank >= rank, excluded.status, status),
    record = iif(excluded.rank >= rank OR record IS NULL, excluded.record, record),
    name = iif(excluded.rank >= rank OR record IS NULL, excluded.name, name),
    user = iif(excluded.rank >= rank OR record IS NULL, excluded.user, user),
    notebook = iif(excluded.rank >= rank OR record IS NULL, excluded.notebook, notebook),
    notebook_name = iif(excluded.rank >= rank OR record IS NULL, excluded.notebook_name, notebook_name),
    submitted_at = iif(excluded.rank >= rank OR record IS NULL, excluded.submitted_at, submitted_at),
    sort_time = iif(excluded.rank >= rank OR record IS NULL, excluded.sort_time, sort_time),
    started_at = iif(excluded.rank >= rank, coalesce(excluded.started_at, started_at),
                     coalesce(started_at, excluded.started_at)),
    finished_at = iif(excluded.rank >= rank, excluded.finished_at, finished_at),
    session = iif(excluded.rank >= rank, excluded.session, session),
    orphaned = iif(excluded.rank >= rank, 0, orphaned)
"""

_STARTED = """
INSERT INTO tasks (uid, rank, status, sort_time, started_at, session, orphaned, record)
VALUES (?, 2, 'running', ?, ?, ?, 0, NULL)
ON CONFLICT (uid) DO UPDATE SET rank = 2, status = 'running', started_at = excluded.started_at
WHERE rank < 2
"""


def database_path(state_dir: Path, env: str) -> Path:
    """Where the database of environment ``env`` lives."""
    return state_dir / f"{env}.journal.sqlite3"


def file_id(path: Path) -> tuple[int, int] | None:
    """Which file ``path`` names now (device, inode); None if there is none.  A connection
    opened on another id writes to a file that was deleted or replaced: its rows are lost."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _check_paths(path: Path) -> None:
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        check_state_path(p)


def connect(path: Path, *, create: bool = False, readonly: bool = False,
            fsync: bool = False) -> sqlite3.Connection:
    """A connection to the database at ``path`` (autocommit mode: callers BEGIN/COMMIT).

    ``create``: make the file (mode 0600) if it is missing; else FileNotFoundError.
    ``readonly``: a connection that refuses writes.  Raises StateFileError when a path is
    a symlink, FIFO or another user's file, or SQLite cannot open the file.
    """
    _check_paths(path)
    if not path.exists():
        if not create:
            raise FileNotFoundError(str(path))
        try:
            os.close(open_state_file(path, os.O_RDWR | os.O_CREAT))
        except OSError as exc:
            raise StateFileError(f"Cannot create the experiment log {str(path)!r}: {exc}.") from exc
    uri = f"file:{quote(str(path))}?mode=rw"
    busy = _BUSY_MS if readonly else _WRITER_BUSY_MS
    try:
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False,
                               timeout=busy / 1000)
    except sqlite3.Error:
        if not readonly:
            raise
        conn = sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True, isolation_level=None,
                               check_same_thread=False, timeout=_BUSY_MS / 1000)
    try:
        _check_paths(path)  # (the check before connecting could have raced a rename)
        conn.execute(f"PRAGMA busy_timeout = {busy}")
        if readonly:
            conn.execute("PRAGMA query_only = 1")
            conn = _readable(conn, path)
        else:
            conn.execute(f"PRAGMA synchronous = {'FULL' if fsync else 'NORMAL'}")
            conn.execute("PRAGMA cache_size = -8000")
            conn.execute("PRAGMA journal_size_limit = 67108864")
            conn.execute("PRAGMA wal_autocheckpoint = 4000")
    except BaseException:
        conn.close()
        raise
    return conn


def _readable(conn: sqlite3.Connection, path: Path) -> sqlite3.Connection:
    """``conn``, or, for a log in a folder nothing can write (a read-only mount, an archive),
    a connection that reads the file as it is: SQLite reads a WAL database only through a
    shared-memory file it must be able to make next to it ("unable to open database file")."""
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return conn
    except sqlite3.OperationalError as exc:
        if "unable to open" not in str(exc) or os.access(path.parent, os.W_OK):
            raise
    conn.close()  # (immutable: no other process can be writing through a read-only folder)
    conn = sqlite3.connect(f"file:{quote(str(path))}?mode=ro&immutable=1", uri=True,
                           isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA query_only = 1")
    return conn


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``; on any exception ``ROLLBACK`` (the connection is
    never left inside a transaction) and the exception goes on.  Every write of the log
    goes through this."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            with suppress(sqlite3.Error):  # (the first error is the one to report)
                conn.execute("ROLLBACK")
        raise


def ensure_schema(conn: sqlite3.Connection) -> int:
    """Create the tables of a new database (WAL mode, incremental vacuum); return the
    database's schema version.  Raises sqlite3.Error (busy, read-only, disk full)."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version == 0:
        if not conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchone():
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")  # only before the first table
        with transaction(conn):
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                version = SCHEMA_VERSION
    _use_wal(conn)
    return version


def _use_wal(conn: sqlite3.Connection) -> None:
    """Switch to WAL.  SQLite refuses it at once, busy timeout or not, while another kernel
    writes to the new log (opening it too): retried for a writer's busy time, as a lock is."""
    deadline = time.monotonic() + _WRITER_BUSY_MS / 1000
    while True:
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() >= deadline:
                raise
        time.sleep(0.01)  # (the writer's thread opening the log: no task waits on it)


# ---- writing ------------------------------------------------------------------------------------
def _num(v: Any) -> float | None:
    return v if v.__class__ is float or (v.__class__ is int) else None


def rows_from_lines(data: bytes, session: str, now: float, rows: dict[str, tuple],
                    bad: list[int], started: dict[str, float] | None = None) -> None:
    """Fold spool lines into ``rows``: uid -> upsert parameters (see
    :meth:`~qmagic.store.records.RecordEncoder.encode` for the lines).

    Record lines ``[rank, "uid", {record}]``: for one uid the highest rank wins (an equal
    rank: the later line), and only the winning line is parsed.  Start lines
    ``[2, "uid", time]`` make a queued row running; those of uids without a record line
    here go to ``started`` (uid -> time).  Other lines (segment headers, damage) are
    skipped; ``bad`` gets one item per damaged line.  A winning line that does not parse
    (cut short by a full disk) gives way to the task's best other line.  A damaged line that
    ends with a line of ours (another program's bytes, or half a line of ours, glued before
    it) keeps that line (:mod:`~qmagic.store.lines`: also in a line not parsed, a loser)."""
    latest: dict[bytes, bytes] = {}
    starts: dict[bytes, bytes] = {}
    salvaged: list[bytes] = []  # our lines at the end of damaged lines
    halves: set[bytes] = set()  # lines that start like ours and end with another (see glued)
    for line in data.split(b"\n"):
        shape = match_line(line)
        if shape is None:
            if not line or line.startswith(b'{"spool"'):
                continue
            bad.append(1)  # (another program's bytes, maybe glued to a line of ours)
            at = salvage(line)
            if at < 0:
                continue
            line = line[at:]
            shape = match_line(line)
        q = shape.end() - 2
        uid = line[4:q]
        if line[q + 2:q + 3] != b"{":  # a start line
            starts[uid], line = line, starts.get(uid)
        else:
            old = latest.get(uid)
            if old is None or old[1] <= line[1]:
                latest[uid], line = line, old
        if line is not None and (at := glued(line)) > 0:  # a loser, not parsed
            bad.append(1)
            halves.add(line)
            salvaged.append(line[at:])
    loads = orjson.loads
    torn: list[tuple[bytes, bytes]] = []
    for raw_uid, line in latest.items():
        try:
            rank, uid, rec = loads(line)
            status = rec["status"]
            if RANKS[status] != rank or uid != rec["uid"]:
                raise ValueError
        except (orjson.JSONDecodeError, ValueError, KeyError, TypeError):
            bad.append(1)
            torn.append((raw_uid, line))
            at = salvage(line)
            if at > 0:
                salvaged.append(line[at:])
            continue
        old = rows.get(uid)
        if old is not None and old[1] > rank:
            continue
        body = line[line.index(b"{", len(raw_uid) + 5): -1]
        name, user = rec.get("name"), rec.get("user")
        prov = rec.get("provenance")
        notebook = prov.get("notebook") if prov.__class__ is dict else None
        notebook = notebook if notebook.__class__ is str else None
        sub, sta, fin = _num(rec.get("submitted_at")), _num(rec.get("started_at")), _num(rec.get("finished_at"))
        if sta is None and old is not None:
            sta = old[9]
        sort_time = sub if sub is not None else sta if sta is not None else fin if fin is not None else now
        rows[uid] = (uid, rank, status, name if name.__class__ is str else None,
                     user if user.__class__ is str else None, notebook,
                     None if notebook is None else notebook_file_name(notebook),
                     sort_time, sub, sta, fin, session, body)
    if torn:  # the tasks' other record lines compete again, without the damaged winners
        winners = {raw_uid + b'",{': line for raw_uid, line in torn}
        others = []
        for line in data.split(b"\n"):
            key = line[4:line.find(b'"', 4) + 3]
            if key in winners and line != winners[key] and line not in halves:
                others.append(line)
        if others:
            rows_from_lines(b"\n".join(others), session, now, rows, bad)
    damaged = {raw_uid for raw_uid, _ in torn}
    for raw_uid, line in starts.items():
        final = latest.get(raw_uid)
        if final is not None and final[1] >= 50 and raw_uid not in damaged:  # it has its start
            if (at := glued(line)) > 0:  # (not parsed)
                bad.append(1)
                salvaged.append(line[at:])
            continue
        try:
            _, uid, t = loads(line)
        except (orjson.JSONDecodeError, ValueError):
            bad.append(1)
            at = salvage(line)
            if at > 0:
                salvaged.append(line[at:])
            continue
        if _num(t) is None or uid.__class__ is not str:
            continue
        row = rows.get(uid)
        if row is None:
            if started is not None:
                started[uid] = t
        elif row[1] == 1:  # queued -> running
            rows[uid] = (*row[:1], 2, "running", *row[3:9], t, *row[10:])
        elif row[9] is None:
            rows[uid] = (*row[:9], t, *row[10:])
    if salvaged:
        rows_from_lines(b"\n".join(salvaged), session, now, rows, bad, started)


def write_rows(conn: sqlite3.Connection, rows: Iterable[tuple]) -> None:
    """Upsert folded rows (inside the caller's transaction)."""
    conn.executemany(_UPSERT, rows)


def write_started(conn: sqlite3.Connection, items: Iterable[tuple[str, float]], session: str) -> None:
    """Mark tasks running (a row without record if the task is not in the database yet)."""
    conn.executemany(_STARTED, ((uid, t, t, session) for uid, t in items))


def mark_orphans(conn: sqlite3.Connection, session: str, when: float | None) -> int:
    """Unfinished tasks of ``session`` become failed (orphaned), ended at the latest sign of
    life known: ``when`` (the session's), or the task's own start if later; return how many."""
    cur = conn.execute("UPDATE tasks SET rank = 3, status = 'failed', orphaned = 1, finished_at = "
                       "coalesce(finished_at, max(coalesce(?, started_at), coalesce(started_at, ?))) "
                       "WHERE session = ? AND rank < 3", (when, when, session))
    return cur.rowcount


def upsert_session(conn: sqlite3.Connection, session: str, *, host: Any = None, pid: Any = None,
                   started_at: Any = None, last_seen: float | None = None, state: str | None = None,
                   info: Any = None) -> None:
    """Insert or update a row of ``sessions`` (None leaves a column as it is)."""
    blob = orjson.dumps(info) if info is not None else None
    conn.execute(
        "INSERT INTO sessions (session, host, pid, started_at, last_seen, state, info) "
        "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (session) DO UPDATE SET "
        "host = coalesce(excluded.host, host), pid = coalesce(excluded.pid, pid), "
        "started_at = coalesce(excluded.started_at, started_at), "
        "last_seen = max(coalesce(excluded.last_seen, last_seen), coalesce(last_seen, excluded.last_seen)), "
        "state = coalesce(excluded.state, state), info = coalesce(excluded.info, info)",
        (session, host if isinstance(host, str) else None, pid if type(pid) is int else None,
         _num(started_at), last_seen, state, blob))


def _used_bytes(conn: sqlite3.Connection) -> int:
    """Bytes of the database in use (its pages minus the free ones)."""
    page_size, pages, free = (conn.execute(f"PRAGMA {p}").fetchone()[0]
                              for p in ("page_size", "page_count", "freelist_count"))
    return (pages - free) * page_size


def retention(conn: sqlite3.Connection, max_age_s: float, max_bytes: int, batch: int = 500,
              now: float | None = None) -> int:
    """Delete at most ``batch`` ended tasks outside the window (older than ``max_age_s``,
    or the oldest while the database holds more than ``max_bytes``) in one transaction;
    return how many.  Unfinished tasks are never deleted."""
    now = time.time() if now is None else now
    cutoff = now - max_age_s
    with transaction(conn):
        deleted = conn.execute(
            "DELETE FROM tasks WHERE id IN (SELECT id FROM tasks WHERE sort_time < ? AND rank = 3 "
            "AND coalesce(finished_at, sort_time) < ? ORDER BY sort_time LIMIT ?)",
            (cutoff, cutoff, batch)).rowcount
        # Over the size: the oldest ended tasks, a few at a time, until it fits (all at once,
        # a log just over its size lost far more than the excess).
        step = max(1, batch // 20)
        while deleted < batch and _used_bytes(conn) > max_bytes:
            gone = conn.execute(
                "DELETE FROM tasks WHERE id IN (SELECT id FROM tasks WHERE rank = 3 "
                "ORDER BY sort_time LIMIT ?)", (min(step, batch - deleted),)).rowcount
            if not gone:
                break
            deleted += gone
        conn.execute("DELETE FROM sessions WHERE state IN ('closed', 'dead') AND last_seen < ?", (cutoff,))
    if deleted:
        conn.executescript(f"PRAGMA incremental_vacuum({batch * 2});")  # (execute() frees one page)
    return deleted


# ---- reading ------------------------------------------------------------------------------------
_SELECT = ("SELECT t.uid, t.status, t.started_at, t.finished_at, t.orphaned, t.record, t.session, "
           "s.host, s.pid, s.info, t.sort_time, t.id FROM tasks AS t LEFT JOIN sessions AS s ON s.session = t.session")


def select_rows(conn: sqlite3.Connection, where: str = "", params: Sequence[Any] = (),
                order: str = "") -> Iterator[tuple]:
    """Rows of tasks (with their session) as tuples, lazily."""
    return conn.execute(f"{_SELECT} {where} {order}", params)


def uid_bounds(prefix: str) -> tuple[str, str]:
    """(low, high) with every string starting with ``prefix`` in [low, high)."""
    return prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1) if ord(prefix[-1]) < 0x10FFFF else prefix + "\U0010ffff"
