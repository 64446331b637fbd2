"""Tests of qmagic.store.history: history(), history_dataframe() and qmagic-history."""

from __future__ import annotations

import csv
import io
import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from store_helpers import fresh_warnings  # noqa: F401 - a fixture
from store_helpers import task as record

from qmagic.format import cell_label
from qmagic.history_text import history_csv, history_table
from qmagic.store.database import database_path
from qmagic.store.history import history, history_dataframe, history_main
from qmagic.store.journal import ORPHAN_REASON, SUMMARY_KEY, Journal
from qmagic.store.records import JournalWarning

REPO = Path(__file__).resolve().parents[1]
ENV = "bench-1"


class Opaque:
    def __repr__(self) -> str:
        return "Opaque(" + "x" * 5000 + ")"


def task(uid: str, status: str = "completed", **fields) -> dict:
    """A finished task's record, unless ``status`` says otherwise."""
    return record(uid, status, **fields)


@pytest.fixture
def populated(tmp_path):
    t0 = time.time() - 7200
    with Journal(tmp_path, ENV, session_info={"qmagic": "0.2.0"}) as j:
        j.finished(task("uid-old", name="calibrate", submitted_at=t0, started_at=t0, finished_at=t0 + 2.5,
                        result=42, provenance={"notebook": "/lab/calib.ipynb", "cell_id": "a",
                                               "execution_count": 3, "cell_hash": "ff"}))
        j.finished(task("uid-bad", "failed", name="scan", args=[1, Opaque()],
                        error="ZeroDivisionError: division by zero",
                        traceback="Traceback...\nZeroDivisionError: division by zero"))
        j.submitted(task("uid-run", "running", name="scan", user="bob", background=False))
        # a kernel that is still running (this one) when the others read: flushed first
        yield tmp_path, j


def test_history_and_dataframe(populated, monkeypatch):
    folder, _ = populated
    assert [r["uid"] for r in history(state_dir=folder, environment_name=ENV)] == ["uid-run", "uid-bad", "uid-old"]
    monkeypatch.setenv("QMAGIC_STATE_DIR", str(folder))
    assert [r["uid"] for r in history(environment_name=ENV, user="bob")] == ["uid-run"]
    assert [r["uid"] for r in history(environment_name=ENV, notebook="calib.ipynb")] == ["uid-old"]
    pd = pytest.importorskip("pandas")
    frame = history_dataframe(environment_name=ENV, since="-1h")
    assert list(frame["uid"]) == ["uid-run", "uid-bad"]
    assert list(frame.columns[:4]) == ["uid", "name", "status", "user"]
    assert pd.api.types.is_datetime64_any_dtype(frame["submitted_at"])
    assert pd.isna(frame.loc[0, "finished_at"]) and pd.isna(frame.loc[0, "duration_s"])
    assert frame.loc[1, "error"].startswith("ZeroDivisionError")
    assert frame.loc[0, "host"] == socket.gethostname() and not frame["orphaned"].any()
    assert frame.loc[0, "cell"] == "01-getting-started.ipynb [12]" and frame.loc[0, "execution_count"] == 12
    assert frame.loc[0, "notebook"] == "/home/alice/01-getting-started.ipynb"
    old = history_dataframe(environment_name=ENV, name="calibrate")
    assert old.loc[0, "duration_s"] == pytest.approx(2.5) and old.loc[0, "result"] == 42
    assert old.loc[0, "cell"] == "calib.ipynb [3]"
    assert len(history_dataframe(environment_name=ENV, status="cancelled")) == 0
    with pytest.raises(ValueError, match="Unknown task status"):
        history(environment_name=ENV, status="done")


def test_an_unknown_filter_or_a_status_of_a_wrong_type_is_a_one_line_value_error(populated):
    """Every door reads its filters by one rule: a mistyped filter name or a status that is
    neither a status nor a list of them says which filters exist (was a TypeError from
    inside the log: "records() got an unexpected keyword argument", "'int' object is not
    iterable"; found by a reviewer), and a window whose since is after its until says so."""
    folder, journal = populated
    for kw, expected in (({"foo": 1}, "Unknown history filter 'foo': use status, user, name, "
                          "notebook, since, until, uid or limit."),
                         ({"status": 3}, "The status filter must be a status or a list of them"),
                         ({"status": ["failed", 2]}, "The status filter must be a status or a list"),
                         # (a reversed window matched nothing, and the answer blamed the log)
                         ({"since": "-1h", "until": "-2h"}, "since (")):
        for read in (lambda: history(state_dir=folder, environment_name=ENV, **kw),
                     lambda: journal.records(**kw)):
            with pytest.raises(ValueError) as info:
                read()
            assert str(info.value).startswith(expected) and "\n" not in str(info.value)
    assert {r["status"] for r in journal.records(status=("failed", "cancelled"))} <= {"failed", "cancelled"}


