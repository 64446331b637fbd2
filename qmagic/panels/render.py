"""HTML for the panels: pure functions of tasks and lock states (no widgets, no text forms).

The widget side (:mod:`qmagic.panels.task_table`, :mod:`qmagic.panels.lock_panel`) puts
these strings into stock ipywidgets ``HTML`` widgets.  Every element carries a stable CSS
class (``qmagic-task-row``, ``qmagic-status-<status>``, ``qmagic-badge``,
``qmagic-progress-text``...) and inline styles, so panels look right without a stylesheet
and tests can find them.

Colours come from JupyterLab's theme variables (``--jp-ui-font-color1``,
``--jp-border-color2``, ``--jp-brand-color1``, ``--jp-success-color1``...), each with a
light-theme fallback for frontends without them, so a panel reads well in the light and the
dark theme: text always uses the theme's font colours; a status colour marks borders, dots
and bars, and tints backgrounds only lightly (``color-mix``).

Every text a user reads here (calls, numbers, elapsed times, tracebacks) comes from
:mod:`qmagic.format`; the ``text/plain`` forms of the panels are that module's too.
"""

from __future__ import annotations

import datetime
import html
from typing import TYPE_CHECKING, Any

from .. import format as fmt

if TYPE_CHECKING:  # pragma: no cover
    from ..core.task import Task

