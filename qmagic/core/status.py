"""A task's status and progress: plain values, one transition table."""

from __future__ import annotations

import enum
from typing import NamedTuple

__all__ = ["FINISHED", "FINISHED_VALUES", "TRANSITIONS", "Progress", "TaskStatus"]


class TaskStatus(str, enum.Enum):
    """Life cycle of a task.  ``wire`` is what the queueserver protocol shows."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        """True for completed, failed and cancelled."""
        return self in FINISHED

    @property
    def wire(self) -> str:
        """'running' for queued/running, 'completed' for every finished status."""
        return "completed" if self in FINISHED else "running"

    def __str__(self) -> str:
        return self.value


#: The statuses a task ends in.
FINISHED = frozenset({TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED})
#: The same as wire texts ("completed", ...), for events and records.
FINISHED_VALUES = frozenset(s.value for s in FINISHED)

#: The only allowed status changes.
TRANSITIONS: dict[TaskStatus, frozenset[TaskStatus]] = {
    TaskStatus.QUEUED: frozenset({TaskStatus.RUNNING, TaskStatus.CANCELLED, TaskStatus.FAILED}),
    TaskStatus.RUNNING: frozenset({TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED}),
    TaskStatus.COMPLETED: frozenset(),
    TaskStatus.FAILED: frozenset(),
    TaskStatus.CANCELLED: frozenset(),
}


class Progress(NamedTuple):
    """Last progress reported by a task: ``value`` of ``total`` (either may be None)."""

    value: float | None
    total: float | None
    message: str | None

    def __repr__(self) -> str:  # (a value the task reported may have a failing repr)
        from ..texts import safe_repr

        return (f"Progress(value={safe_repr(self.value, 200)}, total={safe_repr(self.total, 200)}, "
                f"message={safe_repr(self.message, 200)})")

    @property
    def fraction(self) -> float | None:
        """value/total clipped to [0, 1], or None when unknown."""
        try:  # (any value a task reported: never raises)
            if self.value is None or not self.total:
                return None
            return max(0.0, min(1.0, float(self.value) / float(self.total)))
        except Exception:  # noqa: BLE001
            return None
