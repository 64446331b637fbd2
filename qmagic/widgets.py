"""Live panels in Jupyter: ``TaskPanel`` (``%tasks``), ``LockPanel`` (``%lock_info``), ``TaskRow``.

Panels are compositions of stock ipywidgets that follow a :class:`qmagic.Worker` through
its event subscription.  One writer thread per process (the *pump*) applies widget changes,
coalesced to ``QMagic.panel_update_hz`` updates per second per panel, always showing the
final state of every task.  Without a widget frontend every panel and task has a
deterministic ``text/plain`` form (no uids, no clock times).

The extension calls :func:`attach` when it loads (a :class:`qmagic.Task` then displays as a
live :class:`TaskRow`) and :func:`detach` when it unloads (every panel closed, no thread
left).  See :mod:`qmagic.panels` for the parts.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from .tasks import Task

log = logging.getLogger("qmagic")

__all__ = [
    "widgets_available",
    "attach",
    "detach",
    "TaskPanel",
    "TaskRow",
    "LockPanel",
    "subshell_cancel_available",
]

_lock = threading.Lock()
#: id(worker.engine) -> worker, for every attached worker
_workers: dict[int, Any] = {}
#: id(shell) -> (shell, the Task printer we replaced or None, number of attached workers)
_formatters: dict[int, list[Any]] = {}
_MISSING = object()


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
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


def subshell_cancel_available(shell: Any = None) -> bool:
    """True when panel clicks are handled even while a cell blocks the main thread.

    Needs ipykernel >= 7.4 (kernel subshells and per-comm routing).  Otherwise a click on
    Cancel waits for the running cell to end; interrupt the kernel (■) to stop a foreground
    task sooner.
    """
    from .panels.subshell import _kernel_of, routing_supported

    if shell is None:
        try:
            from IPython import get_ipython

            shell = get_ipython()
        except Exception:  # noqa: BLE001
            return False
    return routing_supported(_kernel_of(shell))


def _worker_for(task: Task) -> Any:
    bus = getattr(task, "_bus", None)
    engine = getattr(bus, "engine", None)
    with _lock:
        worker = _workers.get(id(engine))
        if worker is None and len(_workers) == 1:
            worker = next(iter(_workers.values()))
    return worker


def _task_bundle(task: Task) -> dict:
    """Mime bundle of a Task: a live TaskRow widget plus deterministic text/plain."""
    from .panels import render

    try:
        from .panels.task_panel import TaskRow

        return TaskRow(_worker_for(task), task)._repr_mimebundle_()
    except Exception:  # noqa: BLE001 - a display must never fail
        log.exception("qmagic: could not build the live row of %r", task)
        return {"text/plain": render.row_text(task)}


def attach(shell: Any, worker: Any) -> None:
    """Let panels follow ``worker`` in ``shell``; a Task then displays as a live row.

    Starts nothing yet: the pump thread starts with the first panel.  Idempotent.
    """
    with _lock:
        _workers[id(worker.engine)] = worker
        if not widgets_available(shell):
            return
        entry = _formatters.get(id(shell))
        if entry is not None:
            entry[2] += 1
            return
        formatter = shell.display_formatter.mimebundle_formatter
        previous = formatter.type_printers.get(Task, None)
        formatter.for_type(Task, _task_bundle)
        _formatters[id(shell)] = [shell, previous, 1]


def detach(shell: Any, worker: Any, timeout: float = 5.0) -> None:
    """Undo :func:`attach`: close every panel of ``worker`` (widgets and comms), end the
    subscription, restore how a Task displays, and when no worker is left stop the pump
    thread and delete the panel subshell."""
    from .panels import pump as _pump

    with _lock:
        _workers.pop(id(getattr(worker, "engine", None)), None)
        last_worker = not _workers
        entry = _formatters.get(id(shell))
        if entry is not None:
            entry[2] -= 1
            if entry[2] <= 0 or last_worker:
                del _formatters[id(shell)]
                formatter = shell.display_formatter.mimebundle_formatter
                formatter.pop(Task, None)
                if entry[1] is not None:
                    formatter.for_type(Task, entry[1])
    pump = _pump.current_pump()
    if pump is not None:
        pump.close_views(worker)
        if last_worker or not pump.views():
            _pump.shutdown(timeout)


def __getattr__(name: str) -> Any:
    # The widget classes import ipywidgets: load them only when asked for.
    if name in ("TaskPanel", "TaskRow", "LockPanel"):
        from . import panels

        return getattr(panels, name)
    raise AttributeError(f"module 'qmagic.widgets' has no attribute {name!r}")
