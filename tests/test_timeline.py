"""qmagic.timeline(): the experiment log as a picture (matplotlib, headless)."""

from __future__ import annotations

import time

import pytest

import matplotlib  # noqa: E402 - a test dependency (qmagic[timeline])
matplotlib.use("Agg")

from qmagic._timeline import STATUS_COLOURS, timeline  # noqa: E402


def _rec(name, status, start, end, user="alice", progress=None):
    return {"uid": f"{name}-{start}", "name": name, "user": user, "status": status,
            "submitted_at": start, "started_at": start, "finished_at": end, "progress": progress}


def test_timeline_draws_one_lane_per_function_and_colours_by_status(tmp_path):
    t0 = time.time() - 3600
    records = [
        _rec("scan", "completed", t0, t0 + 600),
        _rec("scan", "cancelled", t0 + 700, t0 + 800, progress={"value": 4, "total": 10, "message": None}),
        _rec("align", "failed", t0 + 100, t0 + 120, user="bob"),
        _rec("count", "running", t0 + 3000, None),
    ]
    fig = timeline(records, title="beamtime")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["align", "count", "scan"]
    colours = {tuple(round(c, 3) for c in bar.get_facecolor()[:3]) for bar in ax.patches}
    expected = {tuple(round(int(STATUS_COLOURS[s][i:i + 2], 16) / 255, 3) for i in (1, 3, 5))
                for s in ("completed", "cancelled", "failed", "running")}
    assert expected <= colours
    assert any(line.get_marker() == "|" for line in ax.lines)  # where the cancelled scan stopped
    assert ax.get_title() == "beamtime"
    fig.savefig(tmp_path / "timeline.png")
    assert (tmp_path / "timeline.png").stat().st_size > 1000


def test_timeline_by_user_and_empty():
    t0 = time.time() - 60
    fig = timeline([_rec("scan", "completed", t0, t0 + 5), _rec("scan", "failed", t0, t0 + 5, user="bob")],
                   lanes="user")
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["alice", "bob"]
    empty = timeline([])
    assert "0 tasks" in empty.axes[0].get_title()
    with pytest.raises(ValueError, match="lanes"):
        timeline([], lanes="colour")


def test_a_bad_record_never_breaks_the_timeline():
    """Impossible times, a progress that is not a dict and rows that are not dicts are left
    out or drawn without the marker; a start time of 0 (1970) is a time, not a missing one."""
    t0 = time.time() - 60
    records = [
        _rec("good", "completed", t0, t0 + 5),
        _rec("huge", "completed", 1e20, None),
        _rec("inf", "failed", float("inf"), t0),
        _rec("text", "failed", "yesterday", t0),
        _rec("end", "cancelled", t0, 1e20, progress={"value": 1, "total": 2}),
        _rec("progress", "cancelled", t0, t0 + 1, progress=[1, 2]),
        "not a record",
        _rec("epoch", "completed", 0, 5),
    ]
    fig = timeline(records)
    names = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert names == ["epoch", "good", "progress"]
    assert fig.axes[0].get_title() == "3 tasks"


def test_one_record_or_a_text_as_records_is_refused_not_drawn_as_nothing():
    """timeline(record) with one record (``qmagic.history(limit=1)[0]``) iterated its keys,
    none a record, and drew an empty "0 tasks" figure without a word; a text likewise."""
    t0 = time.time() - 60
    one = _rec("scan", "completed", t0, t0 + 5)
    for records in (one, "scan", b"scan", 3):
        with pytest.raises(TypeError, match=r"records must be a list of task records, as "
                           r"qmagic.history\(\) returns, not \w+: for one record write timeline\(\[record\]\)"):
            timeline(records)
    assert timeline([one]).axes[0].get_title() == "1 task"
    assert timeline(iter([one, one])).axes[0].get_title() == "2 tasks"


def test_filters_with_records_are_refused_not_ignored():
    """timeline(records, notebook=..., status=...) drew every record given and titled them
    "N tasks from NOTEBOOK" (the filters select from the log; they were silently dropped)."""
    t0 = time.time() - 60
    records = [_rec("scan", "completed", t0, t0 + 5), _rec("scan", "failed", t0, t0 + 5)]
    for filters in ({"notebook": "other.ipynb"}, {"status": "failed"}, {"since": "-1h"},
                    {"since": "-12h"}, {"until": t0, "name": "scan"}):
        with pytest.raises(ValueError, match="qmagic.history") as err:
            timeline(records, **filters)
        assert str(err.value).count("\n") == 0 and all(name in str(err.value) for name in filters)
    assert timeline(records, lanes="user", title="mine").axes[0].get_title() == "mine"


def test_axes_that_are_not_axes_are_refused_in_one_line():
    """timeline(ax=5) ended in "AttributeError: 'int' object has no attribute 'figure'"."""
    t0 = time.time() - 60
    with pytest.raises(TypeError, match=r"^ax must be matplotlib Axes to draw into .* not int\.$"):
        timeline([_rec("scan", "completed", t0, t0 + 5)], ax=5)
