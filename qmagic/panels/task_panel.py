"""Task panels: :class:`TaskPanel` (many tasks, ``%tasks``) and :class:`TaskRow` (one task).

Layout, chosen so that a panel sends about one update message per tick however many tasks
change (every widget is its own comm, every trait change one message):

- the rows of a panel are drawn as HTML in one ``HTML`` widget per *segment*; a segment is
  a run of rows between expanded rows;
- next to each segment's HTML, a ``GridBox`` holds one line of buttons per row (Cancel
  for queued/running tasks, Details), each line exactly as tall as a table row;
- an expanded row's details (output, log, result or traceback) are an ``HTML`` widget of
  their own between two segments.

Buttons are widgets of their own bound to one task uid, so a click always concerns the task
it was drawn for, even while rows move.
"""

from __future__ import annotations

import html
import time
from collections import Counter
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import ipywidgets as W
from ipywidgets.widgets.widget_bool import ToggleButtonStyle
from ipywidgets.widgets.widget_string import HTMLStyle

from . import render
from .base import PanelBase, set_traits
from .pump import UNLIMITED, get_pump

if TYPE_CHECKING:  # pragma: no cover
    from ..tasks import Task

__all__ = ["TaskPanel", "TaskRow"]

#: Widgets closed per application at most (closing is a message too); the rest wait.
CLOSE_BUDGET = 10
_BUTTON_W, _TOGGLE_W = 66, 56
_SHOW = ("running", "all")


class _Row:
    __slots__ = ("task", "key", "toggle", "cancel", "details", "sig", "html", "details_sig", "label")

    def __init__(self, task: Task) -> None:
        self.task = task
        self.key = render.task_key(task)
        self.toggle: W.ToggleButton | None = None
        self.cancel: W.Button | None = None
        self.details: W.HTML | None = None
        self.sig: tuple | None = None
        self.html = ""
        self.details_sig: tuple | None = None
        self.label = ""


class _Segment:
    __slots__ = ("box", "html", "grid", "uids")

    def __init__(self, box: W.HBox, html: W.HTML, grid: W.GridBox) -> None:
        self.box, self.html, self.grid = box, html, grid
        self.uids: tuple[str, ...] | None = None


