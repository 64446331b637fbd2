"""Tests of qmagic.store.journal: the SQLite experiment log and its spool (issue 13).

Invariants (each a test below): (1) submitted() and (2) finished() return only when the
record survives SIGKILL; (3) after SIGKILL at any moment every handed-out uid is found,
unfinished ones failed with ORPHAN_REASON; (4) an asynchronous exception anywhere inside
the calls corrupts nothing and a repeated call is harmless.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import uuid
import warnings
from datetime import datetime
from pathlib import Path

import orjson
import pytest
from polling import eventually
from store_helpers import fresh_warnings, refuse_new_segments, task  # noqa: F401 - fresh_warnings: a fixture

from qmagic.errors import StateFileError
from qmagic.store import segments as segments_module
from qmagic.store.database import connect, database_path, ensure_schema
from qmagic.store.history import history_main
from qmagic.store.journal import (
    ORPHAN_QUEUED_REASON,
    ORPHAN_REASON,
    SUMMARY_KEY,
    Journal,
)
from qmagic.store.legacy import import_legacy
from qmagic.store.reader import Filters
from qmagic.store.records import JournalWarning, RecordEncoder

REPO = Path(__file__).resolve().parents[1]
ENV = "lab-1"
LOG = "qmagic.store.journal"


def run_task(journal: Journal, uid: str, status: str = "completed", **fields) -> None:
    journal.submitted(task(uid, **{k: v for k, v in fields.items() if k in ("name", "user", "submitted_at")}))
    journal.started(uid, time.time())
    journal.finished(task(uid, status, **fields))


@pytest.fixture
def short_close(monkeypatch):
    """A log that cannot store everything waits this long when it closes (5 s otherwise)."""
    from qmagic.store import writer as writer_module

    monkeypatch.setattr(writer_module, "CLOSE_TIMEOUT_S", 0.3)


@pytest.fixture
def short_busy(monkeypatch):
    """A log's writer waits 0.3 s for another process's lock before it is a fault (2 s in
    use): for tests of what a fault does, not of how long a lock is waited for."""
    from qmagic.store import database

    monkeypatch.setattr(database, "_WRITER_BUSY_MS", 300)


@pytest.fixture
def retention_at_once(monkeypatch):
    """Retention passes one after another from the log's open on (the first 1 s after it,
    then every 10 s, in use): for tests of what a pass deletes, not of when it comes."""
    from qmagic.store import writer as writer_module

    monkeypatch.setattr(writer_module, "RETENTION_FIRST_S", 0.0)
    monkeypatch.setattr(writer_module, "RETENTION_EVERY_S", 0.0)


@pytest.fixture
def journal(tmp_path):
    with Journal(tmp_path, ENV) as j:
        yield j


@pytest.fixture
def journal_looking_often(tmp_path, monkeypatch):
    """A log that looks for dead kernels every 0.2 s (3 s in use; the test of that period
    uses ``journal``): for tests that wait for the look, not about how often it comes."""
    from qmagic.store import writer as writer_module

    monkeypatch.setattr(writer_module, "RECOVERY_EVERY_S", 0.2)
    with Journal(tmp_path, ENV) as j:
        yield j


def child(state_dir: Path, body: str, env: dict | None = None) -> subprocess.Popen:
    """A Python process running ``body`` with ``j`` = Journal(state_dir, ENV)."""
    code = (f"import sys, time, os, uuid\nsys.path.insert(0, {str(REPO)!r})\n"
            f"from qmagic.store.journal import Journal\nj = Journal(sys.argv[1], {ENV!r})\n"
            + textwrap.dedent(body))
    return subprocess.Popen([sys.executable, "-c", code, str(state_dir)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=dict(os.environ, **(env or {})))


def expect(proc: subprocess.Popen, expected: str) -> None:
    line = proc.stdout.readline().strip()  # pytest-timeout guards a hung child
    assert line == expected, f"child said {line!r} (exit code {proc.poll()})"


def db_rows(tmp_path: Path, sql: str, params=()) -> list:
    conn = sqlite3.connect(database_path(tmp_path, ENV))
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


# ---- round trip, visibility, filters ----------------------------------------------------------------
@pytest.fixture
def spool_reads(monkeypatch):
    """A writer that stores on flush() only, spool segments of 64 kB (several), and
    ``count()``/``stop()``: from then on (until then) the bytes ``os.pread`` reads add up in
    ``read[0]``."""
    from types import SimpleNamespace

    from qmagic.store import segments as segments_module
    from qmagic.store import writer as writer_module

    monkeypatch.setattr(writer_module, "QUIET_S", 600.0)
    monkeypatch.setattr(writer_module, "MAX_DELAY_S", 600.0)
    monkeypatch.setattr(segments_module, "SEGMENT_BYTES", 64 << 10)
    read, pread = [0], os.pread

    def counting_pread(fd, n, offset):
        data = pread(fd, n, offset)
        read[0] += len(data)
        return data

    return SimpleNamespace(read=read, count=lambda: monkeypatch.setattr(os, "pread", counting_pread),
                           stop=lambda: monkeypatch.setattr(os, "pread", pread))


def test_lookups_of_waiting_records_read_only_their_lines(tmp_path, spool_reads):
    """A lookup merged what waits for the database by reading every waiting spool line:
    0.2-0.6 s per lookup (get, find, a status) with 100,000 tasks waiting in a database
    fault.  The spool now indexes its lines by uid as lookups ask (only what was appended
    since), and a lookup reads only its uids' lines."""
    read = spool_reads.read
    with Journal(tmp_path, ENV) as j:
        for i in range(300):
            run_task(j, f"task-{i:04d}", status="failed" if i % 7 == 0 else "completed")
        j.submitted(task("queued-one"))
        assert len(j._spool.segments) >= 3
        assert j.get("task-0100")["status"] == "completed"  # (the index is made)
        spool_reads.count()
        assert j.get("task-0007")["status"] == "failed" and j.get("queued-one")["status"] == "queued"
        assert j.statuses(["task-0003", "task-0014", "nowhere"]) == {
            "task-0003": "completed", "task-0014": "failed", "nowhere": None}
        assert j.find("task-0299")["uid"] == "task-0299" and j.find("task-029") is None
        assert read[0] < 40_000, f"{read[0]} bytes read for a few lookups"
        j.started("queued-one", time.time())
        assert j.get("queued-one")["status"] == "running"  # (what was appended since: indexed)
        spool_reads.stop()
        assert j.flush()
        assert j.get("task-0007")["status"] == "failed" and j.get("queued-one")["status"] == "running"
        assert j.statuses(["task-0003"]) == {"task-0003": "completed"}


def test_health_counts_waiting_records_without_reading_them_again(tmp_path, spool_reads):
    """``health()["pending"]`` read every waiting spool line at each call (0.28 s with
    100,000 tasks waiting in a long database fault, for every ``%tasks`` footer).  It now
    counts only what was appended since it last looked, and the count stays exact across
    segments, partial stores and new appends."""
    read = spool_reads.read
    with Journal(tmp_path, ENV) as j:
        for i in range(300):
            run_task(j, f"t-{i}")
        assert len(j._spool.segments) >= 3
        assert j.health()["pending"] == 900  # (three lines per task)
        spool_reads.count()
        assert j.health()["pending"] == 900
        assert read[0] < 1000, f"{read[0]} bytes read again"
        run_task(j, "one-more")
        assert j.health()["pending"] == 903
        assert read[0] < 3000, f"{read[0]} bytes read for three new lines"
        spool_reads.stop()
        assert j.flush() and j.health()["pending"] == 0
        for i in range(5):
            run_task(j, f"u-{i}")
        assert j.health()["pending"] == 15
        assert j.flush() and j.health()["pending"] == 0


def test_round_trip_pending_then_stored_then_seen_by_another_process(journal, tmp_path, monkeypatch):
    from qmagic.store import writer as writer_module

    monkeypatch.setattr(writer_module, "QUIET_S", 600.0)  # the writer commits on flush() only
    monkeypatch.setattr(writer_module, "MAX_DELAY_S", 600.0)
    uid = str(uuid.uuid4())
    journal.submitted(task(uid))
    rec = journal.get(uid)  # visible at once in this process, before any commit
    assert rec["status"] == "queued" and rec["journal"]["pending"] is True
    assert rec["journal"]["session"] == journal.session and rec["journal"]["pid"] == os.getpid()
    journal.started(uid, 123.0)
    assert journal.get(uid)["status"] == "running" and journal.get(uid)["started_at"] == 123.0
    journal.finished(task(uid, "completed", result={"counts": [1, 2, 3]},
                          progress={"value": 3, "total": 3, "message": "done"}))
    assert journal.get(uid)["result"] == {"counts": [1, 2, 3]}
    assert journal.flush()
    rec = journal.get(uid)
    assert rec["status"] == "completed" and rec["journal"]["pending"] is False
    assert rec["journal"]["host"] == socket.gethostname() and rec["progress"]["message"] == "done"
    assert rec["provenance"]["execution_count"] == 12
    assert db_rows(tmp_path, "SELECT status, name, notebook_name FROM tasks") == [
        ("completed", "measure", "01-getting-started.ipynb")]
    assert db_rows(tmp_path, "PRAGMA journal_mode") == [("wal",)]
    assert db_rows(tmp_path, "PRAGMA user_version") == [(1,)]
    code = f"print(j.get({uid!r})['result'], flush=True)\nj.close()\n"
    proc = child(tmp_path, code)
    assert proc.communicate(timeout=60)[0].strip() == "{'counts': [1, 2, 3]}"


def test_session_info_host_pid_are_stored_once_per_session(tmp_path):
    with Journal(tmp_path, ENV, session_info={"qmagic": "0.2.0", "python": "3.11.7"}) as j:
        run_task(j, "a")
        run_task(j, "b")
        assert j.flush()
        assert j.get("a")["journal"]["info"] == {"qmagic": "0.2.0", "python": "3.11.7"}
        session = j.session
    rows = db_rows(tmp_path, "SELECT session, host, pid, state FROM sessions")
    assert rows == [(session, socket.gethostname(), os.getpid(), "closed")]


def test_filters(journal):
    t0 = time.time() - 3600
    for i, (status, user, name, nb) in enumerate([("completed", "alice", "scan_x", "/a/one.ipynb"),
                                                  ("failed", "bob", "scan_y", "/b/two.ipynb"),
                                                  ("cancelled", "alice", "move", "/a/two.ipynb"),
                                                  ("completed", "bob", "move", None)]):
        prov = {"notebook": nb, "cell_id": None, "execution_count": i, "cell_hash": None}
        journal.finished(task(f"uid-{i}", status, user=user, name=name, provenance=prov,
                              submitted_at=t0 + 600 * i, started_at=t0 + 600 * i,
                              finished_at=t0 + 600 * i + 60))
    journal.submitted(task("uid-run", "running", submitted_at=t0 - 1, started_at=t0 - 1))

    def uids(**filters):
        return [r["uid"] for r in journal.records(**filters)]

    for stored in (False, True):  # the same answers pending and from SQLite
        if stored:
            assert journal.flush()
        assert uids() == ["uid-3", "uid-2", "uid-1", "uid-0", "uid-run"]  # newest first
        assert uids(status="completed") == ["uid-3", "uid-0"]
        assert uids(status=["failed", "cancelled"]) == ["uid-2", "uid-1"]
        assert uids(user="bob") == ["uid-3", "uid-1"]
        assert uids(name="scan_*") == ["uid-1", "uid-0"]
        assert uids(name="scan_?") == ["uid-1", "uid-0"]
        assert uids(name="scan_[!x]") == []  # (brackets are literal: tests/test_store_history.py)
        assert uids(name="move", user="alice") == ["uid-2"]
        assert uids(notebook="two.ipynb") == ["uid-2", "uid-1"]
        assert uids(notebook="/a/two.ipynb") == ["uid-2"]
        assert uids(notebook="/a/*") == ["uid-2", "uid-0"]
        assert uids(notebook="01-getting-started.ipynb") == ["uid-run"]
        assert uids(limit=2) == ["uid-3", "uid-2"]
        assert uids(uid="uid-r") == ["uid-run"]
        # a task matches a time window when it was active at some time inside it
        assert uids(since=t0 + 1250) == ["uid-3", "uid-2", "uid-run"]  # uid-run is still running
        assert uids(until=t0 + 10) == ["uid-0", "uid-run"]
        assert uids(since=t0 + 1150, until=t0 + 1250) == ["uid-2", "uid-run"]
        assert uids(since=datetime.fromtimestamp(t0 + 1250), status="completed") == ["uid-3"]
        assert uids(since="-10m") == ["uid-run"]
        # a `since` in the future: no task was active then, not even one still running (the
        # database kept uid-run, the records still pending dropped it: one rule now)
        assert uids(since=time.time() + 3600) == []
    with pytest.raises(ValueError, match="Unknown task status bogus"):
        journal.records(status="bogus")
    with pytest.raises(ValueError, match="-30m, -2h, -7d"):
        journal.records(since="last week")


def test_records_are_idempotent_and_merge_by_rank(journal, tmp_path):
    uid = "rank-test"
    journal.finished(task(uid, "completed", result=1))  # the end can be spooled before the start
    journal.submitted(task(uid, "queued"))
    journal.started(uid, time.time())
    assert journal.get(uid)["status"] == "completed"
    assert journal.flush()
    journal.submitted(task(uid, "queued"))  # again, after it is stored
    journal.finished(task(uid, "completed", result=1))
    journal.finished(task(uid, "completed", result=1))
    assert journal.flush()
    assert journal.get(uid)["status"] == "completed" and journal.get(uid)["result"] == 1
    assert db_rows(tmp_path, "SELECT count(*) FROM tasks") == [(1,)]


def test_programming_errors_raise_value_error(journal):
    for bad in ({"name": "f"}, {"uid": 3, "status": "queued"}, {"uid": "", "status": "queued"},
                {"uid": 'a"b', "status": "queued"}, {"uid": "x" * 200, "status": "queued"},
                {"uid": "a", "status": "bogus"}, "not a dict"):
        with pytest.raises(ValueError):
            journal.submitted(bad)
    with pytest.raises(ValueError, match="completed, failed, cancelled"):
        journal.finished(task("a", "running"))
    with pytest.raises(ValueError, match="uid must be a string"):
        journal.started(None, 1.0)
    with pytest.raises(ValueError, match="positive"):
        Journal(journal.state_dir, ENV, max_bytes=0)
    with pytest.raises(ValueError, match="Invalid environment name"):
        Journal(journal.state_dir, "../x")
    assert journal.health()["ok"] and journal.records() == []


