"""queueserver's replies and texts over a worker: shapes, validation, locks, results."""

from __future__ import annotations

import pytest

from qmagic import TaskStatus

from engine_helpers import QS, STATUS_KEYS, TIMEOUT, Gate, make_worker  # noqa: F401 - fixture
from polling import eventually


def test_status_has_every_protocol_key(make_worker):
    status = QS(make_worker()).status()
    assert set(status) == STATUS_KEYS
    assert status["manager_state"] == "idle" and status["ip_kernel_state"] == "idle"
    assert status["worker_environment_exists"] is True
    assert status["lock"] == {"environment": False, "queue": False}
    assert status["plan_queue_mode"] == {"loop": False, "ignore_failures": False}
    assert status["items_in_history"] == 0  # no plan history in a kernel


def test_task_results_uid_changes_on_every_completed_task(make_worker):
    w = make_worker({"f": lambda: 1, "g": lambda: 1 / 0})
    qs = QS(w)
    seen = {qs.status()["task_results_uid"]}
    for name in ["f", "g", "f"]:
        w.submit(name).wait(TIMEOUT)
        uid = qs.status()["task_results_uid"]
        assert uid not in seen
        seen.add(uid)


def test_function_execute_reply_shape(make_worker):
    w = make_worker({"add": lambda a, b=0: a + b})
    item = {"item_type": "function", "name": "add", "args": [1], "kwargs": {"b": 2}}
    reply = QS(w).call("function_execute", item=item, run_in_background=True, user="Alice",
                       user_group="primary")
    assert set(reply) == {"success", "msg", "item", "task_uid"}
    assert reply["success"] is True and reply["msg"] == ""
    assert reply["item"] == {
        "name": "add", "args": [1], "kwargs": {"b": 2}, "user": "Alice",
        "user_group": "primary", "item_uid": reply["task_uid"], "item_type": "function",
    }
    task = w.get_task(reply["task_uid"])
    assert task.result(TIMEOUT) == 3 and task.user == "Alice" and task.origin == "remote"


@pytest.mark.parametrize(
    "params, msg",
    [
        ({"user": ""}, "Error: Incorrect request format: user name is not specified"),
        ({"user_group": ""}, "Error: Incorrect request format: user group is not specified"),
        ({"user_group": 5}, "Error: Incorrect request format: user group is not specified"),
        ({"user_group": "nobody"}, "Error: Unknown user group: 'nobody'"),
    ],
)
def test_user_and_group_are_checked(make_worker, params, msg):
    reply = QS(make_worker({"f": lambda: 1})).function_execute("f", **params)
    assert reply["success"] is False and reply["msg"] == msg and reply["task_uid"] is None


def test_missing_user_or_group_parameter(make_worker):
    qs = QS(make_worker({"f": lambda: 1}))
    item = {"item_type": "function", "name": "f"}
    assert qs.call("function_execute", item=item, user="u")["msg"] == (
        "Error: Incorrect request format: user group is not specified")
    assert qs.call("function_execute", item=item, user_group="primary")["msg"] == (
        "Error: Incorrect request format: user name is not specified")


@pytest.mark.parametrize(
    "item, msg",
    [
        ("f", "Error: Incorrect request format: incorrect type ('<class 'str'>') of item parameter: "
              "item parameter must have type 'dict'"),
        ({"name": "f"}, "Error: Incorrect request format: 'item_type' key is not found"),
        ({"item_type": "plan", "name": "f"}, "Error: Incorrect request format: unsupported "
         "'item_type' value: 'plan', supported item types ('function',)"),
        ({"item_type": "function", "args": []}, "Error: Function name is not specified: "
         "{'item_type': 'function', 'args': []}"),
        ({"item_type": "function", "name": "f", "args": 3},
         "Error: Parameter 'args' is not a tuple or a list: <class 'int'>"),
        ({"item_type": "function", "name": "f", "kwargs": [1]},
         "Error: Parameter 'kwargs' is not a dictionary: <class 'list'>"),
    ],
)
def test_bad_items_refused_without_trace(make_worker, item, msg):
    w = make_worker({"f": lambda: 1})
    reply = QS(w).call("function_execute", item=item, user="u", user_group="primary")
    assert reply["success"] is False and reply["msg"] == msg and reply["task_uid"] is None
    assert w.tasks() == []


@pytest.mark.parametrize("name", ["f g", "x" * 101, "a\udcff", "1abc", "", "os.system"])
def test_names_must_be_identifiers(make_worker, name):
    w = make_worker({"f": lambda: 1})
    reply = QS(w).function_execute({"name": name})
    assert reply["success"] is False and w.tasks() == []