class _TaskTable:
    """Rows, segments and details of a task view (not a widget; owned by a panel)."""

    def __init__(self, view: PanelBase, *, header: bool = False) -> None:
        self.view = view
        #: Segment 0 starts with the counts line and the column titles (TaskPanel).
        self.header = header
        self.summary = ""
        self.rows: dict[str, _Row] = {}
        self.order: list[str] = []
        self.segments: list[_Segment] = []
        self._closing: list[W.Widget] = []
        own = view._qm_own
        h = f"{render.ROW_HEIGHT_PX - 6}px"
        self._button_layout = own(W.Layout(width=f"{_BUTTON_W}px", height=h, margin="0", padding="0 2px"))
        self._toggle_layout = own(W.Layout(width=f"{_TOGGLE_W}px", height=h, margin="0", padding="0 2px"))
        self._button_style = own(W.ButtonStyle(font_size="12px"))
        self._toggle_style = own(ToggleButtonStyle(font_size="12px"))
        self._spacer = own(W.Box(layout=own(W.Layout(width=f"{_BUTTON_W}px", height=h))))
        self._html_layout = own(W.Layout(flex="1 1 auto", min_width="0", margin="0", padding="0"))
        self._html_style = own(HTMLStyle())
        self._grid_layout = own(self._controls_layout(top=0))
        self._first_grid_layout = own(self._controls_layout(top=render.HEADER_PX)) if header else self._grid_layout
        self._segment_layout = own(W.Layout(width="100%", align_items="flex-start", margin="0"))
        self._details_layout = own(W.Layout(width="100%", margin="0", padding="0"))

    @staticmethod
    def _controls_layout(top: int) -> W.Layout:
        """The button column: two columns, one line per table row, ``top`` px below the top."""
        return W.Layout(
            width=f"{render.CONTROLS_WIDTH_PX}px",
            min_width=f"{render.CONTROLS_WIDTH_PX}px",
            grid_template_columns=f"{_BUTTON_W}px {_TOGGLE_W}px",
            grid_auto_rows=f"{render.ROW_HEIGHT_PX}px",
            grid_gap=f"0px {render.CONTROLS_WIDTH_PX - _BUTTON_W - _TOGGLE_W}px",
            align_items="center",
            margin="0",
            padding=f"{top}px 0 0 0",
        )

    # -- widgets of one row ------------------------------------------------------------------
    def _new_row(self, task: Task) -> _Row:
        row = _Row(task)
        uid = task.uid
        toggle = W.ToggleButton(
            value=False,
            description="Details",
            tooltip="Show this task's output, log and result or traceback",
            layout=self._toggle_layout,
            style=self._toggle_style,
            _dom_classes=("qmagic-details-toggle", f"qmagic-task-{row.key}"),
        )
        toggle.observe(lambda change, uid=uid: self.view._qm_poke(uid, flag="layout"), "value")
        row.toggle = self.view._qm_own(toggle, interactive=True)
        if not task.done():
            row.cancel = self._new_cancel(row)
        return row

    def _new_cancel(self, row: _Row) -> W.Button:
        uid = row.task.uid
        button = W.Button(
            description="Cancel",
            tooltip="Ask this task to stop",
            layout=self._button_layout,
            style=self._button_style,
            _dom_classes=("qmagic-cancel", f"qmagic-task-{row.key}"),
        )
        button.on_click(lambda _b, uid=uid: self._on_cancel(uid))
        row.label = "Cancel"
        return self.view._qm_own(button, interactive=True)

    def _on_cancel(self, uid: str) -> None:
        row = self.rows.get(uid)
        if row is not None:
            self.view._qm_cancel(row.task, force=row.label == "Force stop")

    def _release(self, *widgets: W.Widget | None) -> None:
        for widget in widgets:
            if widget is not None:
                self._closing.append(widget)

    def close_all(self) -> None:
        """Close every row widget now (the panel is closing)."""
        for row in self.rows.values():
            self._release(row.toggle, row.cancel, row.details)
        self.rows.clear()
        while self._closing:
            self._close_one()

    # -- applying -----------------------------------------------------------------------------
    def update(self, tasks: Sequence[Task], later: list[Callable[[], int]]) -> tuple[int, tuple[W.Widget, ...]]:
        """Show ``tasks`` (in order).

        Sends now what must change together: each segment's HTML, and its button column
        when rows came, went or moved.  Appends to ``later`` what may wait for the next
        token (a finished row's Cancel, details text, closing widgets), as callables that
        return the messages they sent.  Returns (messages sent now, body children).
        """
        sent = 0
        order = [t.uid for t in tasks]
        wanted = set(order)
        for uid in [u for u in self.rows if u not in wanted]:
            row = self.rows.pop(uid)
            self._release(row.toggle, row.cancel, row.details)
        for task in tasks:
            if task.uid not in self.rows:
                self.rows[task.uid] = self._new_row(task)
        self.order = order

        runs: list[list[_Row]] = [[]]
        for uid in order:
            row = self.rows[uid]
            task = row.task
            if row.cancel is not None and not task.done():
                label = "Force stop" if task.cancel_requested else "Cancel"
                if label != row.label:
                    later.append(lambda row=row, label=label: self._relabel(row, label))
            sig = render.row_signature(task)
            if sig != row.sig:
                row.sig = sig
                row.html = render.row_html(task)
            runs[-1].append(row)
            if row.toggle is not None and row.toggle.value:
                runs.append([])
        if len(runs) > 1 and not runs[-1]:
            runs.pop()

        children: list[W.Widget] = []
        for index, run in enumerate(runs):
            segment = self._segment(index)
            if run:
                html = "".join(r.html for r in run)
            else:
                html = '<div class="qmagic-empty" style="padding:6px 8px;opacity:0.7">No tasks to show.</div>'
            if index == 0 and self.header:
                html = render.header_html(self.summary) + html
            sent += set_traits(segment.html, value=html)
            uids = tuple(r.task.uid for r in run)
            controls: list[W.Widget] = []
            for r in run:
                controls.append(self._spacer if r.task.done() or r.cancel is None else r.cancel)
                controls.append(r.toggle)
            if uids != segment.uids:
                sent += self._set_controls(segment, uids, tuple(controls), run)
            elif tuple(controls) != segment.grid.children:
                later.append(lambda seg=segment, u=uids, c=tuple(controls), run=run:
                             self._set_controls(seg, u, c, run))
            children.append(segment.box)
            last = run[-1] if run else None
            if last is not None and last.toggle is not None and last.toggle.value:
                if last.details is None:
                    self._new_details(last)
                else:
                    later.append(lambda row=last: self._refresh_details(row))
                children.append(last.details)
        for row in self.rows.values():
            if row.details is not None and not (row.toggle is not None and row.toggle.value):
                self._release(row.details)
                row.details = None
                row.details_sig = None
        while len(self.segments) > len(runs):
            segment = self.segments.pop()
            self._release(segment.box, segment.html, segment.grid)
        return sent, tuple(children)

    def closing_work(self, later: list[Callable[[], int]]) -> None:
        """Append one callable per widget waiting to be closed (lowest priority)."""
        for _ in range(min(len(self._closing), CLOSE_BUDGET)):
            later.append(self._close_one)

    def _close_one(self) -> int:
        if not self._closing:
            return 0
        self.view._qm_disown(self._closing.pop(0))
        return 1

    def _set_controls(self, segment: _Segment, uids: tuple, controls: tuple, run: list[_Row]) -> int:
        sent = set_traits(segment.grid, children=controls)
        segment.uids = uids
        for row in run:  # a finished row's Cancel button left the column: close it later
            if row.cancel is not None and row.cancel not in controls:
                self._release(row.cancel)
                row.cancel = None
        return sent

    def _relabel(self, row: _Row, label: str) -> int:
        if row.cancel is None or row.label == label:
            return 0
        row.label = label
        tip = (
            "The task has not stopped yet: raise TaskCancelled inside it (after QMagic.cancel_grace_s)"
            if label == "Force stop"
            else "Ask this task to stop"
        )
        return set_traits(row.cancel, description=label, tooltip=tip)

    def _segment(self, index: int) -> _Segment:
        while len(self.segments) <= index:
            own = self.view._qm_own
            html = own(W.HTML(value="", layout=self._html_layout, style=self._html_style, _dom_classes=("qmagic-task-table",)))
            layout = self._first_grid_layout if not self.segments else self._grid_layout
            grid = own(W.GridBox(children=(), layout=layout, _dom_classes=("qmagic-task-controls",)))
            box = own(W.HBox(children=(html, grid), layout=self._segment_layout,
                             _dom_classes=("qmagic-task-segment",)))
            self.segments.append(_Segment(box, html, grid))
        return self.segments[index]

    def _new_details(self, row: _Row) -> None:
        task = row.task
        row.details_sig = render.details_signature(task)
        row.details = self.view._qm_own(
            W.HTML(value=render.details_html(task), layout=self._details_layout, style=self._html_style,
                   _dom_classes=("qmagic-task-details-box", f"qmagic-task-{row.key}"))
        )

    def _refresh_details(self, row: _Row) -> int:
        if row.details is None:
            return 0
        sig = render.details_signature(row.task)
        if sig == row.details_sig:
            return 0
        row.details_sig = sig
        return set_traits(row.details, value=render.details_html(row.task))