__all__ = [
    "ROW_HEIGHT_PX",
    "HEADER_PX",
    "BUTTON_WIDTH_PX",
    "TOGGLE_WIDTH_PX",
    "CONTROLS_GAP_PX",
    "CONTROLS_WIDTH_PX",
    "CONTROLS_MARGIN_PX",
    "STATUS_COLOURS",
    "task_key",
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

#: Height of one task row, in the table and in the controls column (they must agree).
ROW_HEIGHT_PX = 48
#: Height of the counts line on top of a task table (the controls column is padded by as much).
HEADER_PX = 26
#: The controls drawn over the right end of every row: Cancel / Force stop, then Details.
BUTTON_WIDTH_PX = 80
TOGGLE_WIDTH_PX = 64
CONTROLS_GAP_PX = 6
CONTROLS_WIDTH_PX = BUTTON_WIDTH_PX + CONTROLS_GAP_PX + TOGGLE_WIDTH_PX
#: Space between the controls and the row's right edge.
CONTROLS_MARGIN_PX = 8
#: Most characters of output / log shown in an expanded row (the newest ones).
DETAIL_TEXT_LIMIT = 20_000

# Theme colours, with JupyterLab's light values as fallbacks.
FONT1 = "var(--jp-ui-font-color1, rgba(0, 0, 0, 0.87))"
FONT2 = "var(--jp-ui-font-color2, rgba(0, 0, 0, 0.54))"
BORDER1 = "var(--jp-border-color1, #bdbdbd)"
BORDER2 = "var(--jp-border-color2, #e0e0e0)"
LAYOUT2 = "var(--jp-layout-color2, #eeeeee)"
CODE_FONT = "var(--jp-code-font-family, monospace)"
UI_FONT_SIZE = "var(--jp-ui-font-size1, 13px)"

#: The colour that marks each status (badge border and tint, progress bar, details rule).
STATUS_COLOURS: dict[str, str] = {
    "queued": "var(--jp-layout-color4, #757575)",
    "running": "var(--jp-brand-color1, #1976d2)",
    "completed": "var(--jp-success-color1, #388e3c)",
    "failed": "var(--jp-error-color1, #d32f2f)",
    "cancelled": "var(--jp-warn-color1, #f57c00)",
}
_MESSAGE_COLOURS = {
    "error": "var(--jp-error-color1, #d32f2f)",
    "ok": "var(--jp-success-color1, #388e3c)",
    "info": "var(--jp-brand-color1, #1976d2)",
}

_e = html.escape


def _tint(colour: str, percent: int) -> str:
    """A background tinted with ``colour``: transparent where color-mix is unknown."""
    return f"background:transparent;background:color-mix(in srgb, {colour} {percent}%, transparent)"


def _badge(text: str, colour: str, cls: str = "") -> str:
    return (
        f'<span class="qmagic-badge {cls}" style="flex:0 0 auto;display:inline-block;'
        f"box-sizing:border-box;min-width:86px;text-align:center;border-radius:10px;padding:1px 8px;"
        f"font-size:11.5px;font-weight:600;letter-spacing:0.02em;color:{FONT1};"
        f'border:1px solid {colour};{_tint(colour, 18)}">{_e(text)}</span>'
    )


# -- task rows ---------------------------------------------------------------------------------
def task_key(task: Task) -> str:
    """Short stable key of a task used in CSS classes (``qmagic-task-<key>``)."""
    return task.uid[:8]


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
        return f"{name}: {fmt.one_line(task.error or '', 300)}"
    return ""


def row_signature(task: Task) -> tuple:
    """Everything a row shows that can change; the row is re-rendered only when it does."""
    return (task.status.value, task.progress, _elapsed(task), task.cancel_requested and not task.done())


def row_html(task: Task) -> str:
    """One task row, two lines, :data:`ROW_HEIGHT_PX` tall.

    Line 1: status badge, the call (a script reads ``calibration.py (script)``), foreground
    or background, user and cell, elapsed time.  Line 2: progress bar, value/total and the
    last message (never cut short by a fixed column), and why a task failed or was cancelled.
    The right end is kept free for the row's buttons (drawn over it).
    """
    status = task.status.value
    colour = STATUS_COLOURS.get(status, STATUS_COLOURS["queued"])
    cancelling = task.cancel_requested and not task.done()
    key = task_key(task)
    mode = "background" if task.background else "foreground"
    where = fmt.cell_label(task.provenance)
    who = " · ".join(p for p in (task.user, where) if p)
    tooltip = f"{task.call_text(400)}\n{mode} task of {task.user} ({task.user_group}), from {task.origin}"
    if where:
        tooltip += f", cell {where}"
    progress = task.progress
    fraction = progress.fraction if progress is not None else None
    if fraction is None and status == "completed":
        fraction = 1.0
    width = 0.0 if fraction is None else round(100.0 * fraction, 1)
    amount = fmt.progress_amount(progress)
    message = (progress.message or "") if progress is not None else ""
    progress_inner = _e(amount)
    if message:
        progress_inner += (" · " if amount else "") + f'<span class="qmagic-progress-message">{_e(message)}</span>'
    ending = _ending(task)
    classes = f"qmagic-task-row qmagic-status-{status} qmagic-mode-{mode} qmagic-task-{key}"
    if cancelling:
        classes += " qmagic-cancel-requested"
    right = CONTROLS_WIDTH_PX + 2 * CONTROLS_MARGIN_PX
    line = "display:flex;align-items:center;gap:8px;min-width:0;white-space:nowrap"
    return (
        f'<div class="{classes}" data-task="{key}" data-status="{status}" data-mode="{mode}" '
        f'style="box-sizing:border-box;height:{ROW_HEIGHT_PX}px;padding:3px {right}px 3px 8px;'
        f"display:flex;flex-direction:column;justify-content:center;gap:4px;overflow:hidden;"
        f'border-bottom:1px solid {BORDER2};line-height:normal;font-size:{UI_FONT_SIZE};color:{FONT1}">'
        f'<div class="qmagic-row-head" style="{line}">'
        + _badge("cancelling" if cancelling else status, colour, f"qmagic-status-badge qmagic-status-{status}")
        + f'<span class="qmagic-call" title="{_e(tooltip)}" style="flex:0 0 auto;max-width:50%;'
        f"overflow:hidden;text-overflow:ellipsis;font-family:{CODE_FONT};font-size:12.5px;"
        f'font-weight:600">{_e(task.call_text(80))}</span>'
        f'<span class="qmagic-mode" style="flex:0 0 auto;font-size:11px;padding:0 6px;border-radius:8px;'
        f'border:1px solid {BORDER1};color:{FONT2}">{mode}</span>'
        f'<span class="qmagic-user" title="{_e(who)}" style="flex:0 100 auto;min-width:0;overflow:hidden;'
        f'text-overflow:ellipsis;color:{FONT2}">{_e(who)}</span>'
        f'<span style="flex:1 1 0"></span>'
        f'<span class="qmagic-elapsed" title="time running" style="flex:0 0 auto;'
        f'font-variant-numeric:tabular-nums;color:{FONT2}">{_e(_elapsed(task))}</span></div>'
        f'<div class="qmagic-row-progress" style="{line}">'
        f'<span class="qmagic-bar" style="flex:0 0 150px;height:6px;border-radius:3px;'
        f'background:{LAYOUT2};overflow:hidden"><span class="qmagic-bar-fill" style="display:block;'
        f'height:100%;width:{width}%;background:{colour}"></span></span>'
        f'<span class="qmagic-progress-text" title="{_e(fmt.progress_text(progress))}" '
        f'style="flex:0 1 auto;min-width:0;overflow:hidden;text-overflow:ellipsis">{progress_inner}</span>'
        + (f'<span class="qmagic-row-ending" title="{_e(ending)}" style="flex:0 100 auto;min-width:0;'
           f'overflow:hidden;text-overflow:ellipsis;color:{FONT2}">{_e(ending)}</span>' if ending else "")
        + "</div></div>"
    )


def rows_html(inner: str) -> str:
    """The rows (and the counts line) of one segment, in a box whose minimum width is 0, so
    that long texts are cut with an ellipsis inside their row instead of widening the table
    under the buttons."""
    return f'<div class="qmagic-rows" style="display:grid;grid-template-columns:minmax(0, 1fr)">{inner}</div>'


def header_html(summary: str) -> str:
    """The counts line on top of a task table, exactly :data:`HEADER_PX` tall."""
    return (
        f'<div class="qmagic-task-summary" style="box-sizing:border-box;height:{HEADER_PX}px;'
        f"padding:4px 8px 0 8px;font-size:12px;color:{FONT2};white-space:nowrap;overflow:hidden;"
        f'text-overflow:ellipsis;line-height:normal;border-bottom:1px solid {BORDER2}">{_e(summary)}</div>'
    )


def empty_html() -> str:
    """What a task table shows without rows."""
    return (f'<div class="qmagic-empty" style="padding:8px;line-height:normal;color:{FONT2}">'
            "No tasks to show.</div>")


def footer_html(notes: list[str]) -> str:
    """Lines under a task table (how many tasks are not shown, and why)."""
    if not notes:
        return ""
    return (f'<div class="qmagic-hidden-count" style="font-size:12px;color:{FONT2};padding:2px 8px;'
            f'line-height:1.4">' + "<br>".join(_e(n) for n in notes) + "</div>")


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
    return (task.status.value, task.progress, len(output), output[-64:], len(log), log[-64:])


_PRE = (
    "margin:2px 0 8px 0;padding:6px 8px;max-height:220px;overflow:auto;white-space:pre-wrap;"
    f"word-break:break-word;font-family:{CODE_FONT};font-size:12px;line-height:1.35;"
    f"background:{LAYOUT2};color:{FONT1};border-radius:4px"
)


def _section(title: str, body: str, cls: str) -> str:
    return (
        f'<div class="qmagic-detail {cls}"><div style="font-weight:600;font-size:12px;color:{FONT2}">'
        f'{_e(title)}</div><pre style="{_PRE}">{_e(body)}</pre></div>'
    )


def details_html(task: Task) -> str:
    """An expanded row: who, where and when, the full call, result or traceback, output, log."""
    status = task.status.value
    colour = STATUS_COLOURS.get(status, STATUS_COLOURS["queued"])
    mode = "background" if task.background else "foreground"
    where = fmt.cell_label(task.provenance)
    facts = [f"uid {task.uid}", f"{task.user} ({task.user_group})", f"from {task.origin}", mode]
    if where:
        facts.append(f"cell {where}")
    facts += [f"submitted {_clock(task.submitted_at)}", f"started {_clock(task.started_at)}",
              f"finished {_clock(task.finished_at)}", f"elapsed {_elapsed(task)}"]
    parts = [
        f'<div style="font-size:12px;color:{FONT2};margin-bottom:6px">{_e(" · ".join(facts))}</div>',
        _section("Call", task.call_text(4000), "qmagic-detail-call"),
    ]
    if status == "completed":
        if task.kind == "script":
            changes = task.namespace_changes or {}
            lines = [f"{k}: {', '.join(v)}" for k, v in changes.items() if v] or ["(no names changed)"]
            parts.append(_section("Namespace changes", "\n".join(lines), "qmagic-detail-result"))
        else:
            parts.append(_section("Result", fmt.safe_repr(task.result(timeout=0), 5000, lines=True),
                                  "qmagic-detail-result"))
    elif status in ("failed", "cancelled"):
        body = task.traceback or _ending(task)
        parts.append(_section("Traceback" if task.traceback else status.title(), body,
                              "qmagic-detail-traceback"))
    output = task.output
    parts.append(_section("Output", _tail(output) if output else "(no output)", "qmagic-detail-output"))
    log = task.log_text
    parts.append(_section("Log", _tail(log) if log else "(no log records)", "qmagic-detail-log"))
    return (
        f'<div class="qmagic-task-details qmagic-status-{status}" data-task="{task_key(task)}" '
        f'style="padding:6px 10px 2px 10px;border-left:3px solid {colour};'
        f'border-bottom:1px solid {BORDER2};line-height:normal;color:{FONT1}">{"".join(parts)}</div>'
    )


# -- messages -----------------------------------------------------------------------------------
def message_html(text: str, kind: str = "info") -> str:
    """A panel message: ``kind`` is "info", "ok" or "error" (errors are never silent)."""
    if not text:
        return ""
    colour = _MESSAGE_COLOURS.get(kind, _MESSAGE_COLOURS["info"])
    return (
        f'<div class="qmagic-message qmagic-message-{kind}" style="white-space:pre-wrap;'
        f"font-size:12.5px;line-height:1.35;padding:4px 8px;border-radius:3px;color:{FONT1};"
        f'border-left:3px solid {colour};{_tint(colour, 12)}">{_e(text)}</div>'
    )


# -- the lock -----------------------------------------------------------------------------------
_LOCKED = STATUS_COLOURS["failed"]
_UNLOCKED = STATUS_COLOURS["completed"]


def _scope_badges(state: Any) -> str:
    out = []
    for scope in ("environment", "queue"):
        on = bool(getattr(state, scope))
        word = "locked" if on else "unlocked"
        out.append(
            f'<span class="qmagic-lock-scope qmagic-lock-{scope}-{word}" style="margin-right:6px">'
            + _badge(f"{scope.title()}: {word}", _LOCKED if on else _UNLOCKED) + "</span>"
        )
    return "".join(out)


def _holder(state: Any) -> str:
    info = state.to_lock_info()
    return (f"Locked by <b>{_e(str(info.get('user') or '?'))}</b> since "
            f"{_e(info.get('time_str') or '?')}")


def lock_html(state: Any, holds_key: bool, problem: str = "", changed: bool = False) -> str:
    """The live lock ("Now"): per scope locked/unlocked, who, since when, the note, whether
    this kernel holds the key and whether an emergency key is set.  ``state`` is a
    :class:`qmagic.LockState` (None when it could not be read: ``problem`` says why);
    ``changed``: it differs from what the panel showed when its cell ran."""
    label = "Now (live)" + (" — changed since this cell ran" if changed else "")
    head = (f'<div class="qmagic-lock-label" style="font-size:11.5px;font-weight:600;'
            f'color:{FONT2};margin-bottom:3px">{_e(label)}</div>')
    if state is None:
        return (f'<div class="qmagic-lock-state qmagic-lock-unknown" style="line-height:1.4;color:{FONT1}">'
                f"{head}{message_html(problem or 'The lock could not be read.', 'error')}</div>")
    lines = []
    if state.locked:
        lines.append(_holder(state) + (" · this kernel holds the key" if holds_key
                                       else " · this kernel does not hold the key"))
        lines.append(f"Note: {_e(state.note or '—')}")
    else:
        lines.append("Not locked: anyone may start tasks.")
    lines.append(f"Emergency unlock key: {'set' if state.emergency_key_set else 'not set'}")
    body = "".join(f'<div style="margin-top:3px">{line}</div>' for line in lines)
    warn = message_html(state.damaged, "error") if state.damaged else ""
    warn += message_html(problem, "error") if problem else ""
    word = "locked" if state.locked else "unlocked"
    return (f'<div class="qmagic-lock-state qmagic-lock-{word}" style="font-size:13px;line-height:1.4;'
            f'color:{FONT1}">{head}{_scope_badges(state)}{body}{warn}</div>')


def lock_then_html(state: Any, when: float, problem: str = "") -> str:
    """What the lock was when the panel's cell ran (it does not change afterwards)."""
    stamp = _clock(when)
    if state is None:
        text = _e(problem or "The lock could not be read.")
    elif state.locked:
        scopes = " and ".join(s for s in ("environment", "queue") if getattr(state, s))
        text = f"{_holder(state)} ({_e(scopes)})" + (f" · note: {_e(state.note)}" if state.note else "")
    else:
        text = "Not locked."
    return (
        f'<div class="qmagic-lock-then" style="font-size:12.5px;line-height:1.4;color:{FONT1};'
        f'padding:4px 8px;margin-bottom:6px;border-left:3px solid {BORDER1};{_tint(BORDER1, 15)}">'
        f'<span style="font-weight:600;color:{FONT2}">When this cell ran ({stamp}):</span> {text}</div>'
    )