@pytest.mark.parametrize("value", ["yes", 0, 1, "", [], [0], {"a": 1}, None])
def test_flags_are_read_as_queueserver_reads_them(make_worker, value):
    """queueserver's function_execute takes ``bool(run_in_background)`` (a client sending
    "yes" or 1 was refused here): a JSON value is its truth value."""
    w = make_worker({"f": lambda: 1})
    reply = QS(w).function_execute("f", run_in_background=value)
    assert reply["success"] is True, reply
    task = w.get_task(reply["task_uid"])
    assert task.result(TIMEOUT) == 1 and task.background is bool(value)


@pytest.mark.parametrize("value", ["false", "False", " no ", "0", "off", "null"])
def test_a_text_saying_false_is_refused_not_read_as_true(make_worker, value):
    """``bool("false")`` is true: queueserver would run the task in the background; a
    refusal saying what to send is better than the opposite of what the sender wrote."""
    w = make_worker({"f": lambda: 1})
    reply = QS(w).function_execute("f", run_in_background=value)
    assert reply["success"] is False and w.tasks() == []
    assert reply["msg"] == (f"Error: Incorrect request format: parameter 'run_in_background' is the "
                            f"text {value!r}, which would read as true: send false (JSON, not in quotes)")


def test_unsupported_parameters_and_unknown_methods(make_worker):
    qs = QS(make_worker())
    reply = qs.call("task_status", task_uid="x", bogus=1)
    assert reply["success"] is False and reply["msg"] == (
        "Error: API request contains unsupported parameters: 'bogus'. Supported parameters: ['task_uid']")
    assert reply["status"] is None
    assert qs.call("no_such_method")["msg"] == "Unknown method 'no_such_method'"
    assert "'queue_item_add' is not available" in qs.call("queue_item_add")["msg"]


def test_unsupported_parameter_texts_are_queueserver_handlers_own(make_worker):
    """queueserver's config_get, plans_/devices_existing/allowed reply ``str(ex)``, the other
    handlers ``f"Error: {ex}"``: the same text per method (manager.py's own check)."""
    from bluesky_queueserver.manager.manager import RunEngineManager

    from qmagic.remote.dispatch import METHODS

    bare = {"config_get", "plans_existing", "plans_allowed", "devices_existing", "devices_allowed"}
    qs = QS(make_worker())
    for name, spec in METHODS.items():
        if spec.params is None:
            continue
        with pytest.raises(ValueError) as info:
            RunEngineManager._check_request_for_unsupported_params(
                request={"bogus": 1}, param_names=list(spec.params))
        reply = qs.call(name, bogus=1)
        assert reply["success"] is False, name
        assert reply["msg"] == ("" if name in bare else "Error: ") + str(info.value), name


def test_missing_name_is_accepted_then_fails(make_worker):
    w = make_worker()
    qs = QS(w)
    reply = qs.function_execute("nowhere", run_in_background=True)
    assert reply["success"] is True
    task = w.get_task(reply["task_uid"])
    task.wait(TIMEOUT)
    result = qs.task_result(task_uid=task.uid)["result"]
    assert result["success"] is False
    assert result["msg"] == ("Error occurred while executing 'Execute function': Function 'nowhere' "
                             "is not found in the worker namespace")
    assert "NameError" in result["traceback"] and result["return_value"] is None


def test_a_mistyped_name_fails_naming_the_closest_function_the_caller_may_run(make_worker):
    w = make_worker({"scan": lambda n: n, "scan_secret": lambda n: n, "count": lambda: 1})
    w.user_group_permissions = {"user_groups": {
        "root": {"allowed_functions": [None]},
        "primary": {"allowed_functions": [None]},
        "guest": {"allowed_functions": ["count", "scna", "scan_secrte"]}}}
    qs = QS(w)

    def error(name, group="primary"):
        reply = qs.function_execute({"name": name, "args": [3]}, run_in_background=True, user_group=group)
        assert reply["success"] is True, reply
        task = w.get_task(reply["task_uid"])
        assert task.wait(TIMEOUT) and task.status is TaskStatus.FAILED
        return task.error

    assert error("scna") == "Function 'scna' is not found in the worker namespace (did you mean 'scan'?)"
    assert error("scan_secrte") == ("Function 'scan_secrte' is not found in the worker namespace "
                                     "(did you mean 'scan_secret'?)")
    assert error("zzz") == "Function 'zzz' is not found in the worker namespace"
    # a function the caller's group may not run is never named
    assert error("scna", "guest") == "Function 'scna' is not found in the worker namespace"
    assert error("scan_secrte", "guest") == "Function 'scan_secrte' is not found in the worker namespace"


@pytest.mark.parametrize("name", ["exit", "quit", "get_ipython", "In"])
def test_hidden_names_never_run(make_worker, name):
    ran = []
    w = make_worker({name: lambda *a: ran.append(1)})
    w.hidden_names = {name}
    qs = QS(w)
    for background in (True, False):
        reply = qs.function_execute(name, run_in_background=background)
        if reply["success"]:
            task = w.get_task(reply["task_uid"])
            assert task.wait(TIMEOUT) and task.status is TaskStatus.FAILED
            assert "not found in the worker namespace" in task.error
    assert ran == []


