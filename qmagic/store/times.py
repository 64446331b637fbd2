"""The times users type for the experiment log's views (``since``/``until``): epoch
seconds, ``datetime`` objects, ISO dates and relative times such as ``-2h``.

This module does not import IPython, ipykernel, ipywidgets or zmq.
"""

from __future__ import annotations

import re
import time
from datetime import datetime, timedelta
from typing import Any

from .records import clean_name

__all__ = ["parse_time"]

_RELATIVE = re.compile(r"-?\s*(\d+(?:\.\d*)?)\s*(s|sec|m|min|h|d|w)", re.IGNORECASE)
_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}
_CLOCK = re.compile(r"([01]?\d|2[0-3]):([0-5]\d)(?::([0-5]\d(?:\.\d*)?))?")
_DAYS = {"today": 0, "yesterday": 1}


def parse_time(value: Any, now: float | None = None) -> float | None:
    """Epoch seconds from None, a number (epoch), a ``datetime`` (naive = local time), an ISO
    string (``2026-11-21``, ``2026-11-21T14:30``), a clock time (``22:00``, ``06:30:15``: the
    latest one that is not in the future, so ``22:00`` typed at 3 a.m. is last night's),
    "today" or "yesterday" (local midnight), or a relative time (``-30m``, ``-2h``, ``-7d``,
    ``-1w``, "now").  Raises ValueError with a hint for anything else."""
    if value is None or isinstance(value, bool):
        return None if value is None else _bad_time(value)
    if isinstance(value, (int, float)):  # (not NaN, infinity or an int beyond any float)
        return float(value) if abs(value) < 1e300 else _bad_time(value)
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, str):
        text = value.strip()
        now = time.time() if now is None else now
        if text.lower() == "now":
            return now
        match = _RELATIVE.fullmatch(text)
        if match:
            return now - float(match.group(1)) * _UNITS[match.group(2).lower()]
        clock, days = _CLOCK.fullmatch(text), _DAYS.get(text.lower())
        if clock or days is not None:
            return _local_time(now, clock, days or 0)
        try:
            return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
        except ValueError:
            pass
    return _bad_time(value)


def _local_time(now: float, clock: re.Match[str] | None, days_ago: int) -> float:
    """Local midnight ``days_ago`` days before ``now``'s day, or the latest ``clock`` time
    (hours, minutes, seconds) that is not after ``now``."""
    midnight = datetime.fromtimestamp(now).replace(hour=0, minute=0, second=0, microsecond=0)
    if clock is None:
        return (midnight - timedelta(days=days_ago)).timestamp()
    hours, minutes, seconds = int(clock.group(1)), int(clock.group(2)), float(clock.group(3) or 0)
    at = midnight + timedelta(hours=hours, minutes=minutes, seconds=seconds)
    if at.timestamp() > now:
        at -= timedelta(days=1)
    return at.timestamp()


def _bad_time(value: Any) -> float:
    raise ValueError(f"Cannot read the time {clean_name(value, 40)!r}: use a date such as 2026-11-21 or "
                     "2026-11-21T14:30, a clock time such as 22:00, today, yesterday, or a time ago "
                     "such as -30m, -2h, -7d.")
