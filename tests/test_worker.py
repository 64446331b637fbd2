"""Worker protocol replies (queueserver shapes and texts), permissions, locks, scripts."""

from __future__ import annotations


import pytest

from qmagic import LockRefused, PermissionRefused, TaskStatus

from engine_helpers import STATUS_KEYS, TIMEOUT, Gate, make_worker  # noqa: F401 - fixture



def test_status_has_every_protocol_key(make_worker):
    status = make_worker().status()
    assert set(status) == STATUS_KEYS
    assert status["manager_state"] == "idle" and status["ip_kernel_state"] == "idle"
    assert status["worker_environment_exists"] is True
    assert status["lock"] == {"environment": False, "queue": False}
    assert status["plan_queue_mode"] == {"loop": False, "ignore_failures": False}


def test_task_results_uid_changes_on_every_completed_task(make_worker):
    w = make_worker({"f": lambda: 1, "g": lambda: 1 / 0})
    seen = {w.status()["task_results_uid"]}
    for name in ["f", "g", "f"]:
        w.submit(name).wait(TIMEOUT)
        uid = w.status()["task_results_uid"]
        assert uid not in seen
        seen.add(uid)


def test_function_execute_reply_shape(make_worker):
    w = make_worker({"add": lambda a, b=0: a + b})
    item = {"item_type": "function", "name": "add", "args": [1], "kwargs": {"b": 2}}
    reply = w.function_execute(item, run_in_background=True, user="Alice", user_group="primary")
    assert set(reply) == {"success", "msg", "item", "task_uid"}
    assert reply["success"] is True and reply["msg"] == ""
    assert reply["item"] == {
        "name": "add", "args": [1], "kwargs": {"b": 2}, "user": "Alice",
        "user_group": "primary", "item_uid": reply["task_uid"], "item_type": "function",
    }
    task = w.get_task(reply["task_uid"])
    assert task.result(TIMEOUT) == 3 and task.user == "Alice"


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        ({"user": ""}, "Error: Incorrect request format: user name is not specified"),
        ({"user_group": ""}, "Error: Incorrect request format: user group is not specified"),
        ({"user_group": 5}, "Error: Incorrect request format: user group is not specified"),
    ],
)
def test_missing_user_or_group(make_worker, kwargs, msg):
    reply = make_worker({"f": lambda: 1}).function_execute({"name": "f"}, **kwargs)
    assert reply["success"] is False and reply["msg"] == msg and reply["task_uid"] is None


@pytest.mark.parametrize(
    "item, fragment",
    [
        ("f", "'item' must be a dict"),
        ({"args": []}, "function name is not specified"),
        ({"name": "f", "args": 3}, "'args' must be a list"),
        ({"name": "f", "kwargs": [1]}, "'kwargs' must be a dict"),
        ({"name": "f", "item_type": "plan"}, "only 'function' items"),
    ],
)
def test_bad_items_refused_without_trace(make_worker, item, fragment):
    w = make_worker({"f": lambda: 1})
    reply = w.function_execute(item)
    assert reply["success"] is False and fragment in reply["msg"]
    assert reply["msg"].startswith("Error: Incorrect request format: ")
    assert w.tasks() == []


def test_missing_name_is_accepted_then_fails(make_worker):
    w = make_worker()
    reply = w.function_execute({"name": "nowhere"}, run_in_background=True)
    assert reply["success"] is True
    task = w.get_task(reply["task_uid"])
    task.wait(TIMEOUT)
    result = w.task_result(task.uid)["result"]
    assert result["success"] is False
    assert result["msg"].startswith("Error occurred while executing 'Execute function': Function 'nowhere'")
    assert "NameError" in result["traceback"] and result["return_value"] is None


def test_failure_keeps_exception_traceback_and_msg(make_worker):
    def scan():
        raise ValueError("motor stalled")

    w = make_worker({"scan": scan})
    task = w.submit("scan")
    task.wait(TIMEOUT)
    assert task.status is TaskStatus.FAILED and isinstance(task.exception(), ValueError)
    reply = w.task_result(task.uid)
    assert reply["status"] == "completed"
    res = reply["result"]
    assert set(res) == {"task_uid", "success", "msg", "traceback", "return_value", "time_start", "time_stop"}
    assert res["msg"] == "Error occurred while executing 'Execute function': motor stalled"
    assert 'raise ValueError("motor stalled")' in res["traceback"]
    assert res["time_stop"] >= res["time_start"]


def test_task_result_while_running_and_task_status_list(make_worker):
    gate = Gate()
    w = make_worker({"gate": gate})
    task = w.submit("gate")
    assert gate.started.wait(TIMEOUT)
    reply = w.task_result(task.uid)
    assert reply["status"] == "running"
    assert reply["result"] == {"task_uid": task.uid, "time_start": task.started_at, "run_in_background": True}
    many = w.task_status([task.uid, "unknown-uid"])
    assert many["success"] and many["status"] == {task.uid: "running", "unknown-uid": "not_found"}
    gate.release.set()
    task.wait(TIMEOUT)
    assert w.task_status(task.uid)["status"] == "completed"
    bad = w.task_status(42)
    assert bad["success"] is False and "must be a string" in bad["msg"]


