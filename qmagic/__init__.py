"""qmagic: a Jupyter kernel as a tracked task-execution environment for laboratory work.

The kernel's namespace becomes bluesky-queueserver's "RE Worker namespace": start its
functions as tracked foreground or background tasks, follow their progress, cancel them,
read results and tracebacks, upload scripts, and lock the environment with a key.
"""

__version__ = "0.1.0"

from .config import QMagic
from .context import cancellable_sleep, current_task, raise_if_cancelled, report_progress
from .errors import (
    InvalidTransition,
    LockRefused,
    PermissionRefused,
    QMagicError,
    RequestRefused,
    StateFileError,
    TaskCancelled,
    TaskNotFound,
)
from .events import Subscription
from .extension import get_worker, load_ipython_extension, unload_ipython_extension
from .tasks import Progress, Task, TaskStatus
from .worker import Worker

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
    "QMagicError",
    "TaskNotFound",
    "RequestRefused",
    "LockRefused",
    "PermissionRefused",
    "InvalidTransition",
    "StateFileError",
    "TaskCancelled",
    "get_worker",
    "load_ipython_extension",
    "unload_ipython_extension",
]
