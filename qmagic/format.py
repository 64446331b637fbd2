"""Every text form a user sees: calls, values, progress, tables, details, locks, refusals.

One module, so each form exists once: magics, reprs and panels (for their plain-text form)
all come from here; the experiment log's own forms (the history table and CSV, its health
note) from :mod:`qmagic.history_text`, built on these; tracebacks from :mod:`qmagic.tracebacks`.

- Task lines, tables and details show no uid, clock time or duration: the same run of a
  notebook gives the same text, so nbval can compare it.  (The history table is the
  exception: it is the experiment log and says when each task was submitted, how long it
  ran and its uid.)
- Every text is one printable line per field: lone surrogates and control characters are
  escaped (:func:`printable`; it and :func:`safe_repr` live in :mod:`qmagic.texts`), so odd
  values in the log never break a view.

Pure functions of plain data and Task objects; no IPython, widgets or zmq here.
"""

from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from .errors import LockRefused
from .texts import (
    SUMMARY_KEY,
    carriage_returns,
    notebook_file_name,
    printable,
    safe_repr,
    valid_unicode,
)

if TYPE_CHECKING:  # pragma: no cover
    from .core.task import Task

__all__ = [
    "SUMMARY_KEY",
    "printable",
    "call_text",
    "record_call",
    "safe_repr",
    "finite",
    "format_number",
    "format_elapsed",
    "progress_amount",
    "progress_text",
    "task_line",
    "task_table",
    "tasks_text",
    "first_line",
    "task_detail",
    "record_line",
    "record_detail",
    "counted",
    "error_note",
    "column_widths",
    "table_with_notes",
    "cell_label",
    "lock_text",
    "refusal_line",
    "busy_text",
    "no_tasks_line",
    "one_line",
]

#: Width of the call column in tables (the history table's is wider: no progress column).
CALL_WIDTH = 40
HISTORY_CALL_WIDTH = 48
#: Most characters of a user name and of the progress (value/total and message) in a task
#: line or table row (a remote client's user name may be 1000 characters long).
USER_WIDTH = 24
PROGRESS_WIDTH = 60


def call_text(name: str, args: Iterable[Any] = (), kwargs: Mapping[str, Any] | None = None,
              width: int = 60, *, kind: str = "function") -> str:
    """``name(arg, ..., key=value)`` (Python reprs, each cut to 24 characters) shortened to
    about ``width`` characters; a script reads ``name (script)``.  One printable line."""
    if kind == "script":
        text = printable(name if name == "script" else f"{name} (script)")
        return text if len(text) <= width else text[: max(0, width - 3)] + "..."
    parts, size = [], len(name)
    items = itertools.chain(((None, a) for a in args or ()), (kwargs or {}).items())  # (lazily:
    for key, value in items:  # a list of ten million arguments first took 3 s)
        parts.append(safe_repr(value, 24) if key is None else f"{key}={safe_repr(value, 24)}")
        size += len(parts[-1]) + 2
        if size > width:  # (the rest would be cut anyway: a huge call costs no time)
            break
    text = printable(f"{name}({', '.join(parts)})")
    return text if len(text) <= width else text[: max(0, width - 4)] + "...)"


def record_call(record: Mapping[str, Any], width: int = 60) -> str:
    """:func:`call_text` of a task record (from the log or ``Task.to_dict()``); fields of
    the wrong type (args that are not a list, no name) read as missing."""
    args, kwargs, name = record.get("args"), record.get("kwargs"), record.get("name")
    return call_text("?" if name is None else printable(name),
                     args if isinstance(args, (list, tuple)) else (),
                     kwargs if isinstance(kwargs, Mapping) else {},
                     width, kind=str(record.get("kind") or "function"))


def format_number(value: Any) -> str:
    """``3`` for 3.0, ``0.25`` for 0.25, ``?`` for None (progress amounts).

    Never raises: an int beyond float range reads ``1e+400``, a value the experiment log
    kept as a summary its repr (``nan``), anything that is no number its :func:`printable`
    text (``<BadValue with a failing str>`` if ``str()`` fails)."""
    if value is None:
        return "?"
    if type(value) is dict and SUMMARY_KEY in value:  # (the log's summary of a NaN, a numpy number; a
        # live value's own __contains__ is not asked: it may raise)
        return safe_repr(value, 40)
    try:
        number = float(value)
    except OverflowError:  # an int beyond float range
        try:
            log = math.log10(abs(value))  # (exact enough for ints of any size)
            sign = "-" if value < 0 else ""
            return f"{sign}{10 ** (log - math.floor(log)):.4g}e+{math.floor(log)}"
        except Exception:  # noqa: BLE001
            return printable(value, 40)
    except Exception:  # noqa: BLE001  (not a number, or a failing __float__)
        return printable(value, 40)
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


