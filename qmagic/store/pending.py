"""What a session has not stored yet, for its own reads (:class:`qmagic.store.journal.Journal`):
its waiting lines folded per task, kept between reads, and the newest of them for the history.

Measured on 2 vCPUs: with 100,000 records waiting in a fault (disk full, or another process
holding the database), ``records(limit=50)`` -- the history
views, ``%tasks --history`` and ``qmagic.history()`` -- took 0.9-1.3 s: every call folded every
waiting line again (0.4-0.5 s) and made the record of every waiting task (0.5-0.8 s) to keep 50.
The fold is now kept and extended by what was appended since (during a fault the waiting
lines only grow; when the writer stores some, or lines move from memory into the spool, it is
made afresh), and records are made newest first until the limit is met, the tasks whose
status or uid the filters rule out skipped unmade (tests/test_store_journal.py::
test_the_history_of_a_long_backlog_makes_only_the_records_it_shows counts that work).

This module does not import IPython, ipykernel, ipywidgets or zmq.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any, Callable

from ..errors import StateFileError
from .database import rows_from_lines
from .reader import Filters, LogReader, sort_time
from .records import record_from_row

__all__ = ["PendingFold", "merge_state", "merged_states", "newest", "state_record"]

_EDGE = 256  # bytes of each chunk's start and end that say it is the same chunk, grown


def merge_state(old: dict[str, Any] | None, row: tuple) -> dict[str, Any]:
    """A task's state after one folded spool row (the upsert parameters of
    :func:`qmagic.store.database.rows_from_lines`) or a started item ``(uid, time)``."""
    if len(row) == 2:  # started
        uid, t = row
        if old is None:
            return {"uid": uid, "rank": 2, "status": "running", "started_at": t, "finished_at": None,
                    "orphaned": 0, "record": None, "session": None, "submitted_at": None}
        if old["rank"] < 2:
            return dict(old, rank=2, status="running", started_at=t)
        return old
    rank, status, sta, fin, session, line = row[1], row[2], row[9], row[10], row[11], row[12]
    if old is None or rank >= old["rank"]:
        started = sta if sta is not None else (old or {}).get("started_at")
        return {"uid": row[0], "rank": rank, "status": status, "started_at": started,
                "finished_at": fin, "orphaned": 0, "record": line, "session": session, "submitted_at": row[8]}
    if old["record"] is None:
        return dict(old, record=line, started_at=old["started_at"] if old["started_at"] is not None else sta,
                    submitted_at=row[8])
    return old


def state_record(state: Mapping[str, Any], journal: dict[str, Any]) -> dict[str, Any] | None:
    """The task dict of a merged state (None if it has no record yet or does not validate)."""
    if state.get("record") is None:
        return None
    return record_from_row(state["uid"], state["status"], state["started_at"], state["finished_at"],
                           state["orphaned"], state["record"], journal)


class PendingFold:
    """The fold (:func:`~qmagic.store.database.rows_from_lines`) of a session's waiting lines,
    kept: a read whose chunks each begin with the chunk folded before (same start, same bytes
    where the old one ended) folds only what follows."""

    def __init__(self, session: str) -> None:
        self.session = session
        self._lock = threading.Lock()
        self._seen: list[tuple[int, bytes, bytes]] = []  # per chunk folded: size, start, end
        self._rows: dict[str, tuple] = {}
        self._started: dict[str, float] = {}

    def clear(self) -> None:
        """Forget the fold kept (its memory: ~0.9 kB a waiting task)."""
        with self._lock:
            self._seen, self._rows, self._started = [], {}, {}

    def fold(self, chunks: list[bytes], keep: bool = True) -> tuple[dict[str, tuple], dict[str, float]]:
        """``(rows, started)`` of ``chunks`` (the caller must not change them); ``keep``
        False: forget it after (a backlog that does not grow, outside a fault, is stored
        within seconds: its fold would only hold memory)."""
        with self._lock:
            old = self._seen
            grown = len(chunks) >= len(old) and all(
                len(new) >= size and new[:_EDGE] == head and new[max(0, size - _EDGE):size] == tail
                for new, (size, head, tail) in zip(chunks, old))
            if grown:
                rows, started = dict(self._rows), dict(self._started)
                parts = [new[size:] for new, (size, _, _) in zip(chunks, old)] + chunks[len(old):]
            else:
                rows, started, parts = {}, {}, chunks
            now = time.time()
            for data in parts:
                if data:
                    rows_from_lines(data, self.session, now, rows, [], started)
            if keep:
                self._seen = [(len(c), c[:_EDGE], c[max(0, len(c) - _EDGE):]) for c in chunks]
                self._rows, self._started = rows, started
            else:
                self._seen, self._rows, self._started = [], {}, {}
            return rows, started


def merged_states(reader: LogReader, pending: dict[str, list[tuple]]
                  ) -> dict[str, tuple[dict[str, Any] | None, dict[str, Any] | None]]:
    """``{uid: (merged state or None, its row in the database or None)}`` of pending uids
    (``{uid: events}``, see ``Journal._pending``), over the database's rows."""
    try:
        bases = reader.states(list(pending))
    except StateFileError:  # (what this session holds is still known)
        bases = {}
    out = {}
    for uid, events in pending.items():
        state = base = bases.get(uid)
        for event in events:
            state = merge_state(state, event)
        out[uid] = (state, base)
    return out


def newest(states: dict[str, tuple[dict[str, Any] | None, Any]],
           record: Callable[[tuple[dict[str, Any] | None, Any]], dict[str, Any] | None],
           chosen: Filters, now: float) -> list[dict[str, Any]]:
    """The records that ``chosen`` matches of ``states`` (uid -> (merged state, anything
    else ``record`` takes to make its record)), newest first, at most ``chosen.limit``."""
    keyed = []
    for uid, (state, _) in states.items():
        if state is None or state.get("record") is None:
            continue
        status = "failed" if state.get("orphaned") else state.get("status")
        if chosen.statuses is not None and status not in chosen.statuses:
            continue
        if not chosen.uid_matches(uid):
            continue
        keyed.append((sort_time(state), uid))  # (the state holds the record's times)
    keyed.sort(reverse=True)
    out: list[dict[str, Any]] = []
    for _, uid in keyed:
        if chosen.limit is not None and len(out) >= chosen.limit:
            break
        rec = record(states[uid])
        if rec is not None and chosen.match(rec, now):
            out.append(rec)
    return out
