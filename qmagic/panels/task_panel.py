"""Task panels: :class:`TaskPanel` (many tasks, ``%tasks``) and :class:`TaskRow` (one task:
how a :class:`qmagic.Task` displays, and the live row of a foreground task in its cell).

Both draw their rows with :class:`~qmagic.panels.task_table.TaskTable`; a click on Cancel
goes through the worker (``worker.cancel(task, force=..., origin="panel")``), which holds
every rule (the lock, "already finished"); a refusal is shown in the panel, never silent.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import TYPE_CHECKING, Any, Callable, Iterable

import ipywidgets as W

from .. import format as fmt
from ..errors import RequestRefused, TaskNotFound
from ..worker_state import MSG_WORKER_CLOSED
from . import render, styles
from .base import PanelBase, failed_line, set_traits
from .pump import UNLIMITED, get_pump
from .task_table import TaskTable

if TYPE_CHECKING:  # pragma: no cover
    from ..core.task import Task

__all__ = ["TaskPanel", "TaskRow"]

_SHOW = ("running", "all")
_BORDER = f"1px solid {styles.BORDER2}"


class _TaskViewMixin(PanelBase):
    """Cancel handling and accessors shared by TaskPanel and TaskRow."""

    _table: TaskTable

    def _qm_cancel(self, task: Task, force: bool = False) -> None:
        """Cancel ``task`` for a click (runs in the thread that handles the click)."""
        what = render.call_text(task, 60)
        magic = f"%task_cancel {task.uid[:8]}{' --force' if force else ''}"
        try:
            self.worker.cancel(task, force=force, origin="panel")
        except TaskNotFound as exc:
            self._qm_set_message(str(exc), "error")
        except Exception as exc:  # noqa: BLE001 - shown in the panel, never silent
            # (a second click, or one on a row not yet redrawn, after the task ended: nothing
            # went wrong, so no red line that reads as if the cancel had failed)
            late = type(exc) is RequestRefused and task.done()
            self._qm_set_message(str(exc) if late else failed_line(
                f"cancel {what}", exc, magic, f"give the key with {magic} --lock-key KEY"),
                "info" if late else "error")
        else:
            self._qm_set_message(f"{'Force stop' if force else 'Cancel'} requested: {what}", "info")
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


def _remake_if_given_up(view: PanelBase, given_up: int) -> None:
    """After a view's first rows, made before the pump knew it: if a text fell back meanwhile,
    the pump makes them again (the value's code may have returned before the view was
    registered, and a finished task's row has no periodic update)."""
    if render.texts_given_up() != given_up:
        view._qm_poke(flag="texts")


def _summary(tasks: Iterable[Task], log_on: bool) -> str:
    counts = Counter(t.status.value for t in tasks)
    parts = [f"{counts[s]} {s}" for s in ("running", "queued", "completed", "failed", "cancelled") if counts[s]]
    return " · ".join(parts) if parts else fmt.no_tasks_line(log_on)


class TaskPanel(_TaskViewMixin, W.VBox):
    """A live table of the worker's tasks (what ``%tasks`` shows).

    One row per task, newest first: status, call (scripts by name), foreground or
    background, user and cell, elapsed time, a progress bar with value/total and the last
    message, a Cancel button while queued or running (it becomes "Force stop" once the task
    was asked to stop and has not yet), and a Details toggle (output, log, result or
    traceback).  ``show="running"`` lists queued and running tasks plus those that finished
    in the last ``keep_finished_s`` seconds; ``"all"`` every task the worker still keeps.
    At most ``max_rows`` rows (default ``QMagic.panel_max_rows``); the panel says how many
    are hidden.  Updates are coalesced to ``QMagic.panel_update_hz`` per second.
    ``close()`` ends it.
    """

    def __init__(self, worker: Any, *, show: str = "running", max_rows: int | None = None,
                 keep_finished_s: float = 60.0) -> None:
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
            value='<span class="qm-title">qmagic tasks</span>',
            layout=own(W.Layout(margin="0 12px 0 4px")),
        ))
        self._toolbar = own(W.HBox(
            children=(self._title, self._filter),
            layout=own(W.Layout(align_items="center", margin="0 0 4px 0")),
            _dom_classes=("qmagic-toolbar",),
        ))
        self._message = own(W.HTML(value="", layout=own(W.Layout(display="none", margin="0 0 4px 0")),
                                   _dom_classes=("qmagic-panel-message",)))
        self._body = own(W.VBox(children=(), layout=own(W.Layout(margin="0", width="100%", border_top=_BORDER)),
                                _dom_classes=("qmagic-task-body",)))
        self._footer = own(W.HTML(value="", layout=own(W.Layout(margin="2px 0 0 0")),
                                  _dom_classes=("qmagic-task-footer",)))
        self._table = TaskTable(self, self._qm_cancel, header=True)
        self._style = self._qm_style_widget()
        self._listing: tuple[list[Task], str, str] | None = None
        W.VBox.__init__(
            self,
            # the message under the rows (as in a row and the lock panel): one that appears
            # after a click moves no row under the pointer
            children=(self._style, self._toolbar, self._body, self._message, self._footer),
            layout=W.Layout(border=_BORDER, padding="6px", width="100%"),
            _dom_classes=(styles.PANEL_CLASS, "qmagic-task-panel"),
        )
        self._qm_opened()
        given_up = render.texts_given_up()
        with self._qm_apply_lock:
            self._qm_apply(set(), {"members"}, True, UNLIMITED)
        get_pump().register(self)
        _remake_if_given_up(self, given_up)

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

    def _log_on(self) -> bool:
        return bool(getattr(self.worker, "log_open", False))

    def _limit(self) -> int:
        limit = self.max_rows if self.max_rows is not None else getattr(self.worker, "panel_max_rows", 200)
        return max(1, int(limit))

    # -- content ---------------------------------------------------------------------------------
    def _list(self) -> tuple[list[Task], str, str]:
        tasks = self.worker.tasks()
        if self._filter.value == "running":
            since = time.time() - self.keep_finished_s
            candidates = [t for t in tasks if not t.done() or (t.finished_at or 0.0) >= since]
        else:
            candidates = list(tasks)
        candidates.reverse()
        limit = self._limit()
        visible = candidates[:limit]
        notes = [MSG_WORKER_CLOSED] if self.worker.closed else []
        over = len(candidates) - len(visible)
        if over:
            notes.append(f"{fmt.counted(over, 'older task')} not shown: this panel shows the "
                         f"newest {limit} (QMagic.panel_max_rows).")
        finished_hidden = len(tasks) - len(candidates)
        if finished_hidden:
            notes.append(f"{fmt.counted(finished_hidden, 'finished task')} not "
                         "shown: choose “All” to see them.")
        return visible, _summary(tasks, self._log_on()), render.footer_html(notes)

    @property
    def hidden(self) -> int:
        """How many of the worker's tasks this panel does not show right now."""
        return len(self.worker.tasks()) - len(self._table.order)

    def _qm_apply(self, dirty: set[str], flags: set[str], periodic: bool, budget: int) -> int:
        rows = self._table.rows
        if (
            self._listing is None
            or periodic
            or flags & {"members", "poke", "force"}
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
        """Deterministic text: the table of the tasks this filter shows (running: active only),
        and under it, as in the panel, that the worker was closed."""
        table = self._table_text()
        return f"{table}\n{MSG_WORKER_CLOSED}" if self.worker.closed else table

    def _table_text(self) -> str:
        limit = self._limit()  # (no max_rows: --all or --running, limited by the setting alone)
        hint = "use --all" if self.max_rows is not None else f"a panel shows the newest {limit}: QMagic.panel_max_rows"
        return fmt.tasks_text(self.worker.tasks(), running=self._filter.value == "running", limit=limit,
                              hint=hint, log_on=self._log_on())


class TaskRow(_TaskViewMixin, W.VBox):
    """One live task row: how a :class:`qmagic.Task` displays, and the row a foreground
    task shows in the cell that runs it.

    The same row as in :class:`TaskPanel`: status, call, foreground or background,
    elapsed time, progress, Cancel (then Force stop) while queued or running, Details.
    It follows its task only (``task.subscribe``).  Its ``text/plain`` form is the task's
    line from :func:`qmagic.format.task_line` as it reads when the row is displayed.
    """

    _qm_min_hz = 0.1  # (rows share the budget: sixty of them, a loop's, must not exceed it)

    def __init__(self, worker: Any, task: Task) -> None:
        self._qm_init_base(worker)
        self.task = task
        self._table = TaskTable(self, self._qm_cancel)
        self._style = self._qm_style_widget()
        self._message = self._qm_own(W.HTML(
            value="", layout=self._qm_own(W.Layout(margin="0", padding="4px", border_bottom=_BORDER)),
            _dom_classes=("qmagic-panel-message",)))
        W.VBox.__init__(
            self,
            children=(),
            layout=W.Layout(width="100%", margin="2px 0", border_top=_BORDER, border_left=_BORDER,
                            border_right=_BORDER),
            _dom_classes=(styles.PANEL_CLASS, "qmagic-task-panel", "qmagic-task-single"),
        )
        self._qm_opened()
        #: The row has shown its task's final state: no period, and it rests (pump module).
        self._final_shown = False
        given_up = render.texts_given_up()
        follow = not task.done()  # (a finished task sends no more events)
        with self._qm_apply_lock:
            self._qm_apply(set(), set(), True, UNLIMITED)
        get_pump().register(self, task, events=follow)
        _remake_if_given_up(self, given_up)

    def _qm_period(self) -> float | None:
        # the elapsed time, while it runs; then once more if the task ended after a look
        return None if self._final_shown else 1.0

    def _qm_apply(self, dirty: set[str], flags: set[str], periodic: bool, budget: int) -> int:
        final = self.task.done()  # (read first: what the table reads after is final too)
        later: list[Callable[[], int]] = []
        sent, body = self._table.update([self.task], later)
        message = self._qm_message_html()
        sent += set_traits(self._message, value=message)
        sent += set_traits(self, children=(self._style, *body) + ((self._message,) if message else ()))
        self._table.closing_work(later)
        sent = self._qm_spend(sent, budget, later)
        self._final_shown = final
        return sent

    def text(self) -> str:
        """Deterministic one-line text of the task (no uid, no times)."""
        return fmt.task_line(self.task)
