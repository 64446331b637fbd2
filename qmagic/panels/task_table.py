"""The rows of a task view: HTML segments with their buttons drawn over them.

Layout, chosen so that a panel sends a few update messages per tick (one per changed segment)
however many tasks change (every widget is its own comm, every trait change one message):

- the rows of a view are drawn as HTML in one ``HTML`` widget per *segment* of at most
  :data:`SEGMENT_ROWS` rows, except that rows of queued and running tasks next to each other
  stay together (they change together; at most :data:`ACTIVE_SEGMENT_ROWS`); an expanded
  row ends its segment.  A tick sends only the segments whose rows changed: a running scan's
  row among a hundred finished ones sent the whole table, ~250 kB, ten times a second, and
  JupyterLab fell seconds behind on a loaded machine; and a storm of a hundred running tasks
  sends one segment a tick, not five (at ``panel_update_hz`` messages a second, five made
  each row wait half a second, and the final states of the last ones later still);
- segments are laid out again only when rows come, go, move or expand (a task that ends
  keeps its place, so its final state is one message), and a segment whose rows are the
  same keeps its widgets; a new segment opens with its rows (no message after its opening);
- each segment is a one-cell ``GridBox``: the HTML fills the cell, and a ``GridBox`` of
  buttons (Cancel / Force stop for queued and running tasks, Details for every row; one line
  per row, exactly as tall as a row) sits in the same cell at its right end, over the part
  of the rows kept free for it, so the buttons are inside their row's borders;
- an expanded row's details (output, log, result or traceback) are an ``HTML`` widget of
  their own between two segments.

Buttons are widgets of their own bound to one task uid, so a click always concerns the task
it was drawn for, even while rows move.  Widgets are written only by the pump thread (and
by the constructor of the view, before the pump knows it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import ipywidgets as W
from ipywidgets.widgets.widget_bool import ToggleButtonStyle
from ipywidgets.widgets.widget_string import HTMLStyle

from ..core.status import FINISHED_VALUES
from . import render, styles
from .base import PanelBase, set_traits

if TYPE_CHECKING:  # pragma: no cover
    from ..core.task import Task

__all__ = ["TaskTable", "CLOSE_BUDGET", "SEGMENT_ROWS", "ACTIVE_SEGMENT_ROWS"]

#: Widgets closed per application at most (closing is a message too); the rest wait.
CLOSE_BUDGET = 10
#: Most finished rows drawn in one segment (one HTML widget; a row is about 0.5 kB of HTML).
SEGMENT_ROWS = 20
#: Most rows of queued and running tasks in one segment (they change together: a storm's).
ACTIVE_SEGMENT_ROWS = 100
_FORCE_TIP = ("The task has not stopped yet: raise TaskCancelled inside it "
              "(after QMagic.cancel_grace_s seconds)")


class _Row:
    __slots__ = ("task", "key", "toggle", "cancel", "details", "sig", "html", "details_sig", "label",
                 "remake", "details_remake")

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
        #: made with a fallback (a value's text did not finish in time): made again next time
        self.remake = self.details_remake = False


class _Segment:
    __slots__ = ("box", "html", "grid", "uids")

    def __init__(self, box: W.GridBox, html: W.HTML, grid: W.GridBox) -> None:
        self.box, self.html, self.grid = box, html, grid
        self.uids: tuple[str, ...] | None = None


class TaskTable:
    """Rows, segments and details of a task view (not a widget; owned by a panel).

    ``on_cancel(task, force)`` is called (in the thread that handles the click) when a row's
    Cancel / Force stop button is clicked.
    """

    def __init__(self, view: PanelBase, on_cancel: Callable[[Task, bool], None], *,
                 header: bool = False) -> None:
        self.view = view
        self.on_cancel = on_cancel
        #: Segment 0 starts with the counts line (TaskPanel).
        self.header = header
        self.summary = ""
        self.rows: dict[str, _Row] = {}
        self.order: list[str] = []
        self.segments: list[_Segment] = []
        #: (order, expanded rows) the segments were laid out for, and the runs of uids
        self._laid_out: tuple | None = None
        self._runs: list[tuple[str, ...]] = []
        self._closing: list[W.Widget] = []
        own = view._qm_own
        h = f"{styles.ROW_HEIGHT_PX - 16}px"
        self._button_layout = own(W.Layout(width=f"{styles.BUTTON_WIDTH_PX}px", height=h, margin="0",
                                           padding="0 2px"))
        self._toggle_layout = own(W.Layout(width=f"{styles.TOGGLE_WIDTH_PX}px", height=h, margin="0",
                                           padding="0 2px"))
        self._button_style = own(W.ButtonStyle(font_size="12px"))
        self._toggle_style = own(ToggleButtonStyle(font_size="12px"))
        self._spacer = own(W.Box(layout=own(W.Layout(width=f"{styles.BUTTON_WIDTH_PX}px", height=h))))
        cell = "1 / 1 / 2 / 2"
        self._html_layout = own(W.Layout(grid_area=cell, width="100%", min_width="0", margin="0", padding="0"))
        self._html_style = own(HTMLStyle())
        self._grid_layout = own(self._controls_layout(cell, top=0))
        self._first_grid_layout = (own(self._controls_layout(cell, top=styles.HEADER_PX)) if header
                                   else self._grid_layout)
        self._segment_layout = own(W.Layout(width="100%", margin="0", grid_template_columns="minmax(0, 1fr)",
                                            grid_template_rows="auto"))
        self._details_layout = own(W.Layout(width="100%", margin="0", padding="0"))

    @staticmethod
    def _controls_layout(cell: str, top: int) -> W.Layout:
        """The button column: at the right end of the segment's cell, one line per row."""
        return W.Layout(
            grid_area=cell,
            width=f"{styles.CONTROLS_WIDTH_PX}px",
            min_width=f"{styles.CONTROLS_WIDTH_PX}px",
            align_self="flex-start",
            grid_template_columns=f"{styles.BUTTON_WIDTH_PX}px {styles.TOGGLE_WIDTH_PX}px",
            grid_auto_rows=f"{styles.ROW_HEIGHT_PX}px",
            grid_gap=f"0px {styles.CONTROLS_GAP_PX}px",
            align_items="center",
            margin=f"0 {styles.CONTROLS_MARGIN_PX}px 0 auto",
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
        button.on_click(lambda _b, uid=uid: self._clicked(uid))
        row.label = "Cancel"
        return self.view._qm_own(button, interactive=True)

    def _clicked(self, uid: str) -> None:
        row = self.rows.get(uid)
        if row is not None:
            self.on_cancel(row.task, row.label == "Force stop")

    def _release(self, *widgets: W.Widget | None) -> None:
        for widget in widgets:
            if widget is not None:
                self._closing.append(widget)

    def close_all(self) -> None:
        """Close every row widget now (the view is closing)."""
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
        token (a button's new label, a finished row's Cancel, details text, closing widgets),
        as callables that return the messages they sent.  Returns (messages sent now, the
        view's body children).
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

        for uid in order:
            row = self.rows[uid]
            task = row.task
            if row.cancel is not None and not task.done():
                label = "Force stop" if task.cancel_requested else "Cancel"
                if label != row.label:
                    later.append(lambda row=row, label=label: self._relabel(row, label))
            elif row.sig is not None and row.sig[0] in FINISHED_VALUES and not row.remake:
                continue  # drawn in its final state: nothing of it changes any more
            given_up = render.texts_given_up()
            sig = render.row_signature(task)
            if sig != row.sig or row.remake:
                row.sig = sig
                row.html = render.row_html(task)
                row.remake = render.texts_given_up() != given_up
        expanded = tuple(u for u in order if self.rows[u].toggle is not None and self.rows[u].toggle.value)
        if (order, expanded) != self._laid_out:
            self._laid_out = (order, expanded)
            self._runs = self._lay_out(order)
        runs = [[self.rows[u] for u in uids] for uids in self._runs] or [[]]
        segments = self._segments_for(self._runs or [()])

        children: list[W.Widget] = []
        for index, run in enumerate(runs):
            html = "".join(r.html for r in run) if run else render.empty_html()
            if index == 0 and self.header:
                html = render.header_html(self.summary) + html
            uids = tuple(r.task.uid for r in run)
            controls: list[W.Widget] = []
            for r in run:
                controls.append(self._spacer if r.task.done() or r.cancel is None else r.cancel)
                controls.append(r.toggle)
            segment = segments[index]
            if segment is None:  # (opened with its rows and buttons: no message after)
                segment = self._new_segment(index, render.rows_html(html), tuple(controls))
                self._set_controls(segment, uids, tuple(controls), run)
                segments[index] = segment
            else:
                sent += set_traits(segment.html, value=render.rows_html(html))
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
        kept = {id(segment) for segment in segments}
        for segment in self.segments:
            if id(segment) not in kept:
                self._release(segment.box, segment.html, segment.grid)
        self.segments = [segment for segment in segments if segment is not None]
        return sent, tuple(children)

    def _lay_out(self, order: list[str]) -> list[tuple[str, ...]]:
        """The rows of each segment: SEGMENT_ROWS at most, but queued and running tasks next
        to each other stay together (ACTIVE_SEGMENT_ROWS at most); an expanded row ends one."""
        runs: list[list[str]] = [[]]
        active = False
        for uid in order:
            row = self.rows[uid]
            now_active = not row.task.done()
            run = runs[-1]
            if run and (len(run) >= ACTIVE_SEGMENT_ROWS
                        or (len(run) >= SEGMENT_ROWS and not (active and now_active))):
                runs.append([])
            runs[-1].append(uid)
            active = now_active
            if row.toggle is not None and row.toggle.value:
                runs.append([])
        if len(runs) > 1 and not runs[-1]:
            runs.pop()
        return [tuple(run) for run in runs if run]

    def _segments_for(self, runs: list[tuple[str, ...]]) -> list[_Segment | None]:
        """A segment for each run: the first one stays first (it carries the header); one
        that shows the same rows keeps them; the others are reused, or None (make one)."""
        old = list(self.segments)
        out: list[_Segment | None] = [None] * len(runs)
        if old:
            out[0] = old.pop(0)
        same = {segment.uids: segment for segment in old}
        for index in range(1, len(runs)):
            segment = same.pop(runs[index], None)
            if segment is not None:
                out[index] = segment
                old.remove(segment)
        for index in range(1, len(runs)):
            if out[index] is None and old:
                out[index] = old.pop(0)
        return out

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
        tip = _FORCE_TIP if label == "Force stop" else "Ask this task to stop"
        return set_traits(row.cancel, description=label, tooltip=tip)

    def _new_segment(self, index: int, html_value: str, controls: tuple) -> _Segment:
        own = self.view._qm_own
        html = own(W.HTML(value=html_value, layout=self._html_layout, style=self._html_style,
                          _dom_classes=("qmagic-task-table",)))
        layout = self._first_grid_layout if index == 0 else self._grid_layout
        grid = own(W.GridBox(children=controls, layout=layout, _dom_classes=("qmagic-task-controls",)))
        box = own(W.GridBox(children=(html, grid), layout=self._segment_layout,
                            _dom_classes=("qmagic-task-segment",)))
        return _Segment(box, html, grid)

    def _new_details(self, row: _Row) -> None:
        task = row.task
        given_up = render.texts_given_up()
        row.details_sig = render.details_signature(task)
        row.details = self.view._qm_own(
            W.HTML(value=render.details_html(task), layout=self._details_layout, style=self._html_style,
                   _dom_classes=("qmagic-task-details-box", f"qmagic-task-{row.key}"))
        )
        row.details_remake = render.texts_given_up() != given_up  # (as a row's: see update)

    def _refresh_details(self, row: _Row) -> int:
        if row.details is None:
            return 0
        given_up = render.texts_given_up()
        sig = render.details_signature(row.task)
        if sig == row.details_sig and not row.details_remake:
            return 0
        row.details_sig = sig
        sent = set_traits(row.details, value=render.details_html(row.task))
        row.details_remake = render.texts_given_up() != given_up  # (as a row's: see update)
        return sent
