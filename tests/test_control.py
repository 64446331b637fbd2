"""The remote control channel, driven by the real queueserver client (REManagerAPI).

Part 1 runs a Worker in this process behind a ControlChannel on a free loopback port
(fast: most of the protocol).  Part 2 starts real kernels with
``--ext=qmagic --QMagic.zmq_control_address=...`` for what only a kernel shows: the main
thread, the busy rule while a cell runs, interrupts, config_get's connection info.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import zmq

pytest.importorskip("bluesky_queueserver_api")

from bluesky_queueserver_api import BFunc  # noqa: E402
from bluesky_queueserver_api.zmq import REManagerAPI  # noqa: E402

from qmagic.control import (  # noqa: E402
    DEFAULT_ADDRESS,
    METHODS,
    PRIVATE_KEY_ENV,
    ControlChannel,
    attach,
    detach,
    get_channel,
)
from qmagic.engine import MSG_KERNEL_BUSY, MSG_NOT_IDLE, ThreadForegroundRunner  # noqa: E402
from qmagic.errors import ControlChannelError  # noqa: E402
from qmagic.worker import Worker  # noqa: E402

from engine_helpers import STATUS_KEYS  # noqa: E402

WAIT = 10.0  # generous upper bound for waits that normally take milliseconds


# =========================================================================================
# fixtures
# =========================================================================================
class BusyRunner(ThreadForegroundRunner):
    """The no-kernel foreground thread, plus a switch standing for "a user's cell runs"."""

    def __init__(self) -> None:
        super().__init__()
        self.cell_running = threading.Event()

    def user_busy(self) -> bool:
        return self.cell_running.is_set()


def make_namespace(gate: threading.Event, entered: threading.Event) -> dict:
    def add(a, b=0):
        return a + b

    def fail(text="boom"):
        raise ValueError(f"sample stage refused: {text}")

    def not_json():
        return object()

    def thread_name():
        return threading.current_thread().name

    def hold():
        """Block until the test opens the gate (stands for a long measurement)."""
        entered.set()
        if not gate.wait(WAIT):
            raise TimeoutError("the test never opened the gate")
        return "released"

    def secret():
        return 42

    return {
        "add": add, "fail": fail, "not_json": not_json, "thread_name": thread_name,
        "hold": hold, "secret": secret,
    }


@pytest.fixture
def gate():
    event = threading.Event()
    yield event
    event.set()  # never leave a task blocked


@pytest.fixture
def entered():
    return threading.Event()


@pytest.fixture
def runner():
    return BusyRunner()


@pytest.fixture
def worker(tmp_path, gate, entered, runner):
    w = Worker(make_namespace(gate, entered), state_dir=str(tmp_path / "state"), foreground=runner)
    w.interrupts = []  # kernel_interrupt's effect here (no kernel main thread to interrupt)
    w.interrupt_main = lambda: w.interrupts.append(time.monotonic())
    yield w
    gate.set()
    w.close()


@pytest.fixture
def channel(worker):
    ch = ControlChannel(worker, "tcp://127.0.0.1:*", max_message_bytes=100_000).start()
    yield ch
    ch.stop()


@pytest.fixture
def rm_factory():
    clients: list[REManagerAPI] = []

    def make(address: str, **kwargs) -> REManagerAPI:
        kwargs.setdefault("status_polling_period", 0.1)
        rm = REManagerAPI(zmq_control_addr=address, **kwargs)
        clients.append(rm)
        return rm

    yield make
    for rm in clients:
        rm.close()


@pytest.fixture
def RM(channel, rm_factory):
    return rm_factory(channel.address)


class Raw:
    """A bare zmq.REQ client: sends any bytes, returns the decoded reply (2 s timeout)."""

    def __init__(self, address: str, *, server_key: str | None = None) -> None:
        self.ctx = zmq.Context()
        self.address = address
        self.server_key = server_key
        self.sock = None
        self._open()

    def _open(self) -> None:
        if self.sock is not None:
            self.sock.close(0)
        self.sock = self.ctx.socket(zmq.REQ)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, 2000)
        if self.server_key:
            public, secret = zmq.curve_keypair()
            self.sock.curve_serverkey = self.server_key.encode()
            self.sock.curve_publickey = public
            self.sock.curve_secretkey = secret
        self.sock.connect(self.address)

    def send(self, *frames: bytes) -> dict:
        t0 = time.monotonic()
        self.sock.send_multipart(list(frames))
        reply = json.loads(self.sock.recv())
        assert time.monotonic() - t0 < 2.0
        return reply

    def request(self, method, params=None, **extra) -> dict:
        msg = {"method": method, "params": {} if params is None else params, **extra}
        return self.send(json.dumps(msg).encode())

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


@pytest.fixture
def raw(channel):
    client = Raw(channel.address)
    yield client
    client.close()


def wait_result(rm: REManagerAPI, task_uid: str, timeout: float = WAIT) -> dict:
    """Poll task_result as fast as the client allows until the task completed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reply = rm.task_result(task_uid)
        if reply["status"] == "completed":
            return reply["result"]
        assert reply["status"] == "running", reply
    raise AssertionError(f"task {task_uid} did not complete within {timeout} s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# =========================================================================================
# status, ping, basics
# =========================================================================================
def test_status_and_ping_have_every_key(RM, channel):
    status = RM.status(reload=True)
    assert STATUS_KEYS <= set(status), STATUS_KEYS - set(status)
    assert "success" not in status  # queueserver's status has no success key
    assert status["manager_state"] == "idle"
    assert status["worker_environment_exists"] is True
    assert status["ip_kernel_state"] == "idle"
    assert status["lock"] == {"environment": False, "queue": False}
    assert RM.ping(reload=True)["manager_state"] == "idle"
    assert channel.stats["requests"] >= 2
    assert channel.running and channel.address.startswith("tcp://127.0.0.1:")
    assert not channel.address.endswith(":*")


def test_unknown_method_and_unsupported_params(RM, raw):
    assert raw.request("queue_start") == {"success": False, "msg": "Unknown method 'queue_start'"}
    with pytest.raises(RM.RequestFailedError) as info:
        RM.send_request(method="task_result", params={"task_uid": "x", "colour": "red"})
    assert info.value.response == {
        "success": False,
        "msg": "Error: API request contains unsupported parameters: 'colour'. "
        "Supported parameters: ['task_uid']",
        "task_uid": None,
        "status": None,
        "result": None,
    }
    reply = raw.request("lock_info", {"a": 1, "b": 2})
    assert reply["msg"] == (
        "Error: API request contains unsupported parameters: ['a', 'b']. "
        "Supported parameters: ['lock_key']"
    )
    assert reply["lock_info"] == {} and reply["lock_info_uid"] is None


def test_every_method_in_the_issue_is_served(raw):
    wanted = {
        "status", "ping", "function_execute", "script_upload", "task_status", "task_result",
        "lock", "unlock", "lock_info", "kernel_interrupt", "permissions_get", "config_get",
        "environment_open", "environment_close", "history_clear",
    }
    assert wanted <= set(METHODS)
    for name in wanted:
        reply = raw.request(name, {"definitely_not_a_param": 1})
        if name in ("status", "ping"):  # queueserver ignores status parameters
            assert "manager_state" in reply
        else:
            assert reply["success"] is False
            assert "unsupported parameters: 'definitely_not_a_param'" in reply["msg"], name


# =========================================================================================
# function_execute, task_status, task_result
# =========================================================================================
def test_function_execute_background_and_wait_for_completed_task(RM):
    reply = RM.function_execute(BFunc("add", 2, b=3), run_in_background=True)
    uid = reply["task_uid"]
    assert reply["success"] is True and reply["msg"] == ""
    item = reply["item"]
    assert item["item_uid"] == uid and item["name"] == "add"
    assert item["args"] == [2] and item["kwargs"] == {"b": 3}
    assert item["user"] == RM.user and item["user_group"] == "primary"
    done = RM.wait_for_completed_task(uid, timeout=WAIT)
    assert done == {uid: "completed"}
    result = RM.task_result(uid)
    assert result["status"] == "completed" and result["task_uid"] == uid
    r = result["result"]
    assert r["success"] is True and r["return_value"] == 5 and r["msg"] == ""
    assert r["time_start"] <= r["time_stop"]
    assert RM.task_status(uid)["status"] == "completed"
    many = RM.task_status([uid, "no-such-task-uid"])
    assert many["status"] == {uid: "completed", "no-such-task-uid": "not_found"}
    missing = RM.task_result("no-such-task-uid")
    assert missing["status"] == "not_found" and missing["result"] == {}


def test_function_execute_foreground_runs_on_foreground_thread(RM):
    reply = RM.function_execute(BFunc("thread_name"))
    result = wait_result(RM, reply["task_uid"])
    assert result["success"] is True
    assert result["return_value"] == "qmagic-foreground"  # not the channel's thread


def test_running_task_result_and_not_idle_rule(RM, gate, entered):
    reply = RM.function_execute(BFunc("hold"))
    uid = reply["task_uid"]
    assert entered.wait(WAIT)
    running = RM.task_result(uid)
    assert running["status"] == "running"
    assert running["result"] == {
        "task_uid": uid,
        "time_start": running["result"]["time_start"],
        "run_in_background": False,
    }
    status = RM.status(reload=True)
    assert status["manager_state"] == "executing_task"
    assert status["worker_environment_state"] == "executing_task"
    assert status["ip_kernel_captured"] is True
    with pytest.raises(RM.RequestFailedError) as info:
        RM.function_execute(BFunc("add", 1))
    assert info.value.response["msg"] == MSG_NOT_IDLE
    assert info.value.response["task_uid"] is None
    # background work is still accepted while the foreground is taken
    bg = RM.function_execute(BFunc("add", 1, 1), run_in_background=True)
    assert wait_result(RM, bg["task_uid"])["return_value"] == 2
    gate.set()
    assert wait_result(RM, uid)["return_value"] == "released"


def test_failing_function_reports_message_and_traceback(RM):
    uid = RM.function_execute(BFunc("fail", "door open"), run_in_background=True)["task_uid"]
    RM.wait_for_completed_task(uid, timeout=WAIT)
    r = RM.task_result(uid)["result"]
    assert r["success"] is False and r["return_value"] is None
    assert r["msg"] == (
        "Error occurred while executing 'Execute function': sample stage refused: door open"
    )
    assert "Traceback (most recent call last)" in r["traceback"]
    assert "ValueError: sample stage refused: door open" in r["traceback"]
    assert "in fail" in r["traceback"]


def test_non_json_result_fails_the_remote_task(RM):
    uid = RM.function_execute(BFunc("not_json"), run_in_background=True)["task_uid"]
    r = wait_result(RM, uid)
    assert r["success"] is False and r["return_value"] is None
    assert "Task result can not be serialized as JSON" in r["msg"]


def test_missing_function_is_accepted_then_fails(RM):
    reply = RM.function_execute(BFunc("no_such_function"), run_in_background=True)
    assert reply["success"] is True
    r = wait_result(RM, reply["task_uid"])
    assert r["success"] is False and "no_such_function" in r["msg"]


def test_function_execute_request_format_errors(raw):
    item = {"item_type": "function", "name": "add", "args": [1]}
    reply = raw.request("function_execute", {"user": "u", "user_group": "primary"})
    assert reply == {
        "success": False,
        "msg": "Error: Incorrect request format: request contains no item info",
        "item": None,
        "task_uid": None,
    }
    reply = raw.request("function_execute", {"item": item, "user": "u"})
    assert reply["msg"] == "Error: Incorrect request format: user group is not specified"
    assert reply["item"] == item and reply["task_uid"] is None
    reply = raw.request("function_execute", {"item": item, "user_group": "primary"})
    assert reply["msg"] == "Error: Incorrect request format: user name is not specified"
    reply = raw.request("function_execute", {"item": "add", "user": "u", "user_group": "primary"})
    assert reply["success"] is False and "'item' must be a dict" in reply["msg"]
    reply = raw.request("function_execute", {"item": {**item, "args": 5}, "user": "u",
                                             "user_group": "primary"})
    assert reply["success"] is False and "'args' must be a list" in reply["msg"]


# =========================================================================================
# permissions
# =========================================================================================
def test_permissions_refusals(tmp_path, gate, entered, rm_factory):
    rules = {
        "user_groups": {
            "root": {"allowed_functions": [None], "forbidden_functions": [":^_"]},
            "primary": {"allowed_functions": ["add", ":^thread"], "forbidden_functions": [None]},
        }
    }
    w = Worker(make_namespace(gate, entered), state_dir=str(tmp_path / "s"),
               user_group_permissions=rules)
    try:
        with ControlChannel(w, "tcp://127.0.0.1:*", max_message_bytes=10_000) as ch:
            RM = rm_factory(ch.address)
            assert RM.permissions_get()["user_group_permissions"]["user_groups"]["primary"][
                "allowed_functions"] == ["add", ":^thread"]
            with pytest.raises(RM.RequestFailedError) as info:
                RM.function_execute(BFunc("secret"), run_in_background=True)
            assert info.value.response["msg"] == (
                "Error: Function 'secret' is not allowed for users from 'primary' group."
            )
            with pytest.raises(RM.RequestFailedError) as info:
                RM.function_execute(BFunc("add", 1), user_group="visitors")
            assert info.value.response["msg"] == "Error: Unknown user group: 'visitors'"
            uid = RM.function_execute(BFunc("add", 1), run_in_background=True)["task_uid"]
            assert wait_result(RM, uid)["return_value"] == 1
    finally:
        w.close()


# =========================================================================================
# script_upload
# =========================================================================================
def test_script_upload_defines_functions(RM, raw):
    reply = RM.script_upload("def triple(x):\n    return 3 * x\n", run_in_background=True)
    assert reply["success"] is True
    r = wait_result(RM, reply["task_uid"])
    assert r["success"] is True and r["return_value"] is None
    uid = RM.function_execute(BFunc("triple", 4), run_in_background=True)["task_uid"]
    assert wait_result(RM, uid)["return_value"] == 12
    # a foreground script (on the foreground thread) and a failing one
    uid = RM.script_upload("raise RuntimeError('bad script line')")["task_uid"]
    r = wait_result(RM, uid)
    assert r["success"] is False
    assert r["msg"] == "Error occurred while executing 'Load script': bad script line"
    assert raw.request("script_upload", {}) == {
        "success": False,
        "msg": "Error: Required 'script' parameter is is missing in API call.",
        "task_uid": None,
    }
    assert raw.request("script_upload", {"script": 5})["msg"] == (
        "Error: Type of the 'script' parameter in API call is incorrect."
    )


# =========================================================================================
# locks
# =========================================================================================
def test_lock_environment_refuses_wrong_key_and_enable_locked_api(RM, raw):
    before = RM.status(reload=True)["lock_info_uid"]
    reply = RM.lock_environment("key-A", note="Changing samples", user="Alice")
    assert reply["success"] is True and reply["lock_info"]["environment"] is True
    assert reply["lock_info"]["queue"] is False and reply["lock_info"]["user"] == "Alice"
    status = RM.status(reload=True)
    assert status["lock"] == {"environment": True, "queue": False}
    assert status["lock_info_uid"] != before
    # no key / wrong key: refused with queueserver's text
    for key in (None, "key-B"):
        with pytest.raises(RM.RequestFailedError) as info:
            RM.function_execute(BFunc("add", 1), run_in_background=True, lock_key=key)
        msg = info.value.response["msg"]
        assert msg.startswith("Error: Invalid lock key: \nRE Manager is locked by Alice at ")
        assert "Environment is locked: True\nQueue is locked:       False\n" in msg
        assert msg.endswith("Emergency lock key:    not set\nNote: Changing samples")
    with pytest.raises(RM.RequestFailedError):
        RM.script_upload("x = 1", lock_key="key-B")
    with pytest.raises(RM.RequestFailedError) as info:
        RM.kernel_interrupt(lock_key="key-B")
    assert info.value.response["msg"].startswith("Error: Invalid lock key: ")
    # the right key passes; then the client's own key handling
    uid = RM.function_execute(BFunc("add", 2), run_in_background=True, lock_key="key-A")["task_uid"]
    assert wait_result(RM, uid)["return_value"] == 2
    RM.lock_key = "key-A"
    RM.enable_locked_api = True
    uid = RM.function_execute(BFunc("add", 3), run_in_background=True)["task_uid"]
    assert wait_result(RM, uid)["return_value"] == 3
    # unlocked API calls are not affected by the lock
    assert RM.task_status(uid)["status"] == "completed"
    # another key cannot relock or unlock
    with pytest.raises(RM.RequestFailedError) as info:
        RM.lock_all("key-B", user="Bob")
    assert info.value.response["msg"].startswith(
        "Error: RE Manager was locked with a different key: "
    )
    with pytest.raises(RM.RequestFailedError) as info:
        RM.unlock("key-B")
    assert info.value.response["msg"].startswith("Error: Invalid lock key: ")
    RM.unlock()
    assert RM.status(reload=True)["lock"] == {"environment": False, "queue": False}


def test_lock_all_lock_info_and_queue_scope(RM, raw):
    reply = RM.lock_all("key-A", user="Alice")
    assert reply["lock_info"]["environment"] is True and reply["lock_info"]["queue"] is True
    info = RM.lock_info()
    assert info["success"] is True
    assert info["lock_info"]["user"] == "Alice"
    assert set(info["lock_info"]) == {
        "environment", "queue", "user", "time", "time_str", "note", "emergency_lock_key_is_set"
    }
    assert isinstance(info["lock_info"]["time"], float)
    assert RM.lock_info("key-A")["success"] is True
    with pytest.raises(RM.RequestFailedError):
        RM.lock_info("key-B")
    with pytest.raises(RM.RequestFailedError):
        RM.history_clear(lock_key="key-B")  # queue-lockable
    assert RM.history_clear(lock_key="key-A")["success"] is True
    # re-lock with the same key changes the scopes
    reply = RM.lock_queue("key-A", user="Alice")
    assert reply["lock_info"]["environment"] is False and reply["lock_info"]["queue"] is True
    uid = RM.function_execute(BFunc("add", 7), run_in_background=True)["task_uid"]
    assert wait_result(RM, uid)["return_value"] == 7
    assert RM.unlock("key-A")["lock_info"]["queue"] is False


def test_lock_request_format(raw):
    assert raw.request("lock", {"lock_key": "k", "environment": True})["msg"] == (
        "Error: User name is not specified: 'user' is a required parameter"
    )
    assert raw.request("lock", {"user": "A", "environment": True})["msg"] == (
        "Error: Lock key is not specified: 'lock_key' is a required parameter"
    )
    reply = raw.request("lock", {"user": "A", "lock_key": "k"})
    assert reply["success"] is False and "environment and/or queue must be selected" in reply["msg"]
    assert reply["lock_info"] == {} and reply["lock_info_uid"] is None
    assert raw.request("unlock", {})["msg"] == (
        "Error: Request contains no lock key: 'lock_key' parameter is required"
    )


# =========================================================================================
# kernel_interrupt, environment, history, config
# =========================================================================================
def test_kernel_interrupt_rules(RM, worker, gate, entered):
    assert RM.kernel_interrupt() == {"success": True, "msg": ""}
    assert len(worker.interrupts) == 1
    uid = RM.function_execute(BFunc("hold"))["task_uid"]
    assert entered.wait(WAIT)
    with pytest.raises(RM.RequestFailedError) as info:
        RM.kernel_interrupt()
    assert info.value.response == {
        "success": False,
        "msg": "Failed to interrupt IPython kernel: Not allowed to interrupt running task",
    }
    assert len(worker.interrupts) == 1
    assert RM.kernel_interrupt(interrupt_task=True)["success"] is True
    assert len(worker.interrupts) == 2
    gate.set()
    wait_result(RM, uid)


def test_environment_history_and_config(RM, raw, channel):
    with pytest.raises(RM.RequestFailedError) as info:
        RM.environment_open()
    assert info.value.response == {"success": False, "msg": "RE Worker environment already exists."}
    with pytest.raises(RM.RequestFailedError) as info:
        RM.environment_close()
    assert "cannot be closed remotely" in info.value.response["msg"]
    RM.lock_environment("key-A", user="Alice")
    reply = raw.request("environment_open", {"lock_key": "nope"})
    assert reply["msg"].startswith("Error: Invalid lock key: ")
    RM.unlock("key-A")

    uid = RM.function_execute(BFunc("add", 1), run_in_background=True)["task_uid"]
    wait_result(RM, uid)
    assert RM.status(reload=True)["items_in_history"] >= 1
    assert RM.history_clear() == {"success": True, "msg": ""}
    assert RM.status(reload=True)["items_in_history"] == 0
    # Forgotten in memory, still known to the experiment log (the journal).
    assert RM.task_status(uid)["status"] == "completed"
    with pytest.raises(RM.RequestFailedError) as info:
        RM.history_clear(size=3)
    assert "cannot trim" in info.value.response["msg"]

    assert RM.config_get() == {"success": True, "msg": "", "config": {"ip_connect_info": {}}}
    channel.connection_info = {"shell_port": 1234, "key": "abc", "transport": "tcp"}
    assert RM.config_get()["config"]["ip_connect_info"]["shell_port"] == 1234


def test_task_results_uid_changes_for_wait_for_completed_task(RM):
    first = RM.status(reload=True)["task_results_uid"]
    uid = RM.function_execute(BFunc("add", 1), run_in_background=True)["task_uid"]
    RM.wait_for_completed_task(uid, timeout=WAIT)
    assert RM.status(reload=True)["task_results_uid"] != first


def test_python_task_with_non_json_result_is_readable_remotely(RM, worker):
    task = worker.submit("not_json")  # a notebook user's task: not held to the JSON rule
    assert task.wait(WAIT)
    r = RM.task_result(task.uid)["result"]
    assert r["success"] is True and r["return_value"] is None
    assert "can not be serialized as JSON" in r["msg"] and task.uid in r["msg"]


def test_several_clients_at_once(channel, rm_factory):
    clients = [rm_factory(channel.address) for _ in range(4)]
    errors: list[BaseException] = []

    def drive(rm: REManagerAPI, k: int) -> None:
        try:
            for i in range(25):
                status = rm.send_request(method="status")
                assert status["manager_state"] in ("idle", "executing_task")
                uid = rm.function_execute(BFunc("add", k, i), run_in_background=True)["task_uid"]
                assert wait_result(rm, uid)["return_value"] == k + i
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=drive, args=(rm, k)) for k, rm in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert channel.stats["requests"] >= 4 * 25 * 3


