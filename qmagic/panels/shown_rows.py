"""A Task's live row, shown by a cell (``t`` as a cell's last line, ``display(t)``), becomes
a static copy of its final state once both its cell and its task have ended.

``t = %function_execute -b scan 100`` then ``t``: the cell shows the task's live row (status,
progress, elapsed, Cancel), which goes on following the scan after the cell.  A live row is
an ipywidgets view: reopened without its kernel (the next morning, on GitHub, in
nbconvert's HTML) JupyterLab showed "Error displaying widget: model not found" where the
scan was.  So the row is shown with a display id, and replaced under that id
(``update_display_data``: :func:`~qmagic.panels.cell_rows.update_row`) by its static row,
the row's own HTML with its stylesheet and its final ``text/plain`` line, when both are
over:

- a task that had ended when its row was shown: when its cell ends (``post_run_cell``);
- a task still running when its cell ends: when it ends (on the thread that ends it);
- a task that ended while its cell still ran: when the next cell starts (``pre_run_cell``).
  Never within the cell: whether a scan ends before or after its cell does is a matter of
  timing, and what a cell's outputs hold when it ends must not be (nbval compares them).

Every update carries the request of the cell that showed the row as its parent: JupyterLab
applies it wherever the row is (display ids are the notebook's), and tools that read one
cell's messages at a time (nbclient, nbval) leave a later cell's outputs alone.  The row's
widgets are closed once enough newer rows are static, as foreground rows' are
(:mod:`~qmagic.panels.rested`); a row another display took the place of retires too.  At
most :data:`MAX_WAITING` rows wait for their task; beyond that the oldest stays live.

It is driven by the shell's events and the tasks' ends; a short thread sends the rows due
when a cell starts.
"""

from __future__ import annotations

import collections
import threading
from typing import Any

from . import rested
from .cell_rows import msg_id_of, update_row

__all__ = ["MAX_WAITING", "ShownRows"]

#: Most rows of running tasks waiting to become static (a loop that displays thousands of
#: tasks must not keep them all): beyond it the oldest one stays a live row.
MAX_WAITING = 1000

_Row = tuple[Any, str, dict, Any]  # (task, display id, parent request, the row or None)


class ShownRows:
    """The rows Task displays showed in one kernel shell (see the module docstring).

    ``shown`` is called by the display printer; ``pre_run_cell`` and ``post_run_cell`` are
    the shell's events; each task's done callback calls ``_ended``.  One lock guards the
    three tables; updates are sent outside it.
    """

    def __init__(self, shell: Any) -> None:
        self.shell = shell
        self._lock = threading.Lock()
        #: display id -> (task, parent request, the row, done when shown) of rows the running
        #: cell showed (the row: None when it must stay open, :mod:`~qmagic.panels.rested`)
        self._in_cell: dict[str, tuple[Any, dict, Any, bool]] = {}
        #: display id -> (task, parent request, the row) of rows whose cell ended before their task
        self._waiting: collections.OrderedDict[str, tuple[Any, dict, Any]] = collections.OrderedDict()
        #: rows whose task ended while their cell ran: updated when the next cell starts
        self._due: list[_Row] = []
        self._sender: threading.Thread | None = None  # (the latest thread sending them)

    def shown(self, task: Any, display_id: str, parent: dict | None, row: Any = None) -> None:
        """A live ``row`` of ``task`` was displayed under ``display_id`` by the cell request
        ``parent`` (nothing is tracked without one: no cell, no end to wait for; ``row``
        None: it stays open)."""
        if msg_id_of(parent) is None:
            return
        done = task.done()
        with self._lock:  # (a display id shown again belongs to its latest task)
            replaced = [entry[2] for entry in (self._in_cell.get(display_id),
                                               self._waiting.pop(display_id, None)) if entry]
            replaced += [entry[3] for entry in self._due if entry[1] == display_id]
            self._in_cell[display_id] = (task, parent, row, done)
            self._due = [entry for entry in self._due if entry[1] != display_id]
        for old in replaced:  # (shown nowhere now)
            rested.retire(old)
        if not done:
            task.add_done_callback(lambda t, did=display_id: self._ended(t, did))

    def _ended(self, task: Any, display_id: str) -> None:
        """A task whose row was shown has ended (on the thread that ended it)."""
        with self._lock:
            waiting = self._waiting.get(display_id)
            if waiting is None or waiting[0] is not task:  # (in its cell still: post_run_cell
                return  # sees it done; or its display now shows another task)
            del self._waiting[display_id]
        update_row(self.shell, task, display_id, waiting[1], waiting[2])

    def post_run_cell(self, *_: Any) -> None:
        """The cell ended: the rows of tasks that had ended when shown become static now,
        those of tasks that ended meanwhile when the next cell starts; the others wait for
        their task's end."""
        now: list[_Row] = []
        with self._lock:  # (a task's end waits here: it finds its row below or not at all)
            rows, self._in_cell = self._in_cell, {}
            for display_id, (task, parent, row, done_when_shown) in rows.items():
                if done_when_shown:
                    now.append((task, display_id, parent, row))
                elif task.done():
                    self._due.append((task, display_id, parent, row))
                else:
                    self._waiting[display_id] = (task, parent, row)
                    if len(self._waiting) > MAX_WAITING:
                        self._waiting.popitem(last=False)
        self._update(now)

    def pre_run_cell(self, *_: Any) -> None:
        """A cell starts: the rows whose task ended while their own cell ran become static,
        sent from a thread of their own (each an update of its own, earlier, cell: when it is
        sent does not matter, and hundreds of them must not hold up this cell, nor take a ■
        aimed at it: IPython drops a ■ that lands in a cell event)."""
        with self._lock:
            due, self._due = self._due, []
            if not due:
                return
            before = self._sender
            self._sender = threading.Thread(target=self._send, args=(due, before), daemon=True,
                                            name="qmagic-static-rows")
            self._sender.start()

    def _send(self, rows: list[_Row], before: threading.Thread | None) -> None:
        if before is not None:
            before.join()  # (in order: a later update of a display comes last)
        self._send_rows(rows)

    def finish(self) -> None:
        """qmagic leaves this shell: every row whose task has ended becomes static now;
        the rows of running tasks still do when their task ends."""
        with self._lock:
            rows, self._in_cell = self._in_cell, {}
            due, self._due = self._due, []
            for display_id, (task, parent, row, _done) in rows.items():
                if task.done():
                    due.append((task, display_id, parent, row))
                else:
                    self._waiting[display_id] = (task, parent, row)
            sender = self._sender
        if sender is not None:
            sender.join(5.0)
        self._update(due)

    def _update(self, rows: list[_Row]) -> None:
        """Make ``rows`` static, on the main thread at a cell's end (■ held meanwhile: it
        would show as an error of the cell)."""
        if not rows:
            return
        from ..ipython.runner import interrupts_held

        with interrupts_held():
            self._send_rows(rows)

    def _send_rows(self, rows: list[_Row]) -> None:
        for task, display_id, parent, row in rows:
            update_row(self.shell, task, display_id, parent, row)
