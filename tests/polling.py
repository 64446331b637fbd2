"""Waiting in tests for what another thread or process makes true: a condition polled with a
deadline (a bare sleep is never a wait).  Where the code under test sets an Event, tests wait
on the Event instead."""

from __future__ import annotations

import time
from typing import Callable


def eventually(condition: Callable[[], object], timeout: float = 10.0, what: str = "condition",
               interval: float = 0.001) -> float:
    """Poll ``condition()`` every ``interval`` seconds until it is true; return the seconds it
    took.  Raises AssertionError naming ``what`` after ``timeout`` seconds."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - start