# =========================================================================================
# the busy rule (a user's cell holds the foreground)
# =========================================================================================
def test_busy_rule_refuses_foreground_accepts_background(RM, runner):
    runner.cell_running.set()
    status = RM.status(reload=True)
    assert status["ip_kernel_state"] == "busy" and status["ip_kernel_captured"] is False
    assert status["manager_state"] == "idle"
    with pytest.raises(RM.RequestFailedError) as info:
        RM.function_execute(BFunc("add", 1))
    assert info.value.response["msg"] == MSG_KERNEL_BUSY
    with pytest.raises(RM.RequestFailedError) as info:
        RM.script_upload("y = 2")
    assert info.value.response["msg"] == MSG_KERNEL_BUSY
    uid = RM.function_execute(BFunc("add", 4), run_in_background=True)["task_uid"]
    assert wait_result(RM, uid)["return_value"] == 4
    runner.cell_running.clear()
    uid = RM.function_execute(BFunc("add", 5))["task_uid"]
    assert wait_result(RM, uid)["return_value"] == 5


def test_replies_are_immediate_while_foreground_is_blocked(RM, gate, entered):
    uid = RM.function_execute(BFunc("hold"))["task_uid"]
    assert entered.wait(WAIT)
    for _ in range(20):
        t0 = time.monotonic()
        RM.status(reload=True)
        RM.task_status(uid)
        assert time.monotonic() - t0 < 0.5
    gate.set()
    wait_result(RM, uid)


