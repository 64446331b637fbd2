"""``qmagic.get_worker().close()`` in a kernel, against a real kernel and queueserver's real
client (``REManagerAPI``): every door says the worker is closed and what to do.

Before, the worker closed for every client while ``status`` still said the environment
existed and was idle, remote and magic submits said "Load it again with %load_ext qmagic"
(a no-op while qmagic is loaded), ``%tasks --history`` said the log was off, and a close
inside one of the worker's own tasks waited for itself (2 s in the foreground, 5 s and a
thread left behind in the background).
"""

from __future__ import annotations

import contextlib
import json

import pytest
from bluesky_queueserver_api import BFunc
from kernel_helpers import assert_no_internals, error_text, one_line, start_kernel
from remote_client import LoopClient

from qmagic.core.engine import CLOSED_HINT, MSG_CLOSE_IN_TASK, MSG_CLOSED
from qmagic.worker_state import MSG_WORKER_CLOSED

pytestmark = pytest.mark.timeout(120)

#: qmagic's session in the kernel (its remote door)
SESSION = "__import__('qmagic.ipython.extension', fromlist=['get_session']).get_session(get_ipython())"



@pytest.fixture
def closed_kernel(tmp_path):
    """A kernel serving a queueserver client, one task run, then ``w.close()`` in a cell."""
    address = f"ipc://{tmp_path}/control"
    k = start_kernel(tmp_path / "kernel", f"--QMagic.zmq_control_address={address}")
    rm = LoopClient(zmq_control_addr=address, timeout_recv=10)
    try:
        assert rm.status(reload=True)["worker_environment_exists"] is True
        k.execute("%function_execute add 1 2", check=True)
        k.execute("w.close()", check=True)
        yield k, rm
    finally:
        rm.close()
        k.shutdown()



def test_a_closed_worker_says_so_to_remote_clients_and_refuses_their_requests(closed_kernel):
    k, rm = closed_kernel
    status = rm.status(reload=True)
    assert status["worker_environment_exists"] is False  # as queueserver without a worker
    assert status["worker_environment_state"] == "closed"
    assert status["manager_state"] == "idle" and status["ip_kernel_state"] is None
    requests = {
        "foreground": lambda: rm.function_execute(BFunc("add", 1)),
        "background": lambda: rm.function_execute(BFunc("add", 1), run_in_background=True),
        "script": lambda: rm.script_upload("x = 1"),
    }
    for what, request in requests.items():
        with pytest.raises(rm.RequestFailedError) as info:
            request()
        assert str(info.value) == f"Request failed: {MSG_CLOSED}", what
    with pytest.raises(rm.RequestFailedError) as info:  # it would say "already exists"
        rm.environment_open()
    assert str(info.value) == f"Request failed: {MSG_WORKER_CLOSED}"
    for change in (lambda: rm.lock(lock_key="remote-key", environment=True),
                   lambda: rm.unlock(lock_key="remote-key")):  # (the closed lock store changed)
        with pytest.raises(rm.RequestFailedError) as info:
            change()
        assert str(info.value) == f"Request failed: {MSG_WORKER_CLOSED}"
    assert rm.lock_info()["lock_info"]["environment"] is False  # (it still reads)
    assert "%reload_ext qmagic" in MSG_CLOSED and "%reload_ext qmagic" in MSG_WORKER_CLOSED
    assert rm.status(reload=True)["worker_environment_exists"] is False
    assert k.eval("len(w.tasks())") == 1  # nothing was started