@pytest.mark.parametrize("key", ["uid", "name", "user", "notebook"])
def test_a_text_filter_sqlite_cannot_take_is_a_one_line_value_error(populated, key, capsys):
    """A lone surrogate (or a non-str) in a text filter: one ValueError that says what to
    give, from the open log, from the file alone and from the command line.  So do a NUL
    (SQLite's GLOB stopped there: "*\\x00x" matched every stored record and no pending one)
    and a pattern SQLite refuses (over 50,000 bytes: it blamed the log; found by a hostile
    test)."""
    folder, journal = populated
    for value, shown in (("\ud800", "'\\ud800'"), ("a\udcff" * 50, "'a\\udcffa\\udcff"), (5, "5"),
                         ("*\x00x", "'*\\x00x'"), ("[" * 17000 + "*", "'[[[[")):
        with pytest.raises(ValueError) as info:
            history(state_dir=folder, environment_name=ENV, **{key: value})
        assert str(info.value).startswith(
            f"The {key} filter must be text: up to 4,096 characters, no NUL or lone surrogates (got {shown}")
        assert "\n" not in str(info.value) and len(str(info.value)) < 140
        with pytest.raises(ValueError, match=f"The {key} filter must be text"):
            journal.records(**{key: value})
    journal.close()
    with pytest.raises(ValueError, match=f"The {key} filter must be text"):
        history(state_dir=folder, environment_name=ENV, **{key: "\ud800"})
    with pytest.raises(SystemExit):
        history_main(["--state-dir", str(folder), "--environment", ENV, f"--{key}", "\udcff"])
    assert f"The {key} filter must be text: up to 4,096 characters" in capsys.readouterr().err



def test_a_bad_status_or_time_filter_is_a_one_line_value_error(populated):
    """README: a bad filter raises a one-line ValueError.  A status that is not text or a
    list of texts raised TypeError ("'int' object is not iterable"), bytes listed their
    codes as statuses, and an int beyond any float raised OverflowError (hostile test)."""
    folder, journal = populated
    for status in (5, [["failed"]], b"failed", ["failed", 3]):
        for read in (journal.records, lambda **f: history(state_dir=folder, environment_name=ENV, **f)):
            with pytest.raises(ValueError, match=r"^The status filter must be a status or a list of them") as info:
                read(status=status)
            assert "\n" not in str(info.value) and len(str(info.value)) < 140
    with pytest.raises(ValueError, match=r"^Unknown task status x\\nxyy") as info:
        history(state_dir=folder, environment_name=ENV, status=["failed", "x\nx" + "y" * 5000])
    assert len(str(info.value)) < 200
    for key in ("since", "until"):
        with pytest.raises(ValueError, match="^Cannot read the time '1000") as info:
            history(state_dir=folder, environment_name=ENV, **{key: 10**400})
        assert len(str(info.value)) < 200
    assert {r["uid"] for r in history(state_dir=folder, environment_name=ENV,
                                      status=(s for s in ("failed", "running")))} == {"uid-bad", "uid-run"}


def test_clock_times_today_and_yesterday_read_as_a_scientist_means_them():
    """``qmagic-history --since 22:00`` at 3 a.m. (last night's scans) or ``--since yesterday``
    were refused ("Cannot read the time"): a clock time is the latest one not in the future,
    "today" and "yesterday" local midnights; the refusal names them."""
    from datetime import datetime

    from qmagic.store.times import parse_time

    now = datetime(2026, 12, 4, 3, 0, 0).timestamp()  # (local time)
    for text, meant in (("22:00", datetime(2026, 12, 3, 22, 0)), ("02:30", datetime(2026, 12, 4, 2, 30)),
                        ("03:00", datetime(2026, 12, 4, 3, 0)), (" 7:05:30 ", datetime(2026, 12, 3, 7, 5, 30)),
                        ("today", datetime(2026, 12, 4)), ("Yesterday", datetime(2026, 12, 3))):
        assert parse_time(text, now=now) == meant.timestamp(), text
    for bad in ("24:00", "7:5", "22:60", "tomorrow"):
        with pytest.raises(ValueError, match=f"^Cannot read the time '{bad}': .*a clock time such as 22:00, "
                                             "today, yesterday"):
            parse_time(bad, now=now)


def test_a_bad_filter_shows_as_its_one_line_in_a_cell(populated):
    """``qmagic.history(since="yesterday")`` in a cell showed the line under five frames of
    qmagic's own code (_history.py, store/history.py, reader.py, times.py): IPython shows a
    bad filter's ValueError as its one line, whichever door read it."""
    folder, journal = populated
    for filters, start in (({"since": "tomorrow"}, "Cannot read the time 'tomorrow'"),
                           ({"status": "faild"}, "Unknown task status faild"),
                           ({"limit": "5"}, "limit must be a whole number"),
                           ({"nmae": "scan"}, "Unknown history filter 'nmae'"),
                           ({"user": "\ud800"}, "The user filter must be text")):
        for read in (journal.records, lambda **f: history(state_dir=folder, environment_name=ENV, **f)):
            with pytest.raises(ValueError) as info:
                read(**filters)
            assert info.value._render_traceback_() == [f"ValueError: {info.value}"], filters
            assert str(info.value).startswith(start), info.value
    # where to read (state_dir=3 raised Python's "expected str, bytes or os.PathLike object")
    for where, start in (({"state_dir": 3}, "state_dir must be a folder's path (text or a Path), not int"),
                         ({"environment_name": ""}, "Invalid environment name")):
        with pytest.raises(ValueError) as info:
            history(**{"state_dir": folder, "environment_name": ENV, **where})
        assert info.value._render_traceback_() == [f"ValueError: {info.value}"], where
        assert str(info.value).startswith(start), info.value


def test_history_dataframe_without_pandas(populated, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)  # makes `import pandas` fail
    with pytest.raises(ImportError, match=r"pip install qmagic\[pandas\]"):
        history_dataframe(state_dir=populated[0], environment_name=ENV)


def cli(*args: str) -> int:
    return history_main(["--state-dir", str(args[0]), "-e", ENV, *args[1:]])


