"""The experiment log against real kernels (issue 13): what a caller holds is in the log.

- a task's uid is in the log (it survives SIGKILL) before the Python API, the magic or the
  remote channel hands it out, and its end record before ``result()`` returns — checked by
  killing a kernel under load at the moment the last uids were handed out;
- a waiter that wakes (``result()``, ``wait()``, a done callback, ``as_completed``) finds the
  task's final record in ``history()``;
- which notebook cell started a task (notebook, cell id, execution count, cell hash) is
  recorded, shown by ``%tasks --history``, and filtered by ``qmagic.history(notebook=...)``
  and the ``qmagic-history`` console script (``--notebook``, ``--csv``);
- a log that cannot be written shows in ``%tasks --history`` and ``%control_channel``;
- two kernels write one log at once.

The interrupt storm over thousands of foreground tasks with the log on is in
``test_kernel_interrupts.py`` (it compares every record with the task in memory).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys

import orjson
import pytest
import zmq
from kernel_helpers import QMAGIC_ARGV, SETUP
from kernel_utils import REPO_ROOT

from qmagic.store.database import database_path
from qmagic.store.journal import ORPHAN_QUEUED_REASON, ORPHAN_REASON

pytestmark = pytest.mark.timeout(120)

WAIT = 30.0


def _orphan_reason(rec):
    """What a task a killed kernel left unfinished reads: running, or still queued."""
    return ORPHAN_REASON if rec["started_at"] is not None else ORPHAN_QUEUED_REASON


LOAD = r'''
import os
hold = threading.Event()
def hang(*args):
    hold.wait()
def ok(x):
    return x * 10
_handed = os.open(%(path)r, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
def note(kind, uid, value=""):
    """One write(2) per uid handed out: what a caller holds survives the kill too."""
    os.write(_handed, f"{kind} {uid} {value}\n".encode())
stop_api = threading.Event()
def api_load():
    """Another thread of the notebook: background tasks through the Python API."""
    while not stop_api.is_set():
        t = w.submit("hang")
        note("api", t.uid)
        time.sleep(0.0005)  # (a pace, not a wait: the main thread's loop gets its share)
'''

LOOP = r'''
ip = get_ipython()
sys.setswitchinterval(1e-4)  # (the GIL goes round the threads quickly: every door is busy)
threading.Thread(target=api_load, daemon=True).start()
print("LOOP STARTED", flush=True)
deadline = time.monotonic() + 40
i = 0
while time.monotonic() < deadline:  # (ends with the kernel's death)
    t = w.submit("ok", (i,), background=False)
    note("done", t.uid, t.result())
    t = ip.run_line_magic("function_execute", "-b hang")
    note("magic", t.uid)
    i += 1
print("NOT KILLED", flush=True)
'''


class Remote:
    """A bare queueserver client (0MQ REQ, JSON), as REManagerAPI sends requests."""

    def __init__(self, address: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.REQ)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, int(WAIT * 1000))
        self.sock.connect(address)

    def request(self, method: str, **params) -> dict:
        self.sock.send(json.dumps({"method": method, "params": params}).encode())
        return json.loads(self.sock.recv())

    def function_execute(self, name: str, *args) -> dict:
        return self.request("function_execute", item={"item_type": "function", "name": name, "args": list(args)},
                            run_in_background=True, user="remote user", user_group="primary")

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


def _start(kernel_factory, state, *argv: str, env: dict | None = None):
    k = kernel_factory(argv=[*QMAGIC_ARGV, *argv], env={"QMAGIC_STATE_DIR": str(state), **(env or {})})
    k.execute(SETUP, check=True)
    return k


def _control_channel(k) -> str:
    """Start the kernel's control channel on a port the system picks; its address."""
    k.execute("%control_channel start tcp://127.0.0.1:0", check=True)
    return k.eval("w.zmq_control_address")


def _wait_dead(k) -> None:
    """Wait until the killed kernel is gone; remove its connection file (nobody else will)."""
    k.km.provisioner.process.wait(WAIT)  # (the kernel is a child process of this one)
    assert not k.km.is_alive()
    k.km.cleanup_resources()


def history_cli(*args: str) -> subprocess.CompletedProcess:
    """The ``qmagic-history`` console script as pyproject.toml declares it, in a new process."""
    scripts = (REPO_ROOT / "pyproject.toml").read_text().split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    module, function = re.search(r'^qmagic-history\s*=\s*"([\w.]+):(\w+)"', scripts, re.MULTILINE).groups()
    code = f"import sys\nfrom {module} import {function} as main\nsys.exit(main())"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True,
                          text=True, timeout=WAIT, check=False)


