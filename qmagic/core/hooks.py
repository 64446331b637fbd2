"""Context hooks: what a task carries from the thread that submits it to where it runs.

The kernel uses one to pin a background task's output to the cell that started it, and one
for the live row of a foreground task in its cell.  A hook's ``capture`` runs in the
submitting thread; its ``apply`` is a context manager around the task's code.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Protocol

if TYPE_CHECKING:  # pragma: no cover
    from .task import Task

__all__ = ["ContextHook", "ContextHooks"]


class ContextHook(Protocol):
    """Carries context from the submitting thread to where the task runs (the kernel pins
    a background task's output to the cell that started it)."""

    def capture(self, task: Task) -> Any:
        """Called in the submitting thread; returns a token."""

    def apply(self, task: Task, token: Any) -> ContextManager[Any]:
        """Called where the task runs; the context manager is active around the call."""


class ContextHooks:
    """An engine's hooks.  The tuple is replaced as a whole, never changed in place: a
    submit on another thread reads one tuple while a hook is added or removed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # (writers only)
        self._hooks: tuple[ContextHook, ...] = ()

    def add(self, hook: ContextHook) -> Callable[[], None]:
        """Use ``hook`` for every task submitted from now on; returns the function that
        removes it again (idempotent)."""
        with self._lock:
            self._hooks = (*self._hooks, hook)

        def remove() -> None:
            with self._lock:
                self._hooks = tuple(h for h in self._hooks if h is not hook)
        return remove

    def capture(self, task: Task) -> list[tuple[ContextHook, Any]] | None:
        """Each hook with its token for ``task`` (in the submitting thread); None if none."""
        hooks = self._hooks
        return [(hook, hook.capture(task)) for hook in hooks] if hooks else None
