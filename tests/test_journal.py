"""Tests of qmagic.journal: the persistent task journal (experiment log)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from datetime import datetime
from pathlib import Path

import pytest

from qmagic.errors import StateFileError
from qmagic.journal import (
    ORPHAN_REASON,
    SUMMARY_KEY,
    Journal,
    JournalWarning,
    history,
    history_dataframe,
    history_main,
    parse_time,
)
from qmagic.store.paths import default_state_dir, validate_environment_name

# an unexpected skipped line or write failure fails the test
pytestmark = pytest.mark.filterwarnings("error::qmagic.journal.JournalWarning")

REPO = Path(__file__).resolve().parents[1]
ENV = "bench-1"


def task(uid: str, status: str = "running", **fields) -> dict:
    """A record shaped like the worker's Task.to_dict()."""
    now = time.time()
    base = {"uid": uid, "name": "measure", "kind": "function", "args": [1], "kwargs": {"n": 2},
            "user": "alice", "user_group": "primary", "background": True, "origin": "magic",
            "status": status, "submitted_at": now, "started_at": now, "finished_at": None,
            "progress": None, "result": None, "error": None, "traceback": None}
    if status in ("completed", "failed", "cancelled"):
        base["finished_at"] = now + 0.001
    base.update(fields)
    return base


def run_task(journal: Journal, uid: str, status: str = "completed", **fields) -> None:
    journal.append("start", task(uid, **{k: v for k, v in fields.items() if k in ("name", "user")}))
    journal.append("end", task(uid, status, **fields))


def lines_of(*paths: Path, carry: bool = False) -> list[dict]:
    """The parsed lines of journal files (without the header lines of rotated files)."""
    lines = [json.loads(line) for p in paths for line in p.read_bytes().splitlines()]
    return [line for line in lines if carry or line["event"] != "carry"]


def journal_files(state_dir: Path) -> list[Path]:
    return sorted(state_dir.glob(f"{ENV}.journal*.jsonl"))


@pytest.fixture(autouse=True, params=["orjson", "json"])
def encoder(request, monkeypatch):
    """Every test runs with the optional orjson fast path and with the json module alone."""
    if request.param == "orjson":
        pytest.importorskip("orjson")
    else:
        monkeypatch.setattr("qmagic.journal._orjson", None)
    return request.param


@pytest.fixture
def journal(tmp_path):
    with Journal(tmp_path, ENV) as j:
        yield j


def start_writer(state_dir: Path, body: str, *args: str) -> subprocess.Popen:
    """A Python process that runs ``body`` with ``j`` = Journal(state_dir, ENV)."""
    code = ("import sys, time\nfrom qmagic.journal import Journal\n"
            f"j = Journal(sys.argv[1], {ENV!r}, **eval(sys.argv[2]))\n" + textwrap.dedent(body))
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-c", code, str(state_dir), *(args or ["{}"])],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)


def expect_line(proc: subprocess.Popen, expected: str) -> None:
    line = proc.stdout.readline().strip()  # the test's timeout guards a hung child
    assert line == expected, f"child said {line!r} (exit code {proc.poll()})"


# ---- round trip, filters -------------------------------------------------------------------
def test_append_records_get_round_trip(journal, tmp_path):
    journal.append("queued", task("a", "queued", started_at=None))
    journal.append("start", task("a"))
    journal.append("end", task("a", "completed", result={"counts": [1, 2, 3]},
                               progress={"value": 3, "total": 3, "message": "done"}))
    assert journal.path == tmp_path / f"{ENV}.journal.jsonl"
    lines = lines_of(journal.path)
    assert [line["event"] for line in lines] == ["queued", "start", "end"]
    writer = lines[0]["writer"]
    assert (writer["pid"], writer["host"], writer["session"]) == (os.getpid(), socket.gethostname(),
                                                                  journal.session)
    assert lines[0]["v"] == 1 and isinstance(lines[0]["time"], float)
    [rec] = journal.records()
    assert rec["status"] == "completed" and rec["result"] == {"counts": [1, 2, 3]}
    assert rec["progress"]["message"] == "done"
    assert rec["journal"]["event"] == "end" and not rec["journal"].get("orphaned")
    assert journal.get("a") == rec
    assert journal.get("missing") is None
    # another instance (as after a kernel restart) reads the same
    with Journal(tmp_path, ENV) as other:
        assert other.get("a")["result"] == {"counts": [1, 2, 3]}
    assert journal.errors == 0


