"""A picture of the shift: the experiment log's tasks on a timeline (matplotlib).

``qmagic.timeline(since="-8h", notebook="scan.ipynb")`` draws one lane per function (or per
user), a bar per task from its start to its end coloured by how it ended, a hatched bar for
a task still running (or one whose kernel died), and a marker where its progress stopped
when it did not complete.  It needs matplotlib (``pip install qmagic[timeline]``).
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any, Iterable, Mapping, NamedTuple

from .format import counted, finite
from .history_text import local_time
from .store.records import ORPHAN_REASONS

__all__ = ["timeline", "STATUS_COLOURS"]

#: Bar colour per final status (colour-blind-safe palette; legible on light and dark).
STATUS_COLOURS = {
    "completed": "#2e8b57",
    "failed": "#d1495b",
    "cancelled": "#edae49",
    "running": "#00798c",
    "queued": "#8d99ae",
}


class _Default(str):
    """``timeline()``'s default ``since`` ("-12h"), told apart from a "-12h" given."""


_LAST_12H = _Default("-12h")


class _Bar(NamedTuple):
    rec: Mapping[str, Any]
    start: float  # epoch seconds
    end: float  # epoch seconds (now for a task still running)
    left: datetime
    right: datetime
    unfinished: bool  # still running, or its kernel died


def _bar(rec: Any, now: float) -> _Bar | None:
    """Where a record's bar goes; None for a record whose times cannot be drawn (a bad row
    never breaks the view: it is left out)."""
    if not isinstance(rec, Mapping):
        return None
    start = finite(rec.get("started_at"))
    if start is None:
        start = finite(rec.get("submitted_at"))
    end = finite(rec.get("finished_at"))
    unfinished = end is None or rec.get("error") in ORPHAN_REASONS  # (its kernel died)
    if start is None:
        return None
    end = now if end is None else end
    left, right = local_time(start), local_time(max(end, start + 0.05))
    if left is None or right is None:
        return None
    return _Bar(rec, start, end, left, right, unfinished)


def timeline(
    records: Iterable[Mapping[str, Any]] | None = None,
    *,
    since: Any = _LAST_12H,
    until: Any = None,
    notebook: str | None = None,
    lanes: str = "name",
    title: str | None = None,
    ax: Any = None,
    **filters: Any,
) -> Any:
    """Draw tasks of the experiment log as a timeline; returns the matplotlib Figure.

    ``records``: task records (``qmagic.history()`` form), drawn as given; None reads the
    experiment log with ``since`` (default: the last 12 hours), ``until``, ``notebook`` and the
    other ``qmagic.history`` filters (with ``records`` they are refused: they select from the
    log).  ``lanes``: "name" (one lane per function) or "user".  ``ax``: draw into these axes.
    """
    if lanes not in ("name", "user"):
        raise ValueError(f"lanes must be 'name' or 'user', not {lanes!r}.")
    if ax is not None and not callable(getattr(ax, "barh", None)):
        raise TypeError(f"ax must be matplotlib Axes to draw into (fig, ax = plt.subplots()), "
                        f"not {type(ax).__name__}.")
    if isinstance(records, (Mapping, str, bytes)) or (records is not None and not isinstance(records, Iterable)):
        # (a record alone, ``history(limit=1)[0]``, was read as its keys: "0 tasks", no word why)
        raise TypeError(f"records must be a list of task records, as qmagic.history() returns, not "
                        f"{type(records).__name__}: for one record write timeline([record]).")
    if records is not None:
        given = [name for name, value in (("since", since is not _LAST_12H), ("until", until is not None),
                                          ("notebook", notebook is not None)) if value] + list(filters)
        if given:  # (drawn all the same, they were ignored: a title said "from NOTEBOOK" of any tasks)
            one = len(given) == 1
            raise ValueError(f"timeline() draws the records given as they are; {', '.join(given)} "
                             f"{'selects' if one else 'select'} tasks from the experiment log: pass "
                             f"{'it' if one else 'them'} to qmagic.history(...) and give timeline() its "
                             "records, or leave out records=.")
    try:
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError as exc:
        raise ImportError("qmagic.timeline() needs matplotlib: pip install matplotlib "
                          "(or qmagic[timeline]).") from exc
    if records is None:
        from ._history import history

        records = history(since=since, until=until, notebook=notebook, **filters)
    now = time.time()
    bars = [bar for bar in (_bar(r, now) for r in records) if bar is not None]
    rows = [bar.rec for bar in bars]
    lane_names = sorted({str(r.get(lanes) or "?") for r in rows})
    lane_of = {name: i for i, name in enumerate(lane_names)}
    if ax is None:
        fig, ax = plt.subplots(figsize=(10, 1.2 + 0.45 * max(1, len(lane_names))), layout="constrained")
        # Closed for pyplot: Jupyter shows the returned figure once (not again at the cell's
        # end), and a script's plt.show() does not pick it up.
        plt.close(fig)
    else:
        fig = ax.figure
    for bar in bars:
        rec = bar.rec
        status = str(rec.get("status") or "queued")
        y = lane_of[str(rec.get(lanes) or "?")]
        ax.barh(y, bar.right - bar.left, left=bar.left, height=0.6,
                color=STATUS_COLOURS.get(status, "#8d99ae"), edgecolor="none",
                hatch="//" if bar.unfinished else None, alpha=0.9)
        progress = rec.get("progress")
        if status != "completed" and isinstance(progress, Mapping):
            value, total = finite(progress.get("value")), finite(progress.get("total"))
            if value is not None and total:
                x = local_time(bar.start + (bar.end - bar.start) * max(0.0, min(1.0, value / total)))
                if x is not None:
                    ax.plot([x], [y], marker="|", markersize=14, color="black", alpha=0.7)
    ax.set_yticks(range(len(lane_names)), lane_names)
    ax.invert_yaxis()
    if rows:
        from matplotlib.dates import AutoDateLocator, ConciseDateFormatter

        first = min(bar.left for bar in bars)
        locator = AutoDateLocator()
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))
        ax.set_xlabel(f"local time, {first:%Y-%m-%d}")
    ax.grid(axis="x", alpha=0.3)
    shown = [s for s in STATUS_COLOURS if any(r.get("status") == s for r in rows)]
    handles = [Patch(color=STATUS_COLOURS[s], label=s) for s in shown]
    if any(bar.unfinished for bar in bars):
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="//",
                             label="still running, or\nits kernel died"))
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    ax.set_title(title or counted(len(rows), "task")
                 + (f" from {notebook}" if notebook else ""))
    if not rows:
        ax.text(0.5, 0.5, "No tasks in this period.", transform=ax.transAxes, ha="center")
    return fig
