"""Live ipywidgets panels: :class:`TaskPanel` (``%tasks``), :class:`TaskRow` (one task; how a
:class:`qmagic.Task` displays, and a foreground task's row in its cell) and
:class:`LockPanel` (``%lock_info``).

Panels are compositions of stock ipywidgets that follow a :class:`qmagic.Worker` through
its public API (events, ``cancel``, ``lock`` ...).  One writer thread per process (the
*pump*) applies widget changes, coalesced to ``QMagic.panel_update_hz`` updates per second
per panel, always showing the final state of every task.  Without a widget frontend every
panel has a deterministic ``text/plain`` form (no uids, no clock times).

Parts: ``display`` (attach / detach, the Task formatter), ``cell_rows`` (the in-cell row
hook), ``render`` (HTML, no widgets), ``styles`` (its stylesheet, sent once per panel),
``pump`` (the writer thread) and ``view`` (a view's side of it), ``subshell`` (clicks while a cell blocks), ``base`` (shared widget plumbing), ``task_table``, ``task_panel`` and
``lock_panel``.  Importing this package does not import ipywidgets; the widget classes load
when first asked for.
"""

from __future__ import annotations

from typing import Any

from .display import (
    attach,
    cell_row_hook,
    detach,
    is_attached,
    shown_by_cell,
    subshell_cancel_available,
    widgets_available,
)

__all__ = [
    "attach",
    "detach",
    "cell_row_hook",
    "is_attached",
    "shown_by_cell",
    "widgets_available",
    "subshell_cancel_available",
    "TaskPanel",
    "TaskRow",
    "LockPanel",
]

_WIDGETS = {"TaskPanel": "task_panel", "TaskRow": "task_panel", "LockPanel": "lock_panel"}


def __getattr__(name: str) -> Any:
    module = _WIDGETS.get(name)
    if module is None:
        raise AttributeError(f"module 'qmagic.panels' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
