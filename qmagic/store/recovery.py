"""Recovering what sessions that are gone left behind (see :mod:`qmagic.store.spool`).

A session is gone when its lock file's flock can be taken (its process died, or it closed
without finishing), or when it left spool segments but no lock file.  Its segments are
replayed into SQLite, its unfinished tasks become failed with
:data:`~qmagic.store.records.ORPHAN_REASON` (ended at its latest sign of life: the session's last
commit or heartbeat, its spool's last write, or the task's own start if later), its
session row is marked dead — all in one transaction — and only then are its files deleted.
A process killed in the middle leaves the files; the next one does it again (every write
is an idempotent upsert).  Sessions whose row says "live" but that have no lock file any
more are gone too; imported writers of the earlier journal are checked by pid.

Any process that opens the store (a kernel's writer thread at start and every minute,
``qmagic.history()``, ``qmagic-history``) runs :func:`recover`.

This module does not import IPython, ipykernel, ipywidgets or zmq.
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

import orjson

from ..errors import StateFileError
from .database import (
    mark_orphans,
    rows_from_lines,
    transaction,
    upsert_session,
    write_rows,
)
from .files import open_state_file, unusable
from .legacy import check_legacy_sessions
from .records import warn_once
from .segments import read_lines

__all__ = ["SessionOnDisk", "list_sessions", "recover", "segment_lines", "session_gone", "spool_writes"]

_log = logging.getLogger(__name__)
#: A temporary lock file younger than this may be a starting session's, not locked yet: it is
#: left alone (taking one made that session start in a false fault; it makes its lock file
#: again if its clock jumped and one is taken anyway).  An older one is a session's that died
#: before renaming it; it holds nothing.
STALE_TMP_S = 60.0


@dataclass
class SessionOnDisk:
    """What the state folder holds of one session."""

    session: str
    lock: Path | None = None
    spools: list[tuple[int, Path]] = field(default_factory=list)
    stale_tmp: Path | None = None


def list_sessions(folder: Path, env: str) -> dict[str, SessionOnDisk]:
    """Sessions that have a lock file or spool segments in ``folder``."""
    pattern = re.compile(r"(\.)?" + re.escape(env) + r"\.journal\.([0-9a-f]{32})\.(?:lock(\.tmp)?|(\d+)\.spool)")
    found: dict[str, SessionOnDisk] = {}
    try:
        names = os.listdir(folder)
    except OSError:
        return found
    for name in names:
        m = pattern.fullmatch(name)
        if not m or bool(m.group(1)) != bool(m.group(3)):
            continue
        entry = found.setdefault(m.group(2), SessionOnDisk(m.group(2)))
        if m.group(3):
            entry.stale_tmp = folder / name
        elif m.group(4) is None:
            entry.lock = folder / name
        else:
            entry.spools.append((int(m.group(4)), folder / name))
    for entry in found.values():
        entry.spools.sort()
    return found


def _older_than(path: Path, when: float) -> bool:
    """True if ``path`` was last modified before ``when`` (False if it is gone)."""
    try:
        return os.lstat(path).st_mtime < when
    except OSError:
        return False


def _claim(path: Path) -> int | None:
    """A descriptor holding the flock of ``path`` if it is free (the owner is gone), else None."""
    if fcntl is None:  # pragma: no cover
        return None
    try:
        fd = open_state_file(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        a, b = os.lstat(path), os.fstat(fd)  # still the file under that name?
        if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino):
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def session_gone(lock: Path) -> bool:
    """True if nobody holds the session's lock file (its process died, or it closed with
    records left): a look, a shared flock released at once (:func:`_claim` takes it
    exclusively, to recover the session)."""
    if fcntl is None:  # pragma: no cover
        return False
    try:
        fd = open_state_file(lock, os.O_RDONLY)
    except FileNotFoundError:  # (recovered meanwhile: the database has it now)
        return True
    except StateFileError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # (closing releases the flock)


def segment_lines(path: Path) -> Iterator[bytes]:
    """The complete lines of a dead session's segment, piece by piece (not a line cut short
    by the death; zero bytes skipped; never a buffer as large as what another process may
    have added: see :func:`~qmagic.store.segments.read_lines`).  Raises StateFileError."""
    try:
        fd = open_state_file(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        for blocks, _ in read_lines(fd, 0, os.fstat(fd).st_size):
            yield b"".join([lines for _, lines in blocks])
    except OSError as exc:
        raise unusable("read", path, exc) from exc
    finally:
        os.close(fd)


def spool_writes(entry: SessionOnDisk) -> list[float]:
    """When each of a session's spool segments was last written (signs of its life)."""
    times = []
    for _, path in entry.spools:
        with suppress(OSError):
            times.append(os.lstat(path).st_mtime)
    return times


