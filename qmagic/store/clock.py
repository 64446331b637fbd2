"""The experiment log's clock for deleting records by age: the time elapsed, when the wall
clock jumped ahead.

A clock set a month ahead for a few seconds deleted the whole log (found by a hostile
test): a record's age is counted from the wall clock, and a wall clock that ran more than
:data:`CLOCK_JUMP_S` ahead of the time elapsed since the writer started is warned about
(once) and no longer trusted for ages.  Elapsed time counts suspend (``CLOCK_BOOTTIME``).

This module does not import IPython, ipykernel, ipywidgets or zmq.
"""

from __future__ import annotations

import time

from .records import warn_once

__all__ = ["CLOCK_JUMP_S", "age_limit", "clock_start"]

CLOCK_JUMP_S = 3600.0
_ELAPSED_CLOCK = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)


def clock_start() -> tuple[float, float]:
    """(wall time, elapsed time) now: what :func:`age_limit` counts from."""
    return time.time(), time.clock_gettime(_ELAPSED_CLOCK)


def age_limit(max_age_s: float, clock_start: tuple[float, float], now: float) -> float:
    """``max_age_s``, lengthened by how far the wall clock ran ahead of the time elapsed since
    ``clock_start`` (wall, elapsed): a clock set ahead deletes nothing early, and deletion by
    age goes on after a real correction, late by at most its size.  A clock set back needs
    nothing: it makes every record younger.  ``now`` is the wall time the deletion's cutoff
    counts from (one reading: a jump between two readings deleted records early)."""
    wall, elapsed = clock_start
    ahead = (now - wall) - (time.clock_gettime(_ELAPSED_CLOCK) - elapsed)
    if ahead > CLOCK_JUMP_S:
        warn_once("clock", f"qmagic: the system clock moved {ahead / 3600:.1f} h ahead while this kernel "
                  "ran; the experiment log counts its records' age by the time elapsed instead "
                  "(a wrong clock would delete the records it holds).")
    return max_age_s + max(0.0, ahead)