def test_private_names_need_explicit_permission(make_worker):
    ran = []
    w = make_worker({"_private": lambda: ran.append(1) or 1})
    reply = QS(w).function_execute("_private", run_in_background=True)
    assert reply["success"] is False and "not allowed" in reply["msg"]
    w.user_group_permissions = {"user_groups": {"root": {"allowed_functions": [None]},
                                                "primary": {"allowed_functions": ["_private"]}}}
    reply = QS(w).function_execute("_private", run_in_background=True)
    assert reply["success"] and w.get_task(reply["task_uid"]).result(TIMEOUT) == 1


def test_failure_keeps_exception_traceback_and_msg(make_worker):
    def scan():
        raise ValueError("motor stalled")

    w = make_worker({"scan": scan})
    task = w.submit("scan")
    task.wait(TIMEOUT)
    assert task.status is TaskStatus.FAILED and isinstance(task.exception(), ValueError)
    reply = QS(w).task_result(task_uid=task.uid)
    assert reply["status"] == "completed"
    res = reply["result"]
    assert set(res) == {"task_uid", "success", "msg", "traceback", "return_value", "time_start", "time_stop"}
    assert res["msg"] == "Error occurred while executing 'Execute function': motor stalled"
    assert 'raise ValueError("motor stalled")' in res["traceback"]
    assert "qmagic/" not in res["traceback"] and "threading.py" not in res["traceback"]
    assert res["time_stop"] >= res["time_start"]


def test_task_result_never_runs_the_results_own_code_on_the_callers_thread(make_worker, monkeypatch):
    """A result whose own code is slow (a mapping's items() asking a device), an exception
    whose __str__ is: task_result read them on the control thread, with no time limit, and
    every client waited (found by the remote tester).  The error text is made once as the
    task ends; the result is read through the probe thread with a deadline."""
    import threading

    from qmagic import protocol

    monkeypatch.setattr(protocol, "RESULT_READ_S", 0.2)
    calls = []
    release = threading.Event()

    class Lazy(dict):
        def items(self):
            calls.append(threading.current_thread().name)
            if threading.current_thread().name == "qmagic-probe":  # (blocks when read for a reply)
                release.wait(TIMEOUT)
            return super().items()

    class DeviceError(Exception):
        def __str__(self):
            calls.append(threading.current_thread().name)
            return "the shutter did not answer"

    def fails():
        raise DeviceError()

    w = make_worker({"lazy": lambda: Lazy(a=1), "fails": fails})
    qs = QS(w)
    lazy, failed = w.submit("lazy"), w.submit("fails")
    assert lazy.wait(TIMEOUT) and failed.wait(TIMEOUT)
    before = list(calls)
    reply = qs.task_result(task_uid=lazy.uid)
    res = reply["result"]  # not sent this time: the request fails (a script never takes None for it)
    assert reply["success"] is False and reply["status"] == "completed" and reply["msg"] == res["msg"]
    assert res["return_value"] is None and "could not be read within 0.2 s" in res["msg"]
    release.set()
    assert eventually(lambda: qs.task_result(task_uid=lazy.uid)["result"]["return_value"] == {"a": 1})
    for _ in range(3):
        msg = qs.task_result(task_uid=failed.uid)["result"]["msg"]
        assert msg == "Error occurred while executing 'Execute function': the shutter did not answer"
    assert threading.current_thread().name not in calls[len(before):]  # (the channel's place)



def test_a_small_result_is_sent_while_the_probe_thread_is_stuck_on_another(make_worker):
    """A small result of exact built-in types was read through the probe thread like any
    other: while that thread was busy with another result (the copy of a large one, a result
    whose own code blocks), it was told it "could not be read within 1 s (it is large, or
    its own code is slow or blocked)" (hostile test).  Its copy runs none of its own code
    and takes milliseconds: it is made at once."""
    import collections
    import threading

    from qmagic import probe

    release = threading.Event()
    with pytest.raises(probe.ProbeTimeout):
        probe.read(lambda: release.wait(TIMEOUT), 0.01)  # the doors' probe thread is stuck now
    try:
        w = make_worker({"small": lambda: {"a": [1, 2.5, None, "x"], "b": (True,)},
                         "odd": lambda: collections.OrderedDict(a=1)})
        qs = QS(w)
        small, odd = w.submit("small"), w.submit("odd")
        assert small.wait(TIMEOUT) and odd.wait(TIMEOUT)
        reply = qs.task_result(task_uid=small.uid)
        assert reply["success"] is True, reply
        assert reply["result"]["return_value"] == {"a": [1, 2.5, None, "x"], "b": [True]}
        reply = qs.task_result(task_uid=odd.uid)  # (its own code may run: read with the deadline)
        assert reply["success"] is False and "could not be read" in reply["msg"]
    finally:
        release.set()