def progress_text(progress: Any, limit: int = 200, amount: str | None = None) -> str:
    """``"2/5 message"`` as one :func:`printable` line of at most ``limit`` characters;
    ``""`` when no progress was reported.  ``amount``: its :func:`progress_amount`, if made."""
    if progress is None:
        return ""
    message = progress.get("message") if isinstance(progress, Mapping) else progress.message
    amount = progress_amount(progress) if amount is None else amount
    return printable(" ".join(p for p in (amount, printable(message, limit)) if p), limit)


def counted(n: int, one: str, many: str | None = None) -> str:
    """``n`` and a noun in its number: ``"1 request"``, ``"3 requests"``, ``"2 error replies"``."""
    return f"{n} {one if n == 1 else many or one + 's'}"


def one_line(text: Any, limit: int = 200) -> str:
    """The first non-empty line of ``text``, cut to ``limit`` characters."""
    for line in str(text).splitlines():
        if line.strip():
            line = line.strip()
            return line if len(line) <= limit else line[: limit - 3] + "..."
    return ""


def first_line(text: Any, limit: int) -> str:
    """:func:`one_line` of ``text``, ending ``" ..."`` when more non-empty lines follow (as
    a line cut at ``limit`` ends ``...``): a line that reads as the whole text must be it."""
    text = str(text)
    line = one_line(text, limit)
    if not line.endswith("...") and sum(1 for part in text.splitlines() if part.strip()) > 1:
        line = line + " ..." if len(line) <= limit - 4 else line[: limit - 3] + "..."
    return line


def cell_label(provenance: Mapping[str, Any] | None) -> str:
    """Which notebook cell started a task: ``01-getting-started.ipynb [12]``, ``[12]`` or
    ``""`` from its provenance (the notebook's file name, also of a Windows path)."""
    if not isinstance(provenance, Mapping):
        return ""
    notebook, count = provenance.get("notebook"), provenance.get("execution_count")
    parts = [printable(notebook_file_name(notebook), 60)] if isinstance(notebook, str) else []
    if isinstance(count, int) and not isinstance(count, bool):
        parts.append(f"[{count}]")
    return " ".join(p for p in parts if p)


# -- tasks and records (one rendering: a Task is shown through its record) --------------------
def _record_of(item: Any) -> dict:
    return item if isinstance(item, Mapping) else item.to_dict()


def _record_fields(rec: Mapping[str, Any], width: int) -> list[str]:
    return [
        record_call(rec, width),
        printable(rec.get("user"), USER_WIDTH),
        "background" if rec.get("background") else "foreground",
        printable(rec.get("status"), 12),
        progress_text(rec.get("progress"), PROGRESS_WIDTH),
    ]


def error_note(record: Mapping[str, Any], failed_only: bool = False) -> str:
    """A record's error as one line of at most 100 characters (ending ``...`` when it is cut
    or more lines follow: ``%task_result`` and ``--json`` show all), a failed task's with its
    exception's type (``ZeroDivisionError: division by zero``), a cancelled one's as it is
    (``Task was cancelled: the kernel was shut down``); ``""`` when it holds none (or, with
    ``failed_only``, when the task did not fail: the task views say why a task failed, the
    history also why one was cancelled)."""
    error, kind, failed = record.get("error"), record.get("error_type"), record.get("status") == "failed"
    if not isinstance(error, str) or not error.strip() or failed_only and not failed:
        return ""
    if failed and isinstance(kind, str) and kind and not error.startswith(kind):
        error = f"{kind}: {error}"
    return printable(first_line(error, 100), 100)


def record_line(record: Mapping[str, Any], error: bool = True) -> str:
    """One line: ``add(1, b=5)  qmagic user  background  completed  2/2 half``; a failed
    task's ends with ``error: `` and its :func:`error_note` (unless ``error`` is False)."""
    note = error_note(record, failed_only=True) if error else ""
    return "  ".join(field for field in [*_record_fields(record, 60), note and f"error: {note}"] if field)


def task_line(task: Task) -> str:
    """:func:`record_line` of a live task."""
    return record_line(_record_of(task))