def test_a_closed_worker_says_so_in_the_notebook_and_reload_starts_a_new_one(closed_kernel):
    k, rm = closed_kernel
    refusal = MSG_CLOSED.removeprefix("Error: ")
    for code in ("%function_execute add 1 2", "%function_execute -b add 1 2", "%%script_upload\nx = 1\n"):
        assert one_line(k.execute(code)) == f"UsageError: {refusal}", code
    for code in ("%lock --key key-of-this-test", "%unlock --key key-of-this-test"):
        assert one_line(k.execute(code)) == f"UsageError: {MSG_WORKER_CLOSED}", code
    result = k.execute("w.submit('add', (1,))")
    assert result.error["evalue"] == MSG_CLOSED
    assert k.eval("w.closed") is True
    assert k.execute("%task_status", check=True).stdout.strip() == "add(1, 2)  qmagic user  foreground  completed"
    history = k.execute("%tasks --history").check().stdout  # (it said the log was off)
    assert "add(1, 2)" in history and "completed" in history
    assert f"  {MSG_WORKER_CLOSED}" in k.execute("%control_channel status", check=True).stdout.splitlines()
    k.execute("%reload_ext qmagic\nw = qmagic.get_worker()", check=True)
    assert k.execute("%function_execute add 2 3", check=True).result.startswith("add(2, 3)")
    assert rm.status(reload=True)["worker_environment_exists"] is True
    assert "add(2, 3)" in k.execute("%tasks --history", check=True).stdout


def test_a_closed_worker_starts_no_control_channel_nor_info_socket(closed_kernel, tmp_path):
    """``%control_channel start`` on a closed worker started a channel (its status then said
    the worker was closed) while every other door refuses in one line; so did the settings.
    Refused the same way now, the settings back to off; a channel that served on serves on."""
    k, rm = closed_kernel
    assert rm.status(reload=True)["worker_environment_exists"] is False  # (it served on)
    k.execute("%control_channel stop", check=True)
    refusal = f"The control channel was not started: the qmagic worker was closed; {CLOSED_HINT}."
    for line in ("%control_channel start", f"%control_channel start ipc://{tmp_path}/other"):
        assert one_line(k.execute(line)) == f"UsageError: {refusal}", line
    for setting, what in (("zmq_control_address", "control channel"), ("zmq_info_address", "info socket")):
        result = k.execute(f"w.{setting} = 'ipc://{tmp_path}/{setting}'")
        assert result.error["evalue"] == refusal.replace("control channel", what), setting
        assert k.eval(f"w.{setting}") is None, setting
    assert k.execute("%control_channel status", check=True).stdout.startswith("Control channel: off.")


def test_closing_the_worker_inside_its_own_task_is_refused_at_once(tmp_path):
    """From an uploaded script, a foreground task and a background one waited for: each
    refused, the worker whole after each (one kernel for the three): a close that went on
    to wait for its own task would have closed the worker, which ``w.closed`` tells."""
    k = start_kernel(tmp_path / "kernel")
    try:
        k.execute("def closer():\n    qmagic.get_worker().close()\n", check=True)
        for call in ("%%script_upload\nimport qmagic\nqmagic.get_worker().close()\n",
                     "%function_execute closer", "%function_execute -b --wait closer"):
            shown = error_text(k.execute(call))  # (the user's own frames, as any task's error)
            assert shown[-1] == f"RequestRefused: {MSG_CLOSE_IN_TASK}", call
            assert_no_internals("\n".join(shown))
            assert k.eval("w.closed") is False
            assert k.execute("%function_execute add 2 3", check=True).result.startswith("add(2, 3)")
    finally:
        k.shutdown()


def _start_endless_scan(k, step: str) -> str:
    """Start ``scan`` (``step`` in an endless loop) in the background as ``t``, wait until it
    runs; its uid."""
    k.execute("import time\n"
              "def scan():\n"
              "    while True:\n"
              f"        {step}\n"
              "t = %function_execute -b scan\n"
              "wait_until(lambda: t.running())", check=True)
    return k.eval("t.uid")