# =========================================================================================
# malformed input
# =========================================================================================
def test_malformed_messages_get_error_replies(raw, channel, RM):
    cases = [
        (b"this is not json", "Failed to decode the request: it is not valid JSON"),
        (b"\xff\xfe\x00garbage", "Failed to decode the request"),
        (b"[1, 2, 3]", "Incorrect request type: list. Dictionary is expected"),
        (b'"status"', "Incorrect request type: str"),
        (b"{}", "Invalid request format: method is not specified"),
        (b'{"params": {}}', "Invalid request format: method is not specified"),
        (b'{"method": "status", "params": {}, "id": 1}',
         "Request contains unexpected keys ['id']. Allowed keys: ('method', 'params')"),
        (b'{"method": "status", "params": [1]}', "'params' must be a dictionary"),
        (b'{"method": 17, "params": {}}', "Unknown method 17"),
        (b'{"method": ["status"], "params": {}}', "Unknown method ['status']"),
        (b"[" * 100_000 + b"]" * 100_000, "too large"),
        (b"[" * 50_000 + b"]" * 50_000, "Failed to decode the request"),
        (b'{"method": "task_status", "params": {"task_uid": 5}}', "must be a string or a list"),
        (b'{"method": "task_result", "params": {"task_uid": ["a"]}}', "must be a string"),
        (b'{"method": "task_result", "params": {}}',
         "Error: Required 'task_uid' parameter is missing in the API call."),
        (b'{"method": "lock", "params": {"user": 5, "lock_key": "k", "environment": true}}',
         "User name must be a non-empty string"),
        (b'{"method": "kernel_interrupt", "params": {"lock_key": 5}}',
         "Lock key must be a non-empty string or None"),
    ]
    for payload, expected in cases:
        reply = raw.send(payload)
        assert reply["success"] is False, payload[:60]
        assert expected in reply["msg"], (payload[:60], reply["msg"])
    reply = raw.send(b"x" * 200_000)
    assert reply["success"] is False and "200000 bytes" in reply["msg"]
    assert "QMagic.zmq_max_message_bytes" in reply["msg"]
    reply = raw.send(b'{"method": "status", "params": {}}', b"second frame")
    assert reply["success"] is False and "2 frames" in reply["msg"]
    # params: null is treated as {} (queueserver's default)
    assert "manager_state" in raw.send(b'{"method": "status", "params": null}')
    assert channel.stats["malformed"] >= 12
    # the channel still serves everyone
    assert channel.running
    assert RM.status(reload=True)["manager_state"] == "idle"
    uid = RM.function_execute(BFunc("add", 1), run_in_background=True)["task_uid"]
    assert wait_result(RM, uid)["return_value"] == 1