def test_json_rule_strict_and_not_strict(make_worker):
    w = make_worker({"obj": lambda: object(), "nan": lambda: float("nan")})
    strict = w.function_execute({"name": "obj"}, run_in_background=True, strict_json=True)
    t = w.get_task(strict["task_uid"])
    t.wait(TIMEOUT)
    res = w.task_result(t.uid)["result"]
    assert t.status is TaskStatus.FAILED and res["success"] is False
    assert "Task result can not be serialized as JSON: " in res["msg"]
    loose = w.submit("obj")
    value = loose.result(TIMEOUT)
    res = w.task_result(loose.uid)["result"]
    assert res["success"] is True and res["return_value"] is None
    assert "stays in the kernel" in res["msg"] and loose.uid in res["msg"]
    assert loose.result() is value  # the Python object stays on the Task
    nan = w.submit("nan", strict_json=True)
    nan.wait(TIMEOUT)
    assert nan.status is TaskStatus.COMPLETED  # json.dumps accepts NaN, as in queueserver


def test_permissions_checked_on_request_and_at_start(make_worker):
    gate = Gate()
    rules = {
        "user_groups": {
            "root": {"allowed_functions": [None], "forbidden_functions": [":^_"]},
            "primary": {"allowed_functions": ["gate", "scan"], "forbidden_functions": []},
        }
    }
    w = make_worker({"gate": gate, "scan": lambda: "scanned", "other": lambda: 1},
                    user_group_permissions=rules, max_background_tasks=1)
    assert w.function_execute({"name": "other"})["msg"] == (
        "Error: Function 'other' is not allowed for users from 'primary' group."
    )
    assert w.function_execute({"name": "f"}, user_group="admin")["msg"] == "Error: Unknown user group: 'admin'"
    with pytest.raises(PermissionRefused):
        w.submit("other")
    running = w.submit("gate")
    assert gate.started.wait(TIMEOUT)
    queued = w.submit("scan")  # allowed now ...
    w.user_group_permissions = {  # ... but no longer when it starts
        "user_groups": {
            "root": {"allowed_functions": [None]},
            "primary": {"allowed_functions": ["gate"]},
        }
    }
    gate.release.set()
    running.result(TIMEOUT)
    queued.wait(TIMEOUT)
    assert queued.status is TaskStatus.FAILED
    assert "not allowed for users from 'primary' group" in str(queued.exception())


def test_bad_permissions_change_nothing(make_worker):
    w = make_worker({"f": lambda: 1})
    before = w.permissions_get()
    reply = w.permissions_set({"user_groups": {"primary": {}}})
    assert reply["success"] is False and "root" in reply["msg"]
    assert w.permissions_get() == before


def test_lock_rules_through_the_worker(make_worker, monkeypatch):
    monkeypatch.setenv("QMAGIC_EMERGENCY_LOCK_KEY", "break-glass")
    w = make_worker({"f": lambda: 1})
    uid0 = w.status()["lock_info_uid"]
    reply = w.lock("hutch", environment=True, note="Changing samples", user="Alice")
    assert reply["success"] and reply["lock_info"]["environment"] is True
    assert w.status()["lock"] == {"environment": True, "queue": False}
    assert w.status()["lock_info_uid"] != uid0
    # This worker remembers the key: its own calls pass ...
    assert w.function_execute({"name": "f"}, run_in_background=True)["success"]
    # ... a remote caller must present it.
    refused = w.function_execute({"name": "f"}, run_in_background=True, origin="remote")
    assert refused["success"] is False
    assert refused["msg"].startswith("Error: Invalid lock key: \nRE Manager is locked by Alice at ")
    assert "Environment is locked: True\nQueue is locked:       False\nEmergency lock key:    set\nNote: Changing samples" in refused["msg"]
    assert w.function_execute({"name": "f"}, run_in_background=True, lock_key="hutch", origin="remote")["success"]
    with pytest.raises(LockRefused):
        w.submit("f", lock_key="wrong")
    assert w.task_cancel("abcd-unknown", lock_key="wrong")["success"] is False
    assert w.kernel_interrupt(lock_key="wrong", origin="remote")["success"] is False
    # Read-only calls are never locked.
    assert w.task_status("x")["success"] and w.lock_info()["success"] and "msg" in w.status()
    # The emergency key opens the lock (unlock only).
    assert w.function_execute({"name": "f"}, lock_key="break-glass", origin="remote")["success"] is False
    assert w.unlock("break-glass", origin="remote")["success"]
    assert w.status()["lock"] == {"environment": False, "queue": False}


