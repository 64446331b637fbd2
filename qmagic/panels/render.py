"""HTML for the panels: pure functions of tasks and lock states (no widgets, no text forms).

The widget side (:mod:`qmagic.panels.task_table`, :mod:`qmagic.panels.lock_panel`) puts
these strings into stock ipywidgets ``HTML`` widgets.  Every element carries a stable CSS
class (a row: ``qm-row`` with ``data-task``, ``data-status`` and ``data-mode``; in it
``qm-b`` (badge), ``qm-call``, ``qm-mode``, ``qm-user``, ``qm-el`` (elapsed), ``qm-bar`` /
``qm-fill``, ``qm-pt`` (progress text), ``qm-end`` (why it ended)); how they look is the
panel's stylesheet (:mod:`qmagic.panels.styles`, sent once per panel), so the HTML carries
inline only per-row data (a progress bar's width) and a row is about 0.5 kB.

Every text a user reads here (calls, numbers, elapsed times, tracebacks) comes from
:mod:`qmagic.format`; the ``text/plain`` forms of the panels are that module's too.

A text that runs a value's own code (an argument's or a result's repr, a progress value's
str) is made with a deadline, on the panels' own :class:`~qmagic.probe.Prober` thread, unless
the value runs none (:func:`qmagic.probe.read_at_once`): one that blocked (a result that asks
a server for its contents when shown) held the thread that updates every panel of the kernel
for as long as it blocked.  Past :data:`~qmagic.probe.TEXT_READ_S` the text reads
:data:`~qmagic.probe.NOT_READ`; the table makes such a row again (:func:`texts_given_up`
tells it), and once the value's code returns it is told to (:func:`when_texts_free`); the
text made late is kept for that (a value slower than the deadline runs its code once).
"""

from __future__ import annotations

import datetime
import html
import re
from typing import TYPE_CHECKING, Any, Callable

from .. import format as fmt
from .. import probe
from ..core.memo import Memo
from ..texts import carriage_returns

if TYPE_CHECKING:  # pragma: no cover
    from ..core.task import Task

__all__ = [
    "task_key",
    "call_text",
    "texts_given_up",
    "when_texts_free",
    "row_signature",
    "row_html",
    "rows_html",
    "header_html",
    "empty_html",
    "details_signature",
    "details_html",
    "message_html",
    "lock_html",
    "lock_then_html",
    "footer_html",
]

#: Most characters of output / log shown in an expanded row (the newest ones).
DETAIL_TEXT_LIMIT = 20_000
#: Most characters of a progress message, a user name and why a task ended in a row (a row
#: is re-sent at every change: a 100,000-character message sent it ten times a second).
ROW_TEXT_LIMIT = 300

#: The panels' deadline thread (see the module docstring): a value stuck there never makes
#: the doors' reads give up, nor the other way round.
_TEXTS = probe.Prober("qmagic-panel-text")

_e = html.escape
#: A terminal's colour or style code (SGR: ``ESC [ 31 m``).
_COLOUR_CODE = re.compile(r"\x1b\[[0-9;]*m")


def _badge(text: str, cls: str = "") -> str:
    """A status badge; its colour is its row's status (or ``cls``: ``qm-locked``...)."""
    return f'<span class="qm-b{" " + cls if cls else ""}">{_e(text)}</span>'


# -- task rows ---------------------------------------------------------------------------------
def task_key(task: Task) -> str:
    """Short stable key of a task used in CSS classes (``qmagic-task-<key>``)."""
    return task.uid[:8]


def texts_given_up() -> int:
    """How many texts were made with their fallback so far (a row made while this changed
    is made again at the next update)."""
    return _TEXTS.given_up


def when_texts_free(callback: Callable[[], None]) -> None:
    """Call ``callback()`` (quick: on the panels' deadline thread) each time a value's code
    that a text gave up on has returned."""
    _TEXTS.when_free(callback)


#: Texts of slow values made on the deadline thread, by (task uid, what): ``(token, text)``,
#: used while the task's value is still ``token`` (its result, its Progress), so that making
#: a row again (after its value's code returned late) does not run that code again.
_MADE: Memo[tuple[Any, Any]] = Memo(1000)  # (then forgotten all at once: made again if needed)


