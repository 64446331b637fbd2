"""Faults of the experiment log: what a failure means, and one warning per episode.

- :func:`damaged` / :func:`check_intact`: the database file is damaged or was cut short (it
  never heals: :func:`moved_aside` moves it aside, with its records, and a new one starts);
- :func:`disk_full`: no room left (the fault episode then lasts until all that waited is
  stored: room freed goes to the spool first, see :meth:`~qmagic.store.spool.Spool.prepare`);
- :func:`forget_old_wal`: the database was replaced under a running kernel (``mv``): the
  old file keeps its records, and its ``-wal``/``-shm`` are never applied to the new one;
- :class:`Faults`: fault episodes, back-off between retries, ONE warning per episode.

This module does not import IPython, ipykernel, ipywidgets or zmq.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import time
from contextlib import suppress
from pathlib import Path

from ..errors import StateFileError
from .database import file_id

__all__ = ["DatabaseDamaged", "Faults", "check_intact", "damaged", "disk_full", "forget_old_wal",
           "moved_aside", "set_aside", "spool_deleted", "wal_ids"]

_log = logging.getLogger("qmagic.store.journal")  # (the log's messages, under one name)
_BACKOFF = (0.05, 5.0)


class DatabaseDamaged(StateFileError):
    """The database file was cut short under a running kernel."""


def check_intact(path: Path) -> None:
    """Raise :class:`DatabaseDamaged` when the database file at ``path`` was cut short (a
    database with tables is never smaller than one page).  SQLite itself notices only when
    it reads a page it lost, and meanwhile commits into a file that cannot be read back.

    Only ``stat``: opening and closing the file here would release this process's POSIX locks
    on it, which SQLite's connections rely on (other writers would then corrupt it)."""
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StateFileError(f"Cannot read the experiment log {str(path)!r}: {exc}.") from exc
    if size < 512:
        raise DatabaseDamaged(f"the file {str(path)!r} was cut short ({size} bytes)")


def damaged(exc: BaseException) -> bool:
    """Whether ``exc`` says the database file is damaged (SQLite's CORRUPT or NOTADB: "database
    disk image is malformed", "file is not a database", or :class:`DatabaseDamaged`), not
    merely busy or unwritable."""
    if isinstance(exc, DatabaseDamaged):
        return True
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(exc, sqlite3.DatabaseError) and isinstance(code, int) and code & 0xFF in (11, 26)


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` says there is no room left (SQLite's FULL, or ENOSPC / EDQUOT)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(exc, sqlite3.Error) and isinstance(code, int):
        return code & 0xFF == 13  # SQLITE_FULL
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def set_aside(path: Path, expected: tuple[int, int] | None) -> Path | None:
    """Move a damaged database (and its ``-wal`` and ``-shm``) aside as
    ``<name>.damaged-<time>``; return the new path, or None when the file there is no longer
    the one found damaged (another kernel moved it and started a new one) or cannot be moved."""
    if expected is None or file_id(path) != expected:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = path.with_name(f"{path.name}.damaged-{stamp}"), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.damaged-{stamp}-{n}")
    try:
        os.rename(path, target)
    except OSError:
        return None
    for suffix in ("-wal", "-shm"):  # (never to be applied to the new database)
        with suppress(OSError):
            os.rename(f"{path}{suffix}", f"{target}{suffix}")
    return target


class Faults:
    """Fault episodes of one log: ONE warning when an episode starts (whichever of the
    spool or the database fails first; a disk-full usually stops both), one info line when
    everything works again, back-off between retries meanwhile."""

    def __init__(self, path: Path, pending_limit: int) -> None:
        self.path, self.pending_limit = path, pending_limit
        self.kinds: dict[str, float] = {}  # kind -> since (monotonic)
        self.last_error: str | None = None
        self.retry_at = 0.0
        self._backoff = 0.0

    def failed(self, kind: str, exc: BaseException) -> None:
        """Note a failure: a warning if it starts an episode; back off."""
        self.last_error = f"{type(exc).__name__}: {exc}"
        if kind not in self.kinds:
            first = not self.kinds
            self.kinds[kind] = time.monotonic()
            if not first:
                _log.info("experiment log: the %s cannot be written either (%s).", kind, self.last_error)
            elif kind == "spool":
                _log.warning("qmagic could not write the experiment log's spool in %s (%s). Tasks run "
                             "at normal speed; their records wait in memory (at most %d) until the "
                             "folder can be written again: check disk space and permissions "
                             "(QMagic.state_dir).", self.path.parent, self.last_error, self.pending_limit)
            else:  # (qmagic's own errors say what to do; SQLite's get the usual causes)
                causes = "" if isinstance(exc, StateFileError) else (
                    " (disk full? read-only folder? another program holding the database?)")
                _log.warning("qmagic could not write the experiment log %s (%s). Tasks run at normal "
                             "speed; their records are kept and written when the database can be "
                             "written again%s.", self.path, self.last_error, causes)
        else:
            _log.debug("experiment log: %s still failing: %s", kind, self.last_error)
        self._backoff = min(max(self._backoff * 2, _BACKOFF[0]), _BACKOFF[1])
        self.retry_at = time.monotonic() + self._backoff

    def fixed(self, kind: str) -> None:
        """Note a success of ``kind``; the episode ends when nothing fails any more."""
        if self.kinds.pop(kind, None) is not None and not self.kinds:
            _log.info("qmagic's experiment log works again; what waited is being stored.")
            self.last_error = None
        if not self.kinds:
            self._backoff = 0.0


def wal_ids(path: Path) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """Which files the ``-wal`` and ``-shm`` of ``path`` name now (see :func:`file_id`)."""
    return file_id(Path(f"{path}-wal")), file_id(Path(f"{path}-shm"))


def forget_old_wal(conn: sqlite3.Connection, path: Path, ids: tuple) -> None:
    """The database at ``path`` was replaced under ``conn``: store ``conn``'s WAL into its own
    file (moved aside, it keeps its records) and remove the ``-wal``/``-shm`` it used, ``ids``
    (:func:`wal_ids` while it was open), if they are still there: SQLite would apply that WAL
    to whatever file now has the name (records it never had; a file that was not the old
    one's read as damaged).  Best effort: files another process made since are left."""
    with suppress(sqlite3.Error):
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    for suffix, old in zip(("-wal", "-shm"), ids):
        name = Path(f"{path}{suffix}")
        if old is not None and file_id(name) == old:  # (conn holds it open: no reused inode)
            with suppress(OSError):
                os.unlink(name)


def spool_deleted(folder: Path) -> bool:
    """Say that the spool's files were deleted (one warning); True: store what they held now."""
    _log.warning("qmagic: the experiment log's spool files in %s were deleted while this kernel "
                 "ran; what they held is being stored now and new ones are made.", folder)
    return True


def moved_aside(path: Path, db_id: tuple[int, int] | None, exc: BaseException) -> bool:
    """Move the damaged database aside, with one warning; False if it was not moved."""
    moved = set_aside(path, db_id)
    if moved is not None:
        _log.warning("qmagic: the experiment log %s is damaged (%s); it was moved aside to %s "
                     "(the records it held are there) and a new one is started.", path, exc, moved.name)
    return moved is not None
