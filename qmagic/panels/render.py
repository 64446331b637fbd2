"""HTML and text for the panels: pure functions of tasks and lock info (no widgets here).

The widget side (:mod:`qmagic.panels.task_panel`, :mod:`qmagic.panels.lock_panel`) puts
these strings into stock ipywidgets ``HTML`` widgets.  Every element carries a stable CSS
class (``qmagic-task-row``, ``qmagic-status-<status>``, ``qmagic-badge`` ...) and inline
styles, so panels look the same without any stylesheet and tests can find them.

The ``text/plain`` forms come from :mod:`qmagic.text` (no uids, no clock times).
"""

from __future__ import annotations

import datetime
import html
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from ..text import format_number, progress_amount, user_traceback

if TYPE_CHECKING:  # pragma: no cover
    from ..tasks import Task

__all__ = [
    "ROW_HEIGHT_PX",
    "HEADER_PX",
    "CONTROLS_WIDTH_PX",
    "STATUS_COLOURS",
    "row_signature",
    "row_html",
    "header_html",
    "details_html",
    "details_signature",
    "lock_html",
    "message_html",
    "format_elapsed",
    "format_number",
    "panel_text",
    "row_text",
    "lock_plain_text",
]

#: Height of one task row, in the table and in the controls column (they must agree).
ROW_HEIGHT_PX = 32
#: Height of the counts line plus the column titles on top of a task table.
HEADER_PX = 48
SUMMARY_PX = 22
#: Width of the controls column (Cancel + Details buttons) next to the table.
CONTROLS_WIDTH_PX = 128
#: Most characters of output / log shown in an expanded row (the newest ones).
DETAIL_TEXT_LIMIT = 20_000

#: Badge text colour and background, bar colour, per status: calm, legible, readable on a
#: light and on a dark theme (the badge carries its own background).
STATUS_COLOURS: dict[str, tuple[str, str, str]] = {
    "queued": ("#374151", "#e5e7eb", "#9ca3af"),
    "running": ("#1e3a8a", "#dbeafe", "#3b82f6"),
    "completed": ("#14532d", "#dcfce7", "#22c55e"),
    "failed": ("#7f1d1d", "#fee2e2", "#ef4444"),
    "cancelled": ("#78350f", "#fef3c7", "#f59e0b"),
}
_TRACK = "rgba(128, 128, 128, 0.22)"
_RULE = "rgba(128, 128, 128, 0.22)"

_e = html.escape


def format_elapsed(seconds: float | None, exact: bool = False) -> str:
    """``"7 s"``, ``"3:05"`` (min:s), ``"1:02:03"`` (h:min:s); ``"—"`` when not started.

    ``exact`` (for finished tasks) shows tenths below 10 s: ``"0.8 s"``.
    """
    if seconds is None:
        return "—"
    if exact and seconds < 9.95:
        return f"{max(0.0, seconds):.1f} s"
    whole = int(max(0.0, seconds))
    if whole < 60:
        return f"{whole} s"
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{minutes}:{secs:02d}"


def _elapsed_of(task: Task) -> float | None:
    return None if task.started_at is None else task.elapsed


def _elapsed_text(task: Task) -> str:
    return format_elapsed(_elapsed_of(task), exact=task.done())


def row_signature(task: Task) -> tuple:
    """Everything a row shows; the row is re-rendered only when this changes."""
    return (
        task.status.value,
        task.progress,
        _elapsed_text(task),
        task.cancel_requested and not task.done(),
    )


def _progress_parts(task: Task) -> tuple[float | None, str, str]:
    """(bar fraction or None, amount text, message text)."""
    progress = task.progress
    status = task.status.value
    if progress is None:
        return (1.0 if status == "completed" else None), "", ""
    fraction = progress.fraction
    amount = progress_amount(progress)
    if fraction is None and status == "completed":
        fraction = 1.0
    return fraction, amount, progress.message or ""


def task_key(task: Task) -> str:
    """Short stable key of a task used in CSS classes (``qmagic-task-<key>``)."""
    return task.uid[:8]


