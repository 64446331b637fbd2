"""The worker's experiment log (qmagic.store.journal): records outlive the worker, the
tasks of a worker that died read as failed, the log can be switched on while running."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from engine_helpers import QS, TIMEOUT, Gate, make_worker  # noqa: F401 - fixture
from interrupt_points import interrupted_at, lines_of
from polling import eventually, until_free
from store_helpers import task as log_record
from traitlets.config import Config

import qmagic
from qmagic import TaskStatus, Worker, probe
from qmagic.errors import LogUnavailable, RequestRefused, TaskCancelled, TaskNotFound
from qmagic.worker_log import LOG_CLOSED
from qmagic.store.database import database_path
from qmagic.store.journal import ORPHAN_QUEUED_REASON, ORPHAN_REASON
from qmagic.worker_log import _REPRS, VALUE_REPR_S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def short_busy(monkeypatch):
    """A log's writer waits 0.3 s for another process's lock before it is a fault (2 s in
    use): for tests of what a fault shows or spares, not of how long a lock is waited for."""
    from qmagic.store import database

    monkeypatch.setattr(database, "_WRITER_BUSY_MS", 300)


@pytest.fixture
def journaled(make_worker):
    """Workers with the log on, all on one state folder (like restarts of one kernel)."""
    return lambda namespace=None, **settings: make_worker(namespace, journal_enabled=True, **settings)


def test_results_survive_a_new_worker(journaled):
    def scan(n):
        qmagic.report_progress(n, n, "done")
        return {"points": n}

    first = journaled({"scan": scan, "bad": lambda: 1 / 0, "obj": lambda: object()})
    ok = first.submit("scan", (3,), user="Alice")
    bad = first.submit("bad")
    obj = first.submit("obj")
    for t in (ok, bad, obj):
        t.wait(TIMEOUT)
    first.close()

    second = journaled()  # like a kernel restart: nothing in memory
    qs = QS(second)
    assert second.engine.get(ok.uid) is None
    assert qs.task_status(task_uid=[ok.uid, bad.uid])["status"] == {ok.uid: "completed", bad.uid: "completed"}
    res = qs.task_result(task_uid=ok.uid)["result"]
    assert res["success"] is True and res["return_value"] == {"points": 3}
    assert res["time_stop"] == ok.finished_at
    res = qs.task_result(task_uid=bad.uid)["result"]
    assert res["success"] is False and "ZeroDivisionError" in res["traceback"]
    assert res["msg"] == "Error occurred while executing 'Execute function': division by zero"
    res = qs.task_result(task_uid=obj.uid)["result"]  # a non-JSON result: summarised, not lost
    assert res["success"] is True and res["return_value"] is None and "summary" in res["msg"]
    assert second.find(ok.uid[:8])["uid"] == ok.uid  # a uid prefix finds the record too
    records = second.history(user="Alice")
    assert [r["uid"] for r in records] == [ok.uid]
    assert records[0]["progress"] == {"value": 3, "total": 3, "message": "done"}
    assert records[0]["origin"] == "python" and records[0]["background"] is True
    assert records[0]["journal"]["orphaned"] is False



def test_cancelling_a_task_only_the_log_knows_says_what_it_knows(journaled):
    """After a restart ``%task_cancel 0cc4`` said "No task with uid '0cc4' in this kernel's
    memory." while ``%task_status 0cc4`` read it from the log: cancel says the task has
    already finished, or that it runs in another kernel, which alone can cancel it."""
    gate = Gate()
    first = journaled({"scan": lambda n: n, "gate": gate})
    done = first.submit("scan", (3,))
    assert done.result(TIMEOUT) == 3
    running = first.submit("gate")
    assert gate.started.wait(TIMEOUT)
    second = journaled()  # another kernel on the same log
    try:
        def logged() -> bool:  # (once the first worker's writer has stored its start)
            try:
                return second.find(running.uid[:8])["status"] == "running"
            except TaskNotFound:
                return False

        eventually(logged)
        with pytest.raises(RequestRefused) as info:
            second.cancel(done.uid[:8])
        assert str(info.value) == ("scan(3) has already finished (completed; from the experiment log, it is no "
                                   "longer in this kernel's memory); there is nothing to cancel.")
        with pytest.raises(TaskNotFound) as info:
            second.cancel(running.uid[:8])
        assert str(info.value).startswith(f"gate() is running in another kernel (process {os.getpid()} on ")
        assert str(info.value).endswith("from the experiment log): only that kernel can cancel it.")
        record = second.find(running.uid[:8])  # a record that does not say where it runs
        bare = {**record, "journal": {**record["journal"], "pid": None, "host": None}}
        second.find = lambda uid: bare  # type: ignore[method-assign]
        try:
            with pytest.raises(TaskNotFound) as info:
                second.cancel(running.uid[:8])
        finally:
            del second.find
        assert str(info.value) == ("gate() is running in another kernel (from the experiment log): only that "
                                   "kernel can cancel it.")
        with pytest.raises(TaskNotFound, match="It is not in the experiment log either"):
            second.cancel("f" * 8)
        assert running.status is TaskStatus.RUNNING
    finally:
        gate.release.set()
    assert running.result(TIMEOUT) is None


def test_a_result_the_log_kept_in_part_is_never_sent_as_the_result(journaled):
    """A result the log keeps with a summary in place of a part JSON cannot hold ([1.5, NaN],
    a dict holding a datetime) was sent by task_result, once the task had left the memory,
    with that summary as if it were the result, and no word of it (hostile test)."""
    import datetime

    first = journaled({"nan": lambda: [1.5, float("nan")], "when": lambda: {"at": datetime.datetime(2026, 1, 2)},
                       "ok": lambda: [1.5, {"a": None}]})
    tasks = [first.submit(name) for name in ("nan", "when", "ok")]
    for t in tasks:
        t.wait(TIMEOUT)
    first.close()
    qs = QS(journaled())
    for t in tasks[:2]:
        res = qs.task_result(task_uid=t.uid)["result"]
        assert res["success"] is True and res["return_value"] is None, res
        assert "holds only a summary of it or of part of it" in res["msg"]
    res = qs.task_result(task_uid=tasks[2].uid)["result"]
    assert res["return_value"] == [1.5, {"a": None}] and res["msg"] == ""


def test_a_uid_prefix_the_log_does_not_know_or_shares_is_searched_for_once(journaled, monkeypatch):
    """worker.find of a prefix not in memory: one prefix search of the log tells found,
    several tasks and missing apart (it searched a second time for the "several" line)."""
    w = journaled()
    for uid in ("abcd1111-0000-4000-8000-000000000001", "abcd2222-0000-4000-8000-000000000002"):
        w._journal.submitted(log_record(uid, "completed"))
    reader = w._journal._reader
    searches = []
    search = reader.find_prefix
    monkeypatch.setattr(reader, "find_prefix", lambda *a, **k: searches.append(a) or search(*a, **k))
    with pytest.raises(TaskNotFound, match="not in the experiment log either"):
        w.find("ffff0000")
    assert len(searches) == 1
    with pytest.raises(TaskNotFound, match="matches several tasks in the experiment log"):
        w.find("abcd")
    assert len(searches) == 2
    assert w.find("abcd2")["uid"].startswith("abcd2222") and len(searches) == 3


def closed_worker_with_a_logged_task(journaled):
    """A closed worker of a new kernel, and a task an earlier kernel logged (in the log only)."""
    first = journaled({"add": lambda a, b: a + b})
    task = first.submit("add", (1, 2))
    assert task.wait(TIMEOUT)
    first.close()
    w = journaled()
    w.close()
    return w, task


def test_a_closed_worker_finds_in_its_log_what_its_history_lists(journaled):
    """After ``worker.close()`` the log stays readable for every lookup, not for history
    alone: %task_status UID of a task history listed said it was not in the log."""
    w, old = closed_worker_with_a_logged_task(journaled)
    assert [r["uid"] for r in w.history()] == [old.uid]
    assert w.find(old.uid)["status"] == "completed"
    assert w.find(old.uid[:8])["uid"] == old.uid
    assert w.lookup(old.uid)["uid"] == old.uid
    assert w.statuses([old.uid]) == {old.uid: TaskStatus.COMPLETED}
    with pytest.raises(TypeError, match=r"^statuses\(\) takes a list of uids: statuses\(\[uid\]\) for one"):
        w.statuses(old.uid)  # (each character was looked up: {'a': None, ...})
    with pytest.raises(TaskNotFound, match="not in the experiment log either"):
        w.find("ffff0000")
    with pytest.raises(LogUnavailable) as health:  # (it said the log was off: turn on journal_enabled)
        w.log_health()
    assert str(health.value) == LOG_CLOSED and w.journal_enabled


def test_a_closed_worker_changes_no_lock_and_opens_no_file_again(journaled, tmp_path):
    """After ``worker.close()`` the lock still changed through every door (``worker.lock``,
    %lock, the panel, the remote lock and unlock) on the closed lock store: a lock made the
    state folder again (deleted meanwhile by a cleanup) and wrote its files there, and a
    change of the state folder or of a log setting opened a new log and lock watcher (a
    closed worker with its threads running again, ``log_open`` True).  Each is refused in
    one line saying to run %reload_ext qmagic, the setting goes back; the lock still reads."""
    from qmagic import RequestRefused
    from qmagic.worker_state import MSG_WORKER_CLOSED

    w = journaled()
    w.lock("key-of-this-test")
    w.close()
    state = tmp_path / "state"
    assert w.lock_state().environment and w.current_lock().environment  # (reads answer)
    for leftover in state.iterdir():  # (a cleanup of the folder)
        leftover.unlink()
    state.rmdir()
    threads = set(threading.enumerate())
    for change in (lambda: w.lock("key-of-this-test"), lambda: w.lock("another-key", queue=True),
                   lambda: w.unlock("key-of-this-test"), w.unlock):
        with pytest.raises(RequestRefused) as info:
            change()
        assert str(info.value) == MSG_WORKER_CLOSED
    qs = QS(w)
    assert qs.lock(lock_key="key-of-this-test", environment=True, user="u")["msg"] == MSG_WORKER_CLOSED
    assert qs.unlock(lock_key="key-of-this-test")["msg"] == MSG_WORKER_CLOSED
    for name, value in (("state_dir", str(tmp_path / "other")), ("environment_name", "other"),
                        ("lock_backoff_s", 2.0), ("journal_max_bytes", 10_000_000),
                        ("journal_enabled", False)):
        old = getattr(w, name)
        with pytest.raises(RequestRefused) as info:
            setattr(w, name, value)
        assert str(info.value) == MSG_WORKER_CLOSED and getattr(w, name) == old, name
    assert not state.exists() and not (tmp_path / "other").exists()
    assert not w.log_open and set(threading.enumerate()) <= threads
    assert not w.current_lock().locked  # (its file is gone: read as unlocked)


def _open_files(prefix: str) -> list[str]:
    """The files of this process open under ``prefix`` (from /proc/self/fd)."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # (closed meanwhile, as the listing's own descriptor is)
            continue
        if target.startswith(prefix):
            out.append(target)
    return out


