"""Live widget panels for qmagic (task table, single task row, lock panel).

Public entry points live in :mod:`qmagic.widgets`; this package holds the parts:
``render`` (HTML/text, no widgets), ``pump`` (the one writer thread), ``subshell`` (clicks
while a cell blocks), ``base`` (shared widget plumbing), ``task_panel`` and ``lock_panel``.
"""

from __future__ import annotations

from .lock_panel import LockPanel
from .task_panel import TaskPanel, TaskRow

__all__ = ["TaskPanel", "TaskRow", "LockPanel"]