def _handed(path) -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {"api": [], "magic": [], "done": []}
    for line in path.read_text().splitlines():
        kind, uid, value = (line.split(" ", 2) + [""])[:3]
        if kind in out and len(uid) == 36:
            out[kind].append((uid, value))
    return out


# -- invariants 1-3: SIGKILL under load --------------------------------------------------------------
def test_sigkill_under_load_every_uid_handed_out_is_found(kernel_factory, tmp_path):
    """The notebook's main thread runs foreground tasks and starts background ones with the
    magic, another thread starts background tasks through the API, a remote client starts
    more; the client kills the kernel (SIGKILL) right after a reply.  A new process finds
    every uid any caller got: those whose ``result()`` had returned as completed with their
    result, all others (queued or running) as failed with the orphan reason."""
    state, handed_path = tmp_path / "state", tmp_path / "handed.txt"
    k1 = _start(kernel_factory, state, "--QMagic.max_background_tasks=4", "--QMagic.max_queued_tasks=200000")
    k1.execute(LOAD % {"path": str(handed_path)}, check=True)
    remote = Remote(_control_channel(k1))
    pid = k1.eval("os.getpid()")
    remote_uids: list[str] = []
    try:
        cell = k1.execute_async(LOOP)
        k1.wait_for_output(cell, "LOOP STARTED")
        while len(remote_uids) < 200 or len(remote_uids) % 10 or len(_handed(handed_path)["magic"]) < 100:
            reply = remote.function_execute("hang" if len(remote_uids) % 2 else "ok", len(remote_uids))
            assert reply["success"], reply
            remote_uids.append(reply["task_uid"])
        os.kill(pid, signal.SIGKILL)  # at once: the kernel is still handing out uids
    finally:
        remote.close()
    _wait_dead(k1)
    assert "NOT KILLED" not in k1.stream_text(cell)
    handed = _handed(handed_path)
    assert len(handed["api"]) > 50 and len(handed["done"]) > 50, {k: len(v) for k, v in handed.items()}

    # A power cut would have torn the last line of the dead kernel's spool; a broken line
    # before it is skipped with a warning.  Neither costs any other record.
    segments = sorted(state.glob("default.journal.*.spool"), key=lambda p: int(p.name.split(".")[-2]))
    assert segments, "the dead kernel left no spool"
    with open(segments[-1], "ab") as f:
        f.write(b'[1, "not-json\n[3, "torn-')

    # A new process opens the state folder (the console script: it stores what the dead
    # kernel left, then prints every record).
    done = history_cli("--state-dir", str(state), "--json")
    assert done.returncode == 0, done.stderr
    assert "skipped 1 damaged line(s) in the spool of an earlier session" in done.stderr, done.stderr
    records = {r["uid"]: r for r in map(orjson.loads, done.stdout.splitlines())}
    doors = {**{kind: [u for u, _ in uids] for kind, uids in handed.items()}, "remote": remote_uids}
    lost = {door: [u for u in uids if u not in records] for door, uids in doors.items()}
    assert lost == {door: [] for door in doors}  # no uid a caller held is lost
    for uid, value in handed["done"]:  # result() had returned: the end was in the log
        assert records[uid]["status"] == "completed" and records[uid]["result"] == int(value), records[uid]
    # every other task ended (an "ok" one, perhaps just before the kill) or is an orphan
    wrong = [r for r in records.values() if not (
        (r["status"] == "completed" and r["name"] == "ok" and r["result"] == r["args"][0] * 10)
        or (r["status"] == "failed" and r["error"] == _orphan_reason(r) and r["journal"]["orphaned"] is True))]
    assert wrong == []
    assert {r["origin"] for r in records.values()} == {"python", "magic", "remote"}
    assert not list(state.glob("default.journal.*.spool")) and not list(state.glob("default.journal.*.lock"))

    # A new kernel answers for the dead one's tasks: queueserver replies and the magics.
    k2 = _start(kernel_factory, state)
    magic_uid, done_uid = handed["magic"][0][0], handed["done"][0][0]
    status = k2.eval(f"qs.task_status(task_uid=[{magic_uid!r}, {done_uid!r}])['status']")
    assert status == {magic_uid: "completed", done_uid: "completed"}  # (queueserver's word for ended)
    result = k2.eval(f"[(r['success'], r['return_value'], r['msg']) for r in "
                     f"(qs.task_result(task_uid=u)['result'] for u in {[magic_uid, done_uid]!r})]")
    orphan_msg = f"Error occurred while executing 'Execute function': {_orphan_reason(records[magic_uid])}"
    assert result == [(False, None, orphan_msg), (True, 0, "")]
    assert k2.execute(f"%task_status {magic_uid[:8]}", check=True).stdout == (
        f"{magic_uid[:8]}: failed (from the experiment log)  error: {_orphan_reason(records[magic_uid])}\n")
    detail = k2.execute(f"%task_result {magic_uid[:8]}", check=True).stdout
    assert detail.startswith("hang()") and "(from the experiment log)" in detail
    assert f"failed: {_orphan_reason(records[magic_uid])}" in detail
    assert k2.execute(f"%task_result {done_uid[:8]}", check=True).stdout.endswith("result: 0\n")
    lines = k2.execute("%tasks --history 3", check=True).stdout.splitlines()
    assert lines[0].split() == ["SUBMITTED", "STATUS", "DURATION", "USER", "WHERE", "CELL", "CALL", "UID"]
    newest = sorted(records.values(), key=lambda r: r["submitted_at"])[-3:]
    orphans = sum(r["journal"]["orphaned"] for r in newest)
    errors = [i for i, line in enumerate(lines) if line.startswith("    error: ")]  # (under its task's row)
    expected = [f"error: {_orphan_reason(r)}" for r in reversed(newest) if r["journal"]["orphaned"]]
    assert [lines[i].strip() for i in errors] == expected, (lines, newest)
    assert all("  failed  " in lines[i - 1] for i in errors), lines
    assert len(lines) == 4 + orphans + 1 and orphans > 0
    assert lines[-1].startswith("Older tasks are in the experiment log: %tasks --history N")