def test_cli_json(populated, capsys):
    folder, _ = populated
    assert cli(folder, "--json") == 0
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["uid"] for r in recs] == ["uid-old", "uid-bad", "uid-run"]  # oldest first
    assert recs[0]["result"] == 42 and recs[1]["args"][1][SUMMARY_KEY] == "repr"
    assert recs[0]["journal"]["info"] == {"qmagic": "0.2.0"}
    assert cli(folder, "--json", "--status", "failed", "--status", "completed", "--since", "-1h") == 0
    assert [json.loads(line)["uid"] for line in capsys.readouterr().out.splitlines()] == ["uid-bad"]
    assert cli(folder, "--json", "--limit", "1") == 0
    assert [json.loads(line)["uid"] for line in capsys.readouterr().out.splitlines()] == ["uid-run"]
    for option, value, expected in (("--user", "bob", ["uid-run"]), ("--name", "sc*", ["uid-bad", "uid-run"]),
                                    ("--uid", "uid-o", ["uid-old"]), ("--notebook", "calib.ipynb", ["uid-old"]),
                                    ("--notebook", "/home/alice/*", ["uid-bad", "uid-run"]),
                                    ("--until", "-1h", ["uid-old"])):
        assert cli(folder, "--json", option, value) == 0
        assert [json.loads(line)["uid"] for line in capsys.readouterr().out.splitlines()] == expected, option


def test_limit_zero_gives_no_record_and_a_negative_limit_is_refused(populated, capsys):
    folder, j = populated
    assert j.records(limit=0) == [] and len(j.records(limit=1)) == 1
    assert j.flush()
    assert j.records(limit=0) == [] and [r["uid"] for r in j.records(limit=1)] == ["uid-run"]
    assert history(state_dir=folder, environment_name=ENV, limit=0) == []
    assert len(history(state_dir=folder, environment_name=ENV, limit=2)) == 2
    assert cli(folder, "--json", "--limit", "0") == 0
    out = capsys.readouterr()
    assert out.out == "" and "No task matches --limit 0;" in out.err
    for bad in (-1, -5):
        with pytest.raises(ValueError, match=rf"^limit must be 0 or more: .*\(got {bad}\)\.$"):
            history(state_dir=folder, environment_name=ENV, limit=bad)
        with pytest.raises(ValueError, match="limit must be 0 or more"):
            j.records(limit=bad)
        with pytest.raises(SystemExit) as exit_info:
            cli(folder, "--json", "--limit", str(bad))
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.splitlines()
        assert err[-1] == ("qmagic-history: error: argument --limit: must be 0 or more: the number of "
                           f"newest tasks to show (got {bad})")


def test_cli_table_shows_which_cell_ran_what(populated, capsys):
    folder, _ = populated
    assert cli(folder) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["SUBMITTED", "STATUS", "DURATION", "USER", "WHERE", "CELL", "CALL", "UID"]
    assert "completed" in lines[1] and "2.5 s" in lines[1] and "calibrate(1, n=2)" in lines[1]
    assert "calib.ipynb [3]" in lines[1]
    assert "failed" in lines[2] and "bg/magic" in lines[2] and "scan(1, Opaque(xxx" in lines[2]
    assert "01-getting-started.ipynb [12]" in lines[2]
    assert lines[3].strip() == "error: ZeroDivisionError: division by zero"
    assert "running" in lines[4] and "bob" in lines[4] and "fg/magic" in lines[4]
    assert lines[4].rstrip().endswith("uid-run")


def test_cli_csv(populated, capsys):
    folder, _ = populated
    assert cli(folder, "--csv") == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["uid"] for r in rows] == ["uid-old", "uid-bad", "uid-run"]
    assert rows[0]["duration_s"] == "2.500000" and rows[0]["notebook"] == "/lab/calib.ipynb"
    assert rows[0]["execution_count"] == "3" and rows[1]["error"].startswith("ZeroDivisionError")
    assert rows[2]["finished_at"] == "" and rows[2]["host"] == socket.gethostname()
    assert rows[1]["call"].startswith("scan(1, Opaque(")
    with pytest.raises(SystemExit):
        cli(folder, "--csv", "--json")
    assert "not allowed with" in capsys.readouterr().err


def test_cli_errors_and_empty(tmp_path, capsys):
    # (exit 1: a shift script can tell a mistyped environment from an empty result)
    assert history_main(["--state-dir", str(tmp_path), "--environment", "nothing"]) == 1
    assert "No experiment log for environment 'nothing'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # reading created nothing
    with pytest.raises(SystemExit) as exit_info:
        history_main(["--state-dir", str(tmp_path), "--since", "last week"])
    assert exit_info.value.code == 2
    assert "Cannot read the time 'last week'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        history_main(["--state-dir", str(tmp_path), "--environment", "../etc"])
    assert "Invalid environment name" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        history_main(["--state-dir", str(tmp_path), "--status", "bogus"])
    assert "Unknown task status bogus" in capsys.readouterr().err


def test_a_mistyped_environment_reads_nothing_and_says_so(populated):
    folder, _ = populated
    with pytest.warns(JournalWarning) as caught:
        assert history(state_dir=folder, environment_name="hutch") == []
    assert str(caught[0].message) == (f"No experiment log for environment 'hutch' in {folder}: "
                                       "nothing was recorded there yet (check environment_name "
                                       "and state_dir).")
    assert not list(folder.glob("*hutch*"))  # reading created nothing


def test_cli_unreadable_log_exits_1(tmp_path, capsys):
    database_path(tmp_path, ENV).write_bytes(b"this is not a database" * 100)
    assert history_main(["--state-dir", str(tmp_path), "-e", ENV]) == 1
    assert "is damaged (file is not a database)" in capsys.readouterr().err


