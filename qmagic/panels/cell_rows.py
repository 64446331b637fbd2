"""A foreground task's live row in the cell that runs it (an engine context hook).

``%function_execute scan 100`` runs ``scan`` in the cell, on the kernel's main thread.
:class:`CellRows` is a :class:`qmagic.core.hooks.ContextHook`: when a foreground task is
submitted from a cell (on the main thread, in a kernel where widgets work), ``capture``
notes the cell's request; ``apply`` — where the task's code is about to run — displays a
live :class:`~qmagic.panels.TaskRow` (status, progress, elapsed, Cancel) in that cell.  The
pump thread keeps the row up to date while the main thread runs the task, and shows its
final state when it ends; Cancel works during the blocking cell through the panel
subshell (ipykernel >= 7.4).

The row's ``text/plain`` is the task's line when the row appears (``scan(100)  user
foreground  running``: no uid, no time, no live value), so a terminal or nbval sees the
same text on every run.  The Task the magic then returns displays as text only in that
cell (:meth:`CellRows.shown_here`), never as a second live widget.

**When the cell ends** (``post_run_cell``: :meth:`CellRows.rest`), the row of a task that has
ended is replaced in the cell by a static copy of its final state (``update_display``:
``text/html`` with the row's own stylesheet, and the final ``text/plain`` line).  Its
widgets are closed once enough newer rows have become static, unless an
``ipywidgets.Output`` captured it (it ignores the update and keeps showing the live row):
:mod:`~qmagic.panels.rested`.  The saved notebook is then an experiment log that reads anywhere:
reopened without a kernel (a live widget's model is gone then: JupyterLab showed "Error
displaying widget: model not found"), in nbconvert's HTML, on GitHub.  Nothing is lost: the
cell holds the task's output and error itself, and ``%tasks`` and ``%task_result`` the rest.

At most :data:`MAX_ROWS_PER_CELL` rows per cell execution: a loop of foreground tasks in
one cell shows rows for the first ones only (``%tasks`` shows them all).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from typing import Any, Callable, Iterator

from .. import format as fmt
from ..ipython.context import execute_request
from . import render, rested, styles

log = logging.getLogger("qmagic")

__all__ = ["CellRows", "MAX_ROWS_PER_CELL", "static_row", "update_row"]

#: Most live rows one cell execution shows (one per foreground task it starts).
MAX_ROWS_PER_CELL = 10


def static_row(task: Any) -> dict[str, str]:
    """The mime bundle of ``task``'s row as a static record: the row's HTML with its own
    stylesheet, and its ``text/plain`` line (:func:`qmagic.format.task_line`)."""
    inner = render.rows_html(render.row_html(task))
    html = (f'{styles.row_style_html()}<div class="{styles.PANEL_CLASS} qmagic-task-panel qmagic-task-single">'
            f'<div class="{styles.STATIC_CLASS}">{inner}</div></div>')
    return {"text/html": html, "text/plain": fmt.task_line(task)}


def update_row(shell: Any, task: Any, display_id: str, parent: dict | None, row: Any = None) -> None:
    """Replace the row shown under ``display_id`` by ``task``'s static row, as an update of
    the cell request ``parent`` (from any thread); the live ``row`` shown there then
    retires (:func:`qmagic.panels.rested.retire`: its widgets are closed once newer static
    rows are enough; None: it stays open).  Never raises: on failure the live row stays."""
    from IPython.display import update_display

    setter = getattr(shell, "set_thread_parent", None)
    resetter = getattr(shell, "reset_thread_parent", None)
    try:
        tokens = setter(parent) if parent and setter is not None and resetter is not None else None
        try:
            update_display(static_row(task), raw=True, display_id=display_id)
        finally:
            if tokens is not None:
                resetter(tokens)
    except Exception:  # noqa: BLE001 - the live row stays; a task's end or a cell must not fail
        log.warning("qmagic: could not keep the final row of %s", task.call_text(40), exc_info=True)
        return
    rested.retire(row)


def msg_id_of(parent: dict | None) -> str | None:
    """The ``msg_id`` of a request's header (None without one)."""
    return (parent.get("header") or {}).get("msg_id") if parent else None