def _slow_text(task: Task, what: tuple, token: Any, make: Callable[[], Any], values: tuple,
               fallback: Any) -> Any:
    """``_TEXTS.text(make, values, fallback)``, or the text made late for ``token`` before."""
    key = (task.uid, *what)
    made = _MADE.get(key)
    if made is not None and made[0] is token:
        return made[1]

    def keep(text: Any) -> None:
        _MADE.put(key, (token, text))
    return _TEXTS.text(make, values, fallback, keep=keep)


def call_text(task: Task, width: int) -> str:
    """``task.call_text(width)``, made with a deadline (module docstring); ``name(...)`` past it."""
    made = task._made_call_text(width)
    if made is not None:
        return made
    return _TEXTS.text(lambda: task.call_text(width), (*task.args, *task.kwargs.values()),
                       f"{fmt.printable(task.name, width)}(...)")


def _progress(task: Task, limit: int = ROW_TEXT_LIMIT) -> tuple[str, str, float]:
    """``(amount, text, width)`` of the task's progress: "2/5", "2/5 point 2" (at most
    ``limit`` characters) and the bar's width in percent (a completed task's bar is full),
    made with a deadline (module docstring)."""
    progress = task.progress
    full = 100.0 if task.status.value == "completed" else 0.0
    if progress is None:
        return "", "", full

    def make() -> tuple[str, str, float]:
        fraction = progress.fraction
        width = full if fraction is None else 0.0 if fraction != fraction else round(100.0 * fraction, 1)
        amount = fmt.progress_amount(progress)
        return amount, fmt.progress_text(progress, limit, amount), width

    message = fmt.printable(progress.message, limit)
    return _slow_text(task, ("progress", limit, full), progress, make, (progress.value, progress.total),
                      (probe.NOT_READ, f"{probe.NOT_READ} {message}".rstrip(), full))


def _elapsed(task: Task) -> str:
    return fmt.format_elapsed(None if task.started_at is None else task.elapsed)


def _ending(task: Task) -> str:
    """One line saying why a failed or cancelled task ended ("" otherwise)."""
    status = task.status.value
    if status == "cancelled":
        reason = task.cancel_reason
        return reason[len("Task was "):] if reason.startswith("Task was ") else f"cancelled: {reason}"
    if status == "failed":
        try:
            error = task.exception(timeout=0)
        except BaseException:  # noqa: BLE001 - a display must never fail
            error = None
        name = type(error).__name__ if error is not None else "Error"
        return f"{name}: {fmt.printable(fmt.first_line(task.error or '', ROW_TEXT_LIMIT), ROW_TEXT_LIMIT)}"
    return ""


def row_signature(task: Task) -> tuple:
    """Everything a row shows that can change, as the texts and numbers shown (values a task
    reported may not compare: numpy arrays); the row is re-rendered only when it changes."""
    _amount, text, width = _progress(task)
    return (task.status.value, text, width, _elapsed(task), task.cancel_requested and not task.done())


def row_html(task: Task) -> str:
    """One task row, two lines, :data:`~qmagic.panels.styles.ROW_HEIGHT_PX` tall.

    Line 1: status badge, the call (a script reads ``calibration.py (script)``), foreground
    or background, user and cell, elapsed time.  Line 2: progress bar, value/total and the
    last message (never cut short by a fixed column), and why a task failed or was cancelled.
    The right end is kept free for the row's buttons (drawn over it).
    """
    status = task.status.value
    cancelling = task.cancel_requested and not task.done()
    key = task_key(task)
    mode = "background" if task.background else "foreground"
    where = fmt.cell_label(task.provenance)
    user = fmt.printable(task.user, ROW_TEXT_LIMIT)
    who = " · ".join(p for p in (user, where) if p)
    tooltip = (f"{call_text(task, 400)}\n{mode} task of {user} ({fmt.printable(task.user_group, 100)}), "
               f"from {fmt.printable(task.origin, 100)}")
    if where:
        tooltip += f", cell {where}"
    progress = task.progress
    amount, progress_title, width = _progress(task)
    message = fmt.printable(progress.message, ROW_TEXT_LIMIT) if progress is not None else ""
    progress_inner = _e(amount)
    if message:
        progress_inner += (" · " if amount else "") + _e(message)
    ending = _ending(task)
    classes = "qm-row qm-cr" if cancelling else "qm-row"
    # (a space between the fields: the rows' flex lines ignore it, and a static row whose
    # stylesheet a viewer strips -- an untrusted notebook in JupyterLab, GitHub -- reads
    # "cancelled scan(400) background ...", not "cancelledscan(400)background...")
    return (
        f'<div class="{classes}" data-task="{key}" data-status="{status}" data-mode="{mode}">'
        '<div class="qm-h">'
        + _badge("cancelling" if cancelling else status)
        + f' <span class="qm-call" title="{_e(tooltip)}">{_e(call_text(task, 80))}</span>'
        f' <span class="qm-mode">{mode}</span>'
        f' <span class="qm-user" title="{_e(who)}">{_e(who)}</span>'
        f' <span class="qm-el" title="time running">{_e(_elapsed(task))}</span></div>'
        f'<div class="qm-p"><span class="qm-bar"><span class="qm-fill" style="width:{width}%"></span></span>'
        + (f' <span class="qm-pt" title="{_e(progress_title)}">' if progress_title else ' <span class="qm-pt">')
        + f'{progress_inner}</span>'
        + (f' <span class="qm-end" title="{_e(ending)}">{_e(ending)}</span>' if ending else "")
        + "</div></div>"
    )


