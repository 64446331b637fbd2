"""Deterministic text forms of tasks and locks, for magics, reprs and notebook tests.

Nothing here shows a task uid, a clock time or a duration: the same run of a notebook
gives the same text, so nbval can compare it.  Widgets show the live forms; this module is
what a terminal, a log, or ``text/plain`` shows.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:  # pragma: no cover
    from .tasks import Task

__all__ = [
    "task_line", "task_table", "task_detail", "lock_text", "progress_text", "progress_amount",
    "format_number",
    "user_traceback",
    "history_table", "record_detail",
]

#: Width of the call column in :func:`task_table`.
CALL_WIDTH = 40


def format_number(value: float | None) -> str:
    """``3`` for 3.0, ``0.25`` for 0.25, ``?`` for None (progress amounts)."""
    if value is None:
        return "?"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isfinite(number) and number.is_integer():
        return str(int(number))
    return f"{number:.4g}"


def progress_amount(progress: Any) -> str:
    """``"2/5"``, ``"2"`` (no total) or ``""`` (neither value nor total) of a Progress."""
    if progress is None or (progress.value is None and progress.total is None):
        return ""
    if progress.total is None:
        return format_number(progress.value)
    return f"{format_number(progress.value)}/{format_number(progress.total)}"


def progress_text(task: Task) -> str:
    """``"2/5 message"``, ``"40%"``-free and time-free; ``""`` when no progress was reported."""
    progress = task.progress
    if progress is None:
        return ""
    return " ".join(part for part in (progress_amount(progress), progress.message or "") if part)


def _call(task: Task, width: int) -> str:
    if getattr(task, "kind", "function") == "script":
        return task.name  # "<script>": a script has no call arguments
    return task.call_text(width)


def _fields(task: Task, width: int) -> list[str]:
    return [
        _call(task, width),
        f"{task.user}",
        "background" if task.background else "foreground",
        task.status.value,
        progress_text(task),
    ]


def task_line(task: Task) -> str:
    """One line: ``add(1, b=5)  qmagic user  background  completed  2/2 half``.

    Fields: call, user, background/foreground, status, last progress (when reported).
    """
    return "  ".join(field for field in _fields(task, 60) if field)


def task_table(tasks: Iterable[Task], hidden: int = 0) -> str:
    """Aligned table of ``tasks`` (one row each, columns as in :func:`task_line`).

    ``hidden`` > 0 adds a last line saying how many tasks were left out (e.g. finished
    tasks not asked for).  Without tasks the table is ``"No tasks."``.
    """
    rows = [_fields(task, CALL_WIDTH) for task in tasks]
    lines: list[str] = []
    if rows:
        header = ["task", "user", "mode", "status", "progress"]
        table = [header, *rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        for row in table:
            cells = [cell.ljust(widths[i]) for i, cell in enumerate(row)]
            lines.append("  ".join(cells).rstrip())
    else:
        lines.append("No tasks.")
    if hidden > 0:
        noun = "task" if hidden == 1 else "tasks"
        lines.append(f"({hidden} more {noun} not shown; use --all)")
    return "\n".join(lines)


def _indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line if line else line for line in text.rstrip("\n").splitlines())


def _safe_repr(value: Any, limit: int = 2000) -> str:
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a broken __repr__ must not break the detail view
        text = f"<{type(value).__name__} with a failing repr>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def user_traceback(tb: str) -> str:
    """``tb`` without the frames of qmagic's own modules (engine, worker): only user code."""
    marker = f'  File "{_PACKAGE_DIR}{os.sep}'
    out: list[str] = []
    skipping = False
    for line in tb.splitlines():
        if line.startswith("  File "):
            skipping = line.startswith(marker)
        elif not line.startswith("    "):
            skipping = False
        if not skipping:
            out.append(line)
    return "\n".join(out)