class CellRows:
    """The engine context hook of one worker in one kernel shell (see the module docstring).

    ``active()`` says whether panels are still attached (rows are shown only then).
    """

    def __init__(self, shell: Any, worker: Any, active: Callable[[], bool]) -> None:
        self.shell = shell
        self.worker = worker
        self._active = active
        self._lock = threading.Lock()
        self._cell: str | None = None  # msg_id of the cell execution the rows belong to
        #: uid -> (task, display id of its live row, the row; None before it shows, or once
        #: it rested; the row None as well when it must stay open: :mod:`~qmagic.panels.rested`)
        self._rows: dict[str, tuple[Any, str | None, Any]] = {}

    # -- the ContextHook protocol ---------------------------------------------------------------
    def capture(self, task: Any) -> dict | None:
        """In the submitting thread: the cell's request for a foreground task submitted from
        a cell on the main thread (None otherwise: no row)."""
        if task.background or threading.current_thread() is not threading.main_thread():
            return None
        parent = execute_request(self.shell)
        msg_id = msg_id_of(parent)
        if msg_id is None or not self._active():
            return None
        with self._lock:
            if msg_id != self._cell:
                self._cell, self._rows = msg_id, {}
            if len(self._rows) >= MAX_ROWS_PER_CELL:
                return None
            self._rows[task.uid] = (task, None, None)
        return parent

    def apply(self, task: Any, token: dict | None) -> contextlib.AbstractContextManager:
        """Where the task runs: show its live row in the cell (nothing when ``token`` is None)."""
        if token is None:
            return contextlib.nullcontext()
        return self._showing(task, token)

    # -- the formatter asks -------------------------------------------------------------------------
    def shown_here(self, task: Any) -> bool:
        """True when ``task``'s live row is already in the cell that runs now."""
        msg_id = msg_id_of(execute_request(self.shell))
        with self._lock:
            return msg_id is not None and msg_id == self._cell and task.uid in self._rows

    def rest(self, *_: Any) -> None:
        """``post_run_cell``: the rows of this cell whose task has ended become static copies
        of their final state (:func:`static_row`); a row whose task still runs (left running
        by an interrupt) stays live."""
        from ..ipython.runner import interrupts_held

        msg_id = msg_id_of(execute_request(self.shell))
        with self._lock:
            if msg_id is None or msg_id != self._cell:
                return
            shown = [entry for entry in self._rows.values() if entry[1] is not None]
            self._rows = {uid: (task, None, None) for uid, (task, _, _) in self._rows.items()}
        with interrupts_held():  # (■ after the cell's end would show as an error of the cell)
            for task, display_id, row in shown:
                if task.done():
                    update_row(self.shell, task, display_id, None, row)

    # -- internals ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _showing(self, task: Any, parent: dict) -> Iterator[None]:
        try:
            self._display(task, parent)
        except Exception:  # noqa: BLE001 - a row must never fail the task
            log.warning("qmagic: could not show the live row of %s", task.call_text(40), exc_info=True)
        yield  # the pump shows the final state once the task has ended

    def _display(self, task: Any, parent: dict) -> None:
        from IPython.display import display

        from .task_panel import TaskRow

        row = TaskRow(self.worker, task)
        display_id = uuid.uuid4().hex
        setter = getattr(self.shell, "set_thread_parent", None)
        resetter = getattr(self.shell, "reset_thread_parent", None)
        if threading.current_thread() is threading.main_thread() or setter is None or resetter is None:
            display(row, display_id=display_id)
        else:  # a coroutine task runs on an event loop thread: pin the display to the cell
            tokens = setter(parent)
            try:
                display(row, display_id=display_id)
            finally:
                resetter(tokens)
        keep = None if rested.captured(msg_id_of(parent)) else row
        with self._lock:
            if msg_id_of(parent) == self._cell and task.uid in self._rows:
                self._rows[task.uid] = (task, display_id, keep)