def test_a_closed_worker_reads_its_log_with_no_file_kept_open(journaled):
    """A closed worker's reads (history, find) opened a read-only SQLite connection that
    stayed open until the worker was garbage collected: a descriptor of the database, and a
    reader that may hold back the checkpoints of other kernels writing it.  Each read now
    opens and closes its own; the reads still answer."""
    w, task = closed_worker_with_a_logged_task(journaled)
    path = str(database_path(Path(w.state_dir), w.environment_name))
    for _ in range(2):
        assert [r["uid"] for r in w.history()] == [task.uid]
        assert w.find(task.uid[:8])["status"] == "completed"
        assert w.statuses([task.uid]) == {task.uid: TaskStatus.COMPLETED}
        assert _open_files(path) == []


class _NoItems(dict):
    def items(self):
        raise RuntimeError("no items")


class _NoLen(list):
    def __len__(self):
        raise RuntimeError("no len")


class _NoStr(str):
    def __str__(self):
        raise RuntimeError("no str")


class _NoFloat(float):
    def __float__(self):
        raise RuntimeError("no float")


def test_values_that_cannot_be_read_are_summarised_never_lost(journaled):
    """A result or argument whose items() raises still gets its record: the value becomes
    a summary that says so (found by a hostile test: such a result used to leave the task
    "running" in the log, then an orphan).  A subclass of list, str or float whose len(),
    str() or float() raises is kept as the built-in type holds it, as JSON writes it."""
    odd = {"dict": _NoItems(a=1), "list": _NoLen([1, 2]), "str": _NoStr("x"), "float": _NoFloat(1.5)}
    w = journaled({"make": lambda kind: odd[kind], "echo": lambda value: "ok"})
    tasks = [w.submit("make", (kind,)) for kind in odd] + [w.submit("echo", (value,)) for value in odd.values()]
    for t in tasks:
        t.wait(TIMEOUT)
    w.close()
    after = journaled()
    for t in tasks:
        record = after.find(t.uid)
        assert record["status"] == "completed", record
    made = after.find(tasks[0].uid)["result"]
    assert made["__qmagic_summary__"] == "repr" and "could not be read" in made["repr"]
    assert "could not be read" in after.find(tasks[4].uid)["args"][0]["repr"]
    assert [after.find(t.uid)["result"] for t in tasks[1:4]] == [[1, 2], "x", 1.5]
    assert [after.find(t.uid)["args"][0] for t in tasks[5:]] == [[1, 2], "x", 1.5]



