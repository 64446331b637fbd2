"""Lines of ours in the spool, and our line at the end of damage glued before it
(qmagic.store.lines; folded by qmagic.store.database.rows_from_lines): the rule every
reader applies, on plain bytes."""

from __future__ import annotations

import time
from types import SimpleNamespace

import orjson
import pytest
from store_helpers import task

from qmagic.store import lines as lines_module
from qmagic.store.lines import salvage


@pytest.mark.parametrize("uid", ["abc", "é-1", "測定-7", "🧪"])
def test_our_line_after_foreign_bytes_is_found_whatever_its_uid(uid):
    """salvage compared the uid's bytes with a slice as long as its characters: a task whose
    uid has a non-ASCII character was lost behind another program's bytes."""
    for line in (orjson.dumps([1, uid, task(uid)]), orjson.dumps([2, uid, 1.5])):
        assert salvage(b"junk " + line) == 5
        assert salvage(b'[3,"half-a-line-of-anot' + line) == 23


def _counting_parser(monkeypatch) -> list[int]:
    """Counts the parses salvage tries (each read the whole rest of the line: a copy of it,
    and orjson reads to the end of its input)."""
    attempts: list[int] = []

    def loads(data):
        attempts.append(len(data))
        return orjson.loads(data)
    monkeypatch.setattr(lines_module, "orjson", SimpleNamespace(loads=loads, JSONDecodeError=orjson.JSONDecodeError))
    return attempts


def _seconds(func, *args) -> float:
    """The shortest of three runs of ``func(*args)``, in seconds."""
    best = float("inf")
    for _ in range(3):
        began = time.perf_counter()
        func(*args)
        best = min(best, time.perf_counter() - began)
    return best


#: A line of ours of about a megabyte with 50,000 look-alikes of our lines in its arguments.
OURS_WITH_LOOK_ALIKES = orjson.dumps([1, "t", task("t", args=[[1, "a", {"x": 0.5}]] * 50_000)])
LOOK_ALIKES = {  # about a megabyte each, and 80,000 to 140,000 starts like a line of ours
    "cut short by a full disk": orjson.dumps([1, "t", task("t", args=[[1, "a", 0.5]] * 80_000)])[:-9],
    "cut short, ending in ]": orjson.dumps([1, "t", task("t", args=[[1, "a", 0.5]] * 80_000)])[:-9] + b"]",
    "starts only": b'[1,"a",' * 140_000 + b"]",
    "records": b'[3,"a",{},' * 100_000 + b"]",
}


@pytest.mark.parametrize("line", LOOK_ALIKES.values(), ids=LOOK_ALIKES.keys())
def test_salvage_of_a_long_damaged_line_works_in_proportion_to_it(monkeypatch, line):
    """salvage tried every start of a look-alike of our lines from the right, parsing a copy
    of the rest of the line each time: 0.98 MB with 140,000 of them took 14.5 s (the writer
    thread, lookups under the spool's read lock, the recovery).  A line of ours cut short by
    a full disk with arguments like ``[[1,"a",0.5], ...]`` gets there.  Now at most one
    parse, and about as long as a parse of a line of ours as long."""
    attempts = _counting_parser(monkeypatch)
    assert salvage(line) == -1
    assert len(attempts) <= 1
    monkeypatch.undo()
    assert _seconds(salvage, line) < 20 * _seconds(orjson.loads, OURS_WITH_LOOK_ALIKES)


def test_our_line_holding_look_alikes_is_found_behind_foreign_bytes_with_one_parse(monkeypatch):
    """Our line with 50,000 look-alikes of a line of ours in its arguments, glued to
    another program's bytes: salvage parsed a copy of the rest of the line for each."""
    attempts = _counting_parser(monkeypatch)
    assert salvage(b'[1,"a",{} junk' + OURS_WITH_LOOK_ALIKES) == 14
    assert len(attempts) == 1
