"""The worker's experiment log: records outlive the worker, dead workers' tasks fail."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
from traitlets.config import Config

import qmagic
from qmagic import Worker
from qmagic.journal import ORPHAN_REASON

from engine_helpers import TIMEOUT, Gate, make_worker  # noqa: F401 - fixture

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def journaled(make_worker):
    """Workers with the journal on, all on one state folder (like restarts of one kernel)."""
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
    assert second.task_status([ok.uid, bad.uid])["status"] == {ok.uid: "completed", bad.uid: "completed"}
    res = second.task_result(ok.uid)["result"]
    assert res["success"] is True and res["return_value"] == {"points": 3}
    assert res["time_stop"] == ok.finished_at
    res = second.task_result(bad.uid)["result"]
    assert res["success"] is False and "ZeroDivisionError" in res["traceback"]
    assert res["msg"] == "Error occurred while executing 'Execute function': division by zero"
    res = second.task_result(obj.uid)["result"]  # a non-JSON result: summarised, not lost
    assert res["success"] is True and res["return_value"] is None and "summary" in res["msg"]
    records = second.history(user="Alice")
    assert [r["uid"] for r in records] == [ok.uid]
    assert records[0]["progress"] == {"value": 3, "total": 3, "message": "done"}
    assert records[0]["origin"] == "python" and records[0]["background"] is True


def test_queued_and_cancelled_tasks_are_journaled(journaled):
    gate = Gate()
    w = journaled({"gate": gate, "f": lambda: 1}, max_background_tasks=1)
    running = w.submit("gate")
    assert gate.started.wait(TIMEOUT)
    waiting = w.submit("f")
    assert w.history(uid=waiting.uid)[0]["status"] == "queued"
    waiting.cancel()
    gate.release.set()
    running.wait(TIMEOUT)
    statuses = {r["uid"]: r["status"] for r in w.history()}
    assert statuses == {running.uid: "completed", waiting.uid: "cancelled"}
    assert w.history(uid=waiting.uid)[0]["error"] == "Task was cancelled"


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
    config = Config()
    config.QMagic.state_dir = str(state)
    w = Worker({}, config=config)
    try:
        assert w.task_result(done_uid)["result"]["return_value"] == 7
        for uid in (running_uid, queued_uid):
            reply = w.task_result(uid)
            assert reply["status"] == "completed"
            assert reply["result"]["success"] is False
            assert reply["result"]["msg"].endswith(ORPHAN_REASON)
        failed = {r["uid"] for r in w.history(status="failed")}
        assert failed == {running_uid, queued_uid}
    finally:
        w.close()


def test_journal_off(make_worker):
    w = make_worker({"f": lambda: 1})  # journal off
    t = w.submit("f")
    t.wait(TIMEOUT)
    with pytest.raises(RuntimeError, match="journal is off"):
        w.history()
    w.journal_enabled = True  # live switch on: the journal opens
    t2 = w.submit("f")
    t2.wait(TIMEOUT)
    assert [r["uid"] for r in w.history()] == [t2.uid]


def test_module_history_reads_a_given_state_dir(journaled, tmp_path):
    w = journaled({"f": lambda: 1})
    t = w.submit("f", user="Bob")
    t.wait(TIMEOUT)
    records = qmagic.history(state_dir=str(tmp_path / "state"), user="Bob")
    assert [r["uid"] for r in records] == [t.uid]
    frame = qmagic.history_dataframe(state_dir=str(tmp_path / "state"))
    assert list(frame["uid"]) == [t.uid] and frame["status"][0] == "completed"
