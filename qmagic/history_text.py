"""The experiment log's text forms: the history table and CSV, and the log's health note.

``%tasks --history`` and ``qmagic-history`` print the same :func:`history_table`; the task
lines, call texts and widths they share come from :mod:`qmagic.format`.  Unlike the task
tables there, the history says when each task was submitted, how long it ran and its uid.

Pure functions of plain data; no IPython, widgets or zmq here.
"""

from __future__ import annotations

import csv
import io
from datetime import datetime
from itertools import islice
from typing import Any, Callable, Iterable, Iterator, Mapping

from .format import (
    HISTORY_CALL_WIDTH,
    USER_WIDTH,
    cell_label,
    column_widths,
    counted,
    error_note,
    finite,
    format_elapsed,
    printable,
    record_call,
    table_with_notes,
)

__all__ = ["PAGE_ROWS", "history_csv", "history_csv_lines", "history_table", "history_table_lines", "local_time",
           "log_health_note", "record_duration"]

_CSV_COLUMNS = ("uid", "name", "status", "user", "user_group", "background", "origin", "submitted_at",
                "started_at", "finished_at", "duration_s", "notebook", "cell_id", "execution_count",
                "cell_hash", "call", "error", "error_type", "host", "pid", "session", "orphaned")


def local_time(t: Any) -> datetime | None:
    """The local time of an epoch in a record; None for a missing or impossible one."""
    value = finite(t)
    try:
        return datetime.fromtimestamp(value) if value is not None else None
    except (OverflowError, OSError, ValueError):
        return None


def _clock(t: Any, iso: bool = False) -> str | None:
    stamp = local_time(t)
    if stamp is None:
        return None
    return stamp.isoformat(timespec="milliseconds") if iso else stamp.strftime("%Y-%m-%d %H:%M:%S")


def record_duration(rec: Mapping[str, Any]) -> float | None:
    """Seconds from a record's start to its end; None when either is missing or impossible
    (also an end before the start: the clock was set back while the task ran)."""
    start, stop = finite(rec.get("started_at")), finite(rec.get("finished_at"))
    return stop - start if start is not None and stop is not None and stop >= start else None


#: Rows whose cells set the column widths of a table printed as it is read (``qmagic-history``
#: on a long log): the first page's; a wider cell later pushes the rest of its own line right.
PAGE_ROWS = 200

_HEAD = ["SUBMITTED", "STATUS", "DURATION", "USER", "WHERE", "CELL", "CALL", "UID"]


def history_table(records: Iterable[Mapping[str, Any]], fit: Callable[[str], str] | None = None) -> str:
    """Experiment-log records as a table, in the order given (``%tasks --history``: newest
    first; ``qmagic-history``: oldest first): when submitted (local time), status, duration,
    user, where (``bg``/``fg`` and origin), the notebook cell, the call and the uid; the
    first line of an error follows its row as ``    error: ...`` (a task of a kernel that
    died reads "kernel stopped while the task was running", its duration ``≥ 2.5 s``: up to
    the kernel's last sign of life).

    Odd values (lone surrogates, control characters, None, huge texts, wrong types) are
    escaped, cut or read as missing: a bad record never breaks the table.  ``fit``: what
    each cell becomes before the columns are aligned (a terminal without UTF-8: escapes)."""
    return "\n".join(history_table_lines(records, fit, page=None) or [])


def history_table_lines(records: Iterable[Mapping[str, Any]], fit: Callable[[str], str] | None = None,
                        page: int | None = PAGE_ROWS) -> Iterator[str]:
    """:func:`history_table`'s lines as the records come, ``page`` records at a time (the
    first page sets the column widths): a log of any length in bounded memory, its first
    lines at once.  No records: no lines (``page=None``: the whole table at once, the header
    alone when there are no records)."""
    source, widths = iter(records), None
    while True:
        chunk = list(islice(source, page)) if page else list(source)
        if not chunk and (widths is not None or page):
            return
        rows, notes = [_table_row(rec) for rec in chunk], [error_note(rec) for rec in chunk]
        if fit is not None:
            rows, notes = [[fit(cell) for cell in row] for row in rows], [fit(note) for note in notes]
        lines = table_with_notes(_HEAD, rows, notes, widths)
        if widths is None:
            widths = column_widths([_HEAD, *rows])
            yield lines[0]
        yield from lines[1:]
        if not page or len(chunk) < page:
            return