def test_objects_posing_as_json_types_never_break_a_task_or_its_record(journaled):
    """A unittest.mock.Mock(spec=list) passes for a list (its __class__ says list): the log
    took it for one and raised ("object of type 'Mock' has no len()"), so a task taking one
    could not be submitted, and a task returning one was recorded as failed, "kernel stopped
    while the task was running"; a MagicMock(spec=dict) was stored as {}, one of spec=float
    as 1.0, silently (hostile test).  Values are told by their real type: such an object is
    summarised by its repr."""
    from unittest import mock

    fakes = [mock.Mock(spec=list), mock.MagicMock(spec=dict), mock.NonCallableMagicMock(spec=float),
             mock.MagicMock(spec=str), [mock.Mock(spec=int)]]
    w = journaled({"echo": lambda value: value})
    tasks = [w.submit("echo", (fake,)) for fake in fakes]
    for t in tasks:
        assert t.wait(TIMEOUT)
    w.close()
    after = journaled()
    for fake, t in zip(fakes, tasks):
        record = after.find(t.uid)
        assert record["status"] == "completed", record
        for logged in (record["result"], record["args"][0]):
            logged, one = (logged[0], fake[0]) if type(fake) is list else (logged, fake)
            assert logged["__qmagic_summary__"] == "repr" and logged["repr"] == repr(one), logged


def test_a_value_whose_own_methods_block_never_holds_up_the_task_end(journaled):
    """A list subclass whose __len__ or __iter__ blocks, a str subclass whose __str__ does, a
    dict subclass whose items() does, an object whose __getattr__ does (a proxy that asks a
    device): the log ran that code on the task path with no deadline, so the task ended only
    when it returned (found by a hostile test; only a repr had the deadline).  Such values
    are now read as the built-in type holds them, or get the deadline of a repr."""
    release = threading.Event()

    class Length(list):
        def __len__(self):
            release.wait(60)
            return 2

    class Items(list):
        def __iter__(self):
            release.wait(60)
            return iter([1, 2])

    class Text(str):
        def __str__(self):
            release.wait(60)
            return "text"

    class Pairs(dict):
        def items(self):
            release.wait(60)
            return dict.items(self)

    class Proxy:
        def __getattr__(self, name):
            release.wait(60)
            raise AttributeError(name)

    values = {"len": Length([1, 2]), "iter": Items([1, 2]), "str": Text("a"), "items": Pairs(a=1), "attr": Proxy()}
    w = journaled({"make": lambda kind: values[kind]})
    try:
        tasks = {}
        for kind, value in values.items():
            tasks[kind] = task = w.submit("make", (kind,))
            assert task.wait(VALUE_REPR_S + 10), f"the task's end waited for its result's {kind}"
            assert task.result() is value
        records = {r["uid"]: r["result"] for r in w.history()}
        logged = {kind: records[task.uid] for kind, task in tasks.items()}
        assert [logged["len"], logged["iter"], logged["str"]] == [[1, 2], [1, 2], "a"], logged
        assert "did not finish within 1 s" in logged["items"]["repr"]  # (then the deadline's thread is stuck:)
        assert logged["attr"]["__qmagic_summary__"] == "repr"
        assert "its repr was not read: an earlier value's repr is still blocked" in logged["attr"]["repr"]
    finally:
        release.set()
        until_free(_REPRS)  # (else the next test's reprs are given up at once)


def test_queued_and_cancelled_tasks_are_journaled(journaled):
    gate = Gate()
    w = journaled({"gate": gate, "f": lambda: 1}, max_background_tasks=1)
    running = w.submit("gate")
    assert gate.started.wait(TIMEOUT)
    waiting = w.submit("f")
    assert w.history(uid=waiting.uid)[0]["status"] == "queued"
    assert w.history(uid=running.uid)[0]["status"] == "running"
    waiting.cancel()
    gate.release.set()
    running.wait(TIMEOUT)
    statuses = {r["uid"]: r["status"] for r in w.history()}
    assert statuses == {running.uid: "completed", waiting.uid: "cancelled"}
    error = w.history(uid=waiting.uid)[0]["error"]
    assert error == waiting.error and error.startswith("Task was cancelled")


