"""qmagic: a Jupyter kernel as a tracked task-execution environment for laboratory work.

The kernel's namespace becomes bluesky-queueserver's "RE Worker namespace": start its
functions as tracked foreground or background tasks, follow their progress, cancel them,
read results and tracebacks, upload scripts, and lock the environment with a key.
"""

__version__ = "0.1.0"

from .config import QMagic
from .context import cancellable_sleep, current_task, raise_if_cancelled, report_progress
from .errors import (
    ControlChannelError,
    InvalidTransition,
    LockRefused,
    PermissionRefused,
    PermissionsFormatError,
    QMagicError,
    RequestRefused,
    StateFileError,
    TaskCancelled,
    TaskNotFound,
)
from .events import Subscription
from .extension import get_worker, load_ipython_extension, unload_ipython_extension
from .permissions import DEFAULT_PERMISSIONS, Permissions
from .tasks import Progress, Task, TaskStatus
from .worker import Worker


def __getattr__(name: str):
    # Imported when first asked for: panels and the control channel need ipywidgets and
    # pyzmq, and `python -m qmagic.locks` / `-m qmagic.journal` must not find their module
    # already imported by the package.
    if name in ("history", "history_dataframe"):
        from . import logbook

        return getattr(logbook, name)
    if name == "get_default_lock_key":
        from .locks import get_default_lock_key

        return get_default_lock_key
    if name == "ControlChannel":
        from .control import ControlChannel

        return ControlChannel
    if name in ("TaskPanel", "TaskRow", "LockPanel"):
        from . import widgets

        return getattr(widgets, name)
    raise AttributeError(f"module 'qmagic' has no attribute {name!r}")

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
    "Permissions",
    "DEFAULT_PERMISSIONS",
    "ControlChannel",
    "TaskPanel",
    "TaskRow",
    "LockPanel",
    "history",
    "history_dataframe",
    "get_default_lock_key",
    "QMagicError",
    "TaskNotFound",
    "RequestRefused",
    "LockRefused",
    "PermissionRefused",
    "InvalidTransition",
    "StateFileError",
    "TaskCancelled",
    "PermissionsFormatError",
    "ControlChannelError",
    "get_worker",
    "load_ipython_extension",
    "unload_ipython_extension",
]