def test_cli_runs_as_a_program_with_bad_rows_and_odd_names(populated):
    folder, j = populated
    j.finished(task("uid-odd", name="remote\udcffname\n", user="\udc80"))
    assert j.flush()
    conn = sqlite3.connect(database_path(folder, ENV), isolation_level=None)
    conn.execute("INSERT INTO tasks (uid, rank, status, sort_time, record) VALUES ('x1', 3, 'bogus', ?, '{}')",
                 (time.time(),))  # (recent: retention would delete it)
    conn.execute("INSERT INTO tasks (uid, rank, status, sort_time, submitted_at, record) VALUES "
                 "('x2', 3, 'completed', 'yesterday', 'yesterday', ?)",
                 (json.dumps(task("x2", submitted_at="yesterday")),))
    # text that is not UTF-8 (edited by another tool): in a record, in a status
    conn.execute("INSERT INTO tasks (uid, rank, status, sort_time, record) VALUES "
                 "('x3', 3, 'completed', ?, CAST(X'7B22756964223A22FF227D' AS TEXT))", (time.time(),))
    conn.execute("INSERT INTO tasks (uid, rank, status, sort_time, record) VALUES "
                 "('x4', 3, CAST(X'FF' AS TEXT), ?, '{}')", (time.time(),))
    conn.close()
    env = dict(os.environ, PYTHONPATH=str(REPO), QMAGIC_STATE_DIR=str(folder), PYTHONIOENCODING="ascii")
    for form in ([], ["--json"], ["--csv"]):
        done = subprocess.run([sys.executable, "-m", "qmagic.store.history", "-e", ENV, *form],
                              capture_output=True, text=True, env=env, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        assert "x1" not in done.stdout and "x2" not in done.stdout and "uid-odd" in done.stdout
        assert "x3" not in done.stdout and "x4" not in done.stdout and "uid-old" in done.stdout
        assert done.stderr.count("warning: qmagic experiment log: skipped") == 3  # once per kind
    assert "remote\\udcffname\\n" in done.stdout


def test_every_view_survives_session_metadata_of_another_type(tmp_path, capsys):
    """A BLOB (or a number) written by another tool into sessions.host / sessions.pid or a
    task's session column reads as text / int / None: --json used to crash on the bytes."""
    with Journal(tmp_path, ENV) as j:
        for uid in ("m1", "m2", "m3"):
            j.finished(task(uid))
    conn = sqlite3.connect(database_path(tmp_path, ENV), isolation_level=None)
    conn.execute("UPDATE sessions SET host = CAST('lab-pc' AS BLOB), pid = CAST('12' AS BLOB)")
    conn.execute("INSERT INTO sessions (session, host, pid) VALUES (X'FF00', X'FF', 3.5)")
    conn.execute("UPDATE tasks SET session = X'FF00' WHERE uid = 'm2'")
    conn.execute("UPDATE tasks SET session = CAST(session AS BLOB) WHERE uid = 'm3'")
    conn.close()
    assert cli(tmp_path, "--json") == 0
    metas = {r["uid"]: r["journal"] for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert sorted(metas) == ["m1", "m2", "m3"]
    assert metas["m1"]["host"] == "lab-pc" and metas["m1"]["pid"] is None
    assert metas["m2"] == {**metas["m2"], "session": "\ufffd\x00", "host": "\ufffd", "pid": None}
    assert isinstance(metas["m3"]["session"], str) and metas["m3"]["host"] is None
    for form in ([], ["--csv"]):
        assert cli(tmp_path, *form) == 0
        out = capsys.readouterr().out
        assert all(uid in out for uid in ("m1", "m2", "m3")), out
    hosts = [r["journal"]["host"] for r in history(state_dir=tmp_path, environment_name=ENV)]
    assert hosts == [None, "\ufffd", "lab-pc"]
    with Journal(tmp_path, ENV) as j:  # a record still pending merges over the database's row
        j.finished(task("m2", finished_at=time.time()))
        assert j.get("m2")["journal"]["host"] in ("\ufffd", socket.gethostname())
        from qmagic.store.reader import LogReader

        reader = LogReader(database_path(tmp_path, ENV))
        try:
            state = reader.states(["m1"])["m1"]
        finally:
            reader.close()
        assert (state["host"], state["pid"]) == ("lab-pc", None)


DIES = """
import sys, time
sys.path.insert(0, sys.argv[2])
from qmagic.store.journal import Journal
j = Journal(sys.argv[1], "bench-1")
j.submitted({"uid": "died", "name": "scan", "status": "running", "submitted_at": time.time()})
print("ready", flush=True)
time.sleep(600)
"""


def kill_dies(folder: Path, script: str | None = None) -> None:
    """Run DIES (a kernel's log with an unfinished task), or ``script``, in a child; SIGKILL
    it once ready."""
    proc = subprocess.Popen([sys.executable, "-c", script or DIES, str(folder), str(REPO)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
    finally:
        proc.kill()
        proc.wait(30)
        proc.stdout.close()


def test_reading_stores_what_dead_kernels_left(tmp_path):
    kill_dies(tmp_path)
    [rec] = history(state_dir=tmp_path, environment_name=ENV)
    assert rec["uid"] == "died" and rec["status"] == "failed" and rec["error"] == ORPHAN_REASON
    assert not list(tmp_path.glob("*.spool")) and not list(tmp_path.glob("*.lock"))


DIES_STORED = """
import sys, time
sys.path.insert(0, sys.argv[2])
from qmagic.store.journal import Journal
j = Journal(sys.argv[1], "bench-1")
t = time.time()
j.submitted({"uid": "died", "name": "scan", "status": "running", "submitted_at": t, "started_at": t})
assert j.flush()
print("ready", flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("spool", ["written 1 s after the start", "stored and gone"])
def test_a_killed_kernels_task_ends_at_its_latest_sign_of_life(tmp_path, spool):
    """A task of a kernel killed with SIGKILL ended at the session's last heartbeat, up to
    60 s old: before the task's start ('-') or at it ('≥ 0.0 s') for a task that ran on.
    Its end is now the latest sign of life known: the heartbeat, the spool's last write, the
    task's own start.  (A killed kernel's files; its heartbeat set 60 s back.)"""
    kill_dies(tmp_path, DIES_STORED)
    db = sqlite3.connect(database_path(tmp_path, ENV))
    try:
        [(started,)] = db.execute("SELECT started_at FROM tasks WHERE uid = 'died'").fetchall()
        with db:
            db.execute("UPDATE sessions SET last_seen = ?", (started - 60,))
    finally:
        db.close()
    for path in tmp_path.glob("*.spool"):
        if spool == "stored and gone":
            path.unlink()
        else:
            os.utime(path, (started + 1, started + 1))
    [rec] = history(state_dir=tmp_path, environment_name=ENV)
    assert rec["error"] == ORPHAN_REASON
    assert rec["finished_at"] == (started + 1 if spool.startswith("written") else started)
    row = history_table([rec]).splitlines()[1]
    assert ("≥ 1.0 s" if spool.startswith("written") else "≥ 0.0 s") in row, row


def test_a_log_of_a_newer_qmagic_is_read_never_written(tmp_path, capsys):
    """Reading a newer qmagic's log leaves the spools of its dead kernels to that qmagic
    (their lines may mean something else there), with one warning, and shows what it holds."""
    with Journal(tmp_path, ENV) as j:
        j.finished(task("kept"))
    kill_dies(tmp_path)
    path = database_path(tmp_path, ENV)
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA user_version = 2")
    finally:
        conn.close()
    spools = sorted(tmp_path.glob("*.spool"))
    assert spools
    assert history_main(["--state-dir", str(tmp_path), "-e", ENV, "--json"]) == 0
    out, err = capsys.readouterr()
    assert [json.loads(line)["uid"] for line in out.splitlines()] == ["kept"]
    assert err.count("newer qmagic") == 1 and "Traceback" not in err
    assert sorted(tmp_path.glob("*.spool")) == spools
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT uid FROM tasks").fetchall() == [("kept",)]
    finally:
        conn.close()


def test_render_functions_are_pure_and_safe():
    """qmagic-history's text forms (qmagic.format's, shared with %tasks --history) never
    fail on odd records."""
    recs = [task("a", name="x\ud800", args=[{SUMMARY_KEY: "repr", "repr": "Big(\n1)"}], error="E\x00rr"),
            task("b", "running", provenance=None, user=None, started_at=float("inf"), finished_at=10**400),
            {"uid": None, "name": 7, "args": "not a list", "kwargs": [1], "submitted_at": 1e300,
             "error": ["not text"], "provenance": "nope", "journal": "nope", "user": "\udc80" * 10**4}]
    table = history_table(recs).splitlines()
    assert "x\\ud800(Big(\\n1), n=2)" in table[1] and "error: E\\x00rr" in table[2] and "-" in table[3]
    assert table[4].startswith("-") and "7()" in table[4] and len(table) == 5 and len(table[4]) < 300
    assert cell_label(recs[0]["provenance"]) == "01-getting-started.ipynb [12]" and cell_label(None) == ""
    assert cell_label({"notebook": None, "execution_count": 4}) == "[4]"
    assert cell_label({"notebook": "C:\\lab\\calib.ipynb", "execution_count": True}) == "calib.ipynb"
    rows = list(csv.reader(io.StringIO(history_csv(recs))))
    assert rows[0][:3] == ["uid", "name", "status"] and len(rows) == 4
    assert history_table([]).split() == ["SUBMITTED", "STATUS", "DURATION", "USER", "WHERE", "CELL", "CALL", "UID"]
    died = task("c", "failed", error=ORPHAN_REASON, journal={"orphaned": True})  # its kernel died:
    died["finished_at"] = died["started_at"] + 2.5  # the last sign of life, a lower bound
    assert "failed  ≥ 2.5 s" in history_table([died]).splitlines()[1]
    assert "failed  2.5 s" in history_table([{**died, "journal": {"orphaned": False}}]).splitlines()[1]


def test_warnings_are_issued_once(populated):
    folder, j = populated
    assert j.flush()
    conn = sqlite3.connect(database_path(folder, ENV), isolation_level=None)
    conn.execute("INSERT INTO tasks (uid, rank, status, sort_time, record) VALUES ('x1', 3, 'bogus', ?, '{}')",
                 (time.time(),))
    conn.close()
    with pytest.warns(JournalWarning):
        assert len(history(state_dir=folder, environment_name=ENV)) == 3
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(history(state_dir=folder, environment_name=ENV)) == 3


def test_brackets_in_a_notebook_or_name_filter_match_themselves(tmp_path, capsys):
    """``scan[2].ipynb`` is that notebook, not ``scan2.ipynb`` (brackets were read as a
    glob's character class); ``*`` and ``?`` stay wildcards.  The same answers pending, from
    the database, from the file alone and from the command line (a hostile test found the
    pending side matching a record without a name as "None")."""
    names = {"u-br": ("/lab/scan[2].ipynb", "fit[a]"), "u-2": ("/lab/scan2.ipynb", "fita"),
             "u-b3": ("/lab/scan[3].ipynb", "fit[b]"), "u-nn": ("/lab/other.ipynb", None)}
    with Journal(tmp_path, ENV) as j:
        for uid, (nb, name) in names.items():
            j.finished(task(uid, name=name, provenance={"notebook": nb, "execution_count": 1}))
        cases = [({"notebook": "scan[2].ipynb"}, ["u-br"]), ({"notebook": "/lab/scan[2].ipynb"}, ["u-br"]),
                 ({"notebook": "scan[23].ipynb"}, []), ({"notebook": "scan[?].ipynb"}, ["u-b3", "u-br"]),
                 ({"notebook": "/lab/scan[*"}, ["u-b3", "u-br"]), ({"notebook": "scan?.ipynb"}, ["u-2"]),
                 ({"name": "fit[a]"}, ["u-br"]), ({"name": "fit[ab]"}, []), ({"name": "fit[*]"}, ["u-b3", "u-br"]),
                 # a record without a name matches no name filter (pending, it matched "None")
                 ({"name": "*"}, ["u-2", "u-b3", "u-br"]), ({"name": "None"}, [])]

        def check(read):
            for filters, expected in cases:
                assert sorted(r["uid"] for r in read(**filters)) == expected, filters

        check(j.records)  # pending
        assert j.flush()
        check(j.records)  # from the database
    check(lambda **f: history(state_dir=tmp_path, environment_name=ENV, **f))  # the file alone
    for option, value, expected in (("--notebook", "scan[2].ipynb", ["u-br"]), ("--name", "fit[a]", ["u-br"])):
        assert cli(tmp_path, "--json", option, value) == 0
        assert [json.loads(line)["uid"] for line in capsys.readouterr().out.splitlines()] == expected
    with pytest.raises(SystemExit):
        history_main(["--help"])
    assert "brackets match themselves" in " ".join(capsys.readouterr().out.split())


def test_cli_piped_into_a_reader_that_stops(populated):
    """`qmagic-history | head -1`: the reader closes the pipe before the log is written out.
    The command ends quietly (status 0, nothing on stderr); it printed a BrokenPipeError
    traceback of its own code."""
    folder, _ = populated
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for form in ([], ["--json"], ["--csv"]):
        read_end, write_end = os.pipe()
        os.close(read_end)  # the reader is gone: every write meets a closed pipe
        try:
            done = subprocess.run([sys.executable, "-m", "qmagic.store.history", "--state-dir",
                                   str(folder), "-e", ENV, *form], stdout=write_end,
                                  stderr=subprocess.PIPE, text=True, env=env, timeout=60, check=False)
        finally:
            os.close(write_end)
        assert (done.returncode, done.stderr) == (0, ""), form


class _ClosedAfterOneLine:
    """A stdout whose reader (``| head -1``) closes the pipe after the first line."""

    encoding = "utf-8"

    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, text: str) -> int:
        if self.lines:
            raise BrokenPipeError(32, "Broken pipe")
        self.lines.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    def fileno(self) -> int:
        raise io.UnsupportedOperation("fileno")


@pytest.mark.parametrize("form", [[], ["--json"], ["--csv"]])
def test_cli_prints_a_long_log_page_by_page(tmp_path, monkeypatch, capsys, form):
    """`qmagic-history | head -3` on a 100,000-task log took 5.6 s and 450 MB before its first
    line: every record was read and laid out first.  The log is now read a page at a time
    (oldest first, each page an index range after the last) and each line printed as its
    record comes: a reader that stops after one line leaves the rest of the log unread
    (records made counted around the real function), and the command ends quietly."""
    from qmagic.history_text import PAGE_ROWS
    from qmagic.store import reader as reader_module

    t0 = time.time() - 10_000
    with Journal(tmp_path, ENV) as j:
        for i in range(3 * PAGE_ROWS):  # (one submission time for many: pages break inside a tie)
            j.finished(record(f"u-{i:05d}", "completed", submitted_at=t0 + i // 7, started_at=t0, finished_at=t0 + 1))
        assert j.flush()
    everything = [r["uid"] for r in reversed(history(state_dir=tmp_path, environment_name=ENV))]
    made = []
    real = reader_module.record_from_row
    monkeypatch.setattr(reader_module, "record_from_row", lambda *a: made.append(a[0]) or real(*a))
    out = _ClosedAfterOneLine()
    monkeypatch.setattr(sys, "stdout", out)
    assert cli(tmp_path, *form) == 0
    assert len(out.lines) == 1 and len(made) <= PAGE_ROWS + 1, len(made)
    assert capsys.readouterr().err == ""
    monkeypatch.undo()
    assert cli(tmp_path, "--json") == 0  # (all of it, in order, none twice: ties across pages)
    assert [json.loads(line)["uid"] for line in capsys.readouterr().out.splitlines()] == everything


DIES_STARTED = """
import sys, time
sys.path.insert(0, sys.argv[2])
from qmagic.store.journal import Journal
j = Journal(sys.argv[1], "bench-1")
t = time.time()
j.submitted({"uid": "died-ü", "name": "mesure_é", "status": "running", "submitted_at": t, "started_at": t,
             "provenance": {"notebook": "/lab/Messung ü.ipynb", "cell_id": "c", "execution_count": 4,
                            "cell_hash": "ab"}, "args": ["Größe 😀"]})
print("ready", flush=True)
time.sleep(600)
"""


def test_cli_on_a_terminal_without_utf8(tmp_path):
    """`LANG=en_US.ISO-8859-1 qmagic-history` (or PYTHONIOENCODING=ascii): a notebook named
    'Messung ü.ipynb' and the '≥' of a task whose kernel died ended the command with a
    UnicodeEncodeError traceback and no table.  Now the table and CSV show what the terminal
    cannot encode as backslash escapes, and --json is the same JSON in ASCII."""
    kill_dies(tmp_path, DIES_STARTED)

    def run(encoding: str, *form: str) -> subprocess.CompletedProcess:
        env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONIOENCODING=encoding)
        return subprocess.run([sys.executable, "-m", "qmagic.store.history", "--state-dir", str(tmp_path),
                               "-e", ENV, *form], capture_output=True, env=env, timeout=60, check=False)

    utf8 = run("utf-8", "--json")
    assert utf8.returncode == 0, utf8.stderr
    [expected] = [json.loads(line) for line in utf8.stdout.decode().splitlines()]
    assert expected["provenance"]["notebook"] == "/lab/Messung ü.ipynb" and expected["journal"]["orphaned"]
    for encoding in ("ascii", "latin-1"):
        table = run(encoding)
        assert (table.returncode, table.stderr) == (0, b""), (encoding, table.stderr.decode())
        text = table.stdout.decode(encoding)
        assert "Messung " in text and "\\u2265 " in text and "kernel stopped" in text, text
        assert ("ü.ipynb [4]" if encoding == "latin-1" else "\\xfc.ipynb [4]") in text, text
        head, row = text.splitlines()[:2]  # (the columns stay aligned: escapes are made first)
        assert row.index("died-") == head.index("UID") and row.index("mesure_") == head.index("CALL"), text
        rows = run(encoding, "--csv")
        assert (rows.returncode, rows.stderr) == (0, b""), (encoding, rows.stderr.decode())
        [row] = list(csv.DictReader(io.StringIO(rows.stdout.decode(encoding))))
        assert row["uid"] in ("died-ü", "died-\\xfc") and row["status"] == "failed"
        lines = run(encoding, "--json")
        assert (lines.returncode, lines.stderr) == (0, b""), (encoding, lines.stderr.decode())
        assert lines.stdout.isascii() and [json.loads(line) for line in lines.stdout.decode().splitlines()] == [expected]


def test_a_notebook_path_relative_to_the_jupyter_root_matches_the_recorded_path(tmp_path, capsys):
    """JupyterLab shows a notebook's path relative to its root (``2026-12/scan.ipynb``); the
    kernel records the full path (JPY_SESSION_NAME).  ``--notebook 2026-12/scan.ipynb`` matched
    nothing ("No task matches."), though the file name alone did.  Now a relative path with
    folders matches a recorded path that ends with it, at a folder boundary; an absolute path
    stays exact.  The same answers pending, from the database, from the file and the CLI."""
    names = {"u-dec": "/home/ana/beam/2026-12/scan.ipynb", "u-nov": "/home/ana/beam/2026-11/scan.ipynb",
             "u-x": "/home/ana/beam/x2026-12/scan.ipynb", "u-win": "C:\\beam\\2026-12\\scan.ipynb",
             "u-rel": "2026-12/scan.ipynb"}
    with Journal(tmp_path, ENV) as j:
        for uid, nb in names.items():
            j.finished(task(uid, name="scan", provenance={"notebook": nb, "execution_count": 1}))
        cases = [("2026-12/scan.ipynb", ["u-dec", "u-rel", "u-win"]),
                 ("./2026-12/scan.ipynb", ["u-dec", "u-rel", "u-win"]),
                 ("beam/2026-11/scan.ipynb", ["u-nov"]), ("12/scan.ipynb", []),
                 ("/home/ana/beam/2026-12/scan.ipynb", ["u-dec"]), ("/beam/2026-12/scan.ipynb", []),
                 ("scan.ipynb", sorted(names)), ("*/2026-12/scan.ipynb", ["u-dec"])]

        def check(read):
            for notebook, expected in cases:
                assert sorted(r["uid"] for r in read(notebook=notebook)) == expected, notebook

        check(j.records)  # pending
        assert j.flush()
        check(j.records)  # from the database
    check(lambda **f: history(state_dir=tmp_path, environment_name=ENV, **f))  # the file alone
    assert cli(tmp_path, "--json", "--notebook", "2026-12/scan.ipynb") == 0
    assert sorted(json.loads(line)["uid"] for line in capsys.readouterr().out.splitlines()) == ["u-dec", "u-rel",
                                                                                               "u-win"]


def test_the_tasks_a_killed_kernel_left_show_while_they_cannot_be_stored(tmp_path):
    """What ran when a kernel died is in its spool until a reader stores it.  When that
    cannot be done -- another process holds the database's write lock, or the folder is a
    read-only copy of the beamtime (checked by hand: a read-only bind mount) -- history() and
    qmagic-history showed only what the database held, with a warning: the very tasks the
    scientist asks about were missing.  Now they are read from the spool (failed, "kernel
    stopped while the task was running", journal.pending), filtered and limited like the rest."""
    with Journal(tmp_path, ENV) as j:
        j.finished(task("uid-old", name="calibrate", submitted_at=time.time() - 60))
    kill_dies(tmp_path)  # (its task "died" is in its spool only)
    locker = sqlite3.connect(database_path(tmp_path, ENV), isolation_level=None)
    try:
        locker.execute("BEGIN EXCLUSIVE")  # another process holds the write lock
        with pytest.warns(JournalWarning, match="could not store what earlier kernels left"):
            found = history(state_dir=tmp_path, environment_name=ENV)
        assert [r["uid"] for r in found] == ["died", "uid-old"]  # (newest first)
        assert (found[0]["status"], found[0]["error"], found[0]["journal"]["pending"]) == (
            "failed", ORPHAN_REASON, True)
        env = dict(os.environ, PYTHONPATH=str(REPO))
        done = subprocess.run([sys.executable, "-m", "qmagic.store.history", "--state-dir", str(tmp_path),
                               "-e", ENV, "--json", "--status", "failed", "--status", "completed", "--limit", "1"],
                              capture_output=True, text=True, env=env, timeout=60, check=False)
        assert done.returncode == 0 and "could not store" in done.stderr, done.stderr  # (filtered and
        assert [json.loads(line)["uid"] for line in done.stdout.splitlines()] == ["died"]  # limited alike)
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    [rec] = history(state_dir=tmp_path, environment_name=ENV, uid="died")  # stored now
    assert rec["status"] == "failed" and not rec["journal"]["pending"]


def test_an_empty_answer_says_which_filters_left_everything_out(populated, capsys, tmp_path):
    """`qmagic-history --uid abc` said "No task matches." -- the same words for a log with
    no task at all and for a uid mistyped at 3 a.m.  A uid is matched by its first characters
    (``--uid uid-o`` finds ``uid-old``); an empty answer now names the filters that left every
    task out and says the log holds others, or that it holds none yet."""
    folder, j = populated
    assert j.flush()
    assert cli(folder, "--json", "--uid", "uid-o") == 0  # (a prefix)
    assert [json.loads(line)["uid"] for line in capsys.readouterr().out.splitlines()] == ["uid-old"]
    assert cli(folder, "--uid", "abc", "--status", "failed", "--name", "scan *") == 0
    out = capsys.readouterr()
    assert out.out == "" and out.err == ("No task matches --status failed --name 'scan *' --uid abc; the log holds "
                                         "other tasks (qmagic-history --limit 20 lists the newest).\n")
    with Journal(tmp_path / "empty", ENV):
        pass
    assert cli(tmp_path / "empty") == 0
    assert capsys.readouterr().err == "No task matches: the experiment log holds no task yet.\n"


def test_a_uid_filter_typed_in_capitals_finds_its_task(tmp_path, capsys):
    """``qmagic-history --uid A5ED0265`` found nothing: every view prints uids in lower case
    (uuid4), a scientist types them from a paper log in capitals.  A hex uid filter now
    matches in any case, pending or stored; other text as typed."""
    uid = "a5ed0265-0000-4000-8000-000000000001"
    with Journal(tmp_path, ENV) as j:
        j.finished(record(uid, "completed"))
        j.finished(record("uid-Other", "completed"))
        for stored in (False, True):
            if stored:
                assert j.flush()
            assert [r["uid"] for r in j.records(uid="A5ED0265")] == [uid]
            assert [r["uid"] for r in j.records(uid=uid.upper())] == [uid]
            assert j.records(uid="UID-O") == []  # (not hex: as typed)
    assert [r["uid"] for r in history(state_dir=tmp_path, environment_name=ENV, uid="A5ED")] == [uid]
    assert cli(tmp_path, "--json", "--uid", "A5ED0265") == 0
    assert [json.loads(line)["uid"] for line in capsys.readouterr().out.splitlines()] == [uid]


def test_an_empty_answer_asks_the_database_once_whether_it_holds_tasks(tmp_path, capsys, monkeypatch):
    """The empty answer's "the log holds other tasks" read the whole log a second time:
    recovery again (seconds while a kernel holds the database's write lock) and the query
    of every record.  It is now one indexed row (``LogReader.holds_tasks``) once the log
    has been read: recovery runs once per command (counted around the real one)."""
    from qmagic.store import history as history_module

    with Journal(tmp_path, ENV) as j:
        j.finished(record("uid-one", "completed"))
    prepared = []
    real = history_module._prepare
    monkeypatch.setattr(history_module, "_prepare", lambda *a: prepared.append(a) or real(*a))
    assert cli(tmp_path, "--uid", "abc") == 0
    assert "the log holds other tasks" in capsys.readouterr().err
    assert len(prepared) == 1
    with Journal(tmp_path / "open", ENV) as live:  # (nothing stored yet: its own records answer)
        live.finished(record("uid-two", "completed"))
        assert cli(tmp_path / "open", "--uid", "abc") == 0
        assert "the log holds other tasks" in capsys.readouterr().err


def test_a_notebook_path_is_kept_alike_whatever_else_the_record_holds(tmp_path):
    """A notebook path with a control or format character (``evil\\n\\x1b[31mred\\u202e.ipynb``)
    was stored as it is by a plain record, but escaped (``\\n``, ``\\u202e``) by one that took
    the careful path (an argument JSON cannot hold, a lone surrogate ...): the same notebook
    was then two, and the escaped one's file name was cut at its last backslash, taken for a
    Windows folder (the CELL column read ``u202e.ipynb [3]``).  Now both keep the path."""
    nb = "/lab/evil\n\x1b[31mred\u202e.ipynb"
    prov = {"notebook": nb, "cell_id": "c", "execution_count": 3, "cell_hash": "ab"}
    with Journal(tmp_path, ENV) as j:
        j.finished(task("u-plain", name="scan", args=[1], provenance=prov))
        j.finished(task("u-odd", name="scan", args=[Opaque()], provenance=prov))  # (the careful path)
        assert j.flush()
    found = history(state_dir=tmp_path, environment_name=ENV, notebook=nb)
    assert sorted(r["uid"] for r in found) == ["u-odd", "u-plain"]
    assert {r["provenance"]["notebook"] for r in found} == {nb}
    assert {cell_label(r["provenance"]) for r in found} == {"evil\\n\\x1b[31mred\\u202e.ipynb [3]"}
    assert len(history(state_dir=tmp_path, environment_name=ENV, notebook="evil*")) == 2