class _TaskViewMixin(PanelBase):
    """Cancel handling shared by TaskPanel and TaskRow."""

    _table: _TaskTable

    def _qm_cancel(self, task: Task, *, force: bool = False) -> None:
        """Cancel ``task`` for a click (runs in the thread that handles the click)."""
        what = task.call_text(60)
        try:
            if self.worker is not None:
                reply = self.worker.task_cancel(task.uid, force=force, origin="panel")
            else:
                ok = task.cancel(force=force)
                reply = {"success": ok, "msg": "" if ok else
                         f"Task {task.name} has already finished ({task.status.value}); "
                         "there is nothing to cancel."}
        except Exception as exc:  # noqa: BLE001 - shown in the panel, never silent
            reply = {"success": False, "msg": f"Could not cancel {what}: {type(exc).__name__}: {exc}"}
        if reply.get("success"):
            verb = "Force stop" if force else "Cancel"
            self._qm_set_message(f"{verb} requested: {what}", "info")
        else:
            self._qm_set_message(str(reply.get("msg") or f"Could not cancel {what}."), "error")
        self._qm_poke(task.uid)

    def _qm_close_widgets(self) -> None:
        table = getattr(self, "_table", None)
        if table is not None:
            table.close_all()

    def cancel_button(self, task: Task | str) -> W.Button | None:
        """The Cancel button shown for ``task`` (None when the task has finished)."""
        uid = task if isinstance(task, str) else task.uid
        return self._table.rows[uid].cancel

    def details_toggle(self, task: Task | str) -> W.ToggleButton | None:
        """The Details toggle of ``task``'s row."""
        uid = task if isinstance(task, str) else task.uid
        return self._table.rows[uid].toggle

    def row_html(self) -> str:
        """The HTML of every row currently shown (segments joined), for tests and scripts."""
        return "".join(s.html.value for s in self._table.segments)

    def details_html(self) -> str:
        """The HTML of every expanded row's details."""
        return "".join(r.details.value for r in self._table.rows.values() if r.details is not None)