def test_limit_follows_max_message_bytes(raw, channel):
    channel.max_message_bytes = 50
    assert "too large" in raw.request("task_status", {"task_uid": "x" * 100})["msg"]
    channel.max_message_bytes = 10_000
    assert raw.request("task_status", {"task_uid": "x" * 100})["success"] is True


# =========================================================================================
# CurveZMQ
# =========================================================================================
def test_curve_encryption(worker, rm_factory, monkeypatch):
    public, secret = (k.decode() for k in zmq.curve_keypair())
    wrong_public, _ = (k.decode() for k in zmq.curve_keypair())
    monkeypatch.setenv(PRIVATE_KEY_ENV, secret)
    with ControlChannel(worker, "tcp://127.0.0.1:*", max_message_bytes=10_000) as ch:
        assert ch.curve and "CurveZMQ" in ch.describe()
        good = rm_factory(ch.address, zmq_public_key=public)
        assert good.status(reload=True)["manager_state"] == "idle"
        bad = rm_factory(ch.address, zmq_public_key=wrong_public, timeout_recv=0.5)
        with pytest.raises(bad.RequestTimeoutError):
            bad.send_request(method="status")
        plain = rm_factory(ch.address, timeout_recv=0.5)
        with pytest.raises(plain.RequestTimeoutError):
            plain.send_request(method="status")
        # the channel keeps serving good clients
        uid = good.function_execute(BFunc("add", 6), run_in_background=True)["task_uid"]
        assert wait_result(good, uid)["return_value"] == 6
        assert ch.running