def rows_html(inner: str) -> str:
    """The rows (and the counts line) of one segment, in a box whose minimum width is 0, so
    that long texts are cut with an ellipsis inside their row instead of widening the table
    under the buttons."""
    return f'<div class="qm-tbl">{inner}</div>'


def header_html(summary: str) -> str:
    """The counts line on top of a task table, exactly :data:`~qmagic.panels.styles.HEADER_PX` tall."""
    return f'<div class="qmagic-task-summary">{_e(summary)}</div>'


def empty_html() -> str:
    """What a task table shows without rows."""
    return '<div class="qmagic-empty">No tasks to show.</div>'


def footer_html(notes: list[str]) -> str:
    """Lines under a task table (how many tasks are not shown, and why)."""
    if not notes:
        return ""
    return '<div class="qmagic-hidden-count">' + "<br>".join(_e(n) for n in notes) + "</div>"


# -- details ------------------------------------------------------------------------------------
def _clock(epoch: float | None) -> str:
    if epoch is None:
        return "—"
    return datetime.datetime.fromtimestamp(epoch).strftime("%H:%M:%S")


def _tail(text: str, limit: int = DETAIL_TEXT_LIMIT) -> str:
    if len(text) <= limit:
        return text
    return f"[... {len(text) - limit} earlier characters not shown here; see task.output ...]\n" + text[-limit:]


def details_signature(task: Task) -> tuple:
    """What an expanded row shows; re-rendered only when this changes."""
    output = task.output
    log = task.log_text
    return (task.status.value, _progress(task, 200)[1], len(output), output[-64:], len(log), log[-64:])


def _as_terminal(text: str) -> str:
    """Each line as a terminal leaves it: colour codes read as the text they colour, and a
    carriage return (a progress bar redrawn in place, ``end="\\r"``) starts the line over:
    the last text written on it shows."""
    if "\x1b" in text:
        text = _COLOUR_CODE.sub("", text)
    return carriage_returns(text)


def _section(title: str, body: str, cls: str) -> str:
    """A titled block of text (printable: lines stay; a lone surrogate or a terminal code is
    escaped, so the text can be sent to the browser and shows as written)."""
    return (f'<div class="qmagic-detail {cls}"><div class="qm-dt">{_e(title)}</div>'
            f'<pre>{_e(fmt.printable(_as_terminal(body), lines=True))}</pre></div>')


