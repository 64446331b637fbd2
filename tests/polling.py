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


def until_free(prober: object, timeout: float = 10.0) -> None:
    """Wait until ``prober`` (a :class:`qmagic.probe.Prober`) has returned from the value's
    code a test left it running (a repr that blocked until the test released it): while it
    is busy, the next test's reads through it give up at once.  A released thread that the
    machine runs ~50 ms late made the next test read "<repr did not finish>" or "an earlier
    value's repr is still blocked" (seen by delaying that thread)."""
    from qmagic.probe import ProbeTimeout

    deadline = time.monotonic() + timeout
    while True:
        try:
            prober.read(lambda: None, timeout)  # type: ignore[attr-defined]
            return
        except ProbeTimeout:
            if time.monotonic() > deadline:
                raise AssertionError(f"the {prober.name} thread is still busy after {timeout} s") from None  # type: ignore[attr-defined]
            time.sleep(0.01)