# -- invariant 2 while the kernel lives ------------------------------------------------------------
WAITERS = r'''
import concurrent.futures as cf
bad, checked = [], [0]
def check(t):
    """The log's record of a task whose waiters were released: final, like the task."""
    recs = w.history(uid=t.uid)
    checked[0] += 1
    if len(recs) != 1 or (recs[0]["status"], recs[0]["finished_at"]) != (t.status.value, t.finished_at):
        bad.append((t.name, t.status.value, recs and recs[0]["status"]))
def waiter(t):
    t.wait(20)
    check(t)
gate = threading.Event()
def gated(i):
    gate.wait(20)
    return i
w.max_background_tasks = 4
tasks = [w.submit("gated" if i % 7 else "boom", (i,)) for i in range(240)]
threads = [threading.Thread(target=waiter, args=(t,)) for t in tasks[::4]]
for th in threads:
    th.start()
for t in tasks[1::4]:
    t.add_done_callback(check)
queued = tasks[-1]
queued.cancel()  # a queued task cancelled: its waiters wake at once
gate.set()
for t in cf.as_completed(tasks[2::4], timeout=20):
    check(t)
for t in tasks[3::4]:
    try:
        t.result(20)
    except Exception:
        pass
    check(t)
for i in range(60):  # foreground tasks end before the call returns
    check(w.submit("add", (i,), background=False))
for th in threads:
    th.join(20)
print(checked[0], len(bad), bad[:3], sorted({t.status.value for t in tasks}))
'''


def test_waiters_wake_only_once_the_end_is_in_the_log(kernel_factory, tmp_path):
    k = _start(kernel_factory, tmp_path / "state")
    out = k.execute(WAITERS, check=True).stdout
    assert out == "300 0 [] ['cancelled', 'completed', 'failed']\n"


# -- provenance ------------------------------------------------------------------------------------------
def _send_cell(k, code: str, cell_id: str) -> str:
    """An execute_request as JupyterLab sends it (the cell id in the request's metadata);
    its msg_id."""
    msg = k.kc.session.msg("execute_request", {
        "code": code, "silent": False, "store_history": True, "user_expressions": {},
        "allow_stdin": False, "stop_on_error": True}, metadata={"cellId": cell_id})
    k.kc.shell_channel.send(msg)
    return msg["header"]["msg_id"]