# ---- summaries ---------------------------------------------------------------------------------------
class Opaque:
    def __repr__(self) -> str:
        return "Opaque(" + "x" * 5000 + ")"


class BrokenRepr:
    def __repr__(self) -> str:
        raise RuntimeError("no repr")


def test_values_that_are_not_json_are_summarised_with_a_marker(journal):
    np = pytest.importorskip("numpy")
    big = list(range(50_000))
    circular: list = [1]
    circular.append(circular)
    journal.finished(task(
        "s", "completed", name="scan\ud800\nx",
        args=[1, "ok", Opaque(), np.arange(100_000.0), circular, "bad\udcff"],
        kwargs={"when": datetime(2026, 1, 2), "nan": float("nan"), (1, 2): "tuple key",
                "broken": BrokenRepr(), "many": [object()] * 1000, "pair": (1, 2), "huge": 2**70},
        result=big, progress={"value": float("inf"), "total": 3, "message": None},
        traceback="Traceback (most recent call last):\n" + "  frame\n" * 10_000
        + "ZeroDivisionError: division by zero"))
    assert journal.flush()
    rec = journal.get("s")
    assert rec["name"] == "scan\\ud800\\nx"  # validated before it was stored
    args, kwargs = rec["args"], rec["kwargs"]
    assert args[:2] == [1, "ok"]
    assert args[2][SUMMARY_KEY] == "repr" and args[2]["type"].endswith("Opaque")
    assert args[2]["truncated"] is True and args[2]["length"] == 5008 and len(args[2]["repr"]) == 2000
    assert args[3]["type"] == "numpy.ndarray" and args[3]["shape"] == [100_000]
    assert args[3]["dtype"] == "float64" and args[3]["repr"].startswith("array([")
    assert args[4] == [1, {SUMMARY_KEY: "repr", "type": "list", "repr": "[1, [...]]",
                           "truncated": False, "length": 10, "items": 2}]
    assert args[5] == "bad\\udcff"
    assert kwargs["when"][SUMMARY_KEY] == "repr" and kwargs["when"]["type"] == "datetime.datetime"
    assert kwargs["nan"]["repr"] == "nan" and kwargs["huge"]["repr"] == str(2**70)
    assert kwargs["(1, 2)"] == "tuple key" and kwargs["pair"] == [1, 2]
    assert "repr() failed" in kwargs["broken"]["repr"] and "no repr" in kwargs["broken"]["repr"]
    assert kwargs["many"]["items"] == 1000 and kwargs["many"]["truncated"] is True
    assert rec["progress"]["value"]["repr"] == "inf" and rec["progress"]["total"] == 3
    result = rec["result"]
    assert result[SUMMARY_KEY] == "json" and result["type"] == "list"
    assert result["length"] == len(orjson.dumps(big)) and result["repr"].startswith("[0,1,2,3")
    tb = rec["traceback"]
    assert tb.startswith("Traceback (most recent call last):")
    assert tb.endswith("ZeroDivisionError: division by zero") and "characters omitted" in tb