@contextlib.contextmanager
def _watching_tasks(k):
    """A SUB socket on the kernel's info socket (QS_Info), with a status received (so
    subscribed); yields a function that returns a task's final state as published."""
    import zmq

    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"QS_Info")
    sub.connect(k.eval(f"{SESSION}.remote.info.address"))

    def final_state(uid: str) -> dict:
        while True:
            assert sub.poll(30_000), "the cancelled task's final state never arrived"
            task = json.loads(sub.recv_multipart()[1])["msg"].get("task", {})
            if task.get("task_uid") == uid and task.get("status") not in (None, "queued", "running"):
                return task

    try:
        assert sub.poll(30_000), "no status from the info socket"  # (one a second)
        yield final_state
    finally:
        sub.close(0)
        ctx.term()


def test_a_remote_watcher_sees_the_tasks_the_exit_cancelled(tmp_path):
    """A shutdown request (JupyterLab's shut down or restart) cancels the running tasks and
    records them so; a remote operator watching the info socket (qserver-console-monitor,
    the HTTP gateway) sees the scan cancelled, with the reason.  The exit stops the info
    socket after the tasks' close, and it sends what waits before it goes, within its
    linger.  Before, it was never stopped at the exit, and the final states reached a
    subscriber only if 0MQ happened to write them before the process ended: this test
    passed then too (nothing waits here); behind a backlog they never did, which
    test_remote_info's stop test shows.  What this one catches is a socket stopped before
    the tasks' close (as %unload_ext did: the next test)."""
    from qmagic.ipython.extension import MSG_SHUT_DOWN

    k = start_kernel(tmp_path / "kernel", "--QMagic.zmq_info_address=tcp://127.0.0.1:*")
    try:
        with _watching_tasks(k) as final_state:
            uid = _start_endless_scan(k, "time.sleep(0.01)")
            kernel = k.km.provisioner.process
            k.kc.stop_channels()
            k.kc = None
            k.km.shutdown_kernel(now=False)  # the kernel exits on its own
            final = final_state(uid)
        assert (final["status"], final.get("error")) == ("cancelled", MSG_SHUT_DOWN), final
        assert kernel.wait(30) == 0
    finally:
        k.shutdown()


def test_tasks_an_unload_cancels_keep_the_cell_in_their_tracebacks(tmp_path):
    """``%reload_ext qmagic`` (or ``%unload_ext``) while a background task runs: the task is
    cancelled, but its traceback -- in memory and in the experiment log, what %task_result
    shows -- named the kernel's temporary file (``/tmp/ipykernel_1/123.py``), not the cell:
    the cell labels were taken away before the worker was closed.  Now ``Cell In[N]``."""
    k = start_kernel(tmp_path / "kernel")
    try:
        k.execute("def wait_here():\n"
                  "    while True:\n"
                  "        qmagic.cancellable_sleep(0.05)\n", check=True)
        k.execute("t = %function_execute -b wait_here", check=True)
        k.execute("%reload_ext qmagic", check=True)
        assert k.eval("t.status.value") == "cancelled"
        in_memory = k.eval("t.traceback")
        shown = k.execute("%task_result {t.uid}", check=True).stdout
        for text in (in_memory, shown):
            assert 'File "Cell In[' in text and "ipykernel_" not in text, text
    finally:
        k.shutdown()


def test_a_remote_watcher_sees_the_tasks_an_unload_cancelled(tmp_path):
    """``%unload_ext qmagic`` (or ``%reload_ext``) while a background scan runs: the scan is
    cancelled, but a remote operator watching the info socket never saw it end -- the
    unload stopped the remote door before it closed the worker, so the final state was
    published to no socket, and the scan stayed 'running' in the operator's monitor."""
    k = start_kernel(tmp_path / "kernel", "--QMagic.zmq_info_address=tcp://127.0.0.1:*")
    try:
        with _watching_tasks(k) as final_state:
            uid = _start_endless_scan(k, "qmagic.cancellable_sleep(0.05)")
            k.execute("%unload_ext qmagic", check=True)
            assert k.eval("t.status.value") == "cancelled"
            assert final_state(uid)["status"] == "cancelled"
    finally:
        k.shutdown()