def test_curve_explicit_key_and_bad_keys(worker, rm_factory, monkeypatch):
    monkeypatch.delenv(PRIVATE_KEY_ENV, raising=False)
    public, secret = (k.decode() for k in zmq.curve_keypair())
    with ControlChannel(worker, "tcp://127.0.0.1:*", secret_key=secret) as ch:
        assert rm_factory(ch.address, zmq_public_key=public).status(reload=True)
    with pytest.raises(ControlChannelError, match="z85 key of 40 characters"):
        ControlChannel(worker, "tcp://127.0.0.1:*", secret_key="too-short")
    monkeypatch.setenv(PRIVATE_KEY_ENV, "x" * 39)
    with pytest.raises(ControlChannelError, match=PRIVATE_KEY_ENV):
        ControlChannel(worker, "tcp://127.0.0.1:*")


# =========================================================================================
# lifecycle
# =========================================================================================
def test_start_stop_restart_and_bind_errors(worker, channel):
    address = channel.address
    with pytest.raises(ControlChannelError, match="already in use"):
        ControlChannel(worker, address).start()
    with pytest.raises(ControlChannelError, match="Cannot start the control channel"):
        ControlChannel(worker, "tcp://256.1.1.1:5").start()
    with pytest.raises(ControlChannelError, match="Invalid control channel address"):
        ControlChannel(worker, "127.0.0.1:5")
    assert "serving bluesky-queueserver clients" in channel.describe()
    channel.stop()
    assert not channel.running and "off" in channel.describe()
    channel.stop()  # idempotent
    # the port is free again: another channel can bind it at once
    other = ControlChannel(worker, address).start()
    try:
        client = Raw(address)
        assert "manager_state" in client.request("status")
        client.close()
    finally:
        other.stop()
    assert not [t for t in threading.enumerate() if t.name == "qmagic-control" and t.is_alive()]