def test_a_live_results_own_code_never_runs_on_the_control_thread(make_worker):
    """task_result asked a live result whether it was the log's summary (``SUMMARY_KEY in
    value``): a dict subclass's own ``__contains__`` ran on the control thread (a reviewer);
    one that raised failed the request.  Only a result read from the log can be a summary."""
    import threading

    asked: list[str] = []

    class Reading(dict):
        def __contains__(self, key):
            asked.append(threading.current_thread().name)
            raise RuntimeError("asked on the control thread")

    w = make_worker({"reading": lambda: Reading(a=1)})
    task = w.submit("reading")
    assert task.wait(TIMEOUT)
    reply = QS(w).task_result(task_uid=task.uid)
    assert reply["success"] is True and reply["result"]["return_value"] == {"a": 1}, reply
    assert asked == []


def test_a_result_whose_keys_read_the_same_as_json_text_is_refused_not_cut(make_worker):
    """json writes {1: "a", "1": "b"} with two keys "1" (and the reply a lone surrogate as
    U+FFFD, the same key as a U+FFFD of its own): the client kept the last, a value dropped
    without a word (hostile test).  Such a result is told that it cannot be sent, as the
    log keeps it as a summary."""
    import json

    from qmagic.jsonreply import reply_bytes

    w = make_worker({"ints": lambda: {1: "a", "1": "b"}, "nested": lambda: [{"x": {True: 1, "true": 2}}],
                     "surrogate": lambda: {"\udcff": 1, "\ufffd": 2}, "ok": lambda: {1: "a", "2": "b", "\udcff": 3}})
    qs = QS(w)
    tasks = {name: w.submit(name) for name in ("ints", "nested", "surrogate", "ok")}
    for name, task in tasks.items():
        assert task.wait(TIMEOUT)
        reply = qs.task_result(task_uid=task.uid)
        res = reply["result"]
        if name == "ok":
            assert json.loads(reply_bytes(reply))["result"]["return_value"] == {"1": "a", "2": "b", "\ufffd": 3}
        else:
            assert res["return_value"] is None and "two keys of a dict read the same as JSON text" in res["msg"]


