"""bluesky-httpserver (uvicorn, loopback, single-user API key) in front of a real qmagic
kernel — its control channel and info socket — driven with bluesky-queueserver-api's HTTP
REManagerAPI and the gateway's websockets.  Start and stop times are printed (``-s``)."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from bluesky_queueserver_api import BFunc
from bluesky_queueserver_api.http import REManagerAPI
from websockets.sync.client import connect

from gateway import start_gateway
from kernel_utils import KernelSession

API_KEY = "qmagicTestApiKey0123"  # bluesky-httpserver refuses keys that are not alphanumeric
WAIT = 30.0


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    base = tmp_path_factory.mktemp("gateway")
    t0 = time.monotonic()
    # The kernel binds free ports itself and says which (two ports picked here and freed
    # before the kernel binds them could be the same one, or taken meanwhile: the kernel's
    # own channels and every connection draw from the same ephemeral range).
    kernel = KernelSession(base / "kernel", argv=[
        "--ext=qmagic", "--QMagic.zmq_control_address=tcp://127.0.0.1:*",
        "--QMagic.zmq_info_address=tcp://127.0.0.1:*"]).start()
    try:
        kernel.execute("def add(a, b):\n    print('adding', a, b)\n    return a + b\n", check=True)
        control, info = kernel.eval(
            "(lambda remote: (remote.server.address, remote.info.address))("
            "__import__('qmagic.ipython.extension', fromlist=['get_session']).get_session(get_ipython()).remote)")
        assert not control.endswith(":*") and not info.endswith(":*"), (control, info)
        t_kernel = time.monotonic() - t0
        gw = start_gateway(control, info, API_KEY, base)
        print(f"\nkernel start {t_kernel:.2f} s, gateway start {gw.start_seconds:.2f} s")
        try:
            yield gw
        finally:
            print(f"\ngateway stop {gw.stop():.2f} s")
    finally:
        kernel.shutdown()


@pytest.fixture
def rm(gateway):
    api = REManagerAPI(http_server_uri=gateway.uri)
    api.set_authorization_key(api_key=API_KEY)
    yield api
    api.close()


def _headers() -> dict:
    return {"Authorization": f"ApiKey {API_KEY}"}


def test_no_key_is_401(gateway):
    assert httpx.get(f"{gateway.uri}/api/status").status_code == 401
    assert httpx.get(f"{gateway.uri}/api/status", headers={"Authorization": "ApiKey wrong"}).status_code == 401
    r = httpx.get(f"{gateway.uri}/api/status", headers=_headers())
    assert r.status_code == 200 and r.json()["manager_state"] == "idle"


def test_function_execute_and_result(rm):
    assert rm.status()["worker_environment_exists"] is True
    reply = rm.function_execute(BFunc("add", 2, 3), run_in_background=True)
    assert reply["success"] is True, reply
    rm.wait_for_completed_task(reply["task_uid"], timeout=WAIT)
    result = rm.task_result(reply["task_uid"])
    assert result["status"] == "completed" and result["result"]["return_value"] == 5
    assert rm.task_status(reply["task_uid"])["status"] == "completed"


def test_script_upload(rm):
    reply = rm.script_upload("qs_http_value = 41 + 1\ndef get_value():\n    return qs_http_value\n")
    assert reply["success"] is True, reply
    rm.wait_for_completed_task(reply["task_uid"], timeout=WAIT)
    reply = rm.function_execute(BFunc("get_value"), run_in_background=True)
    rm.wait_for_completed_task(reply["task_uid"], timeout=WAIT)
    assert rm.task_result(reply["task_uid"])["result"]["return_value"] == 42


def test_lock_unlock(rm, gateway):
    rm.lock_key = "http-key"
    reply = rm.lock(environment=True, note="gateway test")
    assert reply["success"] is True and reply["lock_info"]["environment"] is True
    other = REManagerAPI(http_server_uri=gateway.uri)
    other.set_authorization_key(api_key=API_KEY)
    try:
        with pytest.raises(other.RequestFailedError, match="Invalid lock key"):
            other.function_execute(BFunc("add", 1, 1), run_in_background=True)
    finally:
        other.close()
    assert rm.unlock()["success"] is True
    assert rm.status()["lock"] == {"environment": False, "queue": False}


def _ws_messages(gateway, path: str, until, timeout: float = WAIT) -> list:
    uri = gateway.uri.replace("http://", "ws://") + path
    got = []
    with connect(uri, additional_headers=_headers()) as ws:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                got.append(json.loads(ws.recv(timeout=0.5)))
            except TimeoutError:
                continue
            if until(got):
                return got
    raise AssertionError(f"{path}: condition not met; got {got[-5:]}")


def test_status_and_info_websockets(gateway, rm):
    msgs = _ws_messages(gateway, "/api/status/ws", lambda g: len(g) >= 2)
    assert all(set(m["msg"]) == {"status"} for m in msgs)
    assert msgs[-1]["msg"]["status"]["manager_state"] == "idle"
    uri = gateway.uri.replace("http://", "ws://") + "/api/info/ws"
    with connect(uri, additional_headers=_headers()) as ws:
        json.loads(ws.recv(timeout=WAIT))  # subscribed: the periodic status arrives
        uid = rm.function_execute(BFunc("add", 3, 4), run_in_background=True)["task_uid"]
        deadline, final = time.monotonic() + WAIT, None
        while final is None:
            assert time.monotonic() < deadline
            task = json.loads(ws.recv(timeout=WAIT))["msg"].get("task", {})
            if task.get("task_uid") == uid and task.get("status") == "completed":
                final = task
    assert final["result"] == "7" and final["name"] == "add"


def test_console_output_websocket_and_buffer(gateway, rm):
    uri = gateway.uri.replace("http://", "ws://") + "/api/console_output/ws"
    with connect(uri, additional_headers=_headers()) as ws:
        text, marker, deadline = "", 0, time.monotonic() + WAIT
        while "adding 20 22" not in text:  # the route may start listening a moment later:
            assert time.monotonic() < deadline, text  # print again until a line arrives
            marker += 1
            rm.function_execute(BFunc("add", 20, 22), run_in_background=True)
            try:
                while "adding 20 22" not in text:
                    text += json.loads(ws.recv(timeout=1.0))["msg"]
            except TimeoutError:
                continue
    buffer = httpx.get(f"{gateway.uri}/api/console_output", headers=_headers()).json()
    assert "adding 20 22" in buffer["text"]


def test_console_monitor_over_http_gets_a_burst_of_prints_whole(rm):
    """The HTTP client's console monitor polls /api/console_output_update, which holds the
    last 2,000 messages of the info socket; a write per message made 3,000 printed lines
    6,000 messages, the monitor's place fell out of that buffer and it got nothing of the
    burst (the gateway answers an empty list then).  Text is now sent joined."""
    reply = rm.script_upload("def qs_burst(n):\n    for i in range(n):\n        print(f'burst line {i}')\n"
                             "    print('burst over')\n"
                             "def qs_say(text):\n    print(text)\n")
    rm.wait_for_completed_task(reply["task_uid"], timeout=WAIT)
    rm.console_monitor.enable()
    try:
        deadline, text = time.monotonic() + WAIT, ""
        while "monitor ready" not in text:  # the gateway may subscribe a moment later
            assert time.monotonic() < deadline, "the console monitor never received a line"
            rm.function_execute(BFunc("qs_say", "monitor ready"), run_in_background=True)
            try:
                while "monitor ready" not in text:
                    text += rm.console_monitor.next_msg(timeout=1.0)["msg"]
            except rm.RequestTimeoutError:
                continue
        reply = rm.function_execute(BFunc("qs_burst", 3000), run_in_background=True)
        rm.wait_for_completed_task(reply["task_uid"], timeout=WAIT)
        text, deadline = "", time.monotonic() + WAIT
        while "burst over" not in text:
            assert time.monotonic() < deadline, f"the end of the burst never arrived: {text[-200:]!r}"
            try:
                text += rm.console_monitor.next_msg(timeout=1.0)["msg"]
            except rm.RequestTimeoutError:
                continue
        lines = [line for line in text.splitlines() if line.startswith("burst")]
        assert lines == [f"burst line {i}" for i in range(3000)] + ["burst over"]
    finally:
        rm.console_monitor.disable()


def test_a_file_name_that_is_not_utf8_does_not_break_the_console_routes(gateway, rm):
    """Python hands out a file name that is not UTF-8 with its bytes as lone surrogates
    (os.listdir, surrogateescape); a task that printed one sent them as they were, and the
    gateway, which must encode its replies as UTF-8, answered /api/console_output and
    /api/console_output_update with 500 (Internal Server Error) for everyone until the line
    scrolled out.  Such characters are now sent as U+FFFD, as a terminal shows them."""
    reply = rm.script_upload("def qs_list_odd_name():\n"
                             "    print('file:', b'caf\\xe9.dat'.decode('utf-8', 'surrogateescape'))\n"
                             "    print('listed')\n")
    rm.wait_for_completed_task(reply["task_uid"], timeout=WAIT)
    uid = rm.function_execute(BFunc("qs_list_odd_name"), run_in_background=True)["task_uid"]
    rm.wait_for_completed_task(uid, timeout=WAIT)
    assert rm.task_result(uid)["result"]["success"] is True
    deadline = time.monotonic() + WAIT
    while True:  # (the gateway's monitor receives the line a moment later)
        r = httpx.request("GET", f"{gateway.uri}/api/console_output", json={"nlines": 50}, headers=_headers())
        assert r.status_code == 200, r.text
        if "listed" in r.json()["text"]:
            break
        assert time.monotonic() < deadline, r.json()["text"]
    assert "file: caf\ufffd.dat" in r.json()["text"]
    r = httpx.request("GET", f"{gateway.uri}/api/console_output_update", json={"last_msg_uid": "ALL"},
                      headers=_headers())
    assert r.status_code == 200, r.text


def test_a_result_naming_a_file_that_is_not_utf8_reaches_the_gateway(rm):
    """A task returning (or failing with) a file name that is not UTF-8: the control
    channel's reply carried its lone surrogates as JSON escapes, which bluesky-httpserver
    cannot encode as UTF-8: /api/task/result answered 500 for that task for good (and the
    client's next request found its connection reset).  Replies carry U+FFFD for them."""
    reply = rm.script_upload("qs_odd = b'caf\\xe9.dat'.decode('utf-8', 'surrogateescape')\n"
                             "def qs_odd_name():\n    return qs_odd\n"
                             "def qs_odd_failure():\n    raise ValueError('cannot read ' + qs_odd)\n")
    rm.wait_for_completed_task(reply["task_uid"], timeout=WAIT)
    uid = rm.function_execute(BFunc("qs_odd_name"), run_in_background=True)["task_uid"]
    rm.wait_for_completed_task(uid, timeout=WAIT)
    assert rm.task_result(uid)["result"]["return_value"] == "caf\ufffd.dat"
    uid = rm.function_execute(BFunc("qs_odd_failure"), run_in_background=True)["task_uid"]
    rm.wait_for_completed_task(uid, timeout=WAIT)
    result = rm.task_result(uid)["result"]
    assert result["msg"] == "Error occurred while executing 'Execute function': cannot read caf\ufffd.dat"
    assert "ValueError: cannot read caf\ufffd.dat" in result["traceback"]


def test_a_result_holding_nan_reaches_the_gateway_as_null_with_a_word(rm, gateway):
    """A measurement that returns NaN or an infinity: the control channel's reply carried
    Python's ``NaN`` tokens, which bluesky-httpserver cannot encode: /api/task/result
    answered 500 Internal Server Error, with nothing to read.  It gets null for each, and
    the reply's msg says why."""
    from qmagic.jsonreply import NONFINITE_NOTE

    reply = rm.script_upload("import math\ndef qs_nan():\n    return [1.5, math.nan, -math.inf]\n")
    rm.wait_for_completed_task(reply["task_uid"], timeout=WAIT)
    uid = rm.function_execute(BFunc("qs_nan"), run_in_background=True)["task_uid"]
    rm.wait_for_completed_task(uid, timeout=WAIT)
    r = httpx.request("GET", f"{gateway.uri}/api/task/result", json={"task_uid": uid}, headers=_headers())
    assert r.status_code == 200, r.text
    assert r.json()["result"]["return_value"] == [1.5, None, None]
    assert r.json()["msg"] == NONFINITE_NOTE
    assert rm.task_result(uid)["result"]["return_value"] == [1.5, None, None]  # (the client's way)


def test_a_fresh_gateway_passes_on_the_first_output_of_a_quiet_kernel(tmp_path):
    """bluesky-httpserver's console buffer answers /api/console_output_update with nothing for
    as long as it holds no message (the first ``last_msg_uid`` it hands out is in no buffer),
    and an RE Manager fills it with its own log lines; a qmagic kernel that had printed
    nothing since the gateway started left it empty, so the HTTP console monitor (which polls
    with that first uid) lost the first output it should have shown.  The info socket now
    sends an empty console message to its console topic's first subscriber."""
    from traitlets.config import Config

    from qmagic import Worker
    from qmagic.remote.service import RemoteService

    config = Config()
    config.QMagic.state_dir = str(tmp_path / "state")

    def say(text):
        print(text)

    worker = Worker({"say": say}, config=config)
    service = RemoteService(worker)
    gateway = api = None
    try:
        service.start("tcp://127.0.0.1:*")
        info = service.start_info("tcp://127.0.0.1:*")
        gateway = start_gateway(service.server.address, info.address, API_KEY, tmp_path)
        with httpx.Client(base_url=gateway.uri, headers=_headers(), timeout=WAIT) as http:
            def update(uid):
                reply = http.request("GET", "/api/console_output_update", json={"last_msg_uid": uid})
                reply.raise_for_status()
                return reply.json()

            deadline = time.monotonic() + WAIT  # (the gateway subscribes as it starts)
            while not update("ALL")["console_output_msgs"]:
                assert time.monotonic() < deadline, "the gateway's console buffer stayed empty"
                time.sleep(0.05)
            uid = update("")["last_msg_uid"]  # what the HTTP console monitor's first poll gets
            api = REManagerAPI(http_server_uri=gateway.uri)
            api.set_authorization_key(api_key=API_KEY)
            reply = api.function_execute(BFunc("say", "first words"), run_in_background=True)
            api.wait_for_completed_task(reply["task_uid"], timeout=WAIT)
            text, deadline = "", time.monotonic() + WAIT
            while "first words" not in text:
                assert time.monotonic() < deadline, f"the first output never arrived: {text!r}"
                msgs = update(uid)
                text += "".join(m["msg"] for m in msgs["console_output_msgs"])
                uid = msgs["last_msg_uid"]
                time.sleep(0.05)
    finally:
        if api is not None:
            api.close()
        if gateway is not None:
            gateway.stop()
        service.close()
        worker.close()