# =========================================================================================
# the magic and the trait (in-process IPython shell)
# =========================================================================================
def test_magic_start_status_stop(ip, worker, capsys):
    from IPython.core.error import UsageError

    attach(ip, worker)
    try:
        assert "control_channel" in ip.magics_manager.magics["line"]
        ip.run_line_magic("control_channel", "status")
        assert "Control channel: off" in capsys.readouterr().out
        port = free_port()
        ip.run_line_magic("control_channel", f"start tcp://127.0.0.1:{port}")
        out = capsys.readouterr().out
        assert f"tcp://127.0.0.1:{port}" in out and "serving" in out
        assert worker.zmq_control_address == f"tcp://127.0.0.1:{port}"
        channel = get_channel(worker)
        assert channel is not None and channel.running
        client = Raw(channel.address)
        assert client.request("status")["manager_state"] == "idle"
        client.close()
        with pytest.raises(UsageError):
            ip.run_line_magic("control_channel", "launch")
        with pytest.raises(UsageError):
            ip.run_line_magic("control_channel", "stop tcp://127.0.0.1:1")
        ip.run_line_magic("control_channel", "stop")
        assert "stopped" in capsys.readouterr().out
        assert get_channel(worker) is None and worker.zmq_control_address is None
        ip.run_line_magic("control_channel", "stop")
        assert "was not running" in capsys.readouterr().out
        doc = ip.magics_manager.magics["line"]["control_channel"].__doc__
        assert "REManagerAPI" in doc and "{start,stop,status}" in doc
    finally:
        detach(ip, worker)
    assert "control_channel" not in ip.magics_manager.magics["line"]