def table_with_notes(header: list[str], rows: list[list[str]], notes: Iterable[str],
                     widths: list[int] | None = None) -> list[str]:
    """The lines of a table: ``header`` and ``rows`` in aligned columns, each row's note
    (its :func:`error_note`, ``""`` for none) on an indented line under it: ``    error: ...``.
    ``widths``: the columns' (a table printed page by page); a wider cell pushes the rest
    of its own line right."""
    table = [header, *rows]
    widths = widths or column_widths(table)
    aligned = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in table]
    lines = aligned[:1]
    for line, note in zip(aligned[1:], notes):
        lines += [line, f"    error: {note}"] if note else [line]
    return lines


def column_widths(rows: list[list[str]]) -> list[int]:
    """The width of each column of ``rows`` (the widest cell)."""
    return [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]


def no_tasks_line(log_on: bool, start: bool = False) -> str:
    """What a view of the tasks in memory says when there are none: where earlier ones are
    (a restart, a reload or the retention took them from memory, never from the log)."""
    text = "No tasks in this kernel's memory" + (" (start one with %function_execute NAME)" if start else "")
    return text + ("; earlier ones, also of restarted kernels, are in the experiment log: "
                   "%tasks --history." if log_on else ".")


def task_table(tasks: Iterable[Any], hidden: int = 0, hint: str = "use --all", *, uids: bool = False) -> str:
    """Aligned table of tasks (or records), one row each; ``hidden`` > 0 adds a line saying
    how many were left out and ``hint`` (how to see them).  Without tasks: ``"No tasks."``.
    ``uids``: a first column with each task's short uid (what ``%task_cancel UID`` takes),
    for a table that is the only view (a terminal); deterministic forms leave it out."""
    records = [_record_of(t) for t in tasks]
    rows = [_record_fields(rec, CALL_WIDTH) for rec in records]
    header = ["task", "user", "mode", "status", "progress"]
    if uids:
        header = ["uid", *header]
        rows = [[printable(rec.get("uid"), 40)[:8], *row] for rec, row in zip(records, rows)]
    lines = table_with_notes(header, rows,
                             [error_note(rec, failed_only=True) for rec in records]) if rows else ["No tasks."]
    if hidden > 0:
        lines.append(f"({counted(hidden, 'more task', 'more tasks')} not shown; {hint})")
    return "\n".join(lines)


def tasks_text(tasks: list[Any], *, running: bool, limit: int, hint: str = "use --all",
               uids: bool = False, log_on: bool = False) -> str:
    """The text of a view of the tasks in memory (``tasks`` oldest first, as the worker lists
    them): newest first, only the queued and running ones if ``running``, at most ``limit``
    rows; under the table how many it leaves out and how to see them: beyond ``limit``,
    ``hint``; the finished ones a ``running`` view leaves out, ``--all``.  The one rule of
    ``%tasks``' text and of its panel's text form.  No task at all: :func:`no_tasks_line`."""
    if not tasks:
        return no_tasks_line(log_on)
    listed = [t for t in reversed(tasks) if not (running and t.done())]
    shown = listed[:max(1, limit)]
    text = task_table(shown, len(listed) - len(shown), hint, uids=uids) if shown else "No queued or running tasks."
    finished = len(tasks) - len(listed)
    if finished:
        text += f"\n({counted(finished, 'finished task')} not shown; use --all)"
    return text


def _indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line if line else line for line in text.rstrip("\n").splitlines())


def record_detail(record: Mapping[str, Any], *, output: str = "", log: str = "",
                  source: str | None = None) -> str:
    """Several lines: the task line, then result or traceback, output and log.

    ``source`` (e.g. "from the log") is appended to the first line.  No uid, no times.
    Traceback, output and log show as the task wrote them, but a lone surrogate (a file name
    that is not UTF-8) reads U+FFFD: a kernel cannot send it, and showed nothing; and the
    output as a terminal leaves it: a line redrawn with carriage returns shows its last text.
    """
    first = record_line(record, error=False)  # (the traceback or the error follows)
    lines = [f"{first}  ({source})" if source else first]
    status = record.get("status")
    if status == "completed":
        if record.get("kind") == "script":
            changes = record.get("namespace_changes") or {}
            for key in ("added", "changed", "removed"):
                if changes.get(key):
                    lines.append(f"{key}: {', '.join(changes[key])}")
        else:
            lines.append(f"result: {safe_repr(record.get('result'), lines=True)}")
    elif status in ("failed", "cancelled"):
        if record.get("traceback"):
            lines += ["traceback:", _indent(str(record["traceback"]))]
        else:
            lines.append(f"{status}: {record.get('error') or status}")
    if output:  # (a progress line redrawn with "\r" reads as its last state, as in the cell)
        lines += ["output:", _indent(carriage_returns(output))]
    if log:
        lines += ["log:", _indent(log)]
    return valid_unicode("\n".join(lines))