def test_get_follows_writes_of_another_instance(tmp_path):
    writer, reader = Journal(tmp_path, ENV), Journal(tmp_path, ENV)
    assert reader.get("t") is None and reader.records() == []
    writer.append("start", task("t"))
    reader.load()
    assert reader.get("t")["status"] == "running"
    writer.append("end", task("t", "failed", error="ValueError: bad", traceback="Traceback ..."))
    assert reader.get("t")["status"] == "failed"
    assert reader.get("t")["error"] == "ValueError: bad"


def test_filters(journal):
    t0 = time.time() - 3600
    for i, (status, user, name) in enumerate([("completed", "alice", "scan_x"),
                                              ("failed", "bob", "scan_y"),
                                              ("cancelled", "alice", "move"),
                                              ("completed", "bob", "move")]):
        journal.append("end", task(f"uid-{i}", status, user=user, name=name,
                                   submitted_at=t0 + 600 * i, started_at=t0 + 600 * i,
                                   finished_at=t0 + 600 * i + 60))
    journal.append("start", task("uid-run", submitted_at=t0, started_at=t0))

    def uids(**filters):
        return [r["uid"] for r in journal.records(**filters)]

    assert uids() == ["uid-3", "uid-2", "uid-1", "uid-0", "uid-run"]  # newest first
    assert uids(status="completed") == ["uid-3", "uid-0"]
    assert uids(status=["failed", "cancelled"]) == ["uid-2", "uid-1"]
    assert uids(user="bob") == ["uid-3", "uid-1"]
    assert uids(name="scan_*") == ["uid-1", "uid-0"]
    assert uids(name="move", user="alice") == ["uid-2"]
    assert uids(limit=2) == ["uid-3", "uid-2"]
    assert uids(uid="uid-r") == ["uid-run"]
    # a task matches a time window when it was active at some time inside it
    assert uids(since=t0 + 1250) == ["uid-3", "uid-2", "uid-run"]  # uid-run is still running
    assert uids(until=t0 + 10) == ["uid-0", "uid-run"]
    assert uids(since=t0 + 1150, until=t0 + 1250) == ["uid-2", "uid-run"]
    assert uids(since=datetime.fromtimestamp(t0 + 1250), status="completed") == ["uid-3"]
    assert uids(since="-10m") == ["uid-run"]


def test_parse_time():
    now = 1_800_000_000.0
    assert parse_time(None) is None
    assert parse_time(5) == 5.0
    assert parse_time("-2h", now) == now - 7200
    assert parse_time("30m", now) == now - 1800
    assert parse_time("-1.5d", now) == now - 1.5 * 86400
    assert parse_time("now", now) == now
    assert parse_time("2026-11-21T14:30") == datetime(2026, 11, 21, 14, 30).timestamp()
    assert parse_time("2026-11-21T14:30:00Z") == datetime.fromisoformat(
        "2026-11-21T14:30:00+00:00").timestamp()
    with pytest.raises(ValueError, match="-30m, -2h, -7d"):
        parse_time("yesterday")
    with pytest.raises(ValueError):
        parse_time(True)


# ---- JSON safety -----------------------------------------------------------------------------
class Opaque:
    def __repr__(self) -> str:
        return "Opaque(" + "x" * 5000 + ")"


class BrokenRepr:
    def __repr__(self) -> str:
        raise RuntimeError("no repr")