def test_magic_start_on_a_free_port_keeps_that_port(ip, worker, capsys):
    attach(ip, worker)
    try:
        ip.run_line_magic("control_channel", "start tcp://127.0.0.1:*")
        bound = get_channel(worker).address
        assert not bound.endswith(":*") and worker.zmq_control_address == bound
        assert bound in capsys.readouterr().out
        ip.run_line_magic("control_channel", "stop")
        ip.run_line_magic("control_channel", "start")  # the same port again
        assert get_channel(worker).address == bound
    finally:
        detach(ip, worker)


def test_magic_reports_bind_error_as_usage_error(ip, worker, channel):
    from IPython.core.error import UsageError

    attach(ip, worker)
    try:
        with pytest.raises(UsageError, match="already in use"):
            ip.run_line_magic("control_channel", f"start {channel.address}")
        assert get_channel(worker) is None and worker.zmq_control_address is None
    finally:
        detach(ip, worker)


def test_trait_drives_the_channel(worker, capsys):
    address = f"tcp://127.0.0.1:{free_port()}"
    worker.zmq_control_address = address
    attach(None, worker)  # configured address: starts at attach
    try:
        channel = get_channel(worker)
        assert channel is not None and channel.address == address
        worker.zmq_max_message_bytes = 123
        assert channel.max_message_bytes == 123
        worker.zmq_control_address = None
        assert get_channel(worker) is None and not channel.running
        new_address = f"tcp://127.0.0.1:{free_port()}"
        worker.zmq_control_address = new_address
        assert get_channel(worker).address == new_address
    finally:
        detach(None, worker)
    assert not channel.running and get_channel(worker) is None
    assert worker.zmq_control_address == new_address  # kept for a later attach


def test_attach_with_busy_port_leaves_channel_off(worker, channel, capsys):
    worker.zmq_control_address = channel.address
    attach(None, worker)
    try:
        assert get_channel(worker) is None
        assert "control channel is off" in capsys.readouterr().err
    finally:
        detach(None, worker)


def test_default_address_is_loopback():
    assert DEFAULT_ADDRESS.startswith("tcp://127.0.0.1:")


# =========================================================================================
# part 2: a real kernel
# =========================================================================================
def _require_extension():
    try:
        import qmagic.extension  # noqa: F401
    except ImportError:
        pytest.skip("qmagic.extension does not exist yet")