def row_html(task: Task) -> str:
    """One table row: call, user, status badge, progress bar + value/total + message, elapsed."""
    status = task.status.value
    fg, bg, bar = STATUS_COLOURS.get(status, STATUS_COLOURS["queued"])
    cancelling = task.cancel_requested and not task.done()
    badge = "cancelling" if cancelling else status
    fraction, amount, message = _progress_parts(task)
    call = task.call_text(48)
    where = "background" if task.background else "foreground"
    tooltip = f"{task.call_text(400)}\n{where} task, user {task.user} ({task.user_group}), from {task.origin}"
    width = 0.0 if fraction is None else round(100.0 * fraction, 1)
    progress_title = " · ".join(p for p in (amount, message) if p)
    progress_text = _e(amount)
    if message:
        sep = " · " if amount else ""
        progress_text += f'{sep}<span class="qmagic-progress-message">{_e(message)}</span>'
    classes = f"qmagic-task-row qmagic-status-{status} qmagic-task-{task_key(task)}"
    if cancelling:
        classes += " qmagic-cancel-requested"
    return (
        f'<div class="{classes}" data-task="{task_key(task)}" data-status="{status}" '
        f'style="display:flex;align-items:center;gap:10px;height:{ROW_HEIGHT_PX}px;'
        f"box-sizing:border-box;padding:0 8px;border-bottom:1px solid {_RULE};"
        f'white-space:nowrap;overflow:hidden;line-height:normal;font-size:13px">'
        f'<span class="qmagic-call" title="{_e(tooltip)}" style="flex:1 1 auto;min-width:60px;'
        f"overflow:hidden;text-overflow:ellipsis;font-family:var(--jp-code-font-family,monospace);"
        f'font-size:12.5px">{_e(call)}</span>'
        f'<span class="qmagic-user" title="{_e(task.user)}" style="flex:0 0 110px;overflow:hidden;'
        f'text-overflow:ellipsis;opacity:0.8">{_e(task.user)}</span>'
        f'<span class="qmagic-badge" style="flex:0 0 84px;text-align:center;border-radius:10px;'
        f"padding:2px 0;font-size:11.5px;font-weight:600;letter-spacing:0.02em;color:{fg};"
        f'background:{bg}">{_e(badge)}</span>'
        f'<span class="qmagic-progress" title="{_e(progress_title)}" style="flex:0 0 250px;'
        f'display:flex;align-items:center;gap:8px;overflow:hidden">'
        f'<span class="qmagic-bar" style="flex:0 0 96px;height:8px;border-radius:4px;'
        f'background:{_TRACK};overflow:hidden"><span class="qmagic-bar-fill" style="display:block;'
        f'height:100%;width:{width}%;background:{bar}"></span></span>'
        f'<span class="qmagic-progress-text" style="overflow:hidden;text-overflow:ellipsis">'
        f"{progress_text}</span></span>"
        f'<span class="qmagic-elapsed" style="flex:0 0 64px;text-align:right;'
        f'font-variant-numeric:tabular-nums;opacity:0.85">{_e(_elapsed_text(task))}'
        f"</span></div>"
    )


def header_html(summary: str = "") -> str:
    """Counts line and column titles on top of a task table: exactly :data:`HEADER_PX` tall
    (the controls column next to it is padded by as much)."""
    cell = "overflow:hidden;text-overflow:ellipsis"
    return (
        f'<div class="qmagic-task-summary" style="height:{SUMMARY_PX}px;box-sizing:border-box;'
        f"padding:3px 8px 0 8px;font-size:12px;opacity:0.8;white-space:nowrap;overflow:hidden;"
        f'text-overflow:ellipsis;line-height:normal">{_e(summary)}</div>'
        f'<div class="qmagic-task-header" style="display:flex;align-items:center;gap:10px;'
        f"box-sizing:border-box;padding:0 8px;height:{HEADER_PX - SUMMARY_PX}px;font-size:11.5px;"
        f"font-weight:600;text-transform:uppercase;letter-spacing:0.04em;opacity:0.65;"
        f'line-height:normal;white-space:nowrap;border-bottom:1px solid {_RULE}">'
        f'<span style="flex:1 1 auto;min-width:60px;{cell}">task</span>'
        f'<span style="flex:0 0 110px;{cell}">user</span>'
        f'<span style="flex:0 0 84px;text-align:center">status</span>'
        f'<span style="flex:0 0 250px;{cell}">progress</span>'
        f'<span style="flex:0 0 64px;text-align:right">elapsed</span></div>'
    )