def test_values_that_are_not_json_are_summarised_with_a_marker(journal, tmp_path):
    np = pytest.importorskip("numpy")
    big = list(range(50_000))  # plain JSON, but too large
    circular: list = [1]
    circular.append(circular)
    journal.append("end", task(
        "s", "completed",
        args=[1, "ok", Opaque(), np.arange(100_000.0), circular],
        kwargs={"when": datetime(2026, 1, 2), "nan": float("nan"), (1, 2): "tuple key",
                "broken": BrokenRepr(), "many": [object()] * 1000},
        result=big, traceback="Traceback (most recent call last):\n" + "  frame\n" * 10_000
        + "ZeroDivisionError: division by zero"))
    raw = journal.path.read_text()
    json.loads(raw, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    rec = journal.get("s")
    args, kwargs = rec["args"], rec["kwargs"]
    assert args[:2] == [1, "ok"]
    assert args[2][SUMMARY_KEY] == "repr" and args[2]["type"].endswith("Opaque")
    assert args[2]["truncated"] is True and args[2]["length"] == 5008
    assert len(args[2]["repr"]) == 2000 and args[2]["repr"].startswith("Opaque(xxx")
    assert args[3]["type"] == "numpy.ndarray" and args[3]["shape"] == [100_000]
    assert args[3]["dtype"] == "float64" and args[3]["repr"].startswith("array([")
    assert args[4] == [1, {SUMMARY_KEY: "repr", "type": "list", "repr": "[1, [...]]",
                           "truncated": False, "length": 10, "items": 2}]
    assert kwargs["when"]["repr"] == "datetime.datetime(2026, 1, 2, 0, 0)"
    assert kwargs["nan"]["repr"] == "nan"
    assert kwargs["(1, 2)"] == "tuple key"
    assert "repr() failed" in kwargs["broken"]["repr"] and "no repr" in kwargs["broken"]["repr"]
    assert kwargs["many"]["items"] == 1000 and kwargs["many"]["truncated"] is True
    assert len(kwargs["many"]["repr"]) < 2000
    result = rec["result"]
    assert result[SUMMARY_KEY] == "json" and result["type"] == "list"
    assert result["length"] == len(json.dumps(big, separators=(",", ":")))
    assert result["truncated"] is True and result["repr"].startswith("[0,1,2,3")
    tb = rec["traceback"]
    assert tb.startswith("Traceback (most recent call last):")
    assert tb.endswith("ZeroDivisionError: division by zero")  # the end of a traceback matters
    assert "characters omitted" in tb and len(tb) < 20_100


def test_values_json_can_write_but_should_not_are_summarised_too(journal):
    # every value here is accepted by orjson (as null / text / a list): the journal must
    # still mark NaN, infinity and datetimes instead of changing them silently
    journal.append("end", task("o", "completed", result=float("inf"),
                               kwargs={"nan": float("nan"), "when": datetime(2026, 1, 2),
                                       "pair": (1, 2)}))
    rec = journal.get("o")
    assert rec["result"][SUMMARY_KEY] == "repr" and rec["result"]["repr"] == "inf"
    assert rec["kwargs"]["nan"]["repr"] == "nan"
    assert rec["kwargs"]["when"]["type"] == "datetime.datetime"
    assert rec["kwargs"]["pair"] == [1, 2]


def test_summary_sizes_are_configurable(tmp_path):
    with Journal(tmp_path, ENV, summary_chars=10, max_value_chars=300, max_text_chars=100) as j:
        j.append("end", task("c", "completed", args=[Opaque(), "y" * 400], error="e" * 500))
        rec = j.get("c")
    assert rec["args"][0]["repr"] == "Opaque(xxx" and rec["args"][0]["length"] == 5008
    assert rec["args"][1][SUMMARY_KEY] == "json" and rec["args"][1]["length"] == 402
    assert len(rec["error"]) < 200 and "400 characters omitted" in rec["error"]


def test_append_rejects_programming_errors(journal):
    with pytest.raises(ValueError, match="event"):
        journal.append("started", task("x"))
    with pytest.raises(ValueError, match="uid"):
        journal.append("start", {"name": "f"})


def test_io_trouble_never_raises_and_is_counted(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    j = Journal(not_a_dir, ENV)
    with pytest.warns(JournalWarning, match="could not write the task journal"):
        j.append("start", task("a"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second failure does not warn again
        j.append("end", task("a", "completed"))
        assert j.mark_orphans() == 0
    assert j.errors == 2 and str(not_a_dir) in j.last_error


def test_unreadable_journal_raises_state_file_error(tmp_path):
    (tmp_path / f"{ENV}.journal.jsonl").mkdir()  # (chmod 0 does not stop root)
    with pytest.raises(StateFileError, match="Cannot read the task journal"):
        Journal(tmp_path, ENV).records()
    assert history_main(["--state-dir", str(tmp_path), "-e", ENV]) == 1


# ---- orphans -----------------------------------------------------------------------------
WRITE_AND_WAIT = """
now = time.time()
j.append("queued", {"uid": "q1", "name": "later", "status": "queued", "submitted_at": now})
j.append("start", {"uid": "r1", "name": "measure", "status": "running", "submitted_at": now,
                   "started_at": now})
j.append("start", {"uid": "d1", "name": "quick", "status": "running", "started_at": now})
j.append("end", {"uid": "d1", "name": "quick", "status": "completed", "started_at": now,
                 "finished_at": now + 0.5})
print("ready", flush=True)
sys.stdin.readline()
"""


def test_tasks_of_a_killed_kernel_read_as_failed_and_mark_orphans(tmp_path, journal):
    proc = start_writer(tmp_path, WRITE_AND_WAIT)
    try:
        expect_line(proc, "ready")
        statuses = {r["uid"]: r["status"] for r in journal.records()}
        assert statuses == {"q1": "queued", "r1": "running", "d1": "completed"}
        assert journal.mark_orphans() == 0  # the writer is alive: nothing to mark
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    recs = {r["uid"]: r for r in journal.records()}
    for uid in ("q1", "r1"):
        assert recs[uid]["status"] == "failed"
        assert recs[uid]["error"] == recs[uid]["msg"] == ORPHAN_REASON
        assert recs[uid]["journal"]["orphaned"] is True
    last_seen = max(line["time"] for line in lines_of(journal.path))
    assert recs["r1"]["finished_at"] == last_seen  # the last sign of life of that kernel
    assert recs["d1"]["status"] == "completed" and "orphaned" not in recs["d1"]["journal"]
    assert journal.get("r1")["status"] == "failed"
    assert sorted(r["uid"] for r in journal.records(status="failed")) == ["q1", "r1"]

    assert journal.mark_orphans() == 2
    marked = lines_of(journal.path)[-2:]
    assert {m["task"]["uid"] for m in marked} == {"q1", "r1"}
    assert all(m["event"] == "end" and m["writer"]["session"] == journal.session for m in marked)
    assert all(m["task"]["status"] == "failed" and m["task"]["error"] == ORPHAN_REASON
               for m in marked)
    assert journal.mark_orphans() == 0  # idempotent
    assert Journal(tmp_path, ENV).mark_orphans() == 0
    recs = {r["uid"]: r for r in Journal(tmp_path, ENV).records()}
    assert recs["r1"]["status"] == "failed" and recs["r1"]["journal"]["event"] == "end"


def _craft_start(path: Path, uid: str, writer: dict) -> None:
    line = {"v": 1, "event": "start", "time": time.time(), "writer": writer,
            "task": {"uid": uid, "name": "f", "status": "running", "started_at": time.time()}}
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")


def test_orphan_rules_for_pid_reuse_reboot_and_other_hosts(journal):
    journal.append("start", task("mine"))
    [me] = {tuple(sorted(line["writer"].items())) for line in lines_of(journal.path)}
    me = dict(me)
    if me["start"] is None:
        pytest.skip("process start times need Linux /proc")
    host = socket.gethostname()
    parent_start = int(Path(f"/proc/{os.getppid()}/stat").read_bytes().rsplit(b")", 1)[1].split()[19])
    _craft_start(journal.path, "reused",  # the pid is alive but belongs to another process now
                 dict(me, pid=os.getppid(), start=parent_start + 1000, session="s1"))
    _craft_start(journal.path, "rebooted", dict(me, boot="another-boot", session="s2"))
    _craft_start(journal.path, "elsewhere", dict(me, host=host + "-other", pid=1, session="s3"))
    _craft_start(journal.path, "same-process", dict(me, session="s4"))  # e.g. a reloaded extension
    status = {r["uid"]: r["status"] for r in journal.records()}
    assert status == {"mine": "running", "reused": "failed", "rebooted": "failed",
                      "elsewhere": "running", "same-process": "running"}
    assert journal.mark_orphans() == 2


# ---- concurrency -----------------------------------------------------------------------------
APPEND_MANY = """
print("ready", flush=True)
sys.stdin.readline()
for i in range(int(sys.argv[3])):
    j.append(sys.argv[4], {"uid": f"{sys.argv[5]}-{i // 2}", "name": "noop", "args": [i],
                           "status": "running", "submitted_at": time.time()})
print("done", j.errors, flush=True)
"""


def _run_two_writers(tmp_path, n, options, event_rule):
    procs = [start_writer(tmp_path, APPEND_MANY, options, str(n), event_rule, tag)
             for tag in ("A", "B")]
    try:
        for proc in procs:
            expect_line(proc, "ready")
        for proc in procs:  # both start appending at the same moment
            proc.stdin.write("go\n")
            proc.stdin.flush()
        for proc in procs:
            expect_line(proc, "done 0")
            assert proc.wait(timeout=60) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_two_processes_append_500_records_each(tmp_path):
    _run_two_writers(tmp_path, 500, "{}", "start")
    raw = (tmp_path / f"{ENV}.journal.jsonl").read_bytes()
    assert raw.endswith(b"\n") and raw.count(b"\n") == 1000
    lines = [json.loads(line) for line in raw.splitlines()]  # every line intact
    for tag in ("A", "B"):
        mine = [line["task"]["args"][0] for line in lines if line["task"]["uid"].startswith(tag)]
        assert mine == list(range(500))  # complete and in order
    assert len(Journal(tmp_path, ENV).records()) == 500


def test_two_processes_with_rotation_lose_nothing(tmp_path):
    options = "{'segment_bytes': 16_000, 'max_bytes': 10**9}"
    reader, stop, reads = Journal(tmp_path, ENV), threading.Event(), []

    def read_while_they_write():  # the reader's incremental index races with rotations
        while not stop.is_set():
            reader.load()
            reads.append(len(reader._index))

    thread = threading.Thread(target=read_while_they_write)
    thread.start()
    try:
        _run_two_writers(tmp_path, 500, options, "start")
    finally:
        stop.set()
        thread.join(timeout=60)
    assert len(reads) > 1
    files = journal_files(tmp_path)
    assert len(files) > 10  # many rotations happened while both were writing
    keys = {(line["task"]["uid"], line["task"]["args"][0]) for line in lines_of(*files)}
    assert keys == {(f"{t}-{i // 2}", i) for t in "AB" for i in range(500)}
    fresh = [(r["uid"], r["args"]) for r in Journal(tmp_path, ENV).records()]
    assert len(fresh) == 500
    assert [(r["uid"], r["args"]) for r in reader.records()] == fresh


def test_threads_append_concurrently(journal):
    def work(t):
        for i in range(200):
            journal.append("start", task(f"{t}-{i}"))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(lines_of(journal.path)) == 1200
    assert len(journal.records()) == 1200


# ---- damaged files -------------------------------------------------------------------------
def test_torn_last_line_is_skipped_with_a_warning(tmp_path, journal):
    run_task(journal, "t1")
    run_task(journal, "t2")
    data = journal.path.read_bytes()
    journal.path.write_bytes(data[:-25])  # power loss in the middle of t2's "end" line
    reader = Journal(tmp_path, ENV)
    with pytest.warns(JournalWarning, match=rf"{ENV}\.journal\.jsonl, line 4 is incomplete"):
        recs = {r["uid"]: r["status"] for r in reader.records()}
    assert recs == {"t1": "completed", "t2": "running"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert reader.get("t1")["status"] == "completed"  # warned once only
    # the next writer starts a new line instead of gluing its record onto the torn one
    writer = Journal(tmp_path, ENV)
    run_task(writer, "t3")
    assert writer.path.read_bytes().startswith(data[:-25] + b"\n")
    fresh = Journal(tmp_path, ENV)
    with pytest.warns(JournalWarning, match=r"line 4 is not a valid journal record"):
        recs = {r["uid"]: r["status"] for r in fresh.records()}
    assert recs == {"t1": "completed", "t2": "running", "t3": "completed"}
    assert reader.get("t3")["status"] == "completed"


def test_garbage_lines_are_skipped(journal, tmp_path):
    run_task(journal, "a")
    with open(journal.path, "ab") as f:
        f.write(b'not json\n{"v": 1, "event": "start"}\n\n[1, 2]\n')
    run_task(journal, "b")
    with pytest.warns(JournalWarning) as caught:
        assert {r["uid"] for r in Journal(tmp_path, ENV).records()} == {"a", "b"}
    messages = sorted(str(w.message) for w in caught)
    assert [m.split(", ")[1].split(" is")[0] for m in messages] == ["line 3", "line 4", "line 6"]


# ---- rotation and retention -----------------------------------------------------------------
def test_rotation_keeps_the_window_and_running_tasks(tmp_path):
    j = Journal(tmp_path, ENV, max_bytes=40_000, segment_bytes=10_000)
    j.append("start", task("long-running", name="overnight_scan"))
    j.append("queued", task("waiting", "queued", started_at=None))
    for i in range(300):
        run_task(j, f"t{i:03d}")
    assert sum(len(line) + 1 for line in j.path.read_bytes().splitlines()[-2:]) < 1100
    files = journal_files(tmp_path)
    sizes = [p.stat().st_size for p in files]
    assert 40_000 - 10_000 <= sum(sizes) <= 40_000 + 10_000
    numbers = [int(p.name.split(".")[-2]) for p in files if p != j.path]
    assert numbers == sorted(numbers) and min(numbers) > 1  # old segments were deleted
    for reader in (j, Journal(tmp_path, ENV)):
        recs = {r["uid"]: r for r in reader.records()}
        assert recs["long-running"]["status"] == "running"
        assert recs["waiting"]["status"] == "queued"
        assert "t000" not in recs  # outside the size window
        # the last 30 tasks (30 * ~1 KB, plus the carried copies) are within max_bytes
        assert all(f"t{i:03d}" in recs for i in range(270, 300))
    # the unfinished tasks were carried into the active file, after a header line
    header, *lines = lines_of(j.path, carry=True)
    assert header["event"] == "carry" and header["previous"] == files[-2].name
    assert {line["task"]["uid"] for line in lines[:2]} == {"long-running", "waiting"}
    raws, size = j.path.read_bytes().splitlines()[1:], 0
    while size < header["carried"]:  # the carried lines are verbatim copies
        assert raws[0] in files[-2].read_bytes().splitlines()
        size += len(raws.pop(0)) + 1
    assert size == header["carried"]
    j.append("end", task("long-running", "completed"))
    assert Journal(tmp_path, ENV).get("long-running")["status"] == "completed"


def test_age_retention_deletes_only_segments_outside_the_window(tmp_path):
    j = Journal(tmp_path, ENV, segment_bytes=3_000, max_age_s=7 * 86400)
    for i in range(20):
        run_task(j, f"t{i:02d}")
    segments = [p for p in journal_files(tmp_path) if p != j.path]
    assert len(segments) >= 3
    old, recent = segments[0], segments[1]
    os.utime(old, (time.time() - 8 * 86400,) * 2)
    os.utime(recent, (time.time() - 6 * 86400,) * 2)
    old_uids = {line["task"]["uid"] for line in lines_of(old)}
    recent_uids = {line["task"]["uid"] for line in lines_of(recent)}
    # a new kernel applies retention at its first write
    with Journal(tmp_path, ENV, segment_bytes=3_000, max_age_s=7 * 86400) as k:
        k.append("start", task("new"))
        assert not old.exists() and recent.exists()
        uids = {r["uid"] for r in k.records()}
    assert recent_uids <= uids and not (old_uids - recent_uids) & uids


def test_reader_index_stays_right_across_rotations_by_another_writer(tmp_path):
    writer = Journal(tmp_path, ENV, max_bytes=30_000, segment_bytes=5_000)
    reader = Journal(tmp_path, ENV)
    writer.append("start", task("long"))
    for i in range(120):
        run_task(writer, f"t{i}", "completed" if i % 3 else "failed")
        if i % 7 == 0:
            reader.get("long")  # incremental reads in between
    fresh = Journal(tmp_path, ENV)
    assert [(r["uid"], r["status"]) for r in reader.records()] == \
        [(r["uid"], r["status"]) for r in fresh.records()]
    assert reader.get("long")["status"] == "running"


def test_fsync_option(tmp_path):
    with Journal(tmp_path, ENV, fsync=True, segment_bytes=2_000) as j:
        for i in range(10):
            run_task(j, f"f{i}")
        assert len(j.records()) == 10 and j.errors == 0


# ---- history, DataFrame, CLI ------------------------------------------------------------------
@pytest.fixture
def populated(tmp_path):
    with Journal(tmp_path, ENV) as j:
        t0 = time.time() - 7200
        j.append("end", task("uid-old", "completed", name="calibrate", submitted_at=t0,
                             started_at=t0, finished_at=t0 + 2.5, result=42))
        j.append("end", task("uid-bad", "failed", name="scan", args=[1, Opaque()],
                             error="ZeroDivisionError: division by zero",
                             traceback="Traceback...\nZeroDivisionError: division by zero"))
        j.append("start", task("uid-run", name="scan", user="bob", background=False))
    return tmp_path


def test_history_and_dataframe(populated, monkeypatch):
    assert [r["uid"] for r in history(state_dir=populated, environment_name=ENV)] == \
        ["uid-run", "uid-bad", "uid-old"]
    monkeypatch.setenv("QMAGIC_STATE_DIR", str(populated))
    assert [r["uid"] for r in history(environment_name=ENV, user="bob")] == ["uid-run"]
    pd = pytest.importorskip("pandas")
    frame = history_dataframe(environment_name=ENV, since="-1h")
    assert list(frame["uid"]) == ["uid-run", "uid-bad"]
    assert list(frame.columns[:4]) == ["uid", "name", "status", "user"]
    assert pd.api.types.is_datetime64_any_dtype(frame["submitted_at"])
    assert pd.isna(frame.loc[0, "finished_at"]) and pd.isna(frame.loc[0, "duration_s"])
    assert frame.loc[1, "error"].startswith("ZeroDivisionError")
    assert frame.loc[0, "host"] == socket.gethostname() and not frame["orphaned"].any()
    old = history_dataframe(environment_name=ENV, name="calibrate")
    assert old.loc[0, "duration_s"] == pytest.approx(2.5) and old.loc[0, "result"] == 42
    assert len(history_dataframe(environment_name=ENV, status="cancelled")) == 0


def test_history_dataframe_without_pandas(populated, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)  # makes `import pandas` fail
    with pytest.raises(ImportError, match=r"pip install qmagic\[pandas\]"):
        history_dataframe(state_dir=populated, environment_name=ENV)


def test_cli_json(populated, capsys):
    assert history_main(["--state-dir", str(populated), "--environment", ENV, "--json"]) == 0
    out = capsys.readouterr().out.splitlines()
    recs = [json.loads(line) for line in out]
    assert [r["uid"] for r in recs] == ["uid-old", "uid-bad", "uid-run"]  # oldest first
    assert recs[0]["result"] == 42 and recs[1]["args"][1][SUMMARY_KEY] == "repr"
    assert history_main(["--state-dir", str(populated), "-e", ENV, "--json", "--status", "failed",
                         "--status", "completed", "--since", "-1h"]) == 0
    assert [json.loads(line)["uid"] for line in capsys.readouterr().out.splitlines()] == ["uid-bad"]
    assert history_main(["--state-dir", str(populated), "-e", ENV, "--json", "--limit", "1"]) == 0
    assert [json.loads(line)["uid"] for line in capsys.readouterr().out.splitlines()] == ["uid-run"]


def test_cli_table(populated, capsys):
    assert history_main(["--state-dir", str(populated), "--environment", ENV]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["SUBMITTED", "STATUS", "DURATION", "USER", "WHERE", "CALL", "UID"]
    assert "completed" in lines[1] and "2.500 s" in lines[1] and "calibrate(1, n=2)" in lines[1]
    assert "failed" in lines[2] and "bg/magic" in lines[2] and "scan(1, Opaque(xxx" in lines[2]
    assert lines[3].strip() == "error: ZeroDivisionError: division by zero"
    assert "running" in lines[4] and "bob" in lines[4] and "fg/magic" in lines[4]
    assert lines[4].rstrip().endswith("uid-run")


def test_cli_errors_and_empty(tmp_path, capsys):
    assert history_main(["--state-dir", str(tmp_path), "--environment", "nothing"]) == 0
    assert "No journal for environment 'nothing'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        history_main(["--state-dir", str(tmp_path), "--since", "last week"])
    assert exit_info.value.code == 2
    assert "Cannot read the time 'last week'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        history_main(["--state-dir", str(tmp_path), "--environment", "../etc"])
    assert "Invalid environment name" in capsys.readouterr().err


def test_cli_runs_as_a_program_and_reports_torn_lines(populated):
    path = populated / f"{ENV}.journal.jsonl"
    with open(path, "ab") as f:
        f.write(b'{"v": 1, "ev')
    env = dict(os.environ, PYTHONPATH=str(REPO), QMAGIC_STATE_DIR=str(populated))
    done = subprocess.run([sys.executable, "-m", "qmagic.journal", "-e", ENV, "--json"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0
    assert len(done.stdout.splitlines()) == 3
    assert f"warning: qmagic journal {path}, line 4 is incomplete" in done.stderr


# ---- paths -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["", "  ", "a/b", "a\\b", ".hidden", "..", "tab\there", 3])
def test_invalid_environment_names(name, tmp_path):
    with pytest.raises(ValueError, match="Invalid environment name"):
        validate_environment_name(name)
    with pytest.raises(ValueError):
        Journal(tmp_path, name)


def test_valid_environment_names_and_state_dir(monkeypatch, tmp_path):
    for name in ("default", "beamline-1", "lab 3", "µ-probe"):
        assert validate_environment_name(name) == name
    monkeypatch.setenv("QMAGIC_STATE_DIR", str(tmp_path / "state"))
    assert default_state_dir() == tmp_path / "state"
    monkeypatch.delenv("QMAGIC_STATE_DIR")
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "data"))
    assert default_state_dir() == tmp_path / "data" / "qmagic"


def test_bad_limits_are_refused(tmp_path):
    with pytest.raises(ValueError, match="max_bytes must be positive"):
        Journal(tmp_path, ENV, max_bytes=0)