def _table_row(rec: Mapping[str, Any]) -> list[str]:
    duration = record_duration(rec)
    meta = rec.get("journal") if isinstance(rec.get("journal"), Mapping) else {}
    return [_clock(rec.get("submitted_at") or rec.get("started_at")) or "-",
            printable(rec.get("status"), 12),
            "-" if duration is None else ("≥ " if meta.get("orphaned") else "") + format_elapsed(duration),
            printable(rec.get("user"), USER_WIDTH),
            f"{'bg' if rec.get('background') else 'fg'}/{printable(rec.get('origin') or '?', 12)}",
            cell_label(rec.get("provenance")) or "-",
            record_call(rec, HISTORY_CALL_WIDTH),
            printable(rec.get("uid"), 64)]


def history_csv(records: Iterable[Mapping[str, Any]]) -> str:
    """Experiment-log records as CSV, in the order given: a header line, then one row each
    (times in local ISO format, ``duration_s``, provenance, the call as in the table, the
    writer's host, pid and session, ``orphaned``); every value printable."""
    return "".join(history_csv_lines(records))


def history_csv_lines(records: Iterable[Mapping[str, Any]]) -> Iterator[str]:
    """:func:`history_csv`'s lines, each as its record comes (the header first)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(_CSV_COLUMNS)
    for rec in records:
        meta = rec.get("journal") if isinstance(rec.get("journal"), Mapping) else {}
        prov = rec.get("provenance") if isinstance(rec.get("provenance"), Mapping) else {}
        duration = record_duration(rec)
        values = {**{k: rec.get(k) for k in ("uid", "name", "status", "user", "user_group", "background",
                                              "origin", "error", "error_type")},
                  **{k: _clock(rec.get(k), iso=True) for k in ("submitted_at", "started_at", "finished_at")},
                  **{k: prov.get(k) for k in ("notebook", "cell_id", "execution_count", "cell_hash")},
                  "duration_s": None if duration is None else f"{duration:.6f}",
                  "call": record_call(rec, 200), "host": meta.get("host"), "pid": meta.get("pid"),
                  "session": meta.get("session"), "orphaned": bool(meta.get("orphaned"))}
        yield out.getvalue()
        out.seek(0)
        out.truncate()
        writer.writerow([printable(values[c]) for c in _CSV_COLUMNS])
    yield out.getvalue()


def log_health_note(health: Mapping[str, Any]) -> str | None:
    """One line when the experiment log needs attention (a fault, or records lost); None
    while it is healthy — records waiting a moment for the writer are normal.  A log that
    logs no new task (``open`` False) but still records how earlier ones end says so."""
    ok, pending, dropped = health.get("ok", True), int(health.get("pending") or 0), int(health.get("dropped") or 0)
    if ok and not dropped:
        return None

    def entries(n: int) -> str:  # (a task makes about three: submitted, started, finished)
        return counted(n, "entry", "entries")

    parts, held = [], int(health.get("in_memory") or 0)  # (held: a SIGKILL would lose them)
    if not ok:
        held_text = f", {held} only in memory" if held else ""
        parts.append("cannot write" + (f" ({entries(pending)} waiting{held_text})" if pending else ""))
    if dropped:
        parts.append(f"lost {entries(dropped)}")
    why = str(health.get("last_error") or "").rstrip(". ")  # (an error's own text may end with a period)
    which = ", off for new tasks but still recording earlier ones," if health.get("open") is False else ""
    return (f"Note: the experiment log{which} {' and '.join(parts)}" + (f": {why}" if why else "")
            + ". See worker.log_health().")