def _clock(epoch: float | None) -> str:
    if epoch is None:
        return "—"
    return datetime.datetime.fromtimestamp(epoch).strftime("%H:%M:%S")


def _tail(text: str, limit: int = DETAIL_TEXT_LIMIT) -> str:
    if len(text) <= limit:
        return text
    return f"[... {len(text) - limit} earlier characters not shown here; see task.output ...]\n" + text[-limit:]


def _safe_repr(value: Any, limit: int = 5000) -> str:
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a broken __repr__ must not break the panel
        text = f"<{type(value).__name__} with a failing repr>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def details_signature(task: Task) -> tuple:
    """What an expanded row shows; re-rendered only when this changes."""
    output = task.output
    log = task.log_text
    return (task.status.value, task.progress, len(output), output[-64:], len(log), log[-64:])


_PRE = (
    "margin:2px 0 8px 0;padding:6px 8px;max-height:220px;overflow:auto;white-space:pre-wrap;"
    "word-break:break-word;font-family:var(--jp-code-font-family,monospace);font-size:12px;"
    "line-height:1.35;background:rgba(128,128,128,0.08);border-radius:4px"
)


def _section(title: str, body: str, cls: str) -> str:
    return (
        f'<div class="qmagic-detail {cls}"><div style="font-weight:600;font-size:12px;'
        f'opacity:0.75">{_e(title)}</div><pre style="{_PRE}">{_e(body)}</pre></div>'
    )


def details_html(task: Task) -> str:
    """An expanded row: who/when, the full call, result or traceback, output and log."""
    status = task.status.value
    _, _, bar = STATUS_COLOURS.get(status, STATUS_COLOURS["queued"])
    where = "background" if task.background else "foreground"
    facts = (
        f"uid {_e(task.uid)} · {_e(task.user)} ({_e(task.user_group)}) · from {_e(task.origin)} · "
        f"{where} · submitted {_clock(task.submitted_at)} · started {_clock(task.started_at)} · "
        f"finished {_clock(task.finished_at)}"
    )
    parts = [
        f'<div style="font-size:12px;opacity:0.8;margin-bottom:6px">{facts}</div>',
        _section("Call", task.call_text(4000), "qmagic-detail-call"),
    ]
    data = task.to_dict()
    if status == "completed":
        if task.kind == "script":
            changes = task.namespace_changes or {}
            lines = [f"{k}: {', '.join(v)}" for k, v in changes.items() if v] or ["(no names changed)"]
            parts.append(_section("Namespace changes", "\n".join(lines), "qmagic-detail-result"))
        else:
            parts.append(_section("Result", _safe_repr(data["result"]), "qmagic-detail-result"))
    elif status in ("failed", "cancelled"):
        body = (user_traceback(task.traceback) if task.traceback
                else f"{data.get('error_type') or status}: {data.get('error') or ''}")
        parts.append(_section("Traceback" if task.traceback else status.title(), body,
                              "qmagic-detail-traceback"))
    output = task.output
    parts.append(_section("Output", _tail(output) if output else "(no output)", "qmagic-detail-output"))
    log = task.log_text
    parts.append(_section("Log", _tail(log) if log else "(no log records)", "qmagic-detail-log"))
    return (
        f'<div class="qmagic-task-details qmagic-status-{status}" data-task="{task_key(task)}" '
        f'style="padding:6px 10px 2px 10px;margin:0 0 4px 0;border-left:3px solid {bar};'
        f'line-height:normal">{"".join(parts)}</div>'
    )


