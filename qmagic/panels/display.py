"""How panels join a shell: :func:`attach` / :func:`detach`, the Task display formatter and
the in-cell rows of foreground tasks.

The extension calls :func:`attach` when it loads (a :class:`qmagic.Task` then displays as a
live :class:`~qmagic.panels.TaskRow`, bound to the worker that runs it, under a display id:
:class:`~qmagic.panels.shown_rows.ShownRows` makes it static once its cell and its task are
over), installs the hook
from :func:`cell_row_hook` in the worker's engine (a foreground task started from a cell
shows its live row in that cell), and calls :func:`detach` when it unloads (every panel of
the worker closed; with the last worker gone, the pump thread stopped and the panel
subshell deleted).  Nothing here reaches into the engine: the worker is passed in.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import sys
import threading
import uuid
from typing import Any

from ..core.task import Task
from ..errors import one_line
from . import rested
from .cell_rows import CellRows, msg_id_of
from .shown_rows import ShownRows

log = logging.getLogger("qmagic")

__all__ = ["widgets_available", "subshell_cancel_available", "attach", "detach", "cell_row_hook",
           "is_attached", "shown_by_cell"]


class _Attachment:
    """What :func:`attach` added to one shell (None for a worker without a shell)."""

    def __init__(self, shell: Any) -> None:
        self.shell = shell
        self.workers: list[Any] = []
        #: id(worker) -> the in-cell rows of that worker's foreground tasks
        self.cells: dict[int, CellRows] = {}
        self.formatter: Any = None  # the display formatter we registered with
        self.previous: Any = None  # the Task printer we replaced there
        self.shown: ShownRows | None = None  # rows that Task displays showed


_lock = threading.Lock()
_attachments: dict[int, _Attachment] = {}
#: (frontend session, notebook cell id) -> its latest run and the panels that run showed
_by_cell: dict[tuple[str, str], _CellRuns] = {}


def widgets_available(shell: Any) -> bool:
    """True when ``shell`` is a Jupyter (ZMQ) kernel shell and ipywidgets can be imported."""
    if shell is None or getattr(shell, "kernel", None) is None:
        return False
    try:
        from ipykernel.zmqshell import ZMQInteractiveShell
    except ImportError:
        return False
    if not isinstance(shell, ZMQInteractiveShell):
        return False
    try:
        import ipywidgets  # noqa: F401 - is it installed?
    except ImportError:
        return False
    return True


def subshell_cancel_available(shell: Any = None) -> bool:
    """True when panel clicks are handled even while a cell blocks the main thread.

    Needs ipykernel >= 7.4 (kernel subshells and per-comm routing).  Otherwise a click on
    Cancel waits for the running cell to end; interrupt the kernel (■) to stop a foreground
    task sooner.
    """
    from .subshell import kernel_of, routing_supported

    if shell is None:
        try:
            from IPython import get_ipython

            shell = get_ipython()
        except Exception:  # noqa: BLE001
            return False
    return routing_supported(kernel_of(shell))


def is_attached(shell: Any, worker: Any) -> bool:
    """True while ``worker`` is attached to ``shell``."""
    with _lock:
        entry = _attachments.get(id(shell))
        return entry is not None and any(w is worker for w in entry.workers)


def _owner(workers: list[Any], task: Task) -> Any:
    """The worker among ``workers`` that runs ``task`` (None if none of them knows it)."""
    for worker in workers:
        try:
            if worker.get_task(task.uid) is task:
                return worker
        except Exception:  # noqa: BLE001 - unknown or expired there: ask the next worker
            log.debug("qmagic: %r does not run task %s", worker, task.uid[:8], exc_info=True)
    return None


class _CellRuns:
    """The latest run of one notebook cell (its execute request) and the panels it showed;
    the ids of its earlier runs (the last :data:`_EARLIER_KEPT`)."""

    def __init__(self, run: str, panel: Any) -> None:
        self.run, self.panels = run, [panel]
        self.earlier: collections.deque[str] = collections.deque(maxlen=_EARLIER_KEPT)


_EARLIER_KEPT = 32


def shown_by_cell(shell: Any, panel: Any) -> None:
    """Remember ``panel`` as shown by the running cell, and close the panels an earlier run
    of that cell showed: the frontend cleared them when the cell ran again, and left open
    each would go on sending updates nobody sees (thirty re-runs of ``%tasks`` during a
    scan sent 300 messages per second).  A panel shown late for an earlier run (a task it
    started displays itself) is closed at once: the frontend drops it.  Cells are known by
    the frontend's session and the id JupyterLab sends (``metadata.cellId``; two tabs of one
    notebook are two sessions); without one nothing is closed."""
    from ..ipython.context import execute_request
    from ..ipython.runner import interrupts_held

    request = execute_request(shell) or {}
    header = request.get("header") or {}
    cell, run = (request.get("metadata") or {}).get("cellId"), header.get("msg_id")
    if not isinstance(cell, str) or not run:
        return
    key = (str(header.get("session") or ""), cell)
    with _lock:
        runs = _by_cell.get(key)
        if runs is None:
            _by_cell[key] = _CellRuns(run, panel)
            return
        if runs.run == run:
            runs.panels.append(panel)
            return
        if run in runs.earlier:
            unseen = [panel]
        else:
            unseen, runs.panels = runs.panels, [panel]
            runs.earlier.append(runs.run)
            runs.run = run
    with interrupts_held():  # (■ amid the closes would leave the rest open for good)
        for old in unseen:
            try:
                old.close()
            except Exception:  # noqa: BLE001 - a panel nobody sees: never fail the new one
                log.debug("qmagic: could not close a panel of an earlier run", exc_info=True)


def _stopped_showing(task: Task) -> str:
    return task._goes_on(f"stopped showing {task.call_text(40)}")


def _display_call() -> tuple[str | None, bool]:
    """The display id and ``update`` flag of the ``IPython.display.display`` call showing a
    Task now (``display(t, display_id=...)``, ``update_display(t, display_id=...)``, a
    DisplayHandle's ``update``): the row keeps them, as any object's display does.  (None,
    False) for a cell's result or a plain ``display(t)``.  (A formatter is not told them:
    they are read from that call's frame.)"""
    from IPython.core import display_functions

    code = display_functions.display.__code__
    frame = sys._getframe(1)
    for _ in range(40):  # (the formatter's own frames lie between)
        if frame is None:
            break
        if frame.f_code is code:
            local = frame.f_locals
            given = (local.get("transient") or {}).get("display_id")
            return (given if isinstance(given, str) else None), bool((local.get("kwargs") or {}).get("update"))
        frame = frame.f_back
    return None, False


def _row_printer(entry: _Attachment) -> Any:
    def show_task(task: Task) -> None:
        """Display ``task`` as a live TaskRow (with deterministic text/plain) under a display
        id, which :class:`~qmagic.panels.shown_rows.ShownRows` makes static once the cell
        and the task are over.  NotImplementedError (the text/plain printer answers, as the
        cell's result) when the task's live row is already in this cell, when no attached
        worker runs the task, or when the row cannot be built."""
        try:
            with _lock:
                cells, workers = list(entry.cells.values()), list(entry.workers)
            if any(rows.shown_here(task) for rows in cells):
                raise NotImplementedError
            worker = _owner(workers, task)
            if worker is None:
                raise NotImplementedError
            from IPython.display import display

            from ..ipython.context import execute_request
            from ..ipython.runner import interrupts_held
            from .task_panel import TaskRow

            row = error = None
            shown = False
            with interrupts_held() as held:  # (■ amid the widgets would leave a half-built row)
                try:
                    row = TaskRow(worker, task)
                    bundle = row._repr_mimebundle_()
                    if not held:
                        given, update = _display_call()
                        display_id = given or uuid.uuid4().hex
                        display(bundle, raw=True, display_id=display_id, update=update)
                        shown = True
                        shown_by_cell(entry.shell, row)
                        if entry.shown is not None:
                            request = execute_request(entry.shell)
                            keep = None if rested.captured(msg_id_of(request)) else row
                            entry.shown.shown(task, display_id, request, keep)
                except Exception as exc:  # noqa: BLE001 - logged below; a held ■ still counts
                    error = exc
                if row is not None and not shown:  # (never shown: nobody would see it)
                    row.close()
            if error is not None:
                log.error("qmagic: could not show the live row of %r", task, exc_info=error)
                if not held and not shown:
                    raise NotImplementedError
            if held:  # the cell stops, as ■ asked
                raise one_line(KeyboardInterrupt(_stopped_showing(task)))
        except (NotImplementedError, KeyboardInterrupt):
            raise
        except Exception:  # noqa: BLE001 - a display must never fail
            log.exception("qmagic: could not build the live row of %r", task)
            raise NotImplementedError from None

    return show_task


def attach(shell: Any, worker: Any) -> None:
    """Let panels follow ``worker`` in ``shell``; a Task of it then displays as a live row.

    Starts nothing yet: the pump thread starts with the first panel.  Idempotent.
    """
    with _lock:
        entry = _attachments.get(id(shell))
        if entry is None:
            entry = _attachments[id(shell)] = _Attachment(shell)
        if any(w is worker for w in entry.workers):
            return
        entry.workers.append(worker)
        if not widgets_available(shell):
            return
        rows = entry.cells[id(worker)] = CellRows(shell, worker, lambda: is_attached(shell, worker))
        events = getattr(shell, "events", None)
        if events is not None:  # (a finished task's row becomes a static record at the cell's end)
            events.register("post_run_cell", rows.rest)
        if entry.formatter is None:
            formatter = shell.display_formatter.ipython_display_formatter
            entry.previous = formatter.type_printers.get(Task)
            formatter.for_type(Task, _row_printer(entry))
            entry.formatter = formatter
            entry.shown = ShownRows(shell)
            if events is not None:
                events.register("pre_run_cell", entry.shown.pre_run_cell)
                events.register("post_run_cell", entry.shown.post_run_cell)


def cell_row_hook(shell: Any, worker: Any) -> CellRows | None:
    """The engine context hook that shows a foreground task's live row in the cell that
    runs it (see :class:`~qmagic.panels.cell_rows.CellRows`), or None where widgets do not
    work or ``worker`` is not attached.  The caller adds it to the worker's engine and
    removes it before :func:`detach`."""
    with _lock:
        entry = _attachments.get(id(shell))
        return entry.cells.get(id(worker)) if entry is not None else None


def detach(shell: Any, worker: Any, timeout: float = 5.0) -> None:
    """Undo :func:`attach`: close every panel of ``worker`` (widgets and comms), end their
    subscriptions, restore how a Task displays, and when no panel or worker is left stop
    the pump thread and delete the panel subshell."""
    from . import pump as _pump

    rows = shown = None
    with _lock:
        entry = _attachments.get(id(shell))
        if entry is not None:
            entry.workers = [w for w in entry.workers if w is not worker]
            rows = entry.cells.pop(id(worker), None)
            if rows is not None:
                with contextlib.suppress(AttributeError, ValueError):  # (a shell without events)
                    shell.events.unregister("post_run_cell", rows.rest)
            if not entry.workers:
                del _attachments[id(shell)]
                if entry.formatter is not None:
                    entry.formatter.type_printers.pop(Task, None)
                    if entry.previous is not None:
                        entry.formatter.for_type(Task, entry.previous)
                shown = entry.shown
                if shown is not None:
                    for event, callback in (("pre_run_cell", shown.pre_run_cell),
                                            ("post_run_cell", shown.post_run_cell)):
                        with contextlib.suppress(AttributeError, ValueError):
                            shell.events.unregister(event, callback)
        last_worker = not any(e.workers for e in _attachments.values())
        if last_worker:
            _by_cell.clear()  # (their panels are closed below)
    if rows is not None:  # (unloaded in a cell: its finished rows rest now, their cell's end will not reach them)
        rows.rest()
    if shown is not None:  # (likewise; the rows of running tasks still rest when their task ends)
        shown.finish()
    pump = _pump.current_pump()
    if pump is not None:
        pump.close_views(worker)
        if last_worker or not pump.views():
            _pump.shutdown(timeout)
    elif last_worker:
        _pump.shutdown(timeout)  # a router may exist without a pump
    rested.wait_closed(timeout)  # (no qmagic thread outlives the extension)
    rested.forget_closed()  # (those of this worker's rows that rested are closed now)