def task_detail(task: Task) -> str:
    """Several lines: the task line, then result repr or traceback, output and log.

    The traceback is shown without qmagic's own frames (it contains file paths and line
    numbers, not times or uids).
    """
    lines = [task_line(task)]
    status = task.status.value
    if status == "completed":
        if task.kind == "script":
            changes = task.namespace_changes or {}
            for key in ("added", "changed", "removed"):
                names = changes.get(key) or []
                if names:
                    lines.append(f"{key}: {', '.join(names)}")
        else:
            lines.append(f"result: {_safe_repr(task.to_dict()['result'])}")
    elif status in ("failed", "cancelled"):
        tb = task.traceback
        if tb:
            lines.append("traceback:")
            lines.append(_indent(user_traceback(tb)))
        else:
            error = task.to_dict().get("error")
            lines.append(f"{status}: {error}" if error else status)
    output = task.output
    if output:
        lines.append("output:")
        lines.append(_indent(output))
    log = task.log_text
    if log:
        lines.append("log:")
        lines.append(_indent(log))
    return "\n".join(lines)


def lock_text(lock_info: dict) -> str:
    """Text of a ``lock_info`` dict (the protocol's, or a reply holding one); never a key.

    Locked: ``"Locked by USER: environment, queue\\nNote: NOTE"``; unlocked:
    ``"Not locked."``.  The lock time is left out (deterministic text).
    """
    info = lock_info.get("lock_info", lock_info) if isinstance(lock_info, dict) else {}
    info = info or {}
    scopes = [name for name in ("environment", "queue") if info.get(name)]
    emergency = info.get("emergency_lock_key_is_set")
    if not scopes:
        text = "Not locked."
    else:
        text = f"Locked by {info.get('user') or '?'}: {', '.join(scopes)}"
        note = info.get("note")
        if note:
            text += f"\nNote: {note}"
    if emergency:
        text += "\n(An emergency unlock key is set.)"
    return text


def _record_call(record: dict, width: int = CALL_WIDTH) -> str:
    from .journal import SUMMARY_KEY

    def short(value: Any) -> str:
        if isinstance(value, dict) and SUMMARY_KEY in value:
            value = value.get("repr") or f"<{value.get('type', 'value')}>"
            text = str(value)
        else:
            text = _safe_repr(value, 24)
        return text if len(text) <= 24 else text[:21] + "..."

    if record.get("kind") == "script":
        return "<script>"
    parts = [short(a) for a in record.get("args") or []]
    parts += [f"{k}={short(v)}" for k, v in (record.get("kwargs") or {}).items()]
    call = f"{record.get('name', '?')}({', '.join(parts)})"
    return call if len(call) <= width else call[: width - 4] + "...)"


def record_detail(record: dict) -> str:
    """A journal record (a task of this or an earlier kernel) in the form of
    :func:`task_detail`: the call, who, status; the result or the traceback; no times."""
    from .journal import SUMMARY_KEY

    mode = "background" if record.get("background") else "foreground"
    lines = ["  ".join(x for x in (_record_call(record, 60), str(record.get("user") or ""), mode,
                                   str(record.get("status") or ""), "(from the journal)") if x)]
    if record.get("status") == "completed":
        value = record.get("result")
        if isinstance(value, dict) and SUMMARY_KEY in value:
            lines.append(f"result (summary): {value.get('repr') or value.get('type')}")
        elif record.get("kind") != "script":
            lines.append(f"result: {_safe_repr(value)}")
    elif record.get("traceback"):
        lines.append("traceback:")
        lines.append(_indent(user_traceback(record["traceback"])))
    elif record.get("error"):
        lines.append(f"{record.get('status')}: {record['error']}")
    return "\n".join(lines)


def history_table(records: Iterable[dict]) -> str:
    """Journal records (``qmagic.history()``) as a table, newest first.

    Unlike the other forms here this one shows when each task was submitted (local time,
    to the second): it is the experiment log.  No uids.
    """
    import time as _time

    rows = []
    for rec in records:
        when = rec.get("submitted_at")
        stamp = _time.strftime("%Y-%m-%d %H:%M:%S", _time.localtime(when)) if when else "?"
        note = ""
        if (rec.get("journal") or {}).get("orphaned"):
            note = "kernel stopped while the task was running"
        elif rec.get("status") in ("failed", "cancelled") and rec.get("error"):
            note = str(rec["error"]).splitlines()[0][:60]
        rows.append([
            stamp,
            _record_call(rec),
            str(rec.get("user") or ""),
            str(rec.get("origin") or ""),
            "background" if rec.get("background") else "foreground",
            str(rec.get("status") or ""),
            note,
        ])
    if not rows:
        return "The journal holds no tasks."
    header = ["submitted", "task", "user", "origin", "mode", "status", "note"]
    table = [header, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(widths[i]) for i, c in enumerate(row)).rstrip() for row in table)