def test_queue_scope_locks_history_clear_and_permissions(make_worker):
    w = make_worker({"f": lambda: 1})
    w.submit("f").wait(TIMEOUT)
    assert w.lock("k", queue=True, user="Bob")["success"]
    assert w.history_clear(lock_key="bad")["success"] is False
    assert w.permissions_reload(lock_key="bad")["success"] is False
    assert w.function_execute({"name": "f"}, lock_key="bad", run_in_background=True)["success"]  # env free
    assert w.status()["items_in_history"] >= 1
    assert w.history_clear()["success"]  # remembered key
    assert w.status()["items_in_history"] == 0


def test_kernel_interrupt_rule(make_worker):
    gate = Gate()
    w = make_worker({"gate": gate})
    interrupts = []
    w.interrupt_main = lambda: interrupts.append(1)
    assert w.kernel_interrupt() == {"success": True, "msg": ""}
    w.function_execute({"name": "gate"})
    assert gate.started.wait(TIMEOUT)
    assert w.kernel_interrupt() == {
        "success": False,
        "msg": "Failed to interrupt IPython kernel: Not allowed to interrupt running task",
    }
    assert w.kernel_interrupt(interrupt_task=True)["success"]
    assert interrupts == [1, 1]
    gate.release.set()


def test_script_upload_applies_names_and_reports_changes(make_worker):
    ns = {"keep": 1, "old": 2, "gone": 3}
    w = make_worker(ns)
    reply = w.script_upload("def scan(n):\n    'Scan n points.'\n    return n\nold = 20\ndel gone\n")
    assert reply["success"] and set(reply) == {"success", "msg", "task_uid"}
    task = w.get_task(reply["task_uid"])
    task.wait(TIMEOUT)
    assert task.status is TaskStatus.COMPLETED, task.traceback
    assert task.namespace_changes == {"added": ["scan"], "changed": ["old"], "removed": ["gone"]}
    assert ns["old"] == 20 and "gone" not in ns and ns["keep"] == 1
    assert w.functions_available()["scan"] == {"signature": "(n)", "doc": "Scan n points."}
    assert w.task_result(task.uid)["result"]["return_value"] is None
    assert w.submit("scan", (7,)).result(TIMEOUT) == 7


def test_failing_script_leaves_namespace_exactly_as_it_was(make_worker):
    ns = {"a": 1, "b": [1, 2]}
    w = make_worker(ns)
    snapshot = dict(ns)
    task = w.start_script("a = 10\nc = 3\ndel b\nraise RuntimeError('half way')\n", background=True)
    task.wait(TIMEOUT)
    assert task.status is TaskStatus.FAILED
    assert {k: v for k, v in ns.items() if k != "__builtins__"} == snapshot
    assert ns["b"] is snapshot["b"]
    res = w.task_result(task.uid)["result"]
    assert res["msg"] == "Error occurred while executing 'Load script': half way"
    assert "raise RuntimeError('half way')" in res["traceback"]  # the script's line is shown


def test_script_upload_missing_script(make_worker):
    reply = make_worker().script_upload(None)
    assert reply == {
        "success": False,
        "msg": "Error: Required 'script' parameter is is missing in API call.",
        "task_uid": None,
    }


def test_cancel_all(make_worker):
    gate = Gate()
    w = make_worker({"gate": gate}, max_background_tasks=1)
    tasks = [w.submit("gate") for _ in range(3)]
    assert gate.started.wait(TIMEOUT)
    cancelled = w.cancel_all(force=True)
    assert set(cancelled) == set(tasks)
    gate.release.set()
    for t in tasks:
        assert t.wait(TIMEOUT)
    assert tasks[1].status is TaskStatus.CANCELLED and tasks[2].status is TaskStatus.CANCELLED


def test_tasks_filter_and_last_task(make_worker):
    w = make_worker({"ok": lambda: 1, "bad": lambda: 1 / 0})
    a = w.submit("ok")
    b = w.submit("bad")
    a.wait(TIMEOUT)
    b.wait(TIMEOUT)
    assert w.tasks() == [a, b]
    assert w.tasks("failed") == [b]
    assert w.tasks([TaskStatus.COMPLETED, "failed"]) == [a, b]
    assert w.last_task is b


def test_submit_callable_and_bad_target(make_worker):
    w = make_worker()
    assert w.submit(lambda x: x * 2, (4,)).result(TIMEOUT) == 8
    with pytest.raises(TypeError, match="name or a callable"):
        w.submit(42)


def test_task_repr_is_deterministic(make_worker):
    w = make_worker({"add": lambda a, b=0: a + b})
    t = w.submit("add", (1,), {"b": 5})
    t.wait(TIMEOUT)
    assert repr(t) == "<Task add(1, b=5) background completed>"
    assert t.to_dict()["result"] == 6 and t.to_dict()["status"] == "completed"