def _summary(tasks: Iterable[Task]) -> str:
    counts = Counter(t.status.value for t in tasks)
    parts = [f"{counts[s]} {s}" for s in ("running", "queued", "completed", "failed", "cancelled") if counts[s]]
    return " · ".join(parts) if parts else "No tasks yet."


class TaskPanel(_TaskViewMixin, W.VBox):
    """A live table of the worker's tasks (what ``%tasks`` shows).

    One row per task, newest first: call, user, status badge, progress bar with value/total
    and the last message, elapsed time, a Cancel button while queued or running, and a
    Details toggle (output, log, result or traceback).  ``show="running"`` lists queued and
    running tasks plus those that finished in the last ``keep_finished_s`` seconds;
    ``"all"`` every task the worker still keeps.  At most ``max_rows`` rows (default
    ``QMagic.panel_max_rows``); the panel says how many are hidden.  Updates are coalesced
    to ``QMagic.panel_update_hz`` per second.  ``close()`` ends it.
    """

    def __init__(
        self,
        worker: Any,
        *,
        show: str = "running",
        max_rows: int | None = None,
        keep_finished_s: float = 60.0,
    ) -> None:
        if show not in _SHOW:
            raise ValueError(f"show must be 'running' or 'all', got {show!r}.")
        if max_rows is not None and (not isinstance(max_rows, int) or max_rows < 1):
            raise ValueError(f"max_rows must be a positive integer or None, got {max_rows!r}.")
        self._qm_init_base(worker)
        self.max_rows = max_rows
        self.keep_finished_s = float(keep_finished_s)
        own = self._qm_own
        self._filter = own(
            W.ToggleButtons(
                options=[("Running", "running"), ("All", "all")],
                value=show,
                tooltips=["Queued and running tasks (and those that just finished)",
                          "Every task the worker keeps, finished ones too"],
                style=own(W.ToggleButtonsStyle(button_width="80px")),
                layout=own(W.Layout(width="auto", margin="0 12px 0 0")),
                _dom_classes=("qmagic-filter",),
            ),
            interactive=True,
        )
        self._filter.observe(lambda change: self._qm_poke(flag="members"), "value")
        self._title = own(W.HTML(
            value='<span style="font-weight:600;font-size:13px">qmagic tasks</span>',
            layout=own(W.Layout(margin="0 12px 0 4px")),
        ))
        self._toolbar = own(W.HBox(
            children=(self._title, self._filter),
            layout=own(W.Layout(align_items="center", margin="0 0 4px 0")),
            _dom_classes=("qmagic-toolbar",),
        ))
        self._message = own(W.HTML(value="", layout=own(W.Layout(display="none", margin="0 0 4px 0")),
                                   _dom_classes=("qmagic-panel-message",)))
        self._body = own(W.VBox(children=(), layout=own(W.Layout(margin="0", width="100%")),
                                _dom_classes=("qmagic-task-body",)))
        self._footer = own(W.HTML(value="", layout=own(W.Layout(margin="2px 0 0 0")),
                                  _dom_classes=("qmagic-task-footer",)))
        self._table = _TaskTable(self, header=True)
        self._listing: tuple[list[Task], str, str] | None = None
        W.VBox.__init__(
            self,
            children=(self._toolbar, self._message, self._body, self._footer),
            layout=W.Layout(border="1px solid rgba(128,128,128,0.35)", padding="6px", width="100%"),
            _dom_classes=("qmagic-task-panel",),
        )
        self._qm_own(self.layout)
        with self._qm_apply_lock:
            self._qm_apply(set(), {"members"}, True, UNLIMITED)
        get_pump().register(self)

    # -- options -------------------------------------------------------------------------------
    @property
    def show(self) -> str:
        """"running" or "all" (the filter buttons)."""
        return self._filter.value

    @show.setter
    def show(self, value: str) -> None:
        if value not in _SHOW:
            raise ValueError(f"show must be 'running' or 'all', got {value!r}.")
        self._filter.value = value

    def _limit(self) -> int:
        limit = self.max_rows if self.max_rows is not None else getattr(self.worker, "panel_max_rows", 200)
        return max(1, int(limit))

    # -- content ---------------------------------------------------------------------------------
    def _list(self) -> tuple[list[Task], str, str]:
        tasks = self.worker.tasks()
        mode = self._filter.value
        if mode == "running":
            since = time.time() - self.keep_finished_s
            candidates = [t for t in tasks if not t.done() or (t.finished_at or 0.0) >= since]
        else:
            candidates = list(tasks)
        candidates.reverse()
        limit = self._limit()
        visible = candidates[:limit]
        notes = []
        over = len(candidates) - len(visible)
        if over:
            notes.append(
                f"{over} older task{'s' if over != 1 else ''} not shown: this panel shows the "
                f"newest {limit} (QMagic.panel_max_rows)."
            )
        finished_hidden = len(tasks) - len(candidates)
        if finished_hidden:
            notes.append(
                f"{finished_hidden} finished task{'s' if finished_hidden != 1 else ''} not shown: "
                "choose “All” to see them."
            )
        footer = ""
        if notes:
            footer = (
                '<div class="qmagic-hidden-count" style="font-size:12px;opacity:0.75;padding:2px 8px">'
                + "<br>".join(html.escape(n) for n in notes)
                + "</div>"
            )
        return visible, _summary(tasks), footer

    @property
    def hidden(self) -> int:
        """How many of the worker's tasks this panel does not show right now."""
        return len(self.worker.tasks()) - len(self._table.order)

    def _qm_apply(self, dirty: set[str], flags: set[str], periodic: bool, budget: int) -> int:
        rows = self._table.rows
        if (
            self._listing is None
            or periodic
            or "members" in flags
            or "poke" in flags
            or any(uid not in rows or rows[uid].sig is None
                   or rows[uid].sig[0] != rows[uid].task.status.value for uid in dirty)
        ):  # new tasks or status changes: membership and counts may differ
            self._listing = self._list()
        visible, summary, footer = self._listing
        later: list[Callable[[], int]] = []
        self._table.summary = summary  # drawn on top of the table: no message of its own
        sent, body = self._table.update(visible, later)
        sent += set_traits(self._body, children=body)
        # hidden rows and click feedback change rarely: sent with the table
        sent += set_traits(self._footer, value=footer)
        message = self._qm_message_html()
        if message != self._message.value:
            sent += set_traits(self._message, value=message)
            sent += set_traits(self._message.layout, display="" if message else "none")
        self._table.closing_work(later)
        return self._qm_spend(sent, budget, later)

    def text(self) -> str:
        """Deterministic text: the table of the tasks this filter shows (running: active only)."""
        tasks = self.worker.tasks()
        shown = tasks if self._filter.value == "all" else [t for t in tasks if not t.done()]
        shown = list(reversed(shown))[: self._limit()]
        return render.panel_text(shown, len(tasks) - len(shown))