def test_which_notebook_cell_started_each_task(kernel_factory, tmp_path):
    state = tmp_path / "state"
    notebook = tmp_path / "lab" / "01-scan.ipynb"
    k = _start(kernel_factory, state, env={"JPY_SESSION_NAME": str(notebook)})
    remote = Remote(_control_channel(k))
    code = "t1 = w.submit('add', (1,))\nt2 = %function_execute -b add 2\nt3 = %function_execute add 3"
    reply = k.wait(_send_cell(k, code, "cell-scan-1")).check()
    count = reply.reply["execution_count"]
    cell_hash = hashlib.sha256(code.encode()).hexdigest()[:12]
    uids = k.eval("[t.wait(10) and t.uid for t in (t1, t2, t3)]")
    # a remote request while a cell runs: the cell did not start it
    busy = _send_cell(k, "wait_until(lambda: any(t.origin == 'remote' for t in w.tasks()))", "cell-busy")
    try:
        remote_uid = remote.function_execute("add", 5)["task_uid"]
    finally:
        remote.close()
    k.wait(busy).check()
    # the second notebook of this kernel (a session renamed)
    other = k.execute("import os\nos.environ['JPY_SESSION_NAME'] = 'elsewhere/02-align.ipynb'\n"
                      "print(w.submit('add', (4,)).uid)", check=True).stdout.strip()

    k.execute(f"wait_until(lambda: w.get_task({remote_uid!r}).done())", check=True)
    in_cell = {"notebook": str(notebook), "cell_id": "cell-scan-1", "execution_count": count,
               "cell_hash": cell_hash}
    no_cell = {"notebook": str(notebook), "cell_id": None, "execution_count": None, "cell_hash": None}
    expected = [(uids[0], "python", in_cell), (uids[1], "magic", in_cell), (uids[2], "magic", in_cell),
                (remote_uid, "remote", no_cell)]  # (the remote task ran in this notebook's kernel)
    for chosen in ("01-scan.ipynb", str(notebook), "01-*"):
        found = k.eval(f"[(r['uid'], r['origin'], r['provenance']) for r in qmagic.history(notebook={chosen!r})]")
        assert found[::-1] == expected, chosen
    assert k.eval("[r['uid'] for r in qmagic.history(notebook='*-align.ipynb')]") == [other]
    assert k.eval("[r['uid'] for r in qmagic.history(notebook='elsewhere/02-align.ipynb')]") == [other]
    assert k.eval("[r['uid'] for r in qmagic.history(notebook='03-none.ipynb')]") == []
    table = k.execute("%tasks --history 5", check=True).stdout.splitlines()
    assert table[0].split() == ["SUBMITTED", "STATUS", "DURATION", "USER", "WHERE", "CELL", "CALL", "UID"]
    cell_column = [line for line in table if "add(1)" in line or "add(2)" in line or "add(3)" in line]
    assert len(cell_column) == 3 and all(f"01-scan.ipynb [{count}]" in line for line in cell_column), table
    assert "02-align.ipynb [" in next(line for line in table if "add(4)" in line), table

    # Another process reads it while the kernel runs, once the writer stored it.
    k.execute("wait_until(lambda: w.log_health()['pending'] == 0)", check=True)
    done = history_cli("--state-dir", str(state), "--notebook", "01-scan.ipynb", "--csv")
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    assert [(r["uid"], r["origin"], r["status"]) for r in rows] == [  # oldest first
        (uid, origin, "completed") for uid, origin, _ in expected]
    for row, (_, _, prov) in zip(rows, expected):
        assert (row["notebook"], row["cell_id"], row["execution_count"], row["cell_hash"]) == tuple(
            "" if prov[key] is None else str(prov[key]) for key in ("notebook", "cell_id", "execution_count", "cell_hash"))
    done = history_cli("--state-dir", str(state), "--notebook", "02-align.ipynb")
    assert done.returncode == 0 and "02-align.ipynb" in done.stdout and "add(4)" in done.stdout
    assert "add(1)" not in done.stdout


# -- faults ------------------------------------------------------------------------------------------
def test_a_log_that_cannot_be_written_shows_in_the_magics(kernel_factory, tmp_path):
    """Another process holds the database's write lock: tasks run as usual, their records
    wait, ``%tasks --history`` and ``%control_channel`` say so; once the lock is released
    everything is stored and the notes are gone."""
    state = tmp_path / "state"
    k = _start(kernel_factory, state)
    _control_channel(k)
    k.execute("w.submit('add', (1,)).wait(10)", check=True)  # (records may wait a moment: no note)
    assert "experiment log" not in k.execute("%control_channel status", check=True).stdout
    assert "experiment log" not in k.execute("%tasks --history 30", check=True).stdout
    locker = sqlite3.connect(database_path(state, "default"), isolation_level=None, timeout=WAIT)
    try:
        locker.execute("BEGIN EXCLUSIVE")
        k.execute("ts = [w.submit('add', (i,)) for i in range(20)]\n"
                  "assert all(t.wait(10) for t in ts)\n"
                  "wait_until(lambda: not w.log_health()['ok'])", check=True)
        health = k.eval("w.log_health()")
        assert health["pending"] > 0 and health["dropped"] == 0 and "locked" in health["last_error"]
        history = k.execute("%tasks --history 30", check=True).stdout
        assert history.count("completed") == 21  # the records are all there for this kernel
        note = history.splitlines()[-1]
        assert note.startswith("Note: the experiment log cannot write (") and "lost" not in note, note
        assert "database is locked" in note and note.endswith("See worker.log_health().")
        status = k.execute("%control_channel status", check=True).stdout
        assert f"  {note}\n" in status, status
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    k.execute("wait_until(lambda: w.log_health()['ok'] and w.log_health()['pending'] == 0)", check=True)
    assert "experiment log" not in k.execute("%control_channel status", check=True).stdout
    assert "experiment log" not in k.execute("%tasks --history 30", check=True).stdout
    reader = sqlite3.connect(database_path(state, "default"))
    try:
        assert reader.execute("SELECT count(*) FROM tasks WHERE status = 'completed'").fetchone() == (21,)
    finally:
        reader.close()


