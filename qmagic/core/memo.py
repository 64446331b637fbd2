"""A bounded memo that threads share: one lock, emptied all at once when full.

The texts and checks that several doors make again and again for the same values (a
function's resolution, a traceback's text, a slow value's text) are kept in one of these;
every read and write holds its lock (the rule of the house: one lock or one owner thread
per shared structure), never while the value is made.

This module does not import IPython, ipykernel, ipywidgets or zmq.
"""

from __future__ import annotations

import threading
from typing import Any, Generic, Hashable, TypeVar

__all__ = ["Memo"]

V = TypeVar("V")


class Memo(Generic[V]):
    """``{key: value}`` of at most ``size`` entries, shared by threads."""

    def __init__(self, size: int) -> None:
        self._lock = threading.Lock()
        self._items: dict[Hashable, V] = {}
        self._size = size

    def get(self, key: Hashable, default: Any = None) -> V | Any:
        """The value kept for ``key``, else ``default``."""
        with self._lock:
            return self._items.get(key, default)

    def put(self, key: Hashable, value: V) -> None:
        """Keep ``value`` for ``key`` (when full, everything kept before is forgotten first)."""
        with self._lock:
            if len(self._items) >= self._size and key not in self._items:
                self._items.clear()
            self._items[key] = value

    def clear(self) -> None:
        """Forget everything."""
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
