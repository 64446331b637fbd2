"""qmagic: a Jupyter kernel as a tracked task-execution environment for laboratory work.

The kernel's namespace becomes bluesky-queueserver's "RE Worker namespace": start its
functions (also ``async def`` ones) as tracked foreground or background tasks, follow their
progress, cancel them, read results and tracebacks, upload scripts, lock the environment
with a key, and keep an experiment log of every task.  Magics, this Python API, live panels
and queueserver's remote clients are doors to the same worker.
"""

from __future__ import annotations

__version__ = "0.2.0"

from typing import Any

from .config import QMagic
from .core.context import (
    cancellable_sleep,
    current_task,
    raise_if_cancelled,
    report_progress,
)
from .core.events import Subscription
from .core.status import Progress, TaskStatus
from .core.task import Task
from .errors import (
    ControlChannelError,
    InvalidTransition,
    LockRefused,
    LogUnavailable,
    NotLoaded,
    PermissionRefused,
    PermissionsFormatError,
    QMagicError,
    RequestRefused,
    StateFileError,
    TaskCancelled,
    TaskNotFound,
)
from .worker import Worker

#: Imported when first asked for: these need IPython, ipywidgets, zmq, pandas or matplotlib.
#: No module of the package may share a name here: importing ``qmagic.<name>`` binds the
#: module as the package attribute, so ``qmagic.history()`` would become a module after any
#: import of it (by qmagic or by a user).  Hence ``_history`` and ``_timeline``.
_LAZY = {
    "get_worker": ("qmagic.ipython.extension", "get_worker"),
    "load_ipython_extension": ("qmagic.ipython.extension", "load_ipython_extension"),
    "unload_ipython_extension": ("qmagic.ipython.extension", "unload_ipython_extension"),
    "history": ("qmagic._history", "history"),
    "history_dataframe": ("qmagic._history", "history_dataframe"),
    "timeline": ("qmagic._timeline", "timeline"),
    "get_default_lock_key": ("qmagic.store.keys", "get_default_lock_key"),
    "Permissions": ("qmagic.core.permissions", "Permissions"),
    "DEFAULT_PERMISSIONS": ("qmagic.core.permissions", "DEFAULT_PERMISSIONS"),
    "LockState": ("qmagic.store.locks", "LockState"),
    "ControlServer": ("qmagic.remote.server", "ControlServer"),
    "TaskPanel": ("qmagic.panels", "TaskPanel"),
    "TaskRow": ("qmagic.panels", "TaskRow"),
    "LockPanel": ("qmagic.panels", "LockPanel"),
}


def __getattr__(name: str) -> Any:
    """Import a lazy public name (see ``_LAZY``) when first asked for and keep it."""
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'qmagic' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(target[0]), target[1])
    globals()[name] = value
    return value


__all__ = [
    "__version__",
    "QMagic",
    "Worker",
    "Task",
    "TaskStatus",
    "Progress",
    "Subscription",
    "current_task",
    "report_progress",
    "raise_if_cancelled",
    "cancellable_sleep",
    "get_worker",
    "load_ipython_extension",
    "unload_ipython_extension",
    "history",
    "history_dataframe",
    "timeline",
    "get_default_lock_key",
    "Permissions",
    "DEFAULT_PERMISSIONS",
    "LockState",
    "ControlServer",
    "TaskPanel",
    "TaskRow",
    "LockPanel",
    "QMagicError",
    "TaskNotFound",
    "RequestRefused",
    "LockRefused",
    "PermissionRefused",
    "PermissionsFormatError",
    "InvalidTransition",
    "StateFileError",
    "LogUnavailable",
    "ControlChannelError",
    "NotLoaded",
    "TaskCancelled",
]