# -- two kernels -----------------------------------------------------------------------------------------
def test_two_kernels_write_one_log_at_once(kernel_factory, tmp_path):
    state = tmp_path / "shared-state"
    kernels = [_start(kernel_factory, state) for _ in range(2)]
    code = (
        "ts = [w.submit('add', (i,), {'b': 0}, user=USER) for i in range(300)]\n"
        "print(sum(t.result(30) for t in ts))\n"
    )
    cells = [k.execute_async(code.replace("USER", repr(f"user{n}"))) for n, k in enumerate(kernels)]
    for k, cell in zip(kernels, cells):
        assert k.wait(cell, 60).stdout == f"{sum(range(300))}\n"
    # each kernel sees its own records at once, and the other's once stored
    kernels[1].execute("wait_until(lambda: w.log_health()['pending'] == 0)", check=True)
    counts = kernels[0].eval(
        "(len(qmagic.history()), sorted({r['status'] for r in qmagic.history()}), "
        "sorted({r['user'] for r in qmagic.history()}), "
        "len({r['journal']['session'] for r in qmagic.history()}))"
    )
    assert counts == (600, ["completed"], ["user0", "user1"], 2)


STUBBORN = r'''
import asyncio
async def stubborn(path):
    """Swallows the first cancel (code that catches CancelledError by mistake); the second
    one (the forced cancel) stops it, and its cleanup runs."""
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        pass
    try:
        await asyncio.Event().wait()
    finally:
        with open(path, "a") as f:
            f.write("parked\n")
'''

#: Another process holding the log's write lock (as another kernel in a long transaction).
HOLD_WRITE_LOCK = r'''
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.read()
conn.rollback()
'''


def test_the_exit_close_ends_before_jupyter_kills_the_kernel_while_the_log_is_locked(kernel_factory,
                                                                                     tmp_path):
    """A shutdown request (JupyterLab's shut down / restart) with a coroutine task that
    swallows the first cancel, while another process holds the log's write lock.  The exit
    close used to wait 2 s for the tasks (the forced cancel due after the same 2 s) and then
    up to 5 s more to store the log: jupyter_client's SIGTERM (2.5 s after the request)
    ended the kernel half-way.  Now it fits its budget: the kernel exits on its own, the
    task's cleanup ran after the forced cancel, and the next kernel to open the log stores
    what the locked database could not take (the task: cancelled, "the kernel was shut
    down")."""
    from qmagic.ipython.extension import MSG_SHUT_DOWN

    state, parked = tmp_path / "shared-state", tmp_path / "parked.txt"
    k = _start(kernel_factory, state)
    k.execute(STUBBORN + f"t = %function_execute -b stubborn {str(parked)!r}\n"
              "wait_until(lambda: t.running())\n"
              "wait_until(lambda: w.log_health()['pending'] == 0)", check=True)
    uid = k.eval("t.uid")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_WRITE_LOCK,
                               str(database_path(state, k.eval("w.environment_name")))],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        kernel = k.km.provisioner.process
        k.kc.stop_channels()
        k.kc = None
        k.km.shutdown_kernel(now=False)  # a shutdown request; SIGTERM after 2.5 s, SIGKILL after 5
        assert kernel.wait(WAIT) == 0, "the kernel did not exit on its own in time"
    finally:
        holder.stdin.close()
        holder.wait(WAIT)
    assert parked.read_text() == "parked\n"
    k2 = _start(kernel_factory, state)
    rec = k2.eval(f"wait_until(lambda: [r for r in qmagic.history(uid={uid!r}) "
                  "if r['status'] != 'running'], 30) or qmagic.history(uid=" + repr(uid) + ")[0]")
    assert (rec["status"], rec["error"]) == ("cancelled", MSG_SHUT_DOWN), rec