def _replay(conn: sqlite3.Connection, entry: SessionOnDisk, now: float) -> int:
    """Replay a dead session's segments and mark its unfinished tasks; one transaction."""
    rows: dict[str, tuple] = {}
    bad: list[int] = []
    header: dict = {}
    for _, path in entry.spools:
        for data in segment_lines(path):
            if not header and data.startswith(b'{"spool"'):
                with suppress(orjson.JSONDecodeError, TypeError):
                    header = orjson.loads(data[: data.index(b"\n")]) or {}
            rows_from_lines(data, entry.session, now, rows, bad)
    seen = [t for row in rows.values() for t in (row[8], row[9], row[10]) if t is not None]
    seen += spool_writes(entry)
    with transaction(conn):
        write_rows(conn, rows.values())
        upsert_session(conn, entry.session, host=header.get("host"), pid=header.get("pid"),
                       started_at=header.get("started_at"), last_seen=max(seen) if seen else None,
                       state="dead", info=header.get("info") if isinstance(header.get("info"), dict) else None)
        last = conn.execute("SELECT last_seen FROM sessions WHERE session = ?", (entry.session,)).fetchone()
        count = mark_orphans(conn, entry.session, last[0] if last and last[0] is not None else now)
    if bad:
        warn_once("spool-lines", f"qmagic experiment log: skipped {len(bad)} damaged line(s) in the "
                  f"spool of an earlier session ({entry.session}).")
    return count


def recover(conn: sqlite3.Connection, folder: Path, env: str, own_session: str | None, now: float,
            *, legacy: bool = True) -> int:
    """Recover every session that is gone (see the module docstring); return how many.
    ``legacy``: also check the writers of an imported journal (a write transaction whenever
    there are any: not at every look of a running kernel).  Raises sqlite3.Error when the
    database cannot be written (files are kept then)."""
    recovered = 0
    for entry in list_sessions(folder, env).values():
        if entry.session == own_session:
            continue
        if entry.stale_tmp is not None and _older_than(entry.stale_tmp, now - STALE_TMP_S):
            fd = _claim(entry.stale_tmp)  # (a lock that died before it was renamed into place)
            if fd is not None:
                with suppress(OSError):
                    os.unlink(entry.stale_tmp)
                os.close(fd)
        if entry.lock is None and not entry.spools:
            continue
        try:
            fd = _claim(entry.lock) if entry.lock is not None else None
        except StateFileError as exc:
            warn_once(f"lock-{entry.session}", f"qmagic experiment log: {exc}")
            continue
        if entry.lock is not None and fd is None:
            continue  # alive (or being recovered by another process right now)
        try:
            _replay(conn, entry, now)
            for _, path in entry.spools:
                with suppress(FileNotFoundError):
                    os.unlink(path)
            if entry.lock is not None:
                with suppress(FileNotFoundError):
                    os.unlink(entry.lock)
            recovered += 1
        except StateFileError as exc:  # a segment that is a symlink, FIFO, another user's ...
            warn_once(f"spool-{entry.session}", f"qmagic experiment log: {exc}")
        finally:
            if fd is not None:
                os.close(fd)
    recovered += _lost_sessions(conn, folder, env, own_session, now, legacy)
    return recovered


def _lost_sessions(conn: sqlite3.Connection, folder: Path, env: str, own: str | None, now: float,
                   legacy: bool = True) -> int:
    """Sessions marked live whose lock file is gone, and imported writers that are gone."""
    live = conn.execute("SELECT session, last_seen FROM sessions WHERE state = 'live'").fetchall()
    lost = [(s, seen) for s, seen in live
            if s != own and re.fullmatch(r"[0-9a-f]{32}", s or "")
            and not (folder / f"{env}.journal.{s}.lock").exists()]
    has_legacy = legacy and conn.execute("SELECT 1 FROM sessions WHERE state = 'legacy' LIMIT 1").fetchone()
    if not lost and not has_legacy:
        return 0
    with transaction(conn):
        for session, seen in lost:
            # (re-checked inside the transaction: a closing session marks itself closed first)
            row = conn.execute("SELECT state FROM sessions WHERE session = ?", (session,)).fetchone()
            if row and row[0] == "live" and not (folder / f"{env}.journal.{session}.lock").exists():
                mark_orphans(conn, session, seen if seen is not None else now)
                conn.execute("UPDATE sessions SET state = 'dead' WHERE session = ?", (session,))
        if has_legacy:
            check_legacy_sessions(conn)
    return len(lost)