@pytest.fixture
def remote_kernel(kernel_factory, rm_factory):
    _require_extension()
    address = f"tcp://127.0.0.1:{free_port()}"
    k = kernel_factory(argv=["--ext=qmagic", f"--QMagic.zmq_control_address={address}"])
    k.execute(
        "import threading, time\n"
        "def on_main():\n    return threading.current_thread() is threading.main_thread()\n"
        "def add(a, b=0):\n    return a + b\n"
        "def spin(seconds=30):\n"
        "    t = time.monotonic()\n"
        "    while time.monotonic() - t < seconds:\n        time.sleep(0.005)\n"
        "    return 'finished'\n"
        "def burn(seconds=30):\n"
        "    t = time.monotonic()\n"
        "    while time.monotonic() - t < seconds:\n        pass\n"
        "    return 'finished'\n",
        check=True,
    )
    rm = rm_factory(address)
    return k, rm, address


def _wait_status(rm, condition, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = rm.status(reload=True)
        if condition(status):
            return status
    raise AssertionError(f"status condition not met within {timeout} s: {status}")


def test_kernel_foreground_on_main_thread_and_config_get(remote_kernel):
    k, RM, address = remote_kernel
    assert RM.status(reload=True)["manager_state"] == "idle"
    uid = RM.function_execute(BFunc("on_main"))["task_uid"]
    assert wait_result(RM, uid)["return_value"] is True
    uid = RM.function_execute(BFunc("on_main"), run_in_background=True)["task_uid"]
    assert wait_result(RM, uid)["return_value"] is False
    info = RM.config_get()["config"]["ip_connect_info"]
    assert {"shell_port", "iopub_port", "control_port", "hb_port", "stdin_port", "key",
            "transport", "ip"} <= set(info)
    assert isinstance(info["key"], str)
    assert info["shell_port"] == k.km.shell_port


def test_kernel_busy_rule_and_interrupt_of_a_cell(remote_kernel):
    k, RM, address = remote_kernel
    # a pure-Python loop: the main thread holds the GIL except at switch intervals
    msg_id = k.execute_async("print('cell started', flush=True)\nburn(25)")
    k.wait_for_output(msg_id, "cell started")
    status = _wait_status(RM, lambda s: s["ip_kernel_state"] == "busy")
    assert status["ip_kernel_captured"] is False
    worst = 0.0
    for _ in range(50):
        t0 = time.monotonic()
        RM.status(reload=True)
        worst = max(worst, time.monotonic() - t0)
    with pytest.raises(RM.RequestFailedError) as info:
        RM.function_execute(BFunc("add", 1))
    assert info.value.response["msg"] == MSG_KERNEL_BUSY
    uid = RM.function_execute(BFunc("add", 2, 3), run_in_background=True)["task_uid"]
    assert wait_result(RM, uid)["return_value"] == 5
    assert worst < 2.0
    # no foreground task: the interrupt reaches the cell
    assert RM.kernel_interrupt()["success"] is True
    result = k.wait(msg_id, timeout=WAIT)
    assert result.status == "error" and result.error["ename"] == "KeyboardInterrupt"
    assert k.execute("1 + 1").result == "2"
    _wait_status(RM, lambda s: s["ip_kernel_state"] == "idle")


def test_kernel_interrupt_of_a_remote_foreground_task(remote_kernel):
    k, RM, address = remote_kernel
    uid = RM.function_execute(BFunc("spin", 25))["task_uid"]
    _wait_status(RM, lambda s: s["manager_state"] == "executing_task")
    assert RM.task_status(uid)["status"] == "running"
    with pytest.raises(RM.RequestFailedError) as info:
        RM.kernel_interrupt()
    assert info.value.response["msg"] == (
        "Failed to interrupt IPython kernel: Not allowed to interrupt running task"
    )
    assert RM.task_status(uid)["status"] == "running"
    assert RM.kernel_interrupt(interrupt_task=True)["success"] is True
    result = wait_result(RM, uid)
    assert result["success"] is False and "interrupt" in result["msg"].lower()
    _wait_status(RM, lambda s: s["manager_state"] == "idle")
    assert k.execute("1 + 1").result == "2"
    uid = RM.function_execute(BFunc("add", 1, 1))["task_uid"]
    assert wait_result(RM, uid)["return_value"] == 2


def test_kernel_magic_stop_and_start(remote_kernel, rm_factory):
    k, RM, address = remote_kernel
    out = k.execute("%control_channel status", check=True).stdout
    assert "serving bluesky-queueserver clients" in out
    k.execute("%control_channel stop", check=True)
    impatient = rm_factory(address, timeout_recv=0.5)
    with pytest.raises(impatient.RequestTimeoutError):
        impatient.send_request(method="status")
    k.execute("%control_channel start", check=True)  # the last address again
    assert RM.status(reload=True)["manager_state"] == "idle"