def task_detail(task: Task) -> str:
    """:func:`record_detail` of a live task, with its captured output and log."""
    return record_detail(task.to_dict(), output=task.output, log=task.log_text)


# -- numbers of records ------------------------------------------------------------------------
def finite(value: Any) -> float | None:
    """A finite number as float, else None (a time or duration that cannot be shown)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def lock_text(info: Mapping[str, Any], unlocked: bool = False) -> str:
    """Text of a queueserver ``lock_info`` dict; never a key, no time.

    Locked: ``"Locked by USER: environment, queue\\nNote: NOTE"`` (both :func:`printable`:
    anyone's text adds no line or colour); else ``"Not locked."`` (``"Unlocked."`` with
    ``unlocked``: the lock was just released)."""
    scopes = [name for name in ("environment", "queue") if info.get(name)]
    if not scopes:
        text = "Unlocked." if unlocked else "Not locked."
    else:
        text = f"Locked by {printable(info.get('user')) or '?'}: {', '.join(scopes)}"
        if info.get("note"):
            text += f"\nNote: {printable(info['note'])}"
    if info.get("emergency_lock_key_is_set"):
        text += "\n(An emergency unlock key is set.)"
    return text


def busy_text(not_idle: bool, running: Any = None, own: bool = False) -> str:
    """A busy foreground explained to notebook users (what runs, what to do): ``not_idle``, a
    foreground task (``running``, None if unknown) holds it; ``own``, the request comes from
    that task's own code (waiting for its end would never end); else a cell runs."""
    if not_idle and own:
        return (f"Error: {running.call_text(40)} runs in the foreground, so its code cannot start another "
                "foreground task: call the function directly, or start it in the background (-b, or "
                "background=True).")
    if not_idle:
        what = f" ({running.call_text(40)})" if running is not None else ""
        return (f"Error: A foreground task is running{what}: wait for it to end, start this one in "
                "the background (-b, or background=True), or cancel the running one (%task_cancel).")
    return ("Error: The kernel is running a cell: a foreground task can start once it ends; start "
            "this one in the background instead (-b, or background=True).")


def refusal_line(exc: BaseException | str, give_key: str) -> str:
    """A refused request (``RequestRefused``, ``StateFileError``, or its text) as one calm line.

    A missing key for a healthy lock reads ``The environment is locked by Alice (since ...;
    note: ...): GIVE_KEY, or ask them to unlock.`` — ``give_key`` says how the key is given
    where the line is shown (a magic's option, a panel's field); a wrong key given reads
    ``...: the key given does not open it; check the key, or ask them to unlock.``  Any other
    refusal is its own text without the protocol's ``Error:`` prefix, queueserver's
    multi-line texts joined with ``; ``; all of it :func:`printable`.  Never shows a key.
    """
    msg = str(exc)
    state = getattr(exc, "state", None)
    if (isinstance(exc, LockRefused) and state is not None and (state.environment or state.queue)
            and not getattr(state, "damaged", None)):
        scopes = " and ".join(s for s, on in (("environment", state.environment),
                                               ("queue", state.queue)) if on)
        info = state.to_lock_info()
        note = f"; note: {printable(info['note'])}" if info.get("note") else ""
        verb = "are" if state.environment and state.queue else "is"
        who = f"locked by {printable(info.get('user')) or 'someone'} (since {info.get('time_str') or '?'}{note})"
        if "Invalid lock key" in msg:
            if getattr(exc, "key_given", False):
                wrong = ("is neither its lock key nor the emergency key" if getattr(exc, "unlocking", False)
                         else "does not open it")
                return f"The {scopes} {verb} {who}: the key given {wrong}; check the key, or ask them to unlock."
            emergency = ", or the emergency key" if getattr(exc, "unlocking", False) else ""
            default = getattr(exc, "default_key", "")
            mine = f" It was locked with your default key; to release it: {default}." if default else ""
            return f"The {scopes} {verb} {who}: {give_key}{emergency}, or ask them to unlock.{mine}"
        if "locked with a different key" in msg:  # (a lock asked for with another key)
            return (f"The {scopes} {verb} already {who} with another key: to change the lock, "
                    f"{give_key}; to lock with a new key, unlock first.")
    if msg.startswith("Error: "):
        msg = msg[len("Error: "):]
    # queueserver's multi-line texts ("Invalid lock key: \nRE Manager is locked by ...\n
    # Queue is locked:       False") as one line: "Invalid lock key; ...; Queue is locked: False"
    lines = [printable(" ".join(line.split()).rstrip(":")) for line in msg.splitlines() if line.strip()]
    return "; ".join(lines) if lines else "The request was refused."