def message_html(text: str, kind: str = "info") -> str:
    """A panel message: ``kind`` is "info", "ok" or "error" (errors are never silent)."""
    if not text:
        return ""
    colour = {"error": "#b91c1c", "ok": "#15803d"}.get(kind, "inherit")
    bg = {"error": "rgba(239,68,68,0.10)", "ok": "rgba(34,197,94,0.10)"}.get(kind, "transparent")
    return (
        f'<div class="qmagic-message qmagic-message-{kind}" style="white-space:pre-wrap;'
        f"font-size:12.5px;line-height:1.35;padding:4px 8px;border-radius:4px;color:{colour};"
        f'background:{bg}">{_e(text)}</div>'
    )


def _badge(text: str, locked: bool) -> str:
    fg, bg = ("#7f1d1d", "#fee2e2") if locked else ("#14532d", "#dcfce7")
    return (
        f'<span class="qmagic-badge" style="display:inline-block;border-radius:10px;padding:2px 10px;'
        f'font-size:12px;font-weight:600;margin-right:8px;color:{fg};background:{bg}">{_e(text)}</span>'
    )


def lock_html(reply: Mapping[str, Any], holds_key: bool) -> str:
    """The lock panel's state: per scope locked/unlocked, who, since when, note, emergency key."""
    info = reply.get("lock_info") or {}
    problem = "" if reply.get("success", True) else str(reply.get("msg") or "")
    env, queue = bool(info.get("environment")), bool(info.get("queue"))
    locked = env or queue
    scopes = (
        f'<span class="qmagic-lock-scope qmagic-lock-environment-{"locked" if env else "unlocked"}">'
        f'{_badge("Environment: " + ("locked" if env else "unlocked"), env)}</span>'
        f'<span class="qmagic-lock-scope qmagic-lock-queue-{"locked" if queue else "unlocked"}">'
        f'{_badge("Queue: " + ("locked" if queue else "unlocked"), queue)}</span>'
    )
    lines = []
    if locked:
        since = info.get("time_str") or "?"
        lines.append(
            f"Locked by <b>{_e(str(info.get('user') or '?'))}</b> since {_e(since)}"
            + (" · this kernel holds the key" if holds_key else " · this kernel does not hold the key")
        )
        lines.append(f"Note: {_e(info.get('note') or '—')}")
    else:
        lines.append("Not locked: anyone may start tasks.")
    emergency = "set" if info.get("emergency_lock_key_is_set") else "not set"
    lines.append(f"Emergency unlock key: {emergency}")
    body = "".join(f'<div style="margin-top:3px">{line}</div>' for line in lines)
    warn = message_html(problem, "error") if problem else ""
    state = "locked" if locked else "unlocked"
    return (
        f'<div class="qmagic-lock-state qmagic-lock-{state}" style="font-size:13px;'
        f'line-height:1.4;padding:4px 2px">{scopes}{body}{warn}</div>'
    )


# -- text/plain -------------------------------------------------------------------------
try:  # qmagic.text is the shared deterministic text; keep a fallback while it is missing
    from .. import text as _text
except ImportError:  # pragma: no cover - only before qmagic/text.py exists
    _text = None


def row_text(task: Task) -> str:
    """Deterministic one-line text of a task (no uid, no times)."""
    if _text is not None:
        return _text.task_line(task)
    return repr(task)  # pragma: no cover


def panel_text(tasks: Iterable[Task], hidden: int = 0) -> str:
    """Deterministic table of tasks plus the hidden count (no uids, no times)."""
    tasks = list(tasks)
    if _text is not None:
        return _text.task_table(tasks, hidden)
    lines = [repr(t) for t in tasks] or ["No tasks."]  # pragma: no cover
    if hidden:  # pragma: no cover
        lines.append(f"({hidden} more tasks not shown)")
    return "\n".join(lines)  # pragma: no cover


def lock_plain_text(reply: Mapping[str, Any]) -> str:
    """Deterministic lock text (no key, no time)."""
    if _text is not None:
        return _text.lock_text(dict(reply))
    info = reply.get("lock_info") or {}  # pragma: no cover
    scopes = [s for s in ("environment", "queue") if info.get(s)]  # pragma: no cover
    return f"Locked by {info.get('user')}: {', '.join(scopes)}" if scopes else "Not locked."  # pragma: no cover
