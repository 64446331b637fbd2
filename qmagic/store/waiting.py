"""Records that other sessions' spools hold and the database does not have yet.

A kernel's records reach SQLite through its spool (:mod:`qmagic.store.spool`).  While
another process holds the database's write lock (a long transaction, a backup tool), no
record is stored: neither those of the kernels still running nor, through recovery
(:mod:`qmagic.store.recovery`), those a killed kernel left.  A lookup that misses the
database (:meth:`qmagic.store.journal.Journal.get`, ``statuses``, ``match``) then reads the
spools of the log's other sessions for the uids asked: a task is found as its kernel logged
it, and an unfinished task of a kernel that is gone as recovery will store it -- failed,
:data:`~qmagic.store.records.ORPHAN_REASON`, ended when that kernel was last seen.  Its
``journal`` entry says ``pending`` (not stored yet).

Only misses pay: a listing of the state folder, a non-blocking flock test per session with
a spool, and a read of those spools (a search for the uid's bytes; a match is folded with
the database's merge rule).  The time a gone session was last seen, which takes folding all
of its lines, is kept while its files are unchanged (they only change when recovery deletes
them).

This module does not import IPython, ipykernel, ipywidgets or zmq.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Collection
from contextlib import suppress
from pathlib import Path
from typing import Any

import orjson

from ..core.memo import Memo
from ..errors import StateFileError
from .database import rows_from_lines
from .pending import merge_state, state_record
from .reader import LogReader
from .recovery import (
    SessionOnDisk,
    list_sessions,
    segment_lines,
    session_gone,
    spool_writes,
)
from .segments import uid_of

__all__ = ["SEARCHED", "waiting_records"]

#: A gone session's files (name, size, mtime) -> the time it was last seen (threads share it).
_SEEN: Memo[float | None] = Memo(64)
_UNSEEN = object()
#: More uids than this: each line's uid is looked up in a set instead (a miss of that many
#: reads running kernels' spools only during a fault of this kernel's log: 20,000 uids took
#: 0.1 s per 4 MB of spools, against 0.035 s for the database alone).
SEARCHED = 16


def _lines(entry: SessionOnDisk, uids: Collection[bytes], prefix: bytes | None) -> tuple[bytes, dict]:
    """The lines of the session's spool of the tasks ``uids`` (or whose uid starts with
    ``prefix``), and its header.  A few uids: a search for their bytes first."""
    found: list[bytes] = []
    header: dict = {}
    needles = [b',"' + prefix] if prefix is not None else [b'"' + u + b'"' for u in uids]
    search = len(needles) <= SEARCHED
    for _, path in entry.spools:
        with suppress(StateFileError):
            for data in segment_lines(path):
                if not header and data.startswith(b'{"spool"'):
                    with suppress(orjson.JSONDecodeError, TypeError, ValueError):
                        header = orjson.loads(data[: data.index(b"\n")]) or {}
                if search and any(n in data for n in needles):
                    found += [line for line in data.split(b"\n") if any(n in line for n in needles)]
                elif not search:
                    found += [line for line in data.split(b"\n") if uid_of(line) in uids]
    return b"\n".join(found) + b"\n" if found else b"", header if isinstance(header, dict) else {}


def _last_seen(entry: SessionOnDisk, now: float) -> float | None:
    """The latest time a gone session's records hold, as recovery reckons it."""
    key: list[Any] = [entry.session]
    for _, path in entry.spools:
        with suppress(OSError):
            st = os.lstat(path)
            key.append((path.name, st.st_size, st.st_mtime_ns))
    kept = _SEEN.get(tuple(key), _UNSEEN)
    if kept is not _UNSEEN:
        return kept
    rows: dict[str, tuple] = {}
    for _, path in entry.spools:
        with suppress(StateFileError):
            for data in segment_lines(path):
                rows_from_lines(data, entry.session, now, rows, [])
    seen = [t for row in rows.values() for t in (row[8], row[9], row[10]) if t is not None]
    seen += spool_writes(entry)  # (recovery's rule)
    last = max(seen) if seen else None
    _SEEN.put(tuple(key), last)
    return last


def waiting_records(reader: LogReader, folder: Path, env: str, own: str,
                    uids: Collection[str] = (), prefix: str | None = None, *, live: bool = True
                    ) -> dict[str, dict[str, Any]]:
    """``{uid: record}`` of the tasks ``uids`` (or those whose uid starts with ``prefix``)
    that the spools of the log's other sessions hold, merged over the database's rows (see
    the module docstring); ``live`` False: only the spools of sessions that are gone (a
    running kernel's writer stores its own within seconds).  Raises nothing for files it
    cannot read."""
    now = time.time()
    wanted = {u.encode("utf-8", "backslashreplace") for u in uids}
    head = None if prefix is None else prefix.encode("utf-8", "backslashreplace")
    match: Callable[[str], bool] = set(uids).__contains__ if prefix is None else (
        lambda uid: uid.startswith(prefix))
    found: dict[str, list[tuple[tuple, dict[str, Any], SessionOnDisk | None]]] = {}
    for entry in list_sessions(folder, env).values():
        if entry.session == own or not entry.spools:
            continue
        gone = entry if entry.lock is None or session_gone(entry.lock) else None
        if gone is None and not live:
            continue
        data, header = _lines(entry, wanted, head)
        rows: dict[str, tuple] = {}
        if data:  # (recovery's rule: a start line without its task's record line is not kept)
            rows_from_lines(data, entry.session, now, rows, [])
        rows = {uid: row for uid, row in rows.items() if match(uid)}
        if not rows:
            continue
        info = header.get("info")
        meta = {"session": entry.session, "host": header.get("host"), "pid": header.get("pid"),
                "orphaned": False, "pending": True, "info": info if isinstance(info, dict) else None}
        for uid, row in rows.items():
            found.setdefault(uid, []).append((row, meta, gone))
    if not found:
        return {}
    try:
        bases = reader.states(list(found))
    except StateFileError:
        bases = {}
    out = {}
    last_seen: dict[str, list[float]] = {}
    for uid, rows in found.items():
        state = base = bases.get(uid)
        meta, gone = None, None
        for row, row_meta, row_gone in rows:
            merged = merge_state(state, row)
            if merged is not state:
                state, meta, gone = merged, row_meta, row_gone
        if state is base or meta is None:  # (the database's row stands: the lookup had it)
            continue
        meta = dict(meta)
        if gone is not None and state["rank"] < 3 and state["session"] == gone.session:  # recovery's mark
            if gone.session not in last_seen:  # (once per session, not per task)
                last_seen[gone.session] = [t for t in (_last_seen(gone, now), reader.last_seen(gone.session))
                                           if t is not None]
            seen = last_seen[gone.session]
            start = [state["started_at"]] if isinstance(state["started_at"], (int, float)) else []
            end = state["finished_at"] if state["finished_at"] is not None else max(seen + start) if seen else now
            state, meta["orphaned"] = dict(state, orphaned=1, finished_at=end), True
        record = state_record(state, meta)
        if record is not None:
            out[uid] = record
    return out