def test_tasks_of_a_killed_process_read_as_failed(tmp_path):
    state = tmp_path / "state"
    child = textwrap.dedent(
        f"""
        import sys, threading
        sys.path.insert(0, {ROOT!r})
        from traitlets.config import Config
        import qmagic
        cfg = Config(); cfg.QMagic.state_dir = {str(state)!r}
        started = threading.Event()
        def hang():
            started.set()
            threading.Event().wait()
        w = qmagic.Worker({{"hang": hang, "ok": lambda: 7}}, config=cfg, max_background_tasks=1)
        done = w.submit("ok"); done.result(10)
        t = w.submit("hang"); started.wait(10)
        q = w.submit("ok")  # waits behind hang: queued
        print(done.uid, t.uid, q.uid, flush=True)
        threading.Event().wait()
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    try:
        done_uid, running_uid, queued_uid = proc.stdout.readline().split()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(TIMEOUT)
        proc.stdout.close()
    config = Config()
    config.QMagic.state_dir = str(state)
    w = Worker({}, config=config)
    try:
        qs = QS(w)
        assert qs.task_result(task_uid=done_uid)["result"]["return_value"] == 7
        for uid, reason in ((running_uid, ORPHAN_REASON), (queued_uid, ORPHAN_QUEUED_REASON)):
            reply = qs.task_result(task_uid=uid)
            assert reply["status"] == "completed"
            assert reply["result"]["success"] is False
            assert reply["result"]["msg"].endswith(reason)
        failed = {r["uid"]: r for r in w.history(status="failed")}
        assert set(failed) == {running_uid, queued_uid}
        assert all(r["journal"]["orphaned"] for r in failed.values())
        assert failed[running_uid]["error"] == ORPHAN_REASON
        assert failed[queued_uid]["error"] == ORPHAN_QUEUED_REASON  # (it never started)
        assert w.statuses([running_uid, done_uid]) == {running_uid: qmagic.TaskStatus.FAILED,
                                                       done_uid: qmagic.TaskStatus.COMPLETED}
    finally:
        w.close()
    # the dead process's spool and lock file were stored and removed by the recovery
    assert not list(state.glob("*.spool")) and not list(state.glob("*.lock"))


def test_closing_with_a_task_blocked_where_nothing_stops_it_records_it_truly(tmp_path):
    """Unload/close while a task is blocked in C: the worker cannot stop it; its record and
    the Task agree — cancelled, the worker was closed, its code left to end — written before
    the log closes (the log said 'kernel stopped while the task was running' although the
    kernel lived on, and the Task said something else) (found by the notebook tester).
    The reason says its code ran on: it read as if the scan had stopped there (an
    %unload_ext mid-scan; the scan went on to its end, unlogged)."""
    import threading

    from qmagic.core.jobs import CLOSED_REASON, STILL_RUNNING

    blocked, release, returned = threading.Event(), threading.Event(), threading.Event()

    def stuck():
        blocked.set()
        try:
            release.wait()  # (a lock wait in C: no forced cancel reaches it)
        finally:  # (the forced cancel lands as the wait returns)
            returned.set()
        return "late"

    config = Config()
    config.QMagic.state_dir = str(tmp_path)
    config.QMagic.cancel_grace_s = 0.1
    w = Worker({"stuck": stuck}, config=config)
    task = w.submit("stuck")
    assert blocked.wait(TIMEOUT)
    w.close(timeout=0.5)
    said = CLOSED_REASON + STILL_RUNNING
    assert said.endswith("its code ran on, unlogged (nothing could stop it)")
    assert task.status is TaskStatus.CANCELLED and task.error == said
    [rec] = qmagic.history(state_dir=tmp_path)
    assert rec["uid"] == task.uid and rec["status"] == "cancelled" and rec["error"] == said
    assert not rec["journal"]["orphaned"]
    release.set()  # its code ends later: nothing changes, nothing breaks
    assert returned.wait(TIMEOUT)
    assert task.status is TaskStatus.CANCELLED and task.error == said


def test_journal_off_then_switched_on(make_worker):
    w = make_worker({"f": lambda: 1}, journal_enabled=False)
    t = w.submit("f")
    t.wait(TIMEOUT)
    with pytest.raises(LogUnavailable, match="experiment log is off"):
        w.history()
    with pytest.raises(LogUnavailable, match="experiment log is off"):
        w.log_health()
    assert w.log_open is False
    w.journal_enabled = True  # live switch on: the log opens
    assert w.log_open is True
    t2 = w.submit("f")
    t2.wait(TIMEOUT)
    assert [r["uid"] for r in w.history()] == [t2.uid]
    assert w.log_health()["ok"] is True and w.log_health()["dropped"] == 0
    assert w.log_health()["open"] is True
    w.journal_enabled = False  # and off again: closed, nothing recorded meanwhile
    w.submit("f").wait(TIMEOUT)
    w.journal_enabled = True
    assert [r["uid"] for r in w.history()] == [t2.uid]


def test_a_log_setting_changed_while_tasks_run_leaves_them_running(journaled):
    """A log setting changed while a task ran reopened the log, and closing the old one
    marked the task failed, "kernel stopped while the task was running", until it ended
    (found by a hostile test).  The old log now records them to their end (it drains)."""
    gate = Gate()
    w = journaled({"hold": gate, "quick": lambda: 1}, max_background_tasks=1)
    running = w.submit("hold")
    assert gate.started.wait(TIMEOUT)
    queued = w.submit("quick")  # (waits for the one thread)
    w.journal_max_age_s = 7 * 86400.0
    reader = journaled()  # another session's view: what the database holds
    try:
        statuses = {r["uid"]: (r["status"], r["journal"]["orphaned"]) for r in reader.history()}
        assert statuses == {running.uid: ("running", False), queued.uid: ("queued", False)}
        gate.release.set()
        assert queued.result(TIMEOUT) == 1 and running.wait(TIMEOUT)
        w.close()
        statuses = {r["uid"]: r["status"] for r in reader.history()}
        assert statuses == {running.uid: "completed", queued.uid: "completed"}
    finally:
        gate.release.set()


def _holding(journaled):
    """A logged worker, a task running ``hold`` (a :class:`Gate`) until released."""
    gate = Gate()
    w = journaled({"hold": gate})
    running = w.submit("hold")
    assert gate.started.wait(TIMEOUT)
    return w, gate, running


def _submitting(w, name: str, box: dict) -> threading.Thread:
    """A started thread submitting ``name``; a TaskCancelled it gets goes to ``box["error"]``."""
    def submit() -> None:
        try:
            w.submit(name)
        except TaskCancelled as exc:
            box["error"] = exc

    thread = threading.Thread(target=submit)
    thread.start()
    return thread


def _no_drain_thread() -> bool:
    """No log's drain thread is running (one may end just after its log is forgotten)."""
    return not [t for t in threading.enumerate() if t.name == "qmagic-log-drain"]


def _drained(w) -> bool:
    """The worker has no log observer left but its current log's (every drained log closed)."""
    return list(w.engine.observers) == ([w._log_observer] if w._log_observer else [])


def test_the_log_switched_off_while_tasks_run_records_how_they_end(journaled):
    """Switching the log off closed it at once, and closing marked its unfinished tasks
    "kernel stopped while the task was running" although they ran on and completed.  The
    log now drains: tasks it logged are logged to their end, new ones are not, then it
    closes."""
    gate = Gate()
    w = journaled({"hold": gate, "quick": lambda: 1}, max_background_tasks=1)
    running = w.submit("hold")
    assert gate.started.wait(TIMEOUT)
    queued = w.submit("quick")  # (waits for the one thread)
    w.journal_enabled = False
    unlogged = w.submit("quick")  # submitted while the log is off
    reader = journaled()  # another session's view: what the database holds
    try:
        expected = {running.uid: ("running", False), queued.uid: ("queued", False)}
        eventually(lambda: {r["uid"]: (r["status"], r["journal"]["orphaned"])
                            for r in reader.history()} == expected, TIMEOUT, "the records stored")
        gate.release.set()
        assert queued.result(TIMEOUT) == 1 and unlogged.result(TIMEOUT) == 1
        eventually(lambda: _drained(w), TIMEOUT, "the switched-off log to close")
        records = {r["uid"]: r for r in reader.history()}
        assert {uid: (r["status"], r["error"], r["journal"]["orphaned"]) for uid, r in records.items()} == {
            running.uid: ("completed", None, False), queued.uid: ("completed", None, False)}
        assert records[queued.uid]["finished_at"] == queued.finished_at
    finally:
        gate.release.set()
    eventually(_no_drain_thread, TIMEOUT, "the drain threads to end")  # (none left running)


def test_the_log_switched_off_and_on_again_while_a_task_runs(journaled):
    w, gate, running = _holding(journaled)
    w.journal_enabled = False
    w.journal_enabled = True  # the first log drains; the second logs new tasks
    assert len(w._draining) == 1
    later = w.submit("hold")
    gate.release.set()
    assert running.wait(TIMEOUT) and later.wait(TIMEOUT)
    eventually(lambda: _drained(w), TIMEOUT, "the first log to close")
    w.close()
    statuses = {r["uid"]: (r["status"], r["journal"]["orphaned"]) for r in journaled().history()}
    assert statuses == {running.uid: ("completed", False), later.uid: ("completed", False)}


def test_a_log_setting_changed_twice_while_a_task_runs(journaled):
    w, gate, running = _holding(journaled)
    w.journal_max_age_s = 7 * 86400.0
    w.journal_max_age_s = 8 * 86400.0
    gate.release.set()
    assert running.wait(TIMEOUT)
    w.close()
    (record,) = journaled().history()
    assert (record["uid"], record["status"], record["journal"]["orphaned"]) == (running.uid, "completed", False)


def test_a_new_state_folder_while_a_task_runs_leaves_its_record_true_in_the_old(journaled, tmp_path):
    gate = Gate()
    w = journaled({"hold": gate})
    old_folder = str(tmp_path / "state")
    running = w.submit("hold")
    assert gate.started.wait(TIMEOUT)
    w.state_dir = str(tmp_path / "elsewhere")  # another database: the old log drains
    gate.release.set()
    assert running.wait(TIMEOUT)
    eventually(lambda: _drained(w), TIMEOUT, "the old folder's log to close")
    (record,) = qmagic.history(state_dir=old_folder)
    assert (record["uid"], record["status"], record["journal"]["orphaned"]) == (running.uid, "completed", False)
    w.close()


@pytest.mark.parametrize("setting", ["environment_name", "state_dir"])
def test_a_task_running_while_the_log_moves_is_recorded_in_its_own_log_only(journaled, tmp_path, setting):
    """A task submitted before environment_name or state_dir changed was recorded in both
    logs: the old one to its end (it drains), and the new one got a copy of its end alone
    (a "completed" task it never had).  A task belongs to the log it was submitted in."""
    gate = Gate()
    w = journaled({"hold": gate, "quick": lambda: 1}, max_background_tasks=1)
    old = {"state_dir": str(tmp_path / "state"), "environment_name": w.environment_name}
    running = w.submit("hold")
    assert gate.started.wait(TIMEOUT)
    queued = w.submit("quick")  # (waits for the one thread: it starts after the move)
    setattr(w, setting, "moved" if setting == "environment_name" else str(tmp_path / "moved"))
    new = {"state_dir": w.state_dir, "environment_name": w.environment_name}
    try:
        gate.release.set()
        assert running.wait(TIMEOUT) and queued.result(TIMEOUT) == 1
        eventually(lambda: _drained(w), TIMEOUT, "the old log to close")
        assert w._journal.flush(TIMEOUT)
        records = {r["uid"]: r for r in qmagic.history(**old)}
        assert {uid: (r["status"], r["journal"]["orphaned"]) for uid, r in records.items()} == {
            running.uid: ("completed", False), queued.uid: ("completed", False)}
        assert records[queued.uid]["started_at"] == queued.started_at
        assert qmagic.history(**new) == [] and w.history() == []
    finally:
        gate.release.set()
        w.close()


def test_a_draining_logs_faults_show_in_the_health_until_it_closes(journaled, tmp_path, short_busy):
    """A log switched off while its tasks ran, whose records could not be written, said so
    only in a warning: log_health() raised "the log is off" and log_note() (the %tasks and
    %control_channel line) said nothing, records waiting.  Now they count until it closes.
    Then log_health() answered while log_open was False, and its note read as if the log were
    on: ``open`` (= log_open) says no new task is logged, and the note says so."""
    first, second = Gate(), Gate()
    w = journaled({"first": first, "second": second}, max_background_tasks=2)
    tasks = [w.submit("first"), w.submit("second")]
    assert first.started.wait(TIMEOUT) and second.started.wait(TIMEOUT)
    w.journal_enabled = False  # the log drains: both tasks are still logged there
    locker = sqlite3.connect(database_path(tmp_path / "state", "default"), isolation_level=None,
                             timeout=TIMEOUT)
    try:
        locker.execute("BEGIN EXCLUSIVE")  # another process holds the write lock
        first.release.set()  # its end waits to be written; `second` keeps the log draining
        assert tasks[0].wait(TIMEOUT)
        eventually(lambda: not w.log_health()["ok"], TIMEOUT, "the draining log's fault")
        health = w.log_health()
        assert health["pending"] > 0 and health["draining"] == 1 and "locked" in health["last_error"]
        assert health["open"] is False and w.log_open is False
        note = w.log_note()
        assert note.startswith("Note: the experiment log, off for new tasks but still recording "
                               "earlier ones, cannot write (") and "locked" in note, note
    finally:
        locker.execute("ROLLBACK")
        locker.close()
        first.release.set()
        second.release.set()
    assert tasks[1].wait(TIMEOUT)
    eventually(lambda: _drained(w), TIMEOUT, "the switched-off log to close")
    with pytest.raises(LogUnavailable, match="experiment log is off"):
        w.log_health()
    assert w.log_note() is None


def test_a_log_setting_changed_during_a_fault_of_the_log_does_not_wait_for_it(journaled, tmp_path, short_busy):
    """A log setting changed while the log could not write (here another program holds the
    database) held the cell up to 5 s: the old log first stored what it held, which it
    could not.  Now the cell does not wait for a log in a fault; the old log, draining,
    stores those records once the fault clears."""
    w = journaled({"quick": lambda: 1})
    locker = sqlite3.connect(database_path(tmp_path / "state", "default"), isolation_level=None,
                             timeout=TIMEOUT)
    try:
        locker.execute("BEGIN EXCLUSIVE")  # another process holds the write lock
        task = w.submit("quick")
        assert task.result(TIMEOUT) == 1
        eventually(lambda: not w.log_health()["ok"], TIMEOUT, "the log's fault")
        started = time.monotonic()
        w.journal_summary_chars = 3000 - w.journal_summary_chars  # a new log, the old drains
        waited = time.monotonic() - started
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert waited < 2.0, f"the setting change waited {waited:.1f} s for the log in a fault"
    assert w.log_open
    eventually(lambda: [r["status"] for r in w.history(uid=task.uid)] == ["completed"], TIMEOUT,
               "the old log to store the task's record once the fault cleared")
    eventually(lambda: _drained(w), TIMEOUT, "the old log to close")


def test_a_worker_closed_while_a_switched_off_log_drains_closes_it(journaled):
    w, gate, running = _holding(journaled)
    w.journal_enabled = False
    (draining,) = w._draining
    gate.release.set()  # (it may end before the worker closes, or be stopped by the close)
    w.close()
    assert draining.journal._closed
    (record,) = journaled().history()
    assert record["uid"] == running.uid
    assert (record["status"], record["error"]) in (("completed", None), ("failed", ORPHAN_REASON))


def test_a_bounded_close_bounds_a_draining_log_too_while_the_database_is_locked(journaled, tmp_path):
    """``close(log_timeout=...)`` (the close at kernel exit, which must end before
    jupyter_client kills the kernel) bounded the log in force only: a log switched off while
    a task ran still took up to 5 s more (and a busy wait of 2 s on top) to store its
    records while another process held its database.  Every log the close closes now
    shares the bound; what the locked database kept out stays in the spool, and the next
    worker that opens the log stores it."""
    from qmagic.core.jobs import CLOSED_REASON, STILL_RUNNING

    w, gate, running = _holding(journaled)
    w.journal_enabled = False
    (draining,) = w._draining
    locker = sqlite3.connect(database_path(tmp_path / "state", "default"), isolation_level=None,
                             timeout=TIMEOUT)
    try:
        locker.execute("BEGIN EXCLUSIVE")  # another process holds the write lock
        began = time.monotonic()
        w.close(1.0, log_timeout=1.0)
        took = time.monotonic() - began
    finally:
        locker.execute("ROLLBACK")
        locker.close()
        gate.release.set()
    assert took < 3.5, f"the close took {took:.1f} s"
    writer = draining.journal._writer.thread  # (left to end on its own: it does at once)
    writer.join(TIMEOUT)
    assert not writer.is_alive()
    (record,) = journaled().history()
    assert (record["uid"], record["status"], record["error"]) == (running.uid, "cancelled",
                                                                 CLOSED_REASON + STILL_RUNNING)


def test_switching_the_log_off_and_on_while_tasks_stream_never_writes_a_wrong_record(journaled):
    """Submitting threads race a thread that switches the log off and on: every record in
    the log ends as its task did (none "kernel stopped"), and every drained log closes."""
    w = journaled({"f": lambda i: i}, max_background_tasks=4)
    stop = threading.Event()
    tasks: list = []

    def submit() -> None:
        while not stop.is_set():
            task = w.submit("f", (len(tasks),))
            tasks.append(task)
            task.wait(TIMEOUT)

    def toggle() -> None:
        for _ in range(30):
            w.journal_enabled = not w.journal_enabled

    submitters = [threading.Thread(target=submit) for _ in range(3)]
    for th in submitters:
        th.start()
    toggler = threading.Thread(target=toggle)
    toggler.start()
    toggler.join(60)
    stop.set()
    for th in submitters:
        th.join(60)
    assert not toggler.is_alive() and w.journal_enabled  # (30 switches: back on)
    for t in tasks:
        assert t.wait(TIMEOUT)
    eventually(lambda: _drained(w), TIMEOUT, "every switched-off log to close")
    w.close()
    records = journaled().history(limit=None)
    by_uid = {t.uid: t for t in tasks}
    assert records and len(records) < len(tasks)  # (some were submitted while it was off)
    wrong = [(r["uid"], r["status"], r["error"]) for r in records
             if r["status"] != "completed" or r["result"] != by_uid[r["uid"]].result()]
    assert wrong == []
    eventually(_no_drain_thread, TIMEOUT, "the drain threads to end")  # (none left running)


def test_a_result_whose_repr_blocks_never_holds_up_the_task_end(journaled):
    """The log summarises a result JSON cannot hold with its repr, made before the task ends
    (its record first).  A repr that blocked held the task's waiters -- and, for a foreground
    task, the kernel, ■ held back -- until it returned (found by a hostile test).  The repr
    now runs with a deadline; the record says it did not finish."""
    release = threading.Event()

    class Blocking:
        def __repr__(self) -> str:
            release.wait(60)
            return "Blocking()"

    w = journaled({"make": lambda: Blocking()})
    try:
        task = w.submit("make")
        assert task.wait(VALUE_REPR_S + 10), "the task's end waited for its result's repr"
        assert isinstance(task.result(), Blocking)
        (record,) = w.history()
        assert record["status"] == "completed"
        assert record["result"]["repr"].endswith(
            ".<locals>.Blocking object; its repr was not read: it did not finish within 1 s>")
    finally:
        release.set()
        until_free(_REPRS)  # (else the next test's reprs are given up at once)


def test_a_read_stuck_in_the_remote_door_never_empties_a_logged_repr(journaled):
    """The log's reprs ran on the doors' probe thread: while a remote read was stuck there
    (a plan's default that blocks), every result JSON cannot hold was logged as "repr()
    failed: an earlier read is still blocked" although its repr works (found by review)."""
    release = threading.Event()
    with pytest.raises(probe.ProbeTimeout):
        probe.read(lambda: release.wait(TIMEOUT), 0.01)  # the doors' probe is stuck now
    try:
        w = journaled({"make": lambda: {1, 2}})  # (a set: JSON cannot hold it)
        assert w.submit("make").result(TIMEOUT) == {1, 2}
        (record,) = w.history()
        assert record["result"]["repr"] == "{1, 2}"
    finally:
        release.set()
        until_free(probe._DOORS)


def test_module_history_reads_a_given_state_dir(journaled, tmp_path):
    w = journaled({"f": lambda: 1})
    t = w.submit("f", user="Bob")
    t.wait(TIMEOUT)
    records = qmagic.history(state_dir=str(tmp_path / "state"), user="Bob")
    assert [r["uid"] for r in records] == [t.uid]
    assert qmagic.history(state_dir=str(tmp_path / "state"), user="Alice") == []
    frame = qmagic.history_dataframe(state_dir=str(tmp_path / "state"))
    assert list(frame["uid"]) == [t.uid] and frame["status"][0] == "completed"


def test_an_interrupt_while_the_state_folder_changes_leaves_locks_and_log_in_step(journaled, tmp_path):
    """■ while the old log stored what it held (a state folder change): the setting went
    back, the log stayed, but the lock store had already moved to the new folder."""
    w = journaled({})
    journal, locks = w._journal, w._locks
    setter = threading.current_thread()
    real_flush = journal.flush

    def flush(*args, **kwargs):
        if threading.current_thread() is setter:  # (■ lands where the setter waits)
            raise KeyboardInterrupt
        return real_flush(*args, **kwargs)

    journal.flush = flush
    old_folder = w.state_dir
    with pytest.raises(KeyboardInterrupt):
        w.state_dir = str(tmp_path / "elsewhere")
    assert w.state_dir == old_folder and w._journal is journal and w._locks is locks
    del journal.flush
    w.state_dir = str(tmp_path / "elsewhere")  # (once more, uninterrupted: both move)
    assert w._journal is not journal and w._locks is not locks
    w.close()


def test_an_interrupt_while_the_log_is_switched_off_leaves_setting_and_log_in_step(journaled):
    """■ pressed while the switched-off log stored what it held (up to 5 s during a fault)
    or closed: the setting went back to "on" although the log was off (no log, nothing
    recorded from then on) and the old log drained -- the trait said one thing, the worker
    did another."""
    gate = Gate()
    w = journaled({"hold": gate, "quick": lambda: 1})
    setter = threading.current_thread()

    def interrupted(real):
        def call(*args, **kwargs):
            if threading.current_thread() is setter:  # (■ lands where the setter waits)
                raise KeyboardInterrupt
            return real(*args, **kwargs)
        return call

    for busy in (True, False):  # a task running (the log stores what it holds), none (it closes)
        running = w.submit("hold") if busy else None
        if busy:
            assert gate.started.wait(TIMEOUT)
        journal = w._journal
        journal.flush, journal.close = interrupted(journal.flush), interrupted(journal.close)
        try:
            w.journal_enabled = False
        except KeyboardInterrupt:
            pass
        assert w.journal_enabled == (w._journal is not None)
        if w.journal_enabled:  # (nothing changed: the old log still logs new tasks)
            assert w._log_observer.journal is journal and not w._log_observer.draining
            assert w._log_observer not in w._draining
        del journal.flush, journal.close
        w.journal_enabled = False
        w.journal_enabled = True
        later = w.submit("quick")
        assert later.result(TIMEOUT) == 1
        assert [r["uid"] for r in w.history(uid=later.uid)] == [later.uid]
        if busy:
            gate.release.set()
            assert running.wait(TIMEOUT)
    eventually(lambda: _drained(w), TIMEOUT, "the switched-off logs to close")
    w.close()
    assert all(r["status"] == "completed" for r in journaled().history())


def test_a_forced_cancel_of_a_submitter_while_the_log_drains_never_marks_its_task_stopped(journaled):
    """A forced cancel (or ■) landing in a submitting thread just after the draining log
    wrote the task's first record: the observer forgot the task, so its end (cancelled,
    never run) was not logged there and the log's close marked it failed, "kernel stopped
    while the task was running"."""

    gate = Gate()
    w = journaled({"hold": gate, "quick": lambda: 1})
    running = w.submit("hold")
    assert gate.started.wait(TIMEOUT)
    journal = w._journal
    written, go_on = threading.Event(), threading.Event()
    real_submitted = journal.submitted

    def submitted(record):
        real_submitted(record)
        if record["name"] == "quick":
            box["uid"] = record["uid"]
            written.set()
            assert go_on.wait(TIMEOUT)
            raise TaskCancelled  # (a forced cancel landing as the call returns)
    box: dict = {}
    journal.submitted = submitted
    submitter = _submitting(w, "quick", box)
    try:
        assert written.wait(TIMEOUT)
        w.journal_enabled = False  # the log drains while the submit is under way
        go_on.set()
        submitter.join(TIMEOUT)
        assert "error" in box  # (the task ends cancelled, never run: the engine's rule)
    finally:
        go_on.set()
        gate.release.set()
    assert running.wait(TIMEOUT)
    eventually(lambda: _drained(w), TIMEOUT, "the switched-off log to close")
    records = {r["uid"]: (r["status"], r["journal"]["orphaned"]) for r in journaled().history()}
    assert records == {running.uid: ("completed", False), box["uid"]: ("cancelled", False)}


def test_a_task_the_log_never_had_leaves_no_status_behind_when_the_log_closes(journaled):
    """A task submitted while the log was off that started once it was on: the new log
    noted the start of a task it never logged (a row without a record, of its session),
    switching the log off again closed it and marked that row failed, and the log then
    answered "failed" for a task that completed (queueserver's task_status, a restarted
    kernel)."""
    gate, gate2 = Gate(), Gate()
    w = journaled({"hold": gate, "hold2": gate2}, max_background_tasks=1)
    w.journal_enabled = False
    running = w.submit("hold")
    assert gate.started.wait(TIMEOUT)
    later = w.submit("hold2")  # (waits for the one thread)
    w.journal_enabled = True
    try:
        gate.release.set()
        assert gate2.started.wait(TIMEOUT)  # it starts while the new log is on
        assert w._journal.flush(TIMEOUT)
        w.journal_enabled = False  # the new log logged no task of its own: it closes
        eventually(lambda: _drained(w), TIMEOUT, "the log to close")
    finally:
        gate.release.set()
        gate2.release.set()
    assert running.wait(TIMEOUT) and later.result(TIMEOUT) is None
    assert later.status is TaskStatus.COMPLETED
    statuses = journaled().statuses([running.uid, later.uid])
    assert statuses[later.uid] in (None, TaskStatus.COMPLETED), statuses


def test_a_task_announced_while_a_log_setting_changes_is_logged_while_it_runs(journaled):
    """A submitter that read the engine's observers (the old log alone) just before a log
    setting changed, and reached the old log once it drained: the old log took it for a task
    submitted after the switch, the new log was never told, and the task went unlogged
    while it ran although the log was on all along (a SIGKILL then left no trace of it)."""
    gate = Gate()
    w = journaled({"hold": gate})
    old = w._log_observer
    inside, go_on = threading.Event(), threading.Event()

    class Paused(set):  # the submitter loses the GIL right after the old log noted the task
        def add(self, uid):
            super().add(uid)
            if not inside.is_set():
                inside.set()
                assert go_on.wait(TIMEOUT)

    old.live = Paused()
    box: dict = {}

    def submit() -> None:
        box["task"] = w.submit("hold")

    thread = threading.Thread(target=submit)
    thread.start()
    try:
        assert inside.wait(TIMEOUT)
        w.journal_max_age_s = 7 * 86400.0  # the old log drains, a new one logs new tasks
        go_on.set()
        thread.join(TIMEOUT)
        task = box["task"]
        assert gate.started.wait(TIMEOUT)
        for observer in [*w._draining, w._log_observer]:
            assert observer.journal.flush(TIMEOUT)
        records = {r["uid"]: r["status"] for r in journaled().history()}
        assert records == {task.uid: "running"}
    finally:
        go_on.set()
        gate.release.set()
    assert task.wait(TIMEOUT)


def test_the_end_of_a_task_a_closed_log_never_had_is_not_written_to_it(journaled):
    """A forced cancel landing just after a draining log noted a task (for the drain's race),
    once that log had begun to close: the engine's end record of the task (never run, never
    logged there) went to the closed log, dropped with a warning 'task records are not
    logged'."""

    w = journaled({"quick": lambda: 1})
    old = w._log_observer
    inside, go_on = threading.Event(), threading.Event()

    class Paused(set):  # the submitter loses the GIL just before the old log notes the task
        def add(self, uid):
            if not inside.is_set():
                inside.set()
                assert go_on.wait(TIMEOUT)
                super().add(uid)
                raise TaskCancelled  # (a forced cancel landing right after)
            super().add(uid)

    old.live = Paused()
    box: dict = {}
    thread = _submitting(w, "quick", box)
    try:
        assert inside.wait(TIMEOUT)
        with w._state_lock:  # (a setting change elsewhere: the closed log stays with the engine)
            w.journal_enabled = False  # nothing logged there runs: it closes on its thread
            eventually(lambda: old.journal._closed, TIMEOUT, "the old log to close")
            go_on.set()
            thread.join(TIMEOUT)
    finally:
        go_on.set()
    assert "error" in box
    assert old.journal.health()["dropped"] == 0


def _nested(func, name):
    func = getattr(func, "func", func)  # (an observer: traitlets' handler of the method)
    return next(c for c in func.__code__.co_consts if getattr(c, "co_name", None) == name)


def test_an_interrupt_anywhere_in_a_setting_change_leaves_setting_log_and_locks_in_step(journaled, tmp_path,
                                                                                         sigint_as_in_a_cell):
    """■ at every line of a log or lock setting change, in turn (a real SIGINT on the main
    thread).  Between the log's swap and the old log's drain it used to leave the old log
    neither in force nor draining (it went on logging new tasks and never closed) while the
    setting went back; now the swap holds ■ and delivers it once done, and the change stands.
    (■ before the observer's body -- in traitlets, or on its first line -- is out of reach.)"""
    from qmagic.core.foreground import interrupts_held
    from qmagic.worker_log import LogObserver
    from qmagic.worker_state import StateMixin

    assert threading.current_thread() is threading.main_thread()
    w = journaled({"quick": lambda: 1})
    codes = [StateMixin._apply_setting.__code__, _nested(StateMixin._apply_setting, "commit"),
             StateMixin._new_log.__code__, StateMixin._swap_log.__code__,
             _nested(StateMixin._journal_setting, "apply"), _nested(StateMixin._lock_setting, "apply"),
             LogObserver.drain.__code__, interrupts_held.__wrapped__.__code__]
    folders = [str(tmp_path / "a"), str(tmp_path / "b")]
    changes = [("journal_enabled", lambda: not w.journal_enabled),
               ("journal_summary_chars", lambda: 3000 - w.journal_summary_chars),
               ("state_dir", lambda: folders[w.state_dir == folders[0]])]
    bad, fired_any = [], 0
    for code in codes:
        lines = lines_of(code)
        for line in lines[1:] if code is codes[0] else lines:
            for name, value in changes:
                before = getattr(w, name)
                fired = interrupted_at(code, line, lambda: setattr(w, name, value()))
                fired_any += fired
                where = f"{code.co_name} line {line - code.co_firstlineno} ({name})"
                observer = w._log_observer
                if w.journal_enabled != (w._journal is not None):
                    bad.append((where, "setting and log disagree", w.journal_enabled))
                if observer is not None and (observer.journal is not w._journal or observer.draining
                                             or observer not in w.engine.observers):
                    bad.append((where, "the log in force is not the observer's"))
                stray = [o for o in w.engine.observers if isinstance(o, LogObserver)
                         and o is not observer and not (o.draining and o in w._draining)]
                if stray:
                    bad.append((where, "an old log neither in force nor draining", len(stray)))
                if w._journal is not None and str(w._journal.state_dir) != str(w._state_dir()):
                    bad.append((where, "the log is in another folder than the setting says"))
                if str(w._locks.state_dir) != str(w._state_dir()):
                    bad.append((where, "the lock store is in another folder than the setting says"))
                if getattr(w, name) == before and not fired:
                    bad.append((where, "an uninterrupted change did not apply"))
                if bad and bad[-1][0] == where:  # (a fresh worker: one wrong state, one report)
                    w.close()
                    w = journaled({"quick": lambda: 1})
                if not w.journal_enabled:
                    w.journal_enabled = True
                later = w.submit("quick")
                assert later.result(TIMEOUT) == 1
                if not w.history(uid=later.uid):
                    bad.append((where, "a task after the change was not logged"))
    assert fired_any > 100
    assert bad == [], "\n".join(map(str, bad))
    eventually(lambda: _drained(w), TIMEOUT, "the old logs to close")
    w.close()