def details_html(task: Task) -> str:
    """An expanded row: who, where and when, the full call, result or traceback, output, log."""
    status = task.status.value
    mode = "background" if task.background else "foreground"
    where = fmt.cell_label(task.provenance)
    facts = [f"uid {task.uid}", f"{task.user} ({task.user_group})", f"from {task.origin}", mode]
    facts = [fmt.printable(f, ROW_TEXT_LIMIT) for f in facts]
    if where:
        facts.append(f"cell {where}")
    facts += [f"submitted {_clock(task.submitted_at)}", f"started {_clock(task.started_at)}",
              f"finished {_clock(task.finished_at)}", f"elapsed {_elapsed(task)}"]
    parts = [
        f'<div class="qm-facts">{_e(" · ".join(facts))}</div>',
        _section("Call", call_text(task, 4000), "qmagic-detail-call"),
    ]
    if status == "completed":
        if task.kind == "script":
            changes = task.namespace_changes or {}
            lines = [f"{k}: {', '.join(v)}" for k, v in changes.items() if v] or ["(no names changed)"]
            parts.append(_section("Namespace changes", "\n".join(lines), "qmagic-detail-result"))
        else:
            result = task.result(timeout=0)
            text = _slow_text(task, ("result",), None, lambda: fmt.safe_repr(result, 5000, lines=True),
                              (result,), probe.NOT_READ)
            parts.append(_section("Result", text, "qmagic-detail-result"))
    elif status in ("failed", "cancelled"):
        body = task.traceback or _ending(task)
        parts.append(_section("Traceback" if task.traceback else status.title(), body,
                              "qmagic-detail-traceback"))
    output = task.output
    parts.append(_section("Output", _tail(output) if output else "(no output)", "qmagic-detail-output"))
    log = task.log_text
    parts.append(_section("Log", _tail(log) if log else "(no log records)", "qmagic-detail-log"))
    return (
        f'<div class="qmagic-task-details" data-task="{task_key(task)}" data-status="{status}">'
        f'{"".join(parts)}</div>'
    )


# -- messages -----------------------------------------------------------------------------------
def message_html(text: str, kind: str = "info") -> str:
    """A panel message: ``kind`` is "info", "ok" or "error" (errors are never silent)."""
    if not text:
        return ""
    kind = kind if kind in ("info", "ok", "error") else "info"
    return f'<div class="qmagic-message qmagic-message-{kind}">{_e(text)}</div>'


# -- the lock -----------------------------------------------------------------------------------
def _scope_badges(state: Any) -> str:
    out = []
    for scope in ("environment", "queue"):
        on = bool(getattr(state, scope))
        word = "locked" if on else "unlocked"
        out.append(
            f'<span class="qmagic-lock-scope qmagic-lock-{scope}-{word}">'
            + _badge(f"{scope.title()}: {word}", f"qm-{word}") + "</span>"
        )
    return "".join(out)


def _holder(state: Any) -> str:
    info = state.to_lock_info()
    return (f"Locked by <b>{_e(fmt.printable(info.get('user'), ROW_TEXT_LIMIT) or '?')}</b> since "
            f"{_e(fmt.printable(info.get('time_str')) or '?')}")


def lock_html(state: Any, holds_key: bool, problem: str = "", changed: bool = False) -> str:
    """The live lock ("Now"): per scope locked/unlocked, who, since when, the note, whether
    this kernel holds the key and whether an emergency key is set.  ``state`` is a
    :class:`qmagic.LockState` (None when it could not be read: ``problem`` says why);
    ``changed``: it differs from what the panel showed when its cell ran."""
    label = "Now (live)" + (" — changed since this cell ran" if changed else "")
    head = f'<div class="qmagic-lock-label">{_e(label)}</div>'
    if state is None:
        return (f'<div class="qmagic-lock-state qmagic-lock-unknown">'
                f"{head}{message_html(problem or 'The lock could not be read.', 'error')}</div>")
    lines = []
    if state.locked:
        lines.append(_holder(state) + (" · this kernel holds the key" if holds_key
                                       else " · this kernel does not hold the key"))
        lines.append(f"Note: {_e(fmt.printable(state.note) or '—')}")
    else:
        lines.append("Not locked: anyone may start tasks.")
    lines.append(f"Emergency unlock key: {'set' if state.emergency_key_set else 'not set'}")
    body = "".join(f'<div class="qm-line">{line}</div>' for line in lines)
    warn = message_html(state.damaged, "error") if state.damaged else ""
    warn += message_html(problem, "error") if problem else ""
    word = "locked" if state.locked else "unlocked"
    return f'<div class="qmagic-lock-state qmagic-lock-{word}">{head}{_scope_badges(state)}{body}{warn}</div>'


def lock_then_html(state: Any, when: float, problem: str = "") -> str:
    """What the lock was when the panel's cell ran (it does not change afterwards)."""
    stamp = _clock(when)
    if state is None:
        text = _e(problem or "The lock could not be read.")
    elif state.locked:
        scopes = " and ".join(s for s in ("environment", "queue") if getattr(state, s))
        text = f"{_holder(state)} ({_e(scopes)})" + (f" · note: {_e(fmt.printable(state.note))}" if state.note else "")
    else:
        text = "Not locked."
    return (
        f'<div class="qmagic-lock-then"><span class="qm-dt">When this cell ran ({stamp}):</span> '
        f"{text}</div>"
    )
