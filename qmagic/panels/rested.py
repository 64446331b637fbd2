"""Rows that became static copies of their final state: which of them keep their widgets.

A live task row is an ipywidgets view: two dozen widgets, about 100 kB of the kernel's
memory and as many models in the browser.  Once its static copy has replaced it in the
notebook (:func:`~qmagic.panels.cell_rows.update_row`), its widgets serve only a frontend
that did not apply that update: a notebook tab closed meanwhile and opened again while the
kernel runs draws the row its saved copy holds from them.  So the newest :data:`KEEP_OPEN`
static rows keep their widgets and older ones are closed (:func:`retire`): a beamtime's
thousands of scans no longer grow the kernel and the browser by a row each (300 foreground
tasks kept 30 MB).  Closing a row takes ~8 ms: it is done by a short thread of its own
("qmagic-row-closer", while rows wait to be closed), never at a cell's end on the main
thread nor on the thread that ended a task.

A row shown inside an ``ipywidgets.Output`` (``with out:``, ``@out.capture()``, a Sidecar)
is never closed: an Output ignores display updates and goes on showing the live row
(:func:`captured` tells, when the row is shown).
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Any

log = logging.getLogger("qmagic")

__all__ = ["KEEP_OPEN", "captured", "forget_closed", "retire", "wait_closed"]

#: How many rows that became static keep their widgets open (the newest ones).
KEEP_OPEN = 100

_lock = threading.Lock()  # guards the three below
_rows: collections.OrderedDict[int, Any] = collections.OrderedDict()  # id(row) -> row, oldest first
_closing: list[Any] = []  # rows to close, oldest first
_closer: threading.Thread | None = None  # the thread closing them, while there are some


def captured(msg_id: str | None) -> bool:
    """True when an ``ipywidgets.Output`` captures the output of the cell request
    ``msg_id`` now (what the row displayed now lands in).  True as well when that cannot be
    told (the widget registry of another ipywidgets version): the row then stays open."""
    if msg_id is None:
        return False
    try:
        from ipywidgets import Output
        from ipywidgets.widgets import widget as _widget
    except ImportError:
        return True
    registry = getattr(_widget, "_instances", None)
    if not isinstance(registry, dict):
        return True
    return any(isinstance(w, Output) and w.msg_id == msg_id for w in list(registry.values()))


def retire(row: Any) -> None:
    """``row`` has become static (its static copy was sent): keep its widgets open among the
    newest :data:`KEEP_OPEN`; the oldest beyond them are closed by the closer thread (any
    thread; returns at once, never raises).  None (a row that must stay open) does nothing."""
    global _closer
    if row is None:
        return
    with _lock:
        _rows[id(row)] = row
        _rows.move_to_end(id(row))
        _closing.extend(_rows.popitem(last=False)[1] for _ in range(len(_rows) - KEEP_OPEN))
        if not _closing or _closer is not None:
            return
        _closer = threading.Thread(target=_close_waiting, name="qmagic-row-closer", daemon=True)
        try:
            _closer.start()
        except RuntimeError:  # (no thread to be had: the rows stay open)
            _closer = None
            _closing.clear()


def _close_waiting() -> None:
    """The closer thread: close the rows waiting, until none is left."""
    global _closer
    while True:
        with _lock:
            if not _closing:
                _closer = None
                return
            batch = _closing[:]
            _closing.clear()
        for row in batch:
            try:
                row.close()
            except Exception:  # noqa: BLE001 - a row nobody sees: close the others
                log.debug("qmagic: could not close a static row's widgets", exc_info=True)


def wait_closed(timeout: float) -> bool:
    """Wait until no row waits to be closed (within ``timeout`` seconds); True if none does."""
    with _lock:
        closer = _closer
    if closer is not None:
        closer.join(timeout)
    with _lock:
        return _closer is None


def forget_closed() -> None:
    """Drop the rows closed by other means (qmagic unloaded: every panel closed)."""
    with _lock:
        for key in [k for k, row in _rows.items() if row.closed]:
            del _rows[key]