def test_summaries_keep_a_values_own_start_and_stop_at_what_they_keep():
    """Reviewer's findings: a large dict or set was sorted whole by reprlib for its summary
    (a million keys: 0.8 s, the start kept was not the value's own); the start of a long
    container was encoded item by item up to 2,000 items whatever their size (2,000 texts of
    60K characters: 120 MB for a summary of 2,000 characters); a small OrderedDict was read
    through the repr's deadline thread (``items`` of its own), and stored as "not tried"
    while that thread was busy."""
    import collections
    import tracemalloc

    encoder = RecordEncoder()
    channels = {f"ch{i}": float("nan") for i in reversed(range(300))}
    summary = encoder.value(channels)
    assert summary[SUMMARY_KEY] == "repr" and summary["repr"].startswith("{'ch299': nan, 'ch298': nan")
    assert encoder.value({299, 3, 150} | set(range(1000, 1200)))["repr"].startswith("{")
    text = "x" * 60_000
    tracemalloc.start()
    try:
        summary = encoder.value([text] * 60_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert summary[SUMMARY_KEY] == "json" and summary["items"] == 60_000 and summary["repr"].startswith('["xxx')
    assert peak < 5_000_000, peak

    def stuck(fn):
        raise TimeoutError("the repr's thread is busy")
    busy = RecordEncoder(run_value_code=stuck)
    ordered = collections.OrderedDict(b=1, a=2.5)
    ordered.move_to_end("b")
    assert busy.value(ordered) == {"a": 2.5, "b": 1}  # (its own order: OrderedDict's)
    assert list(busy.value(ordered)) == ["a", "b"]


def test_a_container_of_millions_of_items_is_summarised_from_its_start_alone():
    """A list of millions of numbers (an argument, a result) was encoded whole, into JSON of
    megabytes, for a summary of its start: 0.16 s a million on the task path, twice.  Its
    summary now encodes its first items only (measured by what the encoding allocates)."""
    import tracemalloc

    encoder = RecordEncoder()
    positions, channels = list(range(3_000_000)), {f"ch{i}": i for i in range(200_000)}
    record = task("m", "completed", args=[positions], kwargs={"channels": channels}, result=positions)
    tracemalloc.start()
    try:
        line = encoder.encode(record, final=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000, peak  # (the whole list's JSON alone: 21 MB)
    rec = orjson.loads(line)[2]
    for value, items in ((rec["args"][0], 3_000_000), (rec["result"], 3_000_000),
                         (rec["kwargs"]["channels"], 200_000)):
        assert value[SUMMARY_KEY] == "json" and value["items"] == items, value
        assert value["truncated"] is True and value["length"] is None
    assert rec["args"][0]["repr"].startswith("[0,1,2,3,") and len(rec["args"][0]["repr"]) == 2000
    assert rec["kwargs"]["channels"]["repr"].startswith('{"ch0":0,"ch1":1,')
    odd = encoder.encode(task("n", "completed", result=[float("nan")] * 60_000), final=True)
    assert orjson.loads(odd)[2]["result"][SUMMARY_KEY] == "repr"  # (not JSON: its repr, as before)



def test_a_long_text_bytes_or_array_is_summarised_from_its_start_alone():
    """A text of 100M characters was encoded whole for the start its summary keeps (2.5 s
    and 2 GB on the task path: on the fast path, then again); bytes, a bytearray, an array,
    a deque, a dict's keys had their whole repr made (an array of 5M numbers: 14 s, on the
    task path or the repr's deadline thread) to keep its start.  Each is now summarised from
    its start alone (measured by what the encoding allocates)."""
    import array
    import collections
    import tracemalloc

    text = "x" * 20_000_000
    values = [["é" * 5_000_000], b"\x01" * 5_000_000, bytearray(5_000_000), array.array("d", range(1_000_000)),
              collections.deque(range(1_000_000)), dict.fromkeys(range(1_000_000)).keys(), b"\x02" * 10]
    record = task("t", "completed", args=values, result=text)
    encoder = RecordEncoder()
    tracemalloc.start()
    try:
        line = encoder.encode(record, final=True)
        small = encoder.summary(text, "repr")  # (a record still too long: its values' reprs)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000, peak
    rec = orjson.loads(line)[2]
    result, args = rec["result"], rec["args"]
    assert result[SUMMARY_KEY] == "json" and result["type"] == "str" and result["truncated"] is True
    assert result["repr"] == '"' + "x" * 1999 and args[0][0]["repr"].startswith('"ééé')
    assert small["repr"].startswith("'xxxx") and "..." in small["repr"] and small["truncated"] is True
    for value, start in zip(args[1:6], ("b'\\x01\\x01", "bytearray(b'\\x00", "array('d', [0.0, 1.0,", "deque([0, 1,", "[0, 1, 2,")):
        assert value[SUMMARY_KEY] == "repr" and value["repr"].startswith(start), value
        assert value["truncated"] is True and value["length"] is None
    assert args[6] == {SUMMARY_KEY: "repr", "type": "bytes", "repr": "b'" + "\\x02" * 10 + "'",
                       "truncated": False, "length": 43}


def test_nan_and_infinity_are_never_changed_silently(journal):
    journal.finished(task("o", "completed", result=float("inf"), args=[1.5, float("nan")],
                          kwargs={"x": [0.5, float("-inf")]}))
    rec = journal.get("o")
    assert rec["result"][SUMMARY_KEY] == "repr" and rec["result"]["repr"] == "inf"
    assert rec["args"][0] == 1.5 and rec["args"][1]["repr"] == "nan"
    assert rec["kwargs"]["x"][1]["repr"] == "-inf"
    # in containers too large to check item by item (over 100 items): one NaN among 150
    # readings was stored as null, silently
    readings = [1.5] * 150 + [float("nan")]
    journal.finished(task("q", "completed", result=readings, args=[[[0.5, float("inf")]] * 120],
                          kwargs={f"ch{i}": float("-inf") for i in range(150)}))
    rec = journal.get("q")
    assert rec["result"][SUMMARY_KEY] == "repr" and rec["result"]["repr"].startswith("[1.5, 1.5")
    assert rec["result"]["items"] == 151 and rec["result"]["truncated"] is True
    assert rec["args"][0][SUMMARY_KEY] == "repr" and "inf" in rec["args"][0]["repr"]
    assert rec["kwargs"][SUMMARY_KEY] == "repr" and "-inf" in rec["kwargs"]["repr"]
    readings_type = type("Readings", (list,), {})  # (orjson writes a list subclass as a list)
    journal.finished(task("q2", "completed", result=readings_type([0.5] * 150 + [float("inf")])))
    assert journal.get("q2")["result"][SUMMARY_KEY] == "repr"
    journal.finished(task("r", "completed", result=[1.5, None] * 100))  # (null for None: kept)
    assert journal.get("r")["result"] == [1.5, None] * 100




def test_subclasses_of_json_types_are_kept_as_json_writes_them(journal):
    """An OrderedDict, a defaultdict, a Counter or a list subclass holding a NaN, in a
    container of more than 100 items, was stored with null for the NaN, silently (orjson
    writes null for them in subclasses too; the NaN check looked into exact lists and dicts
    only); a str Enum was stored as its str(), "Mode.FAST" (JSON writes "fast"), an int or
    float subclass as its own __int__/__float__ (hostile test).  Each is now read as the
    built-in type holds it, as JSON writes it."""
    import collections
    import enum

    class Mode(str, enum.Enum):
        FAST = "fast"

    class Label(str):
        def __str__(self) -> str:
            return "not the label"

    class Count(int):
        def __int__(self) -> int:
            return 99

    class Reading(float):
        def __float__(self) -> float:
            return 2.0

    class Points(list):
        pass

    nan = float("nan")
    journal.finished(task("sub", "completed", result=collections.OrderedDict((f"ch{i}", 0.5) for i in range(150)),
                          args=[[collections.defaultdict(float, x=nan)] * 120, Points([1.0] * 130 + [nan])],
                          kwargs={"counts": [collections.Counter(a=1, b=float("inf"))] * 101, "mode": Mode.FAST,
                                  "label": Label("x"), "n": Count(5), "r": Reading(1.5), "p": Points([1, 2])}))
    rec = journal.get("sub")
    assert rec["result"] == {f"ch{i}": 0.5 for i in range(150)}
    assert rec["args"][0][SUMMARY_KEY] == "repr" and "nan" in rec["args"][0]["repr"]
    assert rec["args"][1][SUMMARY_KEY] == "repr" and rec["args"][1]["items"] == 131
    kwargs = rec["kwargs"]
    assert kwargs["counts"][SUMMARY_KEY] == "repr" and "inf" in kwargs["counts"]["repr"]
    assert kwargs["mode"] == "fast" and kwargs["label"] == "x" and kwargs["n"] == 5 and kwargs["r"] == 1.5
    assert kwargs["p"] == [1, 2]


def test_keys_that_read_the_same_as_text_lose_no_value(journal):
    """A dict whose keys read the same once made text (1 and "1", None and "None", a lone
    surrogate and its escape) kept one value and dropped the others without a marker (hostile
    test): it is kept as its repr, marked."""
    channels = {1: "first", "1": "second", "2": "third"}
    journal.finished(task("k", "completed", result=channels, args=[{None: 0, "None": 1}],
                          kwargs={"a": 1, "\ud800": 2, "\\ud800": 3}))
    assert journal.flush()
    rec = journal.get("k")
    assert rec["result"][SUMMARY_KEY] == "repr" and rec["result"]["repr"] == repr(channels)
    assert rec["args"][0][SUMMARY_KEY] == "repr" and rec["args"][0]["repr"] == "{None: 0, 'None': 1}"
    assert rec["kwargs"][SUMMARY_KEY] == "repr" and rec["kwargs"]["items"] == 3
    journal.finished(task("p", "completed", result={1: "a", "2": "b"}))  # (no two alike: kept)
    assert journal.get("p")["result"] == {"1": "a", "2": "b"}


def test_summary_chars_is_configurable(tmp_path):
    with Journal(tmp_path, ENV, summary_chars=10) as j:
        j.finished(task("c", "completed", args=[Opaque()]))
        assert j.get("c")["args"][0]["repr"] == "Opaque(xxx"


# ---- invariants 1-3: SIGKILL at any moment -----------------------------------------------------------
KILL_LOAD = """
import threading
from qmagic.store import spool, writer
spool.SEGMENT_BYTES = 64 * 1024  # rotate often
writer.QUIET_S, writer.MAX_DELAY_S = 0.001, 0.02  # commit often
j.close()
j = Journal(sys.argv[1], j.environment_name)
out_lock = threading.Lock()
def say(text):
    with out_lock:
        sys.stdout.write(text)
        sys.stdout.flush()
def rec(uid, status):
    now = time.time()
    return {"uid": uid, "name": "scan", "status": status, "args": [1, 2.5], "kwargs": {},
            "user": "alice", "submitted_at": now, "started_at": now if status != "queued" else None,
            "finished_at": now if status == "completed" else None, "result": [1, 2, 3]}
def load():
    while True:
        uid = str(uuid.uuid4())
        j.submitted(rec(uid, "queued"))
        say("S " + uid + "\\n")  # handed out only now
        j.started(uid, time.time())
        j.finished(rec(uid, "completed"))
        say("F " + uid + "\\n")  # waiters wake only now
say("go\\n")
for _ in range(3):
    threading.Thread(target=load, daemon=True).start()
time.sleep(600)
"""


def test_sigkill_at_any_moment_loses_no_uid(tmp_path):
    """Invariants 1-3: three kernels killed at random moments under load; every uid they
    handed out is found, those whose end was reported are completed, the others failed."""
    handed, ended = set(), set()
    rng = random.Random(13)
    for _ in range(3):
        proc = child(tmp_path, KILL_LOAD)
        try:
            expect(proc, "go")
            lines: list[str] = []
            reader = threading.Thread(target=lambda p=proc, out=lines: out.extend(p.stdout), daemon=True)
            reader.start()
            time.sleep(rng.uniform(0.3, 1.5))  # (the kill moment is random on purpose)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        reader.join(30)
        for line in lines:
            kind, _, uid = line.strip().partition(" ")
            if len(uid) == 36:  # (a line cut short by the kill is not a hand-out)
                (handed if kind == "S" else ended).add(uid)
    assert len(handed) > 300 and ended <= handed
    with Journal(tmp_path, ENV) as j:  # this open recovers the three dead sessions
        status = j.statuses(sorted(handed))
        assert [u for u, s in status.items() if s is None] == []  # no uid lost
        wrong = sorted(u for u in ended if status[u] != "completed")
        assert not wrong, [(u, db_rows(tmp_path, "SELECT rank, status, session, orphaned FROM tasks "
                                                 "WHERE uid = ?", (u,))) for u in wrong[:5]]
        orphans = [u for u, s in status.items() if s != "completed"]
        assert set(status.values()) <= {"completed", "failed"}
        for uid in orphans:
            rec = j.get(uid)
            assert rec["journal"]["orphaned"] is True
            assert rec["error"] == (ORPHAN_REASON if rec["started_at"] is not None else ORPHAN_QUEUED_REASON)
        assert j.health()["ok"]
    assert not list(tmp_path.glob("*.spool")) and len(list(tmp_path.glob("*.lock"))) == 0
    states = db_rows(tmp_path, "SELECT state, count(*) FROM sessions GROUP BY state")
    assert dict(states)["dead"] == 3
    # orphans are failed in the database itself (permanent), not only when read
    assert db_rows(tmp_path, "SELECT count(*) FROM tasks WHERE rank < 3") == [(0,)]


def test_a_kernel_that_died_shows_in_the_kernels_still_running_within_seconds(tmp_path, journal):
    """Another kernel of the environment, open all along, finds the dead kernel's tasks (its
    spooled records, the one that was running as failed) at its next look for dead
    kernels: every few seconds (a once-a-minute look left "not found" for up to 60 s)."""
    proc = child(tmp_path, """
        now = time.time()
        for uid, status in (("done-1", "completed"), ("running-1", "running")):
            j.submitted({"uid": uid, "name": "scan", "status": "queued", "submitted_at": now})
            j.started(uid, now)
        j.finished({"uid": "done-1", "name": "scan", "status": "completed", "submitted_at": now,
                    "started_at": now, "finished_at": now, "result": 1})
        print("logged", flush=True)
        time.sleep(600)
    """)
    try:
        expect(proc, "logged")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    wait_for(lambda: journal.statuses(["done-1", "running-1"]) == {"done-1": "completed",
                                                                  "running-1": "failed"},
             journal, timeout=20)
    assert journal.get("running-1")["error"] == ORPHAN_REASON
    # (a lookup finds them in the dead kernel's spool at once: the look for dead kernels
    # stores them in the database within seconds too)
    wait_for(lambda: db_rows(tmp_path, "SELECT count(*) FROM tasks WHERE uid IN ('done-1', 'running-1')")
             == [(2,)], journal, timeout=20)


def test_two_kernels_opening_a_new_log_at_once_make_no_fault(tmp_path, monkeypatch, fresh_warnings):
    """SQLite refuses the switch to WAL at once, busy timeout or not, while another connection
    writes to a log not yet in WAL, as a second kernel opening the same new log at that moment
    does (its first transaction): 6 of 200 pairs of kernels opened together put a log in a
    fault, its warning ("could not write the experiment log ... database is locked") shown
    though nothing was wrong.  The switch is retried as a lock is: here the other connection
    ends its transaction once the switch has been refused."""
    from qmagic.store import database as database_module

    path = database_path(tmp_path, ENV)
    conn = connect(path, create=True)
    ensure_schema(conn)
    conn.execute("PRAGMA journal_mode = DELETE")  # (a new log, not yet in WAL)
    conn.close()
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # (the other kernel's first transaction)
    refused = threading.Event()

    class Clock:  # the module's time, telling when the switch was refused and waits to retry
        monotonic, time = staticmethod(time.monotonic), staticmethod(time.time)

        @staticmethod
        def sleep(seconds: float) -> None:
            refused.set()
            time.sleep(seconds)

    monkeypatch.setattr(database_module, "time", Clock)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", JournalWarning)
        with Journal(tmp_path, ENV) as journal:
            try:
                assert refused.wait(10), "the switch to WAL was never retried"
            finally:
                other.execute("COMMIT")
                other.close()
            run_task(journal, "first")
            assert journal.flush() and journal.health()["ok"], journal.health()
            assert journal.statuses(["first"]) == {"first": "completed"}
        assert not [w for w in caught if issubclass(w.category, JournalWarning)]
    check = sqlite3.connect(path)
    try:
        assert check.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        check.close()


def test_a_dead_kernels_tasks_are_found_while_another_process_holds_the_database(tmp_path, journal_looking_often):
    """While another process held the database's write lock, no process could store what a
    killed kernel left in its spool: its tasks read "not found" in the other kernels (the
    README promises every uid is found after a SIGKILL).  A lookup that misses the database
    now reads the spools other sessions left: the task as recovery will store it (pending)."""
    journal = journal_looking_often
    run_task(journal, "before")
    assert journal.flush()
    holder = sqlite3.connect(database_path(tmp_path, ENV), isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # (another process's long transaction)
    try:
        proc = child(tmp_path, """
            now = time.time()
            for uid in ("done-1", "running-1", "queued-1"):
                j.submitted({"uid": uid, "name": "scan", "status": "queued", "submitted_at": now})
            for uid in ("done-1", "running-1"):
                j.started(uid, now)
            j.finished({"uid": "done-1", "name": "scan", "status": "completed", "submitted_at": now,
                        "started_at": now, "finished_at": now, "result": 1})
            print("logged", flush=True)
            time.sleep(600)
        """)
        try:
            expect(proc, "logged")
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        spools = {p.name for p in tmp_path.glob("*.spool")}
        assert len(spools) == 2 and journal.statuses(["before"]) == {"before": "completed"}
        uids = ["done-1", "running-1", "queued-1", "unknown-1"]
        assert journal.statuses(uids) == {"done-1": "completed", "running-1": "failed",
                                          "queued-1": "failed", "unknown-1": None}
        done, running, queued = (journal.get(u) for u in uids[:3])
        assert (done["status"], done["result"], done["journal"]["pending"]) == ("completed", 1, True)
        assert (running["error"], running["journal"]["orphaned"]) == (ORPHAN_REASON, True)
        assert queued["error"] == ORPHAN_QUEUED_REASON and journal.get("unknown-1") is None
        assert journal.find("runn")["uid"] == "running-1"  # (a uid prefix too)
        assert running["journal"]["pid"] == proc.pid
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    wait_for(lambda: db_rows(tmp_path, "SELECT count(*) FROM tasks") == [(4,)], journal)  # recovery
    assert journal.statuses(uids) == {"done-1": "completed", "running-1": "failed",
                                      "queued-1": "failed", "unknown-1": None}
    stored = journal.get("running-1")
    assert stored["error"] == ORPHAN_REASON and stored["journal"]["pending"] is False
    assert stored["finished_at"] == running["finished_at"]


def test_a_large_lookup_reads_only_the_spools_of_kernels_that_are_gone(tmp_path, journal, monkeypatch):
    """A miss of many uids (a remote task_status of 20,000) read every running kernel's spool
    too: 0.1 s per 4 MB of spools.  A running kernel stores its own within seconds, so such a
    lookup reads only the spools of kernels that are gone, unless this log is in a fault; a
    few uids still read them all (a task just submitted in another notebook is found)."""
    from qmagic.store import waiting

    read: list[str] = []
    real = waiting._lines
    monkeypatch.setattr(waiting, "_lines", lambda entry, *a: (read.append(entry.session), real(entry, *a))[1])
    with Journal(tmp_path, ENV) as other:  # (running: it holds its session's lock)
        run_task(other, "theirs")
        many = [f"unknown-{i}" for i in range(waiting.SEARCHED + 1)]
        assert journal.statuses(many) == dict.fromkeys(many) and read == []
        assert journal.statuses(many[:2]) == dict.fromkeys(many[:2]) and read == [other.session]
        read.clear()
        monkeypatch.setitem(journal._writer.faults.kinds, "database", time.monotonic())  # (a fault)
        assert journal.statuses(many) == dict.fromkeys(many) and read == [other.session]
        assert journal.statuses(["theirs"] + many) == {"theirs": "completed", **dict.fromkeys(many)}


def test_a_kernel_that_dies_idle_or_closes_with_running_tasks(tmp_path):
    proc = child(tmp_path, """
        j.submitted({"uid": "q1", "name": "later", "status": "queued", "submitted_at": time.time()})
        j.submitted({"uid": "r1", "name": "measure", "status": "running", "submitted_at": time.time()})
        j.finished({"uid": "d1", "name": "quick", "status": "completed", "finished_at": time.time()})
        j.flush()
        print("ready", flush=True)
        sys.stdin.readline()
    """)
    try:
        expect(proc, "ready")
        with Journal(tmp_path, ENV) as j:  # the other kernel is alive: its tasks are not orphans
            assert j.statuses(["q1", "r1", "d1"]) == {"q1": "queued", "r1": "running", "d1": "completed"}
            assert list(tmp_path.glob("*.spool")) and list(tmp_path.glob("*.lock"))
    finally:
        proc.kill()
        proc.wait(30)
    with Journal(tmp_path, ENV) as j:
        assert j.statuses(["q1", "r1", "d1"]) == {"q1": "failed", "r1": "failed", "d1": "completed"}
        assert j.get("r1")["error"] == ORPHAN_REASON and j.get("q1")["error"] == ORPHAN_QUEUED_REASON
        j.submitted(task("mine", "running"))
    with Journal(tmp_path, ENV) as j:  # closing with a running task: it cannot end any more
        assert j.get("mine")["status"] == "failed" and j.get("mine")["error"] == ORPHAN_REASON
        j.finished(task("mine", "completed"))  # ... unless another session records its end
        assert j.flush() and j.get("mine")["status"] == "completed"
        assert j.get("mine")["journal"]["orphaned"] is False


# ---- invariant 4: asynchronous exceptions anywhere ---------------------------------------------------
class Injected(Exception):
    pass



def test_async_exceptions_anywhere_corrupt_nothing(tmp_path, monkeypatch):
    """Invariant 4: thousands of exceptions raised into a thread that loops over the calls
    (retrying a call that was interrupted, and going over every task again and again) leave
    every record right, the writer thread alive and the in-memory state clean."""
    monkeypatch.setattr(segments_module, "SEGMENT_BYTES", 32 * 1024)  # rotations on the task path too
    n = 1000
    uids = [f"storm-{i:05d}" for i in range(n)]
    recs = [(task(u), task(u, "completed", result=i)) for i, u in enumerate(uids)]
    progress = [0, 0, 0]  # pass, task index, step: advanced after each call that returned
    hits, inside = [0], [0]

    def work() -> None:
        rnd, i, step = progress
        if step == 0:
            j.submitted(recs[i][0])
        elif step == 1:
            j.started(uids[i], 1000.0 + i)
        else:
            j.finished(recs[i][1])
        step = (step + 1) % 3
        i = (i + (step == 0)) % n
        progress[:] = [rnd + (i == 0 and step == 0), i, step]

    def runner(stop: list[bool]) -> None:  # (its own flag: a runner once stopped stays stopped)
        while not stop[0]:
            try:
                while not stop[0]:
                    try:
                        work()
                    except Injected as exc:
                        hits[0] += 1
                        tb = exc.__traceback__
                        while tb.tb_next is not None:
                            tb = tb.tb_next
                        inside[0] += "qmagic" in tb.tb_frame.f_code.co_filename
            except Injected:  # landed in the test's own loop, not in a journal call
                pass
        drained = False  # (the exception sent last lands here, in a loop, not in threading's
        while not drained:  # own code as the thread ends)
            try:
                for _ in range(10_000):
                    pass
                drained = True
            except Injected:
                pass

    def ignore_injected(args) -> None:  # a runner that an exception ended is started again
        if args.exc_type is not Injected:
            saved_hook(args)

    saved_hook = threading.excepthook
    threading.excepthook = ignore_injected
    # An exception that lands in a finalizer (a __del__, a weakref callback) is "ignored" by
    # Python and handed to sys.unraisablehook: pytest's hook, interrupted by the next one,
    # failed the test ("Failed to process unraisable exception") though nothing was wrong.
    saved_unraisable = sys.unraisablehook
    monkeypatch.setattr(sys, "unraisablehook",
                        lambda args: None if args.exc_type is Injected else saved_unraisable(args))
    set_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc
    try:
        with Journal(tmp_path, ENV) as j:
            deadline = time.monotonic() + 120
            while (hits[0] < 2000 or progress[0] < 1) and time.monotonic() < deadline:
                stop = [False]
                thread = threading.Thread(target=runner, args=(stop,), daemon=True)
                thread.start()
                while thread.is_alive() and (hits[0] < 2000 or progress[0] < 1) and time.monotonic() < deadline:
                    set_exc(ctypes.c_ulong(thread.ident), ctypes.py_object(Injected))
                    time.sleep(0)  # (the exception lands where the runner is when it runs)
                stop[0] = True  # (never "cleared" with SetAsyncExc(ident, NULL): on CPython
                thread.join(30)  # 3.11 that left every later thread of this process slowed
                # down and a thread started with a trace hook spinning at its first line)
                assert not thread.is_alive(), "a runner did not stop (it would go on calling the log)"
            assert hits[0] >= 2000 and inside[0] > 500 and progress[0] >= 1, (progress, hits, inside)
            assert j.flush(30) and j._writer.thread.is_alive()
            health = j.health()
            assert health["ok"] and health["pending"] == 0 and health["dropped"] == 0, health
            got = j.records()
            assert len(got) == n
            for rec in got:
                i = int(rec["uid"].split("-")[1])
                assert rec["status"] == "completed" and rec["result"] == i, rec
                assert rec["started_at"] == recs[i][1]["started_at"]
            assert not j._spool.held
    finally:
        threading.excepthook = saved_hook
    assert db_rows(tmp_path, "SELECT count(*), min(status), max(status) FROM tasks") == [(n, "completed", "completed")]


# ---- faults: calls keep their way (benchmarks/journal_faults.py times them), one warning, nothing lost --
def log_tasks(journal: Journal, prefix: str, n: int) -> None:
    """submitted() + started() + finished() of ``n`` tasks, as the worker calls them."""
    for i in range(n):
        first, last = task(f"{prefix}-{i}"), task(f"{prefix}-{i}", "completed", result=i)
        journal.submitted(first)
        journal.started(first["uid"], time.time())
        journal.finished(last)


def fault_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOG and r.levelno == logging.WARNING
            and "could not" in r.getMessage()]


def damage_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOG and r.levelno == logging.WARNING
            and "is damaged" in r.getMessage()]


def test_a_database_cut_short_is_moved_aside_and_a_new_one_started(tmp_path, caplog):
    """A database file cut short under a running kernel (``> file``): it never heals, and
    SQLite went on committing into it (records lost for good, then ~100 warnings at close
    and no later kernel could write). It is moved aside (kept: its records are there), one
    warning names it, and the records from then on go to a new database (found by a hostile
    test)."""
    caplog.set_level(logging.INFO, logger=LOG)
    path = database_path(tmp_path, ENV)
    with Journal(tmp_path, ENV) as j:
        for i in range(300):
            run_task(j, f"before-{i}", result="x" * 500)
        assert j.flush()
        os.truncate(path, 0)
        for i in range(100):
            run_task(j, f"after-{i}")
        wait_for(lambda: bool(damage_warnings(caplog)) and j.flush(0.1)
                 and j.statuses(["after-99"]) == {"after-99": "completed"}, j)
        assert j.health()["ok"] and j.health()["last_error"] is None
    [warning] = damage_warnings(caplog)
    [aside] = [p for p in tmp_path.iterdir() if p.name.startswith(path.name + ".damaged-")
               and not p.name.endswith(("-wal", "-shm"))]
    assert aside.name in warning and "moved aside" in warning
    assert fault_warnings(caplog) == []
    with Journal(tmp_path, ENV) as j:  # the next kernel reads and writes the new one
        statuses = j.statuses([f"after-{i}" for i in range(100)])
        assert set(statuses.values()) == {"completed"}
        run_task(j, "later")
        assert j.flush() and j.get("later")["status"] == "completed"


def test_a_database_damaged_while_no_kernel_ran_is_moved_aside_by_the_next(tmp_path, caplog, capsys):
    caplog.set_level(logging.INFO, logger=LOG)
    path = database_path(tmp_path, ENV)
    path.write_bytes(b"this is not a database" * 100)
    assert history_main(["--state-dir", str(tmp_path), "-e", ENV]) == 1  # a view says what will happen
    assert "is damaged" in capsys.readouterr().err
    with Journal(tmp_path, ENV) as j:
        run_task(j, "first")
        assert j.flush() and j.get("first")["status"] == "completed" and j.health()["ok"]
    assert len(damage_warnings(caplog)) == 1 and fault_warnings(caplog) == []
    assert [p.name for p in tmp_path.glob("*.damaged-*")][0].startswith(path.name)


LOCKER = """
import sqlite3, sys
c = sqlite3.connect(sys.argv[1], isolation_level=None)
c.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()
c.execute("COMMIT")
"""


def test_database_locked_by_another_process(tmp_path, caplog, short_busy):
    caplog.set_level(logging.INFO, logger=LOG)
    with Journal(tmp_path, ENV) as j:
        log_tasks(j, "before", 300)
        assert j.flush()
        locker = subprocess.Popen(
            [sys.executable, "-c", LOCKER, str(database_path(tmp_path, ENV))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            expect(locker, "locked")
            log_tasks(j, "during", 2000)
            assert not j.flush(0.5)  # the writer cannot commit ...
            deadline = time.monotonic() + 30
            while j.health()["ok"] and time.monotonic() < deadline:  # (it waits 0.3 s for the lock)
                j.flush(0.1)
            health = j.health()
            assert not health["ok"] and health["pending"] >= 4000 and health["dropped"] == 0
            assert "locked" in health["last_error"]
            assert j.get("during-1999")["status"] == "completed"  # ... but this process sees it all
            # no call waited for the database: each line went into the spool (one write),
            # none waits in memory (the slow path)
            assert health["in_memory"] == 0 and j._spool.out is not None, health
        finally:
            locker.communicate("\n", timeout=30)
        assert j.flush(30)
        health = j.health()
        assert health["ok"] and health["pending"] == 0 and health["dropped"] == 0
        assert health["last_error"] is None  # (the episode is over)
        assert j.statuses([f"during-{i}" for i in range(2000)]) == {f"during-{i}": "completed" for i in range(2000)}
    assert len(fault_warnings(caplog)) == 1  # one warning for the episode
    assert any("works again" in r.getMessage() for r in caplog.records)
    assert db_rows(tmp_path, "SELECT count(*) FROM tasks") == [(2300,)]


NAMESPACE_SCRIPT = """
import json, logging, os, subprocess, sys, threading, time
sys.path.insert(0, %(repo)r)
from qmagic.store import segments, spool
spool.SEGMENT_BYTES = 128 * 1024
from qmagic.store.journal import Journal
folder = sys.argv[1]
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%(size)s,mode=0700", "tmpfs", folder], check=True)
messages = []
class Keep(logging.Handler):
    def emit(self, record):
        messages.append((record.levelname, record.getMessage()))
logging.getLogger("qmagic.store.journal").addHandler(Keep())
logging.getLogger("qmagic.store.journal").setLevel(logging.INFO)
# What the calling thread asks of the disk and of the writer (not the writer's own retries):
# during a fault the calls must not try the disk again for every line (each attempt then took
# 213-248 ms), nor wake the writer for every line (3-6x the calls' CPU).
tally = {"refused": 0, "wakes": 0}
def tallied(cls, name, key):
    original = getattr(cls, name)
    def wrapper(*args, **kwargs):
        mine = threading.current_thread() is threading.main_thread()
        try:
            result = original(*args, **kwargs)
        except Exception:
            if mine and key == "refused":
                tally[key] += 1
            raise
        if mine and key == "wakes":
            tally[key] += 1
        return result
    setattr(cls, name, wrapper)
tallied(segments.AppendFile, "write", "refused")
tallied(segments.SessionFiles, "new_segment", "refused")
tallied(spool.Waker, "set", "wakes")
def calls(j, prefix, n):
    tally.update(refused=0, wakes=0)
    t0 = time.monotonic()
    for i in range(n):
        uid = "%%s-%%d" %% (prefix, i)
        now = time.time()
        j.submitted({"uid": uid, "name": "scan", "status": "queued", "submitted_at": now, "args": [i]})
        j.started(uid, now)
        j.finished({"uid": uid, "name": "scan", "status": "completed", "submitted_at": now,
                    "started_at": now, "finished_at": now, "args": [i], "result": "x" * 100})
    return dict(tally, seconds=time.monotonic() - t0, retry_s=spool._SPOOL_RETRY_S)
def fill(path):
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"x" * 65536)
                f.flush()
        except OSError as exc:
            return exc.errno
def wait_unhealthy(j):
    deadline = time.monotonic() + 20
    while j.health()["ok"] and time.monotonic() < deadline:
        j.flush(0.2)
    return j.health()
out = {}
%(body)s
subprocess.run(["umount", folder], check=True)
out["messages"] = messages
print(json.dumps(out))
"""

DISK_FULL = """
j = Journal(folder, "lab-1")
calls(j, "before", 200)
out["stored_before"] = j.flush(10)
out["fill_error"] = fill(os.path.join(folder, "filler"))
out["during"] = calls(j, "during", 3000)
out["health_during"] = wait_unhealthy(j)
out["visible_during"] = j.get("during-2999")["status"]
os.remove(os.path.join(folder, "filler"))
out["stored_after"] = j.flush(30)
out["health_after"] = j.health()
out["count"] = len(j.records())
j.close()
"""

DISK_FREED_IN_PART = """
j = Journal(folder, "lab-1", pending_limit=1_000_000)
calls(j, "before", 100)
out["stored_before"] = j.flush(10)
filler = os.path.join(folder, "filler")
out["fill_error"] = fill(filler)
calls(j, "during", 6000)
out["health_during"] = wait_unhealthy(j)
deadline = time.monotonic() + 20  # the database met the full disk too (a commit under way when
while not j._writer.db_full and time.monotonic() < deadline:  # room is freed takes it for its
    j.flush(0.2)  # WAL, and then nothing is left for the spool: seen once the writer woke less)
out["db_full"] = j._writer.db_full
out["health_during"] = j.health()
os.truncate(filler, os.path.getsize(filler) - (1 << 20))  # 1 MB: less room than what waits
deadline = time.monotonic() + 30
while j.health()["in_memory"] >= out["health_during"]["in_memory"] and time.monotonic() < deadline:
    j.flush(0.2)
out["health_part"] = j.health()
os.remove(filler)
out["stored_after"] = j.flush(60)
out["health_after"] = j.health()
out["count"] = len(j.records())
j.close()
"""

READ_ONLY = """
subprocess.run(["mount", "-o", "remount,ro", folder], check=True)
j = Journal(folder, "lab-1")
small = Journal(folder, "small", pending_limit=100)
out["during"] = calls(j, "during", 1000)
calls(small, "x", 100)
out["health_during"] = wait_unhealthy(j)
out["small_health"] = small.health()
out["visible_during"] = j.get("during-999")["status"]
subprocess.run(["mount", "-o", "remount,rw", folder], check=True)
out["stored_after"] = j.flush(30)
out["health_after"] = j.health()
out["count"] = len(j.records())
j.close()
small.close()
small = Journal(folder, "small")
out["small_records"] = sorted({r["status"] for r in small.records()}), len(small.records())
small.close()
"""


READ_ONLY_ARCHIVE = """
from qmagic.store.history import history
j = Journal(folder, "lab-1")
calls(j, "shift", 3)
j.close()
subprocess.run(["mount", "-o", "remount,ro", folder], check=True)
out["uids"] = sorted(r["uid"] for r in history(state_dir=folder, environment_name="lab-1"))
out["statuses"] = sorted({r["status"] for r in history(state_dir=folder, environment_name="lab-1")})
"""


def test_a_log_in_a_folder_nothing_can_write_is_read_as_it_is(tmp_path):
    """A beamtime's log read from a read-only mount (an archive): SQLite reads a WAL database
    only through a shared-memory file it makes next to it, so every view said "Cannot read
    the experiment log (unable to open database file)" (found by a hostile test)."""
    out = in_namespace(tmp_path, READ_ONLY_ARCHIVE, "8m")
    assert out["uids"] == ["shift-0", "shift-1", "shift-2"] and out["statuses"] == ["completed"], out


READ_ONLY_KILLED = """
import warnings
from qmagic.store.history import history
j = Journal(folder, "lab-1")
calls(j, "shift", 2)
j.close()
dies = ("import sys, time\\nsys.path.insert(0, sys.argv[2])\\nfrom qmagic.store.journal import Journal\\n"
        "j = Journal(sys.argv[1], 'lab-1')\\nj.submitted({'uid': 'died', 'name': 'scan', 'status': 'running', "
        "'submitted_at': time.time(), 'started_at': time.time()})\\nprint('ready', flush=True)\\ntime.sleep(600)")
child = subprocess.Popen([sys.executable, "-c", dies, folder, sys.path[0]], stdout=subprocess.PIPE, text=True)
assert child.stdout.readline().strip() == "ready"
child.kill()
child.wait()
child.stdout.close()
subprocess.run(["mount", "-o", "remount,ro", folder], check=True)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    found = history(state_dir=folder, environment_name="lab-1")
out["found"] = [(r["uid"], r["status"], r.get("error")) for r in found]
out["warnings"] = [str(w.message) for w in caught]
"""


def test_a_read_only_copy_of_a_log_shows_what_ran_when_its_kernel_died(tmp_path):
    """The archive of a beamtime whose last kernel was killed (SIGKILL): its last tasks are
    only in that kernel's spool, and a read-only folder cannot store them.  history() showed
    the database alone, with a warning that named a lock file and told to choose another
    QMagic.state_dir; the tasks that ran when the kernel died were missing.  Now they are
    read from the spool, and one warning says the folder cannot be written."""
    out = in_namespace(tmp_path, READ_ONLY_KILLED, "8m")
    assert out["found"] == [["died", "failed", "kernel stopped while the task was running"],
                            ["shift-1", "completed", None], ["shift-0", "completed", None]], out
    assert len(out["warnings"]) == 1 and "cannot be written (a read-only copy?)" in out["warnings"][0], out
    assert "state_dir" not in out["warnings"][0]


def assert_calls_spared_the_disk(during: dict) -> None:
    """During a fault the calling thread tried the disk (and woke the writer) at most about
    twice per back-off period of the spool -- once when its own back-off ends, once on a
    segment the writer installed on its own clock (each refused by the full disk) -- not once
    per line (3 lines a task).  (Once per period was the bound: a loop slowed past one period
    by a busy machine saw 4 refusals in 0.52 s.)"""
    periods = 2 + during["seconds"] / during["retry_s"]
    assert during["refused"] <= 2 * periods and during["wakes"] <= 2 * periods, during


def in_namespace(tmp_path: Path, body: str, size: str) -> dict:
    """Run ``body`` in a private mount namespace with a tmpfs at tmp_path/mnt (root only)."""
    if os.geteuid() != 0 or not shutil_which("unshare"):
        pytest.skip("needs root and unshare (a tmpfs in a private mount namespace)")
    folder = tmp_path / "mnt"
    folder.mkdir()
    script = NAMESPACE_SCRIPT % {"repo": str(REPO), "size": size, "body": body}
    done = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, "-c", script, str(folder)],
                          capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not os.path.ismount(folder) and list(folder.iterdir()) == []  # nothing left behind
    return orjson.loads(done.stdout.strip().splitlines()[-1])


def shutil_which(name: str) -> str | None:
    import shutil

    return shutil.which(name)


def test_disk_full_keeps_calls_fast_then_stores_everything(tmp_path):
    out = in_namespace(tmp_path, DISK_FULL, "6m")
    assert out["stored_before"] and out["fill_error"] == 28  # ENOSPC
    assert_calls_spared_the_disk(out["during"])
    during = out["health_during"]
    assert not during["ok"] and during["pending"] > 0 and during["dropped"] == 0, during
    assert out["visible_during"] == "completed"
    assert out["stored_after"] and out["health_after"]["ok"] and out["health_after"]["pending"] == 0, out
    assert out["count"] == 3200 and out["health_after"]["dropped"] == 0
    warnings_ = [m for level, m in out["messages"] if level == "WARNING" and "could not" in m]
    assert len(warnings_) == 1, out["messages"]  # one per episode (spool and database both fail)
    assert out["health_after"]["last_error"] is None
    assert any("works again" in m for _, m in out["messages"])


def test_room_freed_during_a_disk_full_goes_first_to_what_only_memory_holds(tmp_path):
    # Records waiting in memory go into the spool first (a SIGKILL cannot lose them there,
    # and a record takes less room there than in the database), and health() says how many
    # are still only in memory; the episode (one warning) lasts until all is stored.
    out = in_namespace(tmp_path, DISK_FREED_IN_PART, "8m")
    assert out["stored_before"] and out["fill_error"] == 28 and out["db_full"], out
    during, part = out["health_during"], out["health_part"]
    assert not during["ok"] and during["in_memory"] >= 3 * 6000 * 0.9, during
    assert part["in_memory"] < during["in_memory"] - 3000, (during, part)  # now in the spool
    assert not part["ok"] and part["dropped"] == 0  # (the episode goes on until all is stored)
    assert out["stored_after"] and out["health_after"]["pending"] == 0, out
    assert out["count"] == 6100 and out["health_after"]["dropped"] == 0
    warnings_ = [m for level, m in out["messages"] if level == "WARNING" and "could not" in m]
    assert len(warnings_) == 1, out["messages"]  # one episode, however many small commits


def test_read_only_folder_keeps_calls_fast_then_stores_everything(tmp_path):
    out = in_namespace(tmp_path, READ_ONLY, "8m")
    assert_calls_spared_the_disk(out["during"])
    during = out["health_during"]
    assert not during["ok"] and during["pending"] >= 2000 and during["dropped"] == 0, during
    assert "Read-only" in during["last_error"]
    assert out["visible_during"] == "completed"  # waiting in memory, and visible
    small = out["small_health"]
    # 300 lines (3 per task): 100 kept, and as many again for ends only (found by a hostile
    # test: a task whose end was dropped read "kernel stopped while the task was running")
    assert small["pending"] == 167 and small["dropped"] == 133
    assert out["small_records"] == [["completed"], 100]  # (an end line alone is a whole record)
    assert out["stored_after"] and out["health_after"]["ok"] and out["count"] == 1000
    warnings_ = [m for level, m in out["messages"] if level == "WARNING" and "could not" in m]
    assert len(warnings_) == 2, out["messages"]  # one per episode, for each of the two logs


# ---- bad data ------------------------------------------------------------------------------------------
def plant(tmp_path: Path, uid: str, status: str, record: bytes, sort_time=None, submitted_at=None) -> None:
    sort_time = time.time() if sort_time is None else sort_time  # (an old one: retention deletes it)
    conn = sqlite3.connect(database_path(tmp_path, ENV), isolation_level=None)
    conn.execute("INSERT INTO tasks (uid, rank, status, sort_time, submitted_at, record) VALUES (?, 3, ?, ?, ?, ?)",
                 (uid, status, sort_time, submitted_at, record))
    conn.close()


def test_rows_that_do_not_validate_are_skipped_with_one_warning_per_kind(journal, tmp_path):
    run_task(journal, "good")
    assert journal.flush()
    plant(tmp_path, "bogus-1", "bogus", orjson.dumps(task("bogus-1")))
    plant(tmp_path, "bogus-2", "bogus", orjson.dumps(task("bogus-2")))
    plant(tmp_path, "yesterday", "completed", orjson.dumps(task("yesterday", submitted_at="yesterday")),
          sort_time="yesterday", submitted_at="yesterday")
    plant(tmp_path, "not-json", "completed", b"{not json")
    plant(tmp_path, "not-a-dict", "completed", b"[1, 2]")
    plant(tmp_path, "other-uid", "completed", orjson.dumps(task("someone-else")))
    with pytest.warns(JournalWarning) as caught:
        assert [r["uid"] for r in journal.records()] == ["good"]
    kinds = sorted(str(w.message).split("(task ")[1].split(":")[1].strip()[:12] for w in caught)
    assert len(caught) == 3, kinds  # status, time, record: once each
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning for the same kinds
        assert [r["uid"] for r in journal.records(status="completed")] == ["good"]
        assert journal.get("bogus-1") is None and journal.get("not-json") is None
        assert journal.statuses(["bogus-1", "good", "nothing"]) == {"bogus-1": None, "good": "completed",
                                                                   "nothing": None}


def test_lines_cut_short_by_a_full_disk_never_break_a_read_nor_hide_a_task():
    """A write cut short by a full disk leaves part of a line in the spool (the next line
    starts on a new line).  Cut just after its uid, such a line made every read of the log
    raise IndexError (seen in a run of the disk-full test); cut inside a task's final
    record, it hid the task's earlier, durable lines, so after a SIGKILL the task was lost.
    Now it counts as damage and the task's best other line stands."""
    from qmagic.store.database import rows_from_lines
    from qmagic.store.records import RecordEncoder

    encoder = RecordEncoder(2000)
    queued = encoder.encode(task("t-1"))
    ended = encoder.encode(task("t-1", "completed", result=5), final=True)
    started = orjson.dumps([2, "t-1", time.time()], option=orjson.OPT_APPEND_NEWLINE)
    after_uid = ended.index(b'"', 4) + 1
    for cut in (after_uid, after_uid + 1, after_uid + 2, len(ended) // 2, len(ended) - 2):
        rows, bad, starts = {}, [], {}
        rows_from_lines(queued + started + ended[:cut] + b"\n", "s", time.time(), rows, bad, starts)
        assert (rows["t-1"][2], len(bad), starts) == ("running", 1, {}), cut
    rows, bad = {}, []
    rows_from_lines(queued + ended[: len(ended) // 2] + b"\n" + ended, "s", time.time(), rows, bad)
    assert (rows["t-1"][2], len(bad)) == ("completed", 0)  # (a later whole line wins anyway)


def test_names_are_validated_before_they_are_stored(journal):
    journal.submitted(task("n0", name="tab\there", user="bob\n"))  # (the fast path)
    journal.submitted(task("n1", name="remote\udcffname", user="bob\n", user_group=7))
    journal.finished(task("n2", "failed", name="x" * 5000, error="bad \ud800 text", kind=None))
    assert journal.flush()
    zero, one, two = journal.get("n0"), journal.get("n1"), journal.get("n2")
    assert zero["name"] == "tab\\there" and zero["user"] == "bob\\n"
    assert one["name"] == "remote\\udcffname" and one["user"] == "bob\\n" and one["user_group"] == "7"
    assert len(two["name"]) == 500 and two["name"].endswith("...") and two["error"] == "bad \\ud800 text"
    assert [r["uid"] for r in journal.records(name="remote*")] == ["n1"]


def test_long_names_of_a_small_clean_record_are_cut_too(journal):
    """The encoder's fast path (a small record of printable names) cut nothing: names of
    5,000 characters were stored whole although names are cut at 500."""
    journal.finished(task("long", "completed", name="n" * 5000, user="U" * 5000, user_group="g" * 501))
    journal.finished(task("edge", "completed", name="e" * 500, user="u" * 500, user_group="g" * 500))
    assert journal.flush()
    long, edge = journal.get("long"), journal.get("edge")
    for key in ("name", "user", "user_group"):
        assert len(long[key]) == 500 and long[key].endswith("..."), key
        assert edge[key] == edge[key][0] * 500, key  # (500 is kept whole)
    assert [r["uid"] for r in journal.records(user="U" * 497 + "...")] == ["long"]


def test_a_name_equal_to_one_that_passed_is_still_checked(journal):
    """The encoder remembers name triples that passed its checks.  An object equal to one of
    them (an Enum with that name's hash and equality) skipped the checks, and orjson stored
    its value: 2,013 characters with control characters; one whose hash raised made
    submitted() raise (found by a hostile test).  Only exact str or None is looked up."""
    import enum

    class Sneaky(str, enum.Enum):
        NAME = "\x07" * 2000

        def __eq__(self, other):
            return other == "measure" or other is self

        def __hash__(self):
            return hash("measure")

    class BadHash:
        def __hash__(self):
            raise RuntimeError("no hash")

        def __repr__(self):
            return "BadHash()"

    journal.finished(task("plain", "completed"))  # ("measure", "alice", "primary") passes
    journal.finished(task("sneaky", "completed", name=Sneaky.NAME))
    journal.submitted(task("badhash", name=BadHash()))
    assert journal.flush()
    name = journal.get("sneaky")["name"]
    assert len(name) <= 500 and name.isprintable(), name[:80]
    assert journal.get("badhash")["name"] == "BadHash()"


# ---- lookups ---------------------------------------------------------------------------------------------
def test_lookups_are_indexed_and_fast(journal, tmp_path):
    for i in range(3000):
        journal.finished(task(f"{i:04d}-{uuid.uuid4()}", "completed", name=f"scan_{i % 7}"))
    assert journal.flush(60)
    unknown = [str(uuid.uuid4()) for _ in range(20_000)]
    t0 = time.thread_time()  # (this thread's CPU: the query runs here; other load does not count)
    found = journal.statuses(unknown)
    cpu = time.thread_time() - t0
    # ~0.02-0.05 s of CPU; the target (0.2 s) is benchmarks/remote.py's; indexes: below
    assert found == dict.fromkeys(unknown) and cpu < 1.0
    statements: list[str] = []
    journal._reader._query(lambda c: c and c.set_trace_callback(statements.append))
    assert journal.find("0042")["uid"].startswith("0042-")
    assert journal.find("004") is None  # too short for a prefix
    assert journal.find("00") is None and journal.find("0042-zzz") is None
    assert journal.statuses(["0042"]) == {"0042": None}  # statuses take exact uids
    journal.records(status="failed", limit=5)
    journal.records(name="scan_3", limit=5)
    journal.records(notebook="01-getting-started.ipynb", limit=5)
    journal.records(since="-1h", limit=5)
    journal.records(until=time.time() - 60, limit=5)
    journal.statuses(unknown[:10])
    conn = sqlite3.connect(database_path(tmp_path, ENV))
    plans = {s: " / ".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + s)) for s in statements
             if s.lstrip().upper().startswith("SELECT")}
    conn.close()
    assert len(plans) >= 5
    for statement, plan in plans.items():
        assert "SCAN t " not in plan + " " and "SCAN tasks" not in plan, (statement, plan)


def test_find_by_prefix_sees_pending_records_and_refuses_ambiguity(journal):
    journal.submitted(task("abcd-1111"))
    assert journal.find("abcd")["uid"] == "abcd-1111"
    journal.submitted(task("abcd-2222"))
    assert journal.find("abcd") is None and journal.find("abcd-2")["uid"] == "abcd-2222"
    assert journal.flush()
    assert journal.find("abcd") is None and journal.find("abcd-1")["uid"] == "abcd-1111"
    assert journal.find("abcd-1111")["uid"] == "abcd-1111" and journal.find(42) is None


@pytest.mark.parametrize("fault", ["none", "spool"])
def test_lookups_racing_appends_see_every_returned_call(tmp_path, monkeypatch, fault):
    """Plain threads append tasks while others look them up: a task whose submitted()
    returned is found, one whose finished() returned reads completed — whatever the writer
    does meanwhile (storing, rotating and retiring small segments: "none"; or, when no
    segment can be made, lines waiting in memory, which a flush halfway moves into the
    spool and stores: "spool")."""
    from qmagic.store import writer as writer_module

    monkeypatch.setattr(segments_module, "SEGMENT_BYTES", 32 * 1024)
    if fault == "spool":  # the writer stores on flush() only: what waits in memory stays there
        monkeypatch.setattr(writer_module, "QUIET_S", 600.0)
        monkeypatch.setattr(writer_module, "MAX_DELAY_S", 600.0)
    refuse = refuse_new_segments(monkeypatch)
    n, writers, readers = 600, 2, 2
    submitted: list[list[str]] = [[] for _ in range(writers)]  # uids whose submitted() returned
    finished: list[list[str]] = [[] for _ in range(writers)]  # ... whose finished() returned
    done, checked = threading.Event(), threading.Event()
    problems: list[str] = []
    checks = [0]
    with Journal(tmp_path, ENV) as j:
        assert j.flush()
        if fault == "spool":
            refuse.set()
        start = threading.Barrier(writers + readers, timeout=30)

        def write(k: int) -> None:
            start.wait()
            for i in range(n):
                uid = f"w{k}-{i}"
                j.submitted(task(uid, result=None))
                submitted[k].append(uid)
                j.started(uid, time.time())
                j.finished(task(uid, "completed", result=i))
                finished[k].append(uid)
                if i % 20 == 0:  # (the lookups keep up: a check of each stage)
                    checked.clear()
                    checked.wait(10)
                if k == 0 and i == n // 2 and fault == "spool":
                    if not j.health()["in_memory"]:
                        problems.append("nothing waited in memory")
                    refuse.clear()  # the writer moves what waits into the spool, then stores it
                    if not j.flush(30):
                        problems.append("not stored")

        def read(k: int) -> None:
            start.wait()
            rnd = random.Random(k)
            while not done.is_set():
                w = rnd.randrange(writers)
                ended, begun = list(finished[w]), list(submitted[w])
                if not begun:
                    continue
                some_ended = [rnd.choice(ended)] if ended else []
                for uid in some_ended:
                    rec = j.get(uid)
                    if rec is None or rec["status"] != "completed" or rec["result"] != int(uid.split("-")[1]):
                        problems.append(f"get({uid}) = {rec and rec['status']}")
                last = begun[-1]
                if j.get(last) is None or j.find(last) is None:
                    problems.append(f"{last} not found")
                statuses = j.statuses(ended[-50:])
                if set(statuses.values()) - {"completed"}:
                    problems.append(f"statuses {statuses}")
                checks[0] += 1
                checked.set()

        threads = [threading.Thread(target=write, args=(k,)) for k in range(writers)]
        threads += [threading.Thread(target=read, args=(k,)) for k in range(readers)]
        for t in threads:
            t.start()
        for t in threads[:writers]:
            t.join(120)
        done.set()
        for t in threads[writers:]:
            t.join(120)
        assert not any(t.is_alive() for t in threads)
        assert problems == [] and checks[0] >= n // 20, (problems[:5], checks)
        refuse.clear()
        assert j.flush(30)
        health = j.health()
        assert health["pending"] == 0 and health["dropped"] == 0, health
        got = {r["uid"]: r["status"] for r in j.records()}
        assert got == {f"w{k}-{i}": "completed" for k in range(writers) for i in range(n)}


# ---- retention ---------------------------------------------------------------------------------------------
def wait_for(predicate, journal: Journal, timeout: float = 30.0) -> None:
    """Let the writer work (flush wakes it) until ``predicate()`` holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        journal.flush(0.2)


def test_retention_by_age_and_size_never_deletes_unfinished_tasks(tmp_path, monkeypatch, retention_at_once):
    from qmagic.store import writer as writer_module

    monkeypatch.setattr(writer_module, "RETENTION_BATCH", 100)  # (several small transactions)
    old = time.time() - 7200
    with Journal(tmp_path, ENV, max_age_s=3600) as j:
        for i in range(300):
            j.finished(task(f"old-{i}", "completed", submitted_at=old, started_at=old, finished_at=old + 1))
        j.submitted(task("old-queued", submitted_at=old))
        j.submitted(task("old-running", "running", submitted_at=old))
        run_task(j, "new")
        assert j.flush()

        def count() -> int:
            return db_rows(tmp_path, "SELECT count(*) FROM tasks")[0][0]
        wait_for(lambda: count() == 3, j)
        assert {r["uid"] for r in j.records()} == {"old-queued", "old-running", "new"}
    with Journal(tmp_path, "sized", max_bytes=1_000_000) as j:
        big = "y" * 2000
        for i in range(1000):
            j.finished(task(f"t-{i:04d}", "completed", result=big, submitted_at=old + i))
        j.submitted(task("first", submitted_at=old - 10))
        conn_path = database_path(tmp_path, "sized")

        def size() -> int:
            conn = sqlite3.connect(conn_path)
            try:
                page, pages, free = (conn.execute(f"PRAGMA {p}").fetchone()[0]
                                     for p in ("page_size", "page_count", "freelist_count"))
                return (pages - free) * page
            finally:
                conn.close()
        wait_for(lambda: j.flush(0.1) and size() <= 1_000_000, j)
        kept = [r["uid"] for r in j.records()]
        assert "first" in kept and "t-0999" in kept and "t-0000" not in kept  # the oldest went
        assert 100 < len(kept) < 300

        def checkpointed_size() -> int:
            # A checkpoint (SQLite does one now and then) moves the freed pages out of the file.
            # It is run on a connection of the test's own: the writer's connection belongs to the
            # writer thread, and using it from here raced the writer ("database table is locked").
            conn = sqlite3.connect(conn_path, timeout=10)
            try:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                conn.close()
            return os.path.getsize(conn_path)
        wait_for(lambda: checkpointed_size() < 1_500_000, j)  # pages were given back to the system





def test_an_interrupted_read_leaves_no_stale_view(tmp_path, sigint_as_in_a_cell):
    """■ during a history read whose traceback is kept (IPython keeps the last one) left the
    read's cursor open: the reader's snapshot stayed at that moment, so %tasks --history,
    qmagic.history() and lookups never showed a task stored later, and the WAL could not be
    checkpointed past it (hostile test).  The read lets go of its cursor."""
    import inspect

    from interrupt_points import sigint_at

    from qmagic.store.reader import LogReader

    code = LogReader._records.__code__
    source, first = inspect.getsourcelines(code)
    line = first + next(i for i, text in enumerate(source) if "record_from_row(" in text)
    with Journal(tmp_path, ENV) as j:
        for i in range(20):
            run_task(j, f"old-{i:02d}")
        assert j.flush()
        fired, kept = [], []
        sys.settrace(sigint_at(code, line, fired))
        try:
            j.records()
        except KeyboardInterrupt as exc:
            kept.append(exc)  # (as IPython keeps sys.last_traceback)
        finally:
            sys.settrace(None)
        assert fired == [line] and kept
        run_task(j, "new")
        assert j.flush()
        assert [r["uid"] for r in j.records(limit=1)] == ["new"]
        assert j.get("new")["status"] == "completed" and j.statuses(["new"]) == {"new": "completed"}


def test_a_relative_state_folder_stays_where_the_log_was_opened(tmp_path, monkeypatch, caplog):
    """QMAGIC_STATE_DIR=state (or QMagic.state_dir) relative, then a notebook's %cd: the log
    followed the working folder ("deleted or replaced while this kernel ran", a second log,
    spool and lock file in the new folder; hostile test).  It stays where it was opened."""
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
    monkeypatch.chdir(tmp_path / "a")
    with caplog.at_level(logging.WARNING, logger="qmagic"), Journal("state", ENV) as j:
        run_task(j, "before")
        assert j.flush()
        monkeypatch.chdir(tmp_path / "b")
        run_task(j, "after")
        assert j.flush()
        assert {r["uid"] for r in j.records()} == {"before", "after"}
        assert j.health()["path"] == str(tmp_path / "a" / "state" / f"{ENV}.journal.sqlite3")
    assert not (tmp_path / "b" / "state").exists()
    assert db_rows(tmp_path / "a" / "state", "SELECT uid FROM tasks ORDER BY uid") == [("after",), ("before",)]
    assert "deleted" not in caplog.text


def test_the_history_of_a_long_backlog_makes_only_the_records_it_shows(tmp_path, monkeypatch, short_busy):
    """With 100,000 records waiting in a fault, records(limit=50) (%tasks --history,
    qmagic.history()) took 0.9-1.6 s (measured on 2 vCPUs): each call folded every
    waiting line again and made the record of every waiting task.  Now the fold is kept and
    extended, and records are made newest first until the limit is met."""
    import qmagic.store.journal as journal_module
    import qmagic.store.reader as reader_module

    made, folded = [0], [0]
    real_record, real_fold = reader_module.record_from_row, journal_module.rows_from_lines

    def record_from_row(*args):
        made[0] += 1
        return real_record(*args)

    def rows_from_lines(data, *args):
        folded[0] += data.count(b"\n")
        return real_fold(data, *args)

    with Journal(tmp_path, ENV) as j:
        run_task(j, "stored")
        assert j.flush()
        holder = sqlite3.connect(database_path(tmp_path, ENV), isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")  # (a fault: everything logged now waits)
        try:
            for i in range(2000):
                run_task(j, f"w-{i:04d}", "failed" if i % 100 == 0 else "completed",
                         submitted_at=1000.0 + i)
            eventually(lambda: not j.health()["ok"], 30.0, "the writer to see the fault")
            everything = j.records()
            monkeypatch.setattr(reader_module, "record_from_row", record_from_row)
            for name in ("rows_from_lines",):  # (the fold, wherever the journal's reads do it)
                for module in (journal_module, sys.modules.get("qmagic.store.pending")):
                    if module is not None and hasattr(module, name):
                        monkeypatch.setattr(module, name, rows_from_lines)
            for filters in ({"limit": 5}, {"limit": 3, "status": "failed"}, {"limit": 2, "uid": "w-00"}):
                made[0] = folded[0] = 0
                expected = [r["uid"] for r in everything if Filters(**filters).match(r, time.time())]
                assert [r["uid"] for r in j.records(**filters)] == expected[: filters["limit"]]
                assert made[0] <= 2 * filters["limit"] and folded[0] == 0, (filters, made, folded)
            run_task(j, "w-late", submitted_at=time.time() + 60)  # (appended: only that is folded)
            assert [r["uid"] for r in j.records(limit=2)] == ["w-late", "stored"] and folded[0] == 3
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert j.flush(30)
        assert j._fold._rows, "kept during the fault"
        eventually(lambda: j.health()["ok"], 30.0, "the fault to end")
        assert [r["uid"] for r in j.records(limit=3)] == ["w-late", "stored", "w-1999"]
        assert not j._fold._rows, "the fold of a stored backlog was kept (its memory)"
        run_task(j, "w-after", submitted_at=time.time() + 120)  # (outside a fault: folded, not kept)
        assert j.records(limit=1)[0]["uid"] == "w-after" and not j._fold._rows
        j._fold.fold([b"x"])
    assert not j._fold._rows and not j._fold._seen  # (close forgets it)


def test_retention_runs_while_a_long_backlog_is_stored(tmp_path, monkeypatch):
    """The writer stored a backlog (a fault's, or a flood faster than it) in one loop of
    commits: retention waited until it caught up, which a flood never lets it (a kernel with
    journal_max_bytes=1 MB grew its log to 290 MB under 5 KB results; hostile test).  It now
    commits a slice at a time: old tasks leave while the backlog is still being stored."""
    from qmagic.store import writer as writer_module

    monkeypatch.setattr(writer_module, "COMMIT_SLICE_S", 0.02)
    old = time.time() - 60 * 86400
    with Journal(tmp_path, ENV, max_age_s=1e9) as j:  # (this log keeps them)
        for i in range(100):
            j.finished(task(f"old-{i}", "completed", submitted_at=old, started_at=old, finished_at=old))
    path = database_path(tmp_path, ENV)
    holder = sqlite3.connect(path, isolation_level=None)  # another process holding the database
    holder.execute("BEGIN EXCLUSIVE")
    j = Journal(tmp_path, ENV, max_age_s=30 * 86400)
    try:
        for i in range(40_000):
            run_task(j, f"new-{i}", result="z" * 200)
        assert j.health()["pending"] >= 80_000
        holder.execute("ROLLBACK")
        holder.close()

        def old_left() -> int:
            return db_rows(tmp_path, "SELECT count(*) FROM tasks WHERE uid LIKE 'old-%'")[0][0]
        deadline, gone_while_storing = time.monotonic() + 60, None
        while gone_while_storing is None:
            assert time.monotonic() < deadline, "timed out"
            if old_left() == 0:  # (then the backlog: still waiting, or stored before)
                gone_while_storing = j.health()["pending"] > 0
            else:
                j.flush(0.01)
        assert gone_while_storing, "retention waited until the whole backlog was stored"
        assert j.flush(60)
        assert db_rows(tmp_path, "SELECT count(*) FROM tasks")[0][0] == 40_000
    finally:
        j.close()


def test_a_clock_that_jumped_deletes_nothing_by_age(tmp_path, monkeypatch, retention_at_once):
    """A system clock set a month ahead for a few seconds made age retention delete the
    whole log (found by a hostile test).  A wall clock that runs ahead of the elapsed time
    lengthens the age limit by as much (one warning): nothing is deleted early, and age
    retention goes on after a real correction, late by at most its size (it stopped for the
    rest of the kernel's life before)."""
    from qmagic.store.records import JournalWarning

    now = time.time()
    with Journal(tmp_path, ENV, max_age_s=3600) as j:
        wall, elapsed = j._writer._clock_start
        j._writer._clock_start = (wall - 40 * 86400, elapsed)  # the clock now reads 40 days ahead
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", JournalWarning)
            for i in range(50):
                old = now - 7200 - i * 86400  # 2 h to 51 days old by the wall clock
                j.finished(task(f"old-{i}", "completed", submitted_at=old, started_at=old, finished_at=old + 1))
            wait_for(lambda: any("the system clock moved 960.0 h ahead" in str(w.message) for w in caught), j)
            assert j.flush()
            wait_for(lambda: len(j.records()) == 40, j)  # older than 40 days and 1 h: gone
        assert {r["uid"] for r in j.records()} == {f"old-{i}" for i in range(40)}
        # a real correction of 1.5 h: age counts by the elapsed time, and retention goes on
        j._writer._clock_start = (wall - 5400, elapsed)
        wait_for(lambda: {r["uid"] for r in j.records()} == {"old-0"}, j)  # (2 h old by the clock)
        j._writer._clock_start = (wall, elapsed)  # the clock is right again
        wait_for(lambda: len(j.records()) == 0, j)


def test_retention_reads_the_wall_clock_once_per_pass(tmp_path, monkeypatch, retention_at_once):
    """The age limit (lengthened by how far the wall clock ran ahead) and the deletion's
    cutoff came from two readings of the clock: a jump between them deleted records early,
    a task 10 days old with a limit of 30 (found by a hostile test).  Here every reading
    of the wall clock is 25 days ahead of the one before; one reading serves both, so
    nothing under 30 days old goes."""
    from qmagic.store import writer as writer_module

    jumps = itertools.count()

    class JumpingClock:
        def __getattr__(self, name):
            return getattr(time, name)

        @staticmethod
        def time():
            return time.time() + 25 * 86400 * next(jumps)

    passes = []
    real_retention = writer_module.retention

    def counted(*args, **kwargs):
        passes.append(1)
        return real_retention(*args, **kwargs)

    monkeypatch.setattr(writer_module, "retention", counted)
    from qmagic.store import database as database_module

    clock = JumpingClock()
    monkeypatch.setattr(writer_module, "time", clock)
    monkeypatch.setattr(database_module, "time", clock)
    old = time.time() - 10 * 86400
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the clock moved ahead: warned once)
        with Journal(tmp_path, ENV, max_age_s=30 * 86400) as j:
            for i in range(20):
                j.finished(task(f"old-{i}", "completed", submitted_at=old, started_at=old, finished_at=old))
            assert j.flush()
            wait_for(lambda: len(passes) >= 5, j)
            assert len(j.records()) == 20


def test_a_log_just_over_its_size_loses_only_about_the_excess(tmp_path, monkeypatch, retention_at_once):
    """Size retention deleted up to a whole batch (500 tasks) whatever the excess: a log
    10 % over its size lost all of its 400 tasks (found by a hostile test)."""

    old, big = time.time() - 600, "z" * 20_000
    with Journal(tmp_path, ENV) as j:
        for i in range(400):
            j.finished(task(f"t-{i:03d}", "completed", result=big, submitted_at=old + i))
        assert j.flush()
    conn = sqlite3.connect(database_path(tmp_path, ENV))
    used = conn.execute("PRAGMA page_count").fetchone()[0] * conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    with Journal(tmp_path, ENV, max_bytes=int(used * 0.9)) as j:
        wait_for(lambda: j.flush(0.1) and len(j.records()) < 400, j)
        kept = [r["uid"] for r in j.records()]
        assert 330 <= len(kept) < 400 and "t-399" in kept and "t-000" not in kept, len(kept)


# ---- the journal of qmagic 0.1 ------------------------------------------------------------------------
def proc_start(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[19])


def legacy_line(event: str, rec: dict, writer: dict, t: float) -> str:
    import json

    return json.dumps({"v": 1, "event": event, "time": t, "writer": writer, "task": rec}) + "\n"


def test_the_earlier_jsonl_journal_is_imported_once_with_its_orphan_rule(tmp_path):
    host = socket.gethostname()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        dead = {"host": host, "pid": gone.pid, "boot": None, "start": None, "session": "d" * 32}
        alive = {"host": host, "pid": sleeper.pid, "boot": None, "start": proc_start(sleeper.pid),
                 "session": "a" * 32}
        t = time.time() - 100
        (tmp_path / f"{ENV}.journal.1.jsonl").write_text(
            legacy_line("queued", task("old-done"), dead, t)
            + legacy_line("start", task("old-done", "running"), dead, t + 1)
            + legacy_line("end", task("old-done", "completed", result=42), dead, t + 2))
        (tmp_path / f"{ENV}.journal.jsonl").write_text(
            '{"v":1,"event":"carry","time":1,"writer":{},"carried":0,"previous":"x"}\n'
            + legacy_line("start", task("old-orphan", "running", submitted_at=t + 3, started_at=t + 3), dead, t + 3)
            + legacy_line("start", task("old-alive", "running"), alive, t + 4)
            + "{not json\n"
            + legacy_line("end", task("old-odd", "failed", name="bad\udcff", error="E"), dead, t + 5))
        with Journal(tmp_path, ENV) as j:
            recs = {r["uid"]: r for r in j.records()}
            assert set(recs) == {"old-done", "old-orphan", "old-alive", "old-odd"}
            assert recs["old-done"]["status"] == "completed" and recs["old-done"]["result"] == 42
            orphan = recs["old-orphan"]
            assert orphan["status"] == "failed" and orphan["error"] == ORPHAN_REASON
            assert orphan["journal"]["orphaned"] is True and orphan["finished_at"] == t + 5
            assert recs["old-alive"]["status"] == "running"  # its writer may still end it
            assert recs["old-odd"]["name"] == "bad\\udcff"
        assert sorted(p.name for p in tmp_path.glob(f"{ENV}.journal.*jsonl*")) == [
            f"{ENV}.journal.1.jsonl.imported", f"{ENV}.journal.jsonl.imported"]
        sleeper.kill()
        sleeper.wait(30)
        with Journal(tmp_path, ENV) as j:  # opened again: not imported twice; the writer is gone now
            assert len(j.records()) == 4
            assert j.get("old-alive")["status"] == "failed"
            assert j.get("old-alive")["error"] == ORPHAN_REASON
    finally:
        sleeper.kill()
        sleeper.wait(30)


def test_the_earlier_journal_read_by_kernels_opening_at_once_is_imported_once(tmp_path, caplog):
    """Kernels that open the log at the same moment all read the old files before the first one
    renames them; the ones that write after it find them imported (the same files: a hard link
    stands for the name not yet renamed) and only rename them."""
    caplog.set_level(logging.INFO, logger="qmagic.store.legacy")
    dead = {"host": "elsewhere", "pid": 1, "boot": None, "start": None, "session": "d" * 32}
    old = tmp_path / f"{ENV}.journal.jsonl"
    old.write_text(legacy_line("end", task("old-done", "completed", result=42), dead, time.time() - 100))
    first, second = (connect(database_path(tmp_path, ENV), create=True) for _ in range(2))
    try:
        ensure_schema(first)
        assert import_legacy(first, tmp_path, ENV, time.time()) == 1
        os.link(tmp_path / f"{ENV}.journal.jsonl.imported", old)  # (as the second one read it)
        assert import_legacy(second, tmp_path, ENV, time.time()) == 0
        assert len([r for r in caplog.records if "imported" in r.getMessage()]) == 1
        assert sorted(p.name for p in tmp_path.glob(f"{ENV}.journal.*jsonl*")) == [
            f"{ENV}.journal.jsonl.imported", f"{ENV}.journal.jsonl.imported.2"]
        old.write_text(legacy_line("end", task("new-done", "completed"), dead, time.time()))
        assert import_legacy(second, tmp_path, ENV, time.time()) == 1  # another file: imported
        assert second.execute("SELECT count(*) FROM tasks").fetchone()[0] == 2
    finally:
        first.close()
        second.close()


# ---- files ----------------------------------------------------------------------------------------------
def test_symlinked_database_is_refused_never_followed(tmp_path, caplog, short_close):
    caplog.set_level(logging.WARNING, logger=LOG)
    target = tmp_path / "elsewhere.db"
    target.write_bytes(b"precious")
    os.symlink(target, database_path(tmp_path, ENV))
    with Journal(tmp_path, ENV) as j:
        run_task(j, "a")
        assert j.get("a")["status"] == "completed"  # still kept (in the spool)
        assert not j.flush(0.5)
        assert "symbolic link" in j.health()["last_error"]
        with pytest.raises(StateFileError, match="symbolic link"):
            j.records()
    assert target.read_bytes() == b"precious"
    assert any("symbolic link" in m for m in fault_warnings(caplog))
    os.unlink(database_path(tmp_path, ENV))
    os.symlink(target, f"{database_path(tmp_path, ENV)}-wal")  # the -wal file SQLite would open
    with Journal(tmp_path, ENV) as j:  # (and the spool the last one left is stored ... not yet)
        assert not j.flush(0.5) and "symbolic link" in j.health()["last_error"]
    assert target.read_bytes() == b"precious"


@pytest.mark.parametrize("clock", ["right", "jumped"])
def test_a_recovery_racing_a_new_session_does_not_take_its_lock_for_a_dead_ones(tmp_path, monkeypatch, caplog, clock):
    """Two kernels start at once: the first one's recovery saw the second's lock file while
    it was still a temporary file not yet locked, took it for a session that died before
    renaming it, and deleted it; the second's log then started in a fault ("could not write
    the experiment log's spool ... check disk space") until its writer retried.  A recovery
    now leaves a temporary lock file younger than a minute alone; and should it take one
    anyway (a clock that jumped makes the file look old), the new session makes its lock
    file again."""
    from qmagic.store.database import connect, ensure_schema
    from qmagic.store.recovery import recover

    caplog.set_level(logging.WARNING, logger=LOG)
    conn = connect(database_path(tmp_path, ENV), create=True)
    ensure_schema(conn)
    real_flock, raced, attempts = segments_module.fcntl.flock, [], []

    def flock(fd, op):
        if not raced:  # the other kernel's recovery runs between the file's creation and its lock
            raced.append(True)  # (its own flock calls come here too)
            [tmp] = tmp_path.glob(".*.lock.tmp")
            if clock == "jumped":
                os.utime(tmp, (time.time() - 3600, time.time() - 3600))
            recover(conn, tmp_path, ENV, None, time.time())
            attempts.append(tmp.exists())  # (left alone, or taken)
        return real_flock(fd, op)

    monkeypatch.setattr(segments_module.fcntl, "flock", flock)
    try:
        with Journal(tmp_path, ENV) as j:
            assert raced and not list(tmp_path.glob(".*.tmp"))
            assert attempts == [clock == "right"]
            assert (tmp_path / f"{ENV}.journal.{j.session}.lock").exists()
            run_task(j, "a")
            assert j.health()["ok"] and j.flush() and j.get("a")["status"] == "completed"
    finally:
        conn.close()
    assert fault_warnings(caplog) == []


def test_a_dead_sessions_temporary_lock_file_is_removed_once_old(tmp_path):
    """A session that died between making its lock file and renaming it left a temporary
    file; recovery removes it once it is over a minute old, not before."""
    from qmagic.store.database import connect, ensure_schema
    from qmagic.store.recovery import STALE_TMP_S, recover

    conn = connect(database_path(tmp_path, ENV), create=True)
    ensure_schema(conn)
    tmp = tmp_path / f".{ENV}.journal.{uuid.uuid4().hex}.lock.tmp"
    tmp.write_bytes(b"")
    try:
        recover(conn, tmp_path, ENV, None, time.time())
        assert tmp.exists()  # young: maybe a session starting now
        recover(conn, tmp_path, ENV, None, time.time() + STALE_TMP_S + 1)
        assert not tmp.exists()
    finally:
        conn.close()


def test_odd_files_of_dead_sessions_do_not_hang_or_redirect(tmp_path):
    from qmagic.store.history import history

    with Journal(tmp_path, ENV) as j:
        run_task(j, "ok")
    os.mkfifo(tmp_path / f"{ENV}.journal.{'f' * 32}.0.spool")  # would block a plain open()
    os.symlink("/etc/passwd", tmp_path / f"{ENV}.journal.{'e' * 32}.lock")
    with pytest.warns(JournalWarning) as caught:
        assert [r["uid"] for r in history(state_dir=tmp_path, environment_name=ENV)] == ["ok"]
    text = " ".join(str(w.message) for w in caught)
    assert "not a regular file" in text and "symbolic link" in text
    assert Path("/etc/passwd").exists() and os.path.islink(tmp_path / f"{ENV}.journal.{'e' * 32}.lock")
    with Journal(tmp_path, ENV) as j:  # a kernel's writer thread skips them too
        run_task(j, "later")
        assert j.flush() and len(j.records()) == 2


def test_fifty_open_close_cycles_leave_no_descriptor_thread_or_file(tmp_path):
    import gc

    with Journal(tmp_path, ENV) as j:  # (first use: imports, SQLite's own setup)
        run_task(j, "warm")
    gc.collect()
    fds, threads = sorted(os.listdir("/proc/self/fd")), threading.active_count()
    for i in range(50):
        j = Journal(tmp_path, ENV)
        run_task(j, f"t{i}")
        assert j.get(f"t{i}")["status"] == "completed"
        if i % 2:
            assert j.flush()
        j.close()
        j.close()  # (twice is harmless)
    gc.collect()
    assert sorted(os.listdir("/proc/self/fd")) == fds and threading.active_count() == threads
    assert [p.name for p in tmp_path.iterdir()] == [f"{ENV}.journal.sqlite3"]
    with Journal(tmp_path, ENV) as j:
        assert len(j.records()) == 51


def test_a_forked_child_cannot_write_its_parents_log(journal):
    run_task(journal, "parent-1")
    pid = os.fork()
    if pid == 0:  # the child: its calls are dropped, the parent's files untouched
        code = 1
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                run_task(journal, "child-1")
                code = 0 if journal.health()["dropped"] == 3 else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 30
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert done[0] == pid and os.waitstatus_to_exitcode(done[1]) == 0
    run_task(journal, "parent-2")
    assert journal.flush()
    assert {r["uid"] for r in journal.records()} == {"parent-1", "parent-2"}


def test_a_forked_child_does_not_keep_a_killed_parents_session_alive(tmp_path):
    """The session's flock belongs to the open file description the forked child inherited:
    the child closes its copy (the parent keeps its lock), so once the parent is SIGKILLed its
    running task reads as failed at once, even while the child lives on."""
    proc = child(tmp_path, """
        j.submitted({"uid": "r1", "name": "measure", "status": "running", "submitted_at": time.time()})
        j.flush()
        if os.fork() == 0:  # (after-fork handlers have run once fork returns here)
            os.write(1, f"child {os.getpid()}\\n".encode())  # (one write: lines never interleave)
            sys.stdin.readline()  # lives until the test closes stdin
            os._exit(0)
        j.submitted({"uid": "r2", "name": "measure", "status": "running", "submitted_at": time.time()})
        j.flush()
        os.write(1, b"ready\\n")
        import threading
        threading.Event().wait()
    """)
    forked = None
    try:
        first, second = proc.stdout.readline().split(), proc.stdout.readline().split()
        said = {line[0]: line[1:] for line in (first, second) if line}
        assert set(said) == {"child", "ready"}, said
        forked = int(said["child"][0])
        with Journal(tmp_path, ENV) as j:  # the parent lives: its session is alive, its tasks run
            assert j.statuses(["r1", "r2"]) == {"r1": "running", "r2": "running"}
        proc.kill()
        proc.wait(30)
        os.kill(forked, 0)  # the forked child still lives
        with Journal(tmp_path, ENV) as j:
            assert j.statuses(["r1", "r2"]) == {"r1": "failed", "r2": "failed"}
            assert j.get("r1")["error"] == ORPHAN_REASON
    finally:
        proc.kill()
        proc.wait(30)
        proc.stdin.close()
        proc.stdout.close()
        if forked is not None:
            try:
                os.kill(forked, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_database_of_a_newer_qmagic_is_not_written(tmp_path, caplog, short_close):
    caplog.set_level(logging.WARNING, logger=LOG)
    with Journal(tmp_path, ENV) as j:
        run_task(j, "mine")
    conn = sqlite3.connect(database_path(tmp_path, ENV))
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with Journal(tmp_path, ENV) as j:
        run_task(j, "later")
        assert not j.flush(0.5) and "newer qmagic" in j.health()["last_error"]
        assert j.get("mine")["status"] == "completed"  # still read
    assert db_rows(tmp_path, "SELECT uid FROM tasks") == [("mine",)]
    warnings_ = [m for m in fault_warnings(caplog) if "newer qmagic" in m]
    assert warnings_ and all("upgrade qmagic to write to it" in m and "disk full?" not in m
                             for m in warnings_), warnings_  # (its cause, no guesses)


def test_two_processes_write_at_once(tmp_path):
    body = """
        for i in range(500):
            uid = "%s-" + str(i)
            j.submitted({"uid": uid, "name": "f", "status": "queued", "submitted_at": time.time()})
            j.finished({"uid": uid, "name": "f", "status": "completed", "finished_at": time.time()})
        j.close()
        print("done", flush=True)
    """
    procs = [child(tmp_path, body % name) for name in ("a", "b")]
    with Journal(tmp_path, ENV) as j:
        for i in range(500):
            j.finished(task(f"c-{i}", "completed"))
        for proc in procs:
            assert proc.communicate(timeout=120)[0].strip() == "done" and proc.returncode == 0
        assert j.flush()
        assert len(j.records()) == 1500
    assert db_rows(tmp_path, "SELECT state, count(*) FROM sessions GROUP BY state") == [("closed", 3)]


def test_spool_and_lock_files_deleted_by_hand_are_made_again(journal, tmp_path):
    run_task(journal, "before")
    for path in [*tmp_path.glob("*.spool"), *tmp_path.glob("*.lock")]:
        path.unlink()
    run_task(journal, "during")  # (into the deleted file: the writer still reads it)
    assert journal.flush()
    run_task(journal, "after")
    assert journal.flush()
    assert list(tmp_path.glob("*.spool")) and list(tmp_path.glob(f"*{journal.session}.lock"))
    assert {r["uid"] for r in journal.records()} == {"before", "during", "after"}
    assert journal.health()["ok"]


def test_what_deleted_spool_files_held_is_stored_at_once_with_a_warning(tmp_path, caplog, monkeypatch):
    """Spool files deleted by hand during a burst: what was written into them survives no
    crash, so the writer stores it at its next look instead of at the burst's end (a SIGKILL
    0.2-0.4 s later lost 1,000-2,000 handed-out uids), and says so once (found by a hostile
    test)."""
    from qmagic.store import writer as writer_module

    caplog.set_level(logging.INFO, logger=LOG)
    monkeypatch.setattr(writer_module, "MAX_DELAY_S", 60.0)  # (a burst that never pauses)
    monkeypatch.setattr(writer_module, "QUIET_S", 60.0)
    with Journal(tmp_path, ENV) as j:
        assert j.flush()
        for i in range(50):
            run_task(j, f"before-{i}")
        for path in [*tmp_path.glob("*.spool"), *tmp_path.glob("*.lock")]:
            path.unlink()
        j._writer.wake.set()

        def stored() -> bool:
            return db_rows(tmp_path, "SELECT count(*) FROM tasks WHERE uid LIKE 'before-%'")[0][0] == 50
        eventually(stored, 10.0, "the deleted segment's records in the database")
        warnings_ = [r.getMessage() for r in caplog.records if "spool files" in r.getMessage()]
        assert len(warnings_) == 1 and "were deleted" in warnings_[0]


def test_a_database_deleted_by_hand_is_started_again_and_said_so(journal, tmp_path, caplog):
    """Someone deletes the log while a kernel writes it: what is stored from then on goes to a
    new database (not into the deleted file, lost with it), with one warning; another
    process, and this one's reads, see it (found by the hostile tester)."""
    run_task(journal, "before")
    assert journal.flush() and journal.get("before") is not None
    for suffix in ("", "-wal", "-shm"):
        Path(f"{journal.path}{suffix}").unlink(missing_ok=True)
    with caplog.at_level("WARNING", logger="qmagic.store.journal"):
        run_task(journal, "after")
        assert journal.flush()
    assert caplog.text.count("was deleted or replaced while this kernel ran") == 1
    assert journal.get("after")["status"] == "completed" and journal.get("before") is None
    assert db_rows(tmp_path, "SELECT uid, status FROM tasks") == [("after", "completed")]
    assert journal.health()["ok"]


def test_a_database_replaced_by_hand_never_gets_the_old_ones_wal(journal, tmp_path, caplog):
    """Someone moves the log aside (``mv``) and puts another database in its place (an older
    backup, a file of another tool) while a kernel writes it: the old file keeps what was
    stored in it, and the new one never gets the old file's WAL applied to it (SQLite
    would, through the ``-wal``/``-shm`` of the same name: the backup got records it never
    had, and a file that was not the old one's read as damaged and was moved aside with
    every record stored since — found by the hostile tester in a live kernel)."""
    for i in range(10):
        run_task(journal, f"early{i}")
    assert journal.flush()
    path = Path(journal.path)
    backup = tmp_path / "backup.sqlite3"
    src, dst = sqlite3.connect(path), sqlite3.connect(backup)
    try:
        src.backup(dst)
    finally:
        src.close(), dst.close()
    for i in range(30):
        run_task(journal, f"before{i}")
    assert journal.flush() and journal.get("before29") is not None
    journal.records()  # (the reader holds the old file open too, as a kernel's lookups do)
    os.rename(path, tmp_path / "moved.sqlite3")
    os.rename(backup, path)
    early, before, after = ({f"{kind}{i}" for i in range(n)} for kind, n in (("early", 10), ("before", 30), ("after", 5)))
    assert {r["uid"] for r in journal.records()} == early  # (read before the writer notices)
    with caplog.at_level("WARNING", logger="qmagic.store.journal"):
        for i in range(5):
            run_task(journal, f"after{i}")
        assert journal.flush()
    assert caplog.text.count("was deleted or replaced while this kernel ran") == 1
    assert "damaged" not in caplog.text
    assert {r["uid"] for r in journal.records()} == early | after
    assert db_rows(tmp_path, "PRAGMA integrity_check") == [("ok",)]
    moved = sqlite3.connect(tmp_path / "moved.sqlite3")  # (alone: its -wal did not move with it)
    try:
        assert {uid for (uid,) in moved.execute("SELECT uid FROM tasks")} == early | before
    finally:
        moved.close()

    # a file that is no database at all: moved aside as damaged, and what is stored from
    # then on stays in the log
    os.rename(path, tmp_path / "moved-2.sqlite3")
    (tmp_path / "junk").write_bytes(b"junk" * 1000)
    os.rename(tmp_path / "junk", path)
    for i in range(5):
        run_task(journal, f"later{i}")
    assert journal.flush()
    later = {f"later{i}" for i in range(5)}
    assert {r["uid"] for r in journal.records()} == later
    assert {uid for (uid,) in db_rows(tmp_path, "SELECT uid FROM tasks")} == later
    assert journal.health()["ok"]


def test_fsync_option(tmp_path):
    with Journal(tmp_path, ENV, fsync=True) as j:
        run_task(j, "durable")
        assert j.get("durable")["status"] == "completed" and j.flush()
        assert db_rows(tmp_path, "PRAGMA user_version") == [(1,)]
    with Journal(tmp_path, ENV) as j:
        assert j.get("durable")["status"] == "completed"


# ---- files changed under a running kernel (issue 14) -----------------------------------------------
TRUNCATE = """
import threading
stop = threading.Event()
written = []
def writer_loop():
    i = 0
    while not stop.is_set():
        uid = f"t-{i}"
        j.submitted({"uid": uid, "name": "scan", "status": "queued", "submitted_at": time.time()})
        j.finished({"uid": uid, "name": "scan", "status": "completed", "submitted_at": time.time(),
                    "started_at": time.time(), "finished_at": time.time()})
        written.append(uid)
        i += 1
t = threading.Thread(target=writer_loop)
t.start()
folder = sys.argv[1]
deadline = time.monotonic() + 1.0
cuts = 0
while time.monotonic() < deadline:  # another process truncating every spool file, again and again
    for name in os.listdir(folder):
        if name.endswith(".spool"):
            try:
                os.truncate(os.path.join(folder, name), 0)
                cuts += 1
            except OSError:
                pass
stop.set()
t.join()
j.submitted({"uid": "after", "name": "scan", "status": "queued", "submitted_at": time.time()})
seen = j.get("after") is not None
j.close()
with Journal(folder, j.environment_name) as k:  # (a new session: reads the database)
    stored = k.get("after") is not None
print("alive", cuts > 0, len(written) > 10, seen, stored, flush=True)
"""


def test_lines_written_after_the_spool_was_cut_are_seen_and_stored(tmp_path):
    """Another process truncates the live spool segment after the writer stored part of
    it: the lines written afterwards are seen at once and stored, none is lost."""
    with Journal(tmp_path, ENV) as j:
        for i in range(200):
            run_task(j, f"before-{i}")
        assert j.flush()
        (segment,) = tmp_path.glob("*.spool")
        os.truncate(segment, 0)  # (to 0 the way `: > file` does; the file is then smaller
        for i in range(3):       # than what the writer had stored from it)
            run_task(j, f"after-{i}")
        assert [j.get(f"after-{i}")["status"] for i in range(3)] == ["completed"] * 3
        assert j.flush() and j.health()["pending"] == 0
        run_task(j, "later")  # counting goes on from the cut file's size
        assert j.flush() and j.health()["pending"] == 0
    with Journal(tmp_path, ENV) as j:
        found = j.statuses([f"before-{i}" for i in range(200)] + [f"after-{i}" for i in range(3)] + ["later"])
        assert set(found.values()) == {"completed"}, {u: s for u, s in found.items() if s != "completed"}


def test_a_spool_cut_after_it_was_counted_and_indexed_is_counted_and_indexed_again(tmp_path, monkeypatch):
    """The pending count and the lookup index go on from where they last read a segment.
    Cut by another process, then written past that point again once the writer stored
    what was left, the segment is read again from its start: no lookup misses a task, no
    count is off."""
    from qmagic.store import writer as writer_module

    monkeypatch.setattr(writer_module, "QUIET_S", 600.0)  # the writer stores on flush() only
    monkeypatch.setattr(writer_module, "MAX_DELAY_S", 600.0)
    with Journal(tmp_path, ENV) as j:
        for i in range(100):
            run_task(j, f"before-{i}")
        assert j.get("before-5")["status"] == "completed" and j.health()["pending"] == 300
        assert j.flush()
        (segment,) = tmp_path.glob("*.spool")
        os.truncate(segment, 0)
        run_task(j, "after-cut")
        assert j.flush()  # (the writer finds the cut)
        for i in range(300):  # (past where the count and the index had read to)
            run_task(j, f"later-{i}")
        assert j.health()["pending"] == 900
        assert [j.get(f"later-{i}")["status"] for i in (0, 150, 299)] == ["completed"] * 3
        assert j._spool.lines_of({b"later-0"})  # (found waiting in the spool, not in the database)
        assert j.flush() and j.health()["pending"] == 0
        assert j.statuses(["after-cut", "later-0"]) == {"after-cut": "completed", "later-0": "completed"}


def test_lines_written_after_a_cut_are_counted_before_the_writer_stores_them(tmp_path, monkeypatch):
    """Another process cuts the spool after the writer stored it; until the writer stores
    again (a database fault: not for hours) what was written since waits and is counted.
    The count subtracted the lines stored from the file before the cut: 0 pending."""
    from qmagic.store import writer as writer_module

    monkeypatch.setattr(writer_module, "QUIET_S", 600.0)  # the writer stores on flush() only
    monkeypatch.setattr(writer_module, "MAX_DELAY_S", 600.0)
    with Journal(tmp_path, ENV) as j:
        for i in range(100):
            run_task(j, f"before-{i}")
        assert j.flush() and j.health()["pending"] == 0
        (segment,) = tmp_path.glob("*.spool")
        os.truncate(segment, 0)
        for i in range(2):
            run_task(j, f"after-{i}")
        assert j.health()["pending"] == 6
        assert j.get("after-1")["status"] == "completed"
        assert j.flush() and j.health()["pending"] == 0


def test_truncating_the_spool_under_a_writing_process_never_crashes_it(tmp_path):
    proc = child(tmp_path, TRUNCATE)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, f"the writing process died (exit code {proc.returncode})"
    assert out.strip().splitlines()[-1] == "alive True True True True"


def test_every_write_transaction_rolls_back_on_any_error(tmp_path):
    """One helper holds the transaction rule (a heartbeat without it once left the writer's
    connection inside a transaction after an error, and the next commit failed too)."""
    from qmagic.store.database import transaction

    conn = sqlite3.connect(tmp_path / "t.sqlite3", isolation_level=None)
    conn.execute("CREATE TABLE t (x)")
    for exc in (sqlite3.OperationalError("disk I/O error"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with transaction(conn):
                conn.execute("INSERT INTO t VALUES (1)")
                raise exc
        assert not conn.in_transaction
    with transaction(conn):
        conn.execute("INSERT INTO t VALUES (2)")
    assert conn.execute("SELECT x FROM t").fetchall() == [(2,)] and not conn.in_transaction
    conn.close()


def test_the_frequent_look_for_dead_kernels_writes_nothing_for_an_imported_journals_writers(tmp_path):
    """Looks for dead kernels run every 3 s; checking the writers of an imported old journal
    takes a write transaction each time (a reviewer counted 10 in 10 looks), so the writer
    asks for it only at the heartbeat's pace (legacy=True)."""
    from qmagic.store.database import upsert_session
    from qmagic.store.recovery import recover

    conn = connect(database_path(tmp_path, ENV), create=True)
    try:
        ensure_schema(conn)
        upsert_session(conn, "legacy-old", host="elsewhere", pid=1, last_seen=time.time(), state="legacy")
        statements: list[str] = []
        conn.set_trace_callback(statements.append)
        recover(conn, tmp_path, ENV, "mine", time.time(), legacy=False)
        assert not any(s.startswith("BEGIN") for s in statements), statements
        recover(conn, tmp_path, ENV, "mine", time.time())
        assert any(s.startswith("BEGIN") for s in statements), statements  # (at the heartbeat)
    finally:
        conn.close()


def test_the_heartbeat_beats_often_only_while_a_task_of_the_session_is_unfinished(tmp_path, monkeypatch):
    """A killed kernel's unfinished task ends at the session's last sign of life; with a
    heartbeat once a minute, a scan killed after 30 s read "≥ 0.1 s".  While a task of the
    session is unfinished the heartbeat beats every BUSY_HEARTBEAT_S (here 0.2 s); with none
    it keeps its minute (an idle kernel writes nothing)."""
    from qmagic.store import writer as writer_module

    monkeypatch.setattr(writer_module, "BUSY_HEARTBEAT_S", 0.2)
    with Journal(tmp_path, "env") as j:
        db = sqlite3.connect(database_path(tmp_path, "env"))
        try:
            def last_seen() -> float:
                return db.execute("SELECT last_seen FROM sessions WHERE session = ?", (j.session,)).fetchone()[0]

            j.submitted(task("scan", "queued"))
            j.started("scan", time.time())
            assert j.flush(10)
            first = last_seen()
            eventually(lambda: last_seen() > first + 0.5, 10, "heartbeats while the scan runs")
            j.finished(task("scan", "completed", started_at=time.time() - 1, finished_at=time.time()))
            assert j.flush(10)
            idle = last_seen()  # (flush() returned after the step that stored the end)
            for _ in range(3):  # three busy checks later: no heartbeat
                checked = j._writer._next_busy
                eventually(lambda c=checked: j._writer._next_busy > c, 10, "a busy check")
            assert last_seen() == idle
        finally:
            db.close()
