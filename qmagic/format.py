"""Every text form a user sees: calls, values, progress, tables, details, locks, tracebacks.

One module, so each form exists once: magics, reprs, panels (for their plain-text form),
the history views and the stored tracebacks all come from here (tracebacks from
:mod:`qmagic.tracebacks`, whose names this module re-exports).

- Task lines, tables and details show no uid, clock time or duration: the same run of a
  notebook gives the same text, so nbval can compare it.  (History tables are the
  exception: they are the experiment log and say when each task was submitted.)
- Tracebacks show the user's own frames only: never qmagic's, never ``threading`` or
  ``asyncio`` internals; a cell's code reads ``Cell In[12]`` instead of a temporary path.

Pure functions of plain data and Task objects; no IPython, widgets or zmq here.
"""

from __future__ import annotations

import math
import os
import time
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from .tracebacks import is_internal_frame, set_filename_labeler, traceback_text, user_traceback

if TYPE_CHECKING:  # pragma: no cover
    from .core.task import Task

__all__ = [
    "log_health_note",
    "SUMMARY_KEY",
    "call_text",
    "short_repr",
    "safe_repr",
    "format_number",
    "format_elapsed",
    "progress_amount",
    "progress_text",
    "task_line",
    "task_table",
    "task_detail",
    "record_line",
    "record_detail",
    "history_table",
    "cell_label",
    "lock_text",
    "traceback_text",
    "user_traceback",
    "set_filename_labeler",
    "one_line",
    "is_internal_frame",
]

#: Key that marks a value the experiment log replaced by a summary (see qmagic.store).
SUMMARY_KEY = "__qmagic_summary__"
#: Width of the call column in tables.
CALL_WIDTH = 40


# -- values ----------------------------------------------------------------------------------
def safe_repr(value: Any, limit: int = 2000) -> str:
    """``repr(value)`` cut to ``limit`` characters; never raises (a broken ``__repr__`` shows
    as ``<Type with a failing repr>``); summaries from the log show their kept repr."""
    if isinstance(value, dict) and SUMMARY_KEY in value:
        text = str(value.get("repr") or f"<{value.get('type', 'value')}>")
    else:
        try:
            text = repr(value)
        except Exception:  # noqa: BLE001
            text = f"<{type(value).__name__} with a failing repr>"
    return text if len(text) <= limit else text[: max(0, limit - 3)] + "..."


def short_repr(value: Any, limit: int = 24) -> str:
    """A short :func:`safe_repr` for call texts."""
    return safe_repr(value, limit)


def call_text(name: str, args: Iterable[Any] = (), kwargs: Mapping[str, Any] | None = None,
              width: int = 60, *, kind: str = "function") -> str:
    """``name(arg, ..., key=value)`` shortened to about ``width`` characters; a script
    reads ``name (script)``."""
    if kind == "script":
        text = name if name == "script" else f"{name} (script)"
        return text if len(text) <= width else text[: width - 3] + "..."
    parts = [short_repr(a) for a in args or ()]
    parts += [f"{k}={short_repr(v)}" for k, v in (kwargs or {}).items()]
    text = f"{name}({', '.join(parts)})"
    return text if len(text) <= width else text[: max(0, width - 4)] + "...)"


def format_number(value: Any) -> str:
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


def format_elapsed(seconds: float | None) -> str:
    """``"0.8 s"``, ``"12 s"``, ``"3:05"`` (min:s), ``"1:02:03"``; ``"—"`` before the start.

    The same form while a task runs and once it finished."""
    if seconds is None:
        return "—"
    seconds = max(0.0, float(seconds))
    if seconds < 9.95:
        return f"{seconds:.1f} s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole} s"
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def progress_amount(progress: Any) -> str:
    """``"2/5"``, ``"2"`` (no total) or ``""`` of a Progress (or its dict form)."""
    if isinstance(progress, Mapping):
        value, total = progress.get("value"), progress.get("total")
    elif progress is not None:
        value, total = progress.value, progress.total
    else:
        return ""
    if value is None and total is None:
        return ""
    if total is None:
        return format_number(value)
    return f"{format_number(value)}/{format_number(total)}"


def progress_text(progress: Any) -> str:
    """``"2/5 message"``; ``""`` when no progress was reported."""
    if progress is None:
        return ""
    message = progress.get("message") if isinstance(progress, Mapping) else progress.message
    return " ".join(p for p in (progress_amount(progress), str(message or "")) if p)


def one_line(text: Any, limit: int = 200) -> str:
    """The first non-empty line of ``text``, cut to ``limit`` characters."""
    for line in str(text).splitlines():
        if line.strip():
            line = line.strip()
            return line if len(line) <= limit else line[: limit - 3] + "..."
    return ""


def cell_label(provenance: Mapping[str, Any] | None) -> str:
    """``01-getting-started.ipynb [12]``, ``[12]`` or ``""`` from a task's provenance."""
    if not provenance:
        return ""
    notebook = provenance.get("notebook")
    count = provenance.get("execution_count")
    parts = [os.path.basename(str(notebook))] if notebook else []
    if isinstance(count, int):
        parts.append(f"[{count}]")
    return " ".join(parts)


# -- tasks and records (one rendering: a Task is shown through its record) --------------------
def _record_of(item: Any) -> dict:
    return item if isinstance(item, Mapping) else item.to_dict()