def test_nan_and_infinity_go_out_as_null_with_a_word_never_as_broken_json(make_worker):
    """JSON has no NaN or infinity: the replies carried Python's ``NaN`` tokens, which
    bluesky-httpserver cannot pass on (its /api/task/result answered 500 Internal Server
    Error for that task for good).  The reply is strict JSON: each is null, and ``msg`` says
    so, for a small result and for a large one (copied once with its JSON)."""
    import json
    import math

    from qmagic.jsonreply import LARGE_BYTES, NONFINITE_NOTE, reply_bytes

    def strict(data: bytes):
        def refuse(token):
            raise AssertionError(f"not JSON: {token}")
        return json.loads(data, parse_constant=refuse)

    big = [0.5] * (LARGE_BYTES // 4) + [math.nan]
    w = make_worker({"small": lambda: [1.5, math.nan, {"x": -math.inf}], "big": lambda: big,
                     "fine": lambda: [1.5, 2.0]})
    qs = QS(w)
    tasks = {name: w.submit(name) for name in ("small", "big", "fine")}
    for name, task in tasks.items():
        assert task.wait(TIMEOUT) and task.status is TaskStatus.COMPLETED, name
        for _ in range(2):  # (a large result's second reply is made from its kept copy)
            reply = strict(reply_bytes(qs.task_result(task_uid=task.uid)))
            value = reply["result"]["return_value"]
            if name == "fine":
                assert reply["msg"] == "" and value == [1.5, 2.0]
                continue
            assert reply["success"] is True and reply["msg"] == NONFINITE_NOTE, name
            assert value == ([1.5, None, {"x": None}] if name == "small" else [0.5] * (LARGE_BYTES // 4) + [None])
    assert math.isnan(tasks["small"].result()[1])  # (the kernel keeps the exact value)
    refused = strict(reply_bytes({"success": False, "msg": "Error: no", "value": math.inf}))
    assert refused["msg"] == f"Error: no. {NONFINITE_NOTE}" and refused["value"] is None  # (two sentences)
    keyed = strict(reply_bytes({"success": True, "msg": "", "value": {math.nan: [math.inf]}}))
    assert keyed["value"] == {"NaN": [None]}  # (a key is text: as json always wrote it)
    deep: object = math.nan
    for _ in range(600):  # (json writes it; a walk of Python calls on it did not: reviewer)
        deep = [deep]
    reply = strict(reply_bytes({"success": True, "msg": "", "value": deep}))
    assert reply["msg"] == NONFINITE_NOTE and str(reply["value"]).count("[") == 600
    texts = strict(reply_bytes({"success": True, "msg": "", "value": ['"NaN"', "Infinity \\", 1.0]}))
    assert texts == {"success": True, "msg": "", "value": ['"NaN"', "Infinity \\", 1.0]}


def test_task_result_while_running_and_task_status_list(make_worker):
    gate = Gate()
    w = make_worker({"gate": gate})
    qs = QS(w)
    task = w.submit("gate")
    assert gate.started.wait(TIMEOUT)
    reply = qs.task_result(task_uid=task.uid)
    assert reply["status"] == "running"
    assert reply["result"] == {"task_uid": task.uid, "time_start": task.started_at, "run_in_background": True}
    many = qs.task_status(task_uid=[task.uid, "unknown-uid"])
    assert many["success"] and many["status"] == {task.uid: "running", "unknown-uid": "not_found"}
    gate.release.set()
    task.wait(TIMEOUT)
    assert qs.task_status(task_uid=task.uid)["status"] == "completed"
    bad = qs.task_status(task_uid=42)
    assert bad["success"] is False and "must be a string" in bad["msg"]


def test_request_lists_have_a_maximum(make_worker):
    from qmagic.protocol import MAX_REQUEST_ITEMS

    reply = QS(make_worker()).task_status(task_uid=["u"] * (MAX_REQUEST_ITEMS + 1))
    assert reply["success"] is False and f"at most {MAX_REQUEST_ITEMS}" in reply["msg"]


def test_a_result_nested_too_deeply_is_refused_with_the_reason(make_worker):
    """json.dumps raises RecursionError for such a value: remote task_result answers as for
    any value JSON cannot hold (found by a hostile test: it failed with "a qmagic bug")."""
    deep: list = []
    for _ in range(5000):
        deep = [deep]
    w = make_worker({"deep": lambda: deep})
    qs = QS(w)
    mine = w.submit("deep")  # from Python: the value stays on the Task
    assert mine.result(TIMEOUT) is deep
    res = qs.task_result(task_uid=mine.uid)
    assert res["success"] is True and res["task_uid"] == mine.uid
    assert res["result"]["return_value"] is None and "nested too deeply" in res["result"]["msg"]
    remote = w.get_task(qs.function_execute("deep", run_in_background=True)["task_uid"])
    assert remote.wait(TIMEOUT) and remote.status is TaskStatus.FAILED
    assert remote.error == "Task result can not be serialized as JSON: it is nested too deeply"


def test_a_deep_result_that_passed_the_json_rule_is_sent(make_worker):
    """900 lists in one another pass the rule for remote results when the task ends (json
    writes them), but task_result's copy walked 100 levels in Python frames before handing
    the rest to json, and answered "can not be serialized as JSON (maximum recursion depth
    exceeded)" for a task that had completed (a hostile test)."""
    deep: list = [1]
    for _ in range(900):
        deep = [deep]
    w = make_worker({"deep": lambda: deep})
    qs = QS(w)
    task = w.get_task(qs.function_execute("deep", run_in_background=True)["task_uid"])
    assert task.wait(TIMEOUT) and task.status is TaskStatus.COMPLETED
    res = qs.task_result(task_uid=task.uid)["result"]
    assert res["success"] is True and res["msg"] == "" and res["return_value"] == deep


def test_json_rule_for_remote_tasks(make_worker):
    w = make_worker({"obj": lambda: object(), "nan": lambda: float("nan")})
    qs = QS(w)
    strict = qs.function_execute("obj", run_in_background=True)
    t = w.get_task(strict["task_uid"])
    t.wait(TIMEOUT)
    res = qs.task_result(task_uid=t.uid)["result"]
    assert t.status is TaskStatus.FAILED and res["success"] is False
    assert "Task result can not be serialized as JSON: " in res["msg"]
    loose = w.submit("obj")  # from Python: the value stays on the Task
    value = loose.result(TIMEOUT)
    res = qs.task_result(task_uid=loose.uid)["result"]
    assert res["success"] is True and res["return_value"] is None
    assert "stays in the kernel" in res["msg"] and loose.uid in res["msg"]
    # (how to get it in a notebook: a name that exists there once qmagic is imported)
    assert res["msg"].endswith(f": qmagic.get_worker().get_task('{loose.uid}').result()"), res["msg"]
    assert loose.result() is value
    nan = w.get_task(qs.function_execute("nan", run_in_background=True)["task_uid"])
    nan.wait(TIMEOUT)
    assert nan.status is TaskStatus.COMPLETED  # json.dumps accepts NaN, as in queueserver


def test_lock_replies_and_texts(make_worker, monkeypatch):
    monkeypatch.setenv("QMAGIC_EMERGENCY_LOCK_KEY", "break-glass")
    w = make_worker({"f": lambda: 1})
    qs = QS(w)
    uid0 = qs.status()["lock_info_uid"]
    reply = qs.lock(lock_key="hutch", environment=True, note="Changing samples", user="Alice")
    assert reply["success"] and reply["lock_info"]["environment"] is True
    assert set(reply) == {"success", "msg", "lock_info", "lock_info_uid"}
    assert qs.status()["lock"] == {"environment": True, "queue": False}
    assert qs.status()["lock_info_uid"] != uid0
    refused = qs.function_execute("f", run_in_background=True)
    assert refused["success"] is False
    assert refused["item"] is None  # (queueserver checks the key before it reads the item)
    assert refused["msg"].startswith("Error: Invalid lock key: \nRE Manager is locked by Alice at ")
    assert ("Environment is locked: True\nQueue is locked:       False\nEmergency lock key:    set\n"
            "Note: Changing samples") in refused["msg"]
    assert qs.function_execute("f", run_in_background=True, lock_key="hutch")["success"]
    assert qs.kernel_interrupt(lock_key="wrong")["success"] is False
    assert qs.task_status(task_uid="x")["success"] and qs.lock_info(lock_key=None)["success"]
    assert qs.function_execute("f", lock_key="break-glass")["success"] is False  # unlock only
    assert qs.unlock(lock_key="break-glass")["success"]
    assert qs.status()["lock"] == {"environment": False, "queue": False}
    assert qs.lock(lock_key="k", user="Bob")["msg"].startswith("Error: Invalid option")


def test_queue_scope_locks_history_clear_and_permissions(make_worker):
    w = make_worker({"f": lambda: 1})
    qs = QS(w)
    w.submit("f").wait(TIMEOUT)
    assert qs.lock(lock_key="k", queue=True, user="Bob")["success"]
    assert qs.history_clear(lock_key="bad")["success"] is False
    assert qs.permissions_reload(lock_key="bad")["success"] is False
    assert qs.function_execute("f", lock_key="bad", run_in_background=True)["success"]  # env free
    assert len(w.tasks("completed")) >= 1
    assert qs.history_clear(lock_key="k")["success"]
    assert w.tasks("completed") == []


def test_kernel_interrupt_rule(make_worker):
    gate = Gate()

    def polling():  # an asynchronous KeyboardInterrupt lands between bytecodes
        gate.calls += 1
        gate.started.set()
        while not gate.release.wait(0.005):
            pass

    w = make_worker({"gate": polling})
    qs = QS(w)
    assert qs.kernel_interrupt() == {"success": True, "msg": ""}  # idle: nothing to do
    qs.function_execute("gate")
    assert gate.started.wait(TIMEOUT)
    assert qs.kernel_interrupt() == {
        "success": False,
        "msg": "Failed to interrupt IPython kernel: Not allowed to interrupt running task",
    }
    task = w.last_task
    assert qs.kernel_interrupt(interrupt_task=True)["success"]
    assert qs.kernel_interrupt(interrupt_task=True)["success"]  # coalesced: still one interrupt
    assert task.wait(TIMEOUT) and task.status is TaskStatus.CANCELLED
    assert gate.calls == 1 and "KeyboardInterrupt" in task.traceback


def test_script_upload_reply_and_missing_script(make_worker):
    ns = {"keep": 1}
    w = make_worker(ns)
    qs = QS(w)
    reply = qs.script_upload(script="def scan(n):\n    return n\n", run_in_background=True)
    assert reply["success"] and set(reply) == {"success", "msg", "task_uid"}
    task = w.get_task(reply["task_uid"])
    assert task.wait(TIMEOUT) and task.status is TaskStatus.COMPLETED, task.traceback
    assert qs.task_result(task_uid=task.uid)["result"]["return_value"] is None
    assert qs.script_upload(script=None) == {
        "success": False, "msg": "Error: Required 'script' parameter is is missing in API call.",
        "task_uid": None}
    assert qs.script_upload(script=5)["msg"] == "Error: Type of the 'script' parameter in API call is incorrect."


def test_failing_script_message(make_worker):
    w = make_worker({})
    qs = QS(w)
    reply = qs.script_upload(script="a = 10\nraise RuntimeError('half way')\n", run_in_background=True)
    task = w.get_task(reply["task_uid"])
    task.wait(TIMEOUT)
    res = qs.task_result(task_uid=task.uid)["result"]
    assert res["msg"] == "Error occurred while executing 'Load script': half way"
    assert "raise RuntimeError('half way')" in res["traceback"]


def test_bad_permissions_change_nothing(make_worker):
    qs = QS(make_worker({"f": lambda: 1}))
    before = qs.permissions_get()
    reply = qs.permissions_set(user_group_permissions={"user_groups": {"primary": {}}})
    assert reply["success"] is False and "root" in reply["msg"]
    assert qs.permissions_get() == before
    qs.permissions_set(user_group_permissions={"user_groups": {
        "root": {"allowed_functions": [None]}, "primary": {"allowed_functions": ["f"]}}})
    restricted = qs.permissions_get()
    # None is refused with queueserver's text (it reset the rules to the permissive defaults)
    assert qs.permissions_set(user_group_permissions=None) == {
        "success": False, "msg": "Error: User group permissions: Invalid type '<class 'NoneType'>', must be 'dict'"}
    assert qs.permissions_get() == restricted


def test_environment_close_open_destroy(make_worker):
    import qmagic

    gate = Gate()

    def waiting():
        gate.started.set()
        qmagic.cancellable_sleep(60)

    w = make_worker({"gate": waiting, "f": lambda: 1})
    qs = QS(w)
    assert qs.environment_open()["msg"] == "RE Worker environment already exists."
    running = w.submit("gate")
    assert gate.started.wait(TIMEOUT)
    assert qs.environment_close()["success"]
    assert qs.status()["worker_environment_exists"] is False
    assert qs.function_execute("f")["msg"] == "Error: RE Worker environment is not open"
    assert qs.script_upload(script="x = 1")["msg"] == "RE Worker environment is not open"
    assert qs.config_get()["config"] == {"ip_connect_info": {}}
    assert qs.kernel_interrupt()["msg"] == "Failed to interrupt IPython kernel: Worker environment does not exist"
    assert w.submit("f").result(TIMEOUT) == 1  # the notebook keeps working
    assert qs.environment_close()["msg"] == "RE Worker environment does not exist."
    assert qs.environment_open()["success"] and qs.status()["worker_environment_exists"]
    assert qs.environment_destroy()["success"]
    assert running.wait(TIMEOUT) and running.status is TaskStatus.CANCELLED
    assert qs.status()["worker_environment_exists"] is False


def test_what_guis_ask_for(make_worker):
    from ophyd.positioner import SoftPositioner  # (ophyd.sim makes a temporary folder on import)

    def count(detectors: list, num: int = 1, *, md=None):
        """Take readings."""
        yield from ()

    w = make_worker({"count": count, "motor": SoftPositioner(name="motor", init_pos=0), "f": lambda: 1})
    w.catalog.refresh(force=True)
    qs = QS(w)
    plans = qs.plans_existing()
    assert plans["success"] and set(plans["plans_existing"]) == {"count"}
    desc = plans["plans_existing"]["count"]
    assert desc["description"] == "Take readings." and desc["properties"] == {"is_generator": True}
    assert [p["name"] for p in desc["parameters"]] == ["detectors", "num", "md"]
    assert desc["parameters"][1]["default"] == "1" and desc["parameters"][2]["kind"]["name"] == "KEYWORD_ONLY"
    assert qs.plans_allowed(user_group="primary")["plans_allowed"] == plans["plans_existing"]
    assert qs.plans_allowed(user_group="nobody")["msg"] == "Unknown user group: 'nobody'"
    assert qs.plans_allowed()["msg"] == "Incorrect request format: user group is not specified"
    devices = qs.devices_existing()["devices_existing"]
    assert devices["motor"]["is_movable"] and devices["motor"]["is_readable"]
    assert devices["motor"]["classname"] == "SoftPositioner"
    assert qs.devices_allowed(user_group="primary")["devices_allowed"] == devices
    assert qs.queue_get() == {"success": True, "msg": "", "items": [], "running_item": {},
                              "plan_queue_uid": qs.status()["plan_queue_uid"]}
    assert qs.history_get()["items"] == []
    status = qs.status()
    assert status["plans_existing_uid"] == plans["plans_existing_uid"]


def test_an_empty_lock_key_opens_nothing_but_is_no_error(make_worker):
    """As queueserver: lock_key "" is accepted while nothing is locked, refused as a wrong
    key when locked."""
    w = make_worker({"f": lambda: 1})
    qs = QS(w)
    assert qs.function_execute("f", lock_key="", run_in_background=True)["success"] is True
    w.lock("hutch")
    try:
        reply = QS(make_worker({"f": lambda: 1}, state_dir=w.state_dir)).function_execute(
            "f", lock_key="", run_in_background=True)  # another kernel, without the key
        assert reply["success"] is False and reply["msg"].startswith("Error: Invalid lock key")
    finally:
        w.unlock()


def test_an_object_that_blocks_when_read_never_holds_up_a_reply(make_worker):
    """The namespace's own code (a property, a repr) may block; status and the plan list
    answer anyway, and everything works again once it returns (found by a hostile test: a
    blocking RE.state froze the control channel for good)."""
    import threading
    import time

    release = threading.Event()

    class StuckRE:
        @property
        def state(self):
            release.wait(TIMEOUT)
            return "idle"

    class StuckDefault:
        def __repr__(self):
            release.wait(TIMEOUT)
            return "StuckDefault()"

    def scan(detector=StuckDefault()):
        yield detector

    w = make_worker({"RE": StuckRE(), "scan": scan})
    qs = QS(w)
    try:
        t0 = time.monotonic()
        assert qs.status()["re_state"] is None  # after the deadline: no state, but a reply
        assert qs.status()["re_state"] is None  # still stuck: gives up at once
        plans = qs.plans_existing()
        assert plans["success"] is False and "an object's repr or attribute is slow or blocks" in plans["msg"]
        assert time.monotonic() - t0 < 3.0
    finally:
        release.set()
    eventually(lambda: qs.status()["re_state"] == "idle", TIMEOUT, "RE.state to answer again")
    assert qs.plans_existing()["plans_existing"]["scan"]["parameters"][0]["default"] == "StuckDefault()"


def test_a_state_folder_failure_reaches_the_client_as_its_own_text(make_worker):
    """A lock that failed on the state file answered the generic "check the request's
    parameters" (found by a hostile test): the reply now says what failed and what to do."""
    w = make_worker({"f": lambda: 1})
    qs = QS(w)
    flock = w._locks.path.with_name(w._locks.path.name + ".flock")
    flock.mkdir()  # (the file the lock store must open is a folder)
    reply = qs.call("lock", lock_key="k", user="u", environment=True)
    assert reply["success"] is False and reply["msg"].startswith("Error: ")
    assert str(flock) in reply["msg"] and "could not process this request" not in reply["msg"]
    flock.rmdir()
    assert qs.call("lock", lock_key="k", user="u", environment=True)["success"] is True


def test_a_kept_result_copy_goes_with_its_task(make_worker):
    """task_result keeps a large result's copy and JSON for the next requests; kept past the
    task's own life (its retention), it held that memory until other large results pushed it
    out.  It now goes when the task is forgotten."""
    import gc

    from qmagic import TaskNotFound

    w = make_worker({"data": lambda n: [i * 0.5 for i in range(n)], "quick": lambda: 1},
                    max_finished_tasks=1)
    qs = QS(w)
    uid = qs.function_execute({"name": "data", "args": [50_000]}, run_in_background=True)["task_uid"]
    eventually(lambda: qs.task_result(task_uid=uid)["result"].get("return_value") is not None,
               timeout=TIMEOUT, what="the result read")
    assert len(qs.protocol.result_copies) == 1  # (~0.5 MB of JSON: kept)
    for _ in range(2):  # (only one finished task is kept in memory)
        w.submit("quick").wait(TIMEOUT)
    def forgotten() -> bool:
        try:
            w.get_task(uid)
        except TaskNotFound:
            return True
        return False

    eventually(forgotten, timeout=TIMEOUT, what="the task forgotten")
    eventually(lambda: gc.collect() is not None and len(qs.protocol.result_copies) == 0,
               timeout=TIMEOUT, what="the kept copy dropped with its task")


def test_a_result_is_told_large_before_it_is_copied_without_running_its_code():
    """:func:`may_be_large` tells whether a result's copy may be large work (its JSON may
    pass ``LARGE_BYTES``, each number counted at its longest; or a subclass of list, tuple
    or dict, which json reads through its own methods) before it is made, on the control
    thread, running none of the value's own code.  (A reviewer's finds: counted at their
    least, 21,000 floats, 426 kB of JSON, were small; a list subclass was read by list's
    methods while json runs its own.)"""
    from collections import namedtuple

    from qmagic.jsonreply import LARGE_BYTES
    from qmagic.result_copies import may_be_large

    class Sly(list):  # (its own methods must never run)
        def __iter__(self):
            raise AssertionError("ran the result's own __iter__")

        def __len__(self):
            raise AssertionError("ran the result's own __len__")

    class Number(float):
        def __repr__(self):
            raise AssertionError("ran the result's own __repr__")

    point = namedtuple("point", "x y")
    for small in (None, 1.5, "x" * 1000, [0.5] * 1000, {"a": 1, "b": [1, 2, "x"], 3: None},
                  [Number(1.5)] * 1000, [[]] * 10_000, 2 ** 1000, [1.5] * 2400,
                  [object()], {1, 2}):  # (JSON cannot encode the last two: their copy fails at once)
        assert not may_be_large(small), small
    for large in ("x" * LARGE_BYTES, [0] * 30_000, ["ab"] * 20_000, {str(i): i for i in range(10_000)},
                  [[[1.5] * 1000] * 30], [0.5] * 10 ** 6, [0.5] * 3000, [10 ** 18] * 3000,
                  7 ** 300_000, Sly([1.5]), point(1, 2), _nested(200)):  # (subclasses: their own code)
        assert may_be_large(large), type(large)


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value