class TaskRow(_TaskViewMixin, W.VBox):
    """One live task row (how a :class:`qmagic.Task` displays in the cell that started it).

    The same row as in :class:`TaskPanel`: status badge, progress, elapsed time, Cancel while
    queued/running, Details.  ``worker`` may be None (Cancel then calls ``task.cancel()``).
    """

    def __init__(self, worker: Any, task: Task) -> None:
        self._qm_init_base(worker)
        self.task = task
        self._table = _TaskTable(self)
        self._message = self._qm_own(W.HTML(value="", _dom_classes=("qmagic-panel-message",)))
        W.VBox.__init__(
            self,
            children=(),
            layout=W.Layout(width="100%", margin="0"),
            _dom_classes=("qmagic-task-panel", "qmagic-task-single"),
        )
        self._qm_own(self.layout)
        with self._qm_apply_lock:
            self._qm_apply(set(), set(), True, UNLIMITED)
        get_pump().register(self, uid=task.uid)

    def _qm_period(self) -> float | None:
        task = self.task
        if not task.done():
            return 1.0
        return None

    def _qm_apply(self, dirty: set[str], flags: set[str], periodic: bool, budget: int) -> int:
        later: list[Callable[[], int]] = []
        sent, body = self._table.update([self.task], later)
        message = self._qm_message_html()
        sent += set_traits(self._message, value=message)
        sent += set_traits(self, children=body + ((self._message,) if message else ()))
        self._table.closing_work(later)
        return self._qm_spend(sent, budget, later)

    def text(self) -> str:
        """Deterministic one-line text of the task (no uid, no times)."""
        return render.row_text(self.task)