def _record_fields(rec: Mapping[str, Any], width: int) -> list[str]:
    return [
        call_text(str(rec.get("name", "?")), rec.get("args") or (), rec.get("kwargs") or {},
                  width, kind=str(rec.get("kind") or "function")),
        str(rec.get("user") or ""),
        "background" if rec.get("background") else "foreground",
        str(rec.get("status") or ""),
        progress_text(rec.get("progress")),
    ]


def record_line(record: Mapping[str, Any]) -> str:
    """One line: ``add(1, b=5)  qmagic user  background  completed  2/2 half``."""
    return "  ".join(field for field in _record_fields(record, 60) if field)


def task_line(task: Task) -> str:
    """:func:`record_line` of a live task."""
    return record_line(_record_of(task))


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    table = [header, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in table]


def task_table(tasks: Iterable[Any], hidden: int = 0) -> str:
    """Aligned table of tasks (or records), one row each; ``hidden`` > 0 adds a line saying
    how many were left out.  Without tasks: ``"No tasks."``."""
    rows = [_record_fields(_record_of(t), CALL_WIDTH) for t in tasks]
    lines = _table(["task", "user", "mode", "status", "progress"], rows) if rows else ["No tasks."]
    if hidden > 0:
        lines.append(f"({hidden} more {'task' if hidden == 1 else 'tasks'} not shown; use --all)")
    return "\n".join(lines)


def _indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line if line else line for line in text.rstrip("\n").splitlines())


def record_detail(record: Mapping[str, Any], *, output: str = "", log: str = "",
                  source: str | None = None) -> str:
    """Several lines: the task line, then result or traceback, output and log.

    ``source`` (e.g. "from the log") is appended to the first line.  No uid, no times.
    """
    first = record_line(record)
    lines = [f"{first}  ({source})" if source else first]
    status = record.get("status")
    if status == "completed":
        if record.get("kind") == "script":
            changes = record.get("namespace_changes") or {}
            for key in ("added", "changed", "removed"):
                if changes.get(key):
                    lines.append(f"{key}: {', '.join(changes[key])}")
        else:
            lines.append(f"result: {safe_repr(record.get('result'))}")
    elif status in ("failed", "cancelled"):
        if record.get("traceback"):
            lines += ["traceback:", _indent(str(record["traceback"]))]
        else:
            lines.append(f"{status}: {record.get('error') or status}")
    if output:
        lines += ["output:", _indent(output)]
    if log:
        lines += ["log:", _indent(log)]
    return "\n".join(lines)


def task_detail(task: Task) -> str:
    """:func:`record_detail` of a live task, with its captured output and log."""
    return record_detail(task.to_dict(), output=task.output, log=task.log_text)


def history_table(records: Iterable[Mapping[str, Any]]) -> str:
    """Experiment-log records as a table, newest first: when submitted (local time), the
    call, who, from where (notebook and cell), mode, status and a note.  No uids."""
    rows = []
    for rec in records:
        when = rec.get("submitted_at")
        stamp = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))
                 if isinstance(when, (int, float)) else "?")
        note = ""
        if (rec.get("journal") or {}).get("orphaned"):
            note = "kernel stopped while the task was running"
        elif rec.get("status") in ("failed", "cancelled") and rec.get("error"):
            note = one_line(rec["error"], 60)
        fields = _record_fields(rec, CALL_WIDTH)
        rows.append([stamp, fields[0], fields[1], cell_label(rec.get("provenance")) or str(rec.get("origin") or ""),
                     fields[2], fields[3], note])
    if not rows:
        return "The experiment log holds no tasks."
    return "\n".join(_table(["submitted", "task", "user", "cell", "mode", "status", "note"], rows))


def log_health_note(health: Mapping[str, Any]) -> str | None:
    """One line when the experiment log needs attention (a fault, or records lost); None
    while it is healthy — records waiting a moment for the writer are normal."""
    ok, pending, dropped = health.get("ok", True), int(health.get("pending") or 0), int(health.get("dropped") or 0)
    if ok and not dropped:
        return None

    def entries(n: int) -> str:  # (a task makes about three: submitted, started, finished)
        return f"{n} entr{'ies' if n != 1 else 'y'}"

    parts = []
    if not ok:
        parts.append("cannot write" + (f" ({entries(pending)} waiting)" if pending else ""))
    if dropped:
        parts.append(f"lost {entries(dropped)}")
    why = health.get("last_error")
    return (f"Note: the experiment log {' and '.join(parts)}" + (f": {why}" if why else "")
            + ". See worker.log_health().")


def lock_text(info: Mapping[str, Any]) -> str:
    """Text of a queueserver ``lock_info`` dict; never a key, no time.

    Locked: ``"Locked by USER: environment, queue\\nNote: NOTE"``; else ``"Not locked."``.
    """
    scopes = [name for name in ("environment", "queue") if info.get(name)]
    if not scopes:
        text = "Not locked."
    else:
        text = f"Locked by {info.get('user') or '?'}: {', '.join(scopes)}"
        if info.get("note"):
            text += f"\nNote: {info['note']}"
    if info.get("emergency_lock_key_is_set"):
        text += "\n(An emergency unlock key is set.)"
    return text
