"""bluesky-queueserver's replies, over the worker: the protocol's dicts and texts.

Each method takes the request's ``params`` (already checked for unsupported names by
:mod:`qmagic.remote.dispatch`) and returns queueserver's reply dict.  Parameter types are
checked here with queueserver-style messages (``"run_in_background": "false"`` is refused,
not read as true); every rule is the worker's.  Refusals are in-band:
``{"success": False, "msg": ...}`` plus the method's other keys.
"""

from __future__ import annotations

import datetime
from typing import Any, Callable, Mapping

from . import __version__
from .catalog import check_name, describe_device, describe_plan
from .core.status import TaskStatus
from .core.task import Task
from .errors import PermissionsFormatError, RequestRefused
from .format import SUMMARY_KEY

__all__ = ["QueueserverProtocol", "MAX_REQUEST_ITEMS", "status_reply"]

#: Most uids one task_status request may ask about.
MAX_REQUEST_ITEMS = 50_000
#: Longest user name accepted in a request (as for the lock's user).
MAX_USER_CHARS = 1000
_KIND_TEXT = {"function": "Execute function", "script": "Load script", "coroutine": "Execute function"}


def _flag(params: Mapping[str, Any], name: str, default: bool) -> bool:
    value = params.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestRefused(
            f"Error: Incorrect request format: parameter {name!r} must be true or false, "
            f"got {value!r} ({type(value).__name__})"
        )
    return value


def _optional_str(params: Mapping[str, Any], name: str, what: str) -> str | None:
    value = params.get(name)
    if value is not None and not isinstance(value, str):
        raise RequestRefused(f"Error: {what} must be a non-empty string or None: {name} = {value!r}")
    return value


def _user_name(params: Mapping[str, Any]) -> None:
    """A user name in a request is text that can be stored and shown: the same bound as the
    lock's user (qmagic.store.lockfile.MAX_USER_CHARS), and no lone surrogates (a JSON
    ``"\\udcff"`` escape decodes to one; it cannot be written to the log or a terminal)."""
    user = params.get("user")
    if not isinstance(user, str) or not user:
        return  # missing or not a string: the worker refuses it ("user name is not specified")
    try:
        user.encode("utf-8")
        ok = len(user) <= MAX_USER_CHARS
    except UnicodeEncodeError:
        ok = False
    if not ok:
        shown = repr(user) if len(user) <= 40 else repr(user[:37]) + "..."
        raise RequestRefused(
            "Error: Incorrect request format: user name must be text of at most "
            f"{MAX_USER_CHARS} characters without lone surrogates: user = {shown}")


def _lock_key(params: Mapping[str, Any]) -> str | None:
    key = params.get("lock_key")
    if key is not None and (not isinstance(key, str) or not key):
        raise RequestRefused(f"Error: Lock key must be a non-empty string or None: lock_key = {key!r}")
    return key


def status_reply(worker: Any) -> dict[str, Any]:
    """The queueserver ``status`` dict (every key the clients read)."""
    counts = worker.engine.counts()
    fg: Task | None = counts["foreground"]
    busy = worker.engine.foreground.user_busy()
    state = "executing_task" if fg is not None else "idle"
    lock = worker._locks.state()
    env_open = worker.environment_is_open
    if not env_open:  # as an RE Manager without a worker
        kernel_state, captured, background = None, None, 0
    elif fg is not None:
        kernel_state, captured = "busy", bool(counts["foreground_handed_over"])
        background = counts["running_background"]
    else:
        kernel_state, captured = ("busy" if busy else "idle"), False
        background = counts["running_background"]
    re_state = getattr(worker.namespace.get("RE"), "state", None) if env_open else None
    re_state = re_state if isinstance(re_state, str) else None
    catalog = worker.catalog
    status_key = (state, kernel_state, background, counts["results_uid"], lock.uid, catalog.plans_uid,
                  catalog.devices_uid, worker.permissions_uid, worker.environment_uid, re_state)
    return {
        "msg": f"RE Manager v{__version__} (qmagic)",
        "time": datetime.datetime.now().isoformat(),
        "items_in_queue": 0,
        "items_in_history": 0,
        "running_item_uid": None,
        "manager_state": state,
        "queue_stop_pending": False,
        "queue_autostart_enabled": False,
        "pause_pending": False,
        "worker_environment_exists": env_open,
        "worker_environment_state": (state if env_open else "closed"),
        "worker_background_tasks": background,
        "re_state": re_state,
        "ip_kernel_state": kernel_state,
        "ip_kernel_captured": captured,
        "status_uid": _uid_of(status_key),
        "run_list_uid": worker.static_uid,
        "plan_queue_uid": worker.static_uid,
        "plan_history_uid": worker.static_uid,
        "devices_existing_uid": catalog.devices_uid,
        "plans_existing_uid": catalog.plans_uid,
        "devices_allowed_uid": _uid_of((catalog.devices_uid, worker.permissions_uid)),
        "plans_allowed_uid": _uid_of((catalog.plans_uid, worker.permissions_uid)),
        "task_results_uid": counts["results_uid"],
        "lock_info_uid": lock.uid,
        "plan_queue_mode": {"loop": False, "ignore_failures": False},
        "lock": {"environment": bool(lock.environment), "queue": bool(lock.queue)},
    }


_uid_cache: dict[Any, str] = {}


def _uid_of(key: Any) -> str:
    """A stable uid for a state key (the same state gives the same uid)."""
    import uuid

    uid = _uid_cache.get(key)
    if uid is None:
        if len(_uid_cache) > 256:
            _uid_cache.clear()
        uid = _uid_cache[key] = str(uuid.uuid4())
    return uid


class QueueserverProtocol:
    """queueserver's methods for one worker (see the module docstring).

    ``client`` names who sent a request (for per-client throttling of wrong lock keys).
    """

    def __init__(self, worker: Any, connection_info: Callable[[], dict] | None = None) -> None:
        self.worker = worker
        self.connection_info = connection_info or (lambda: {})

    # -- status ---------------------------------------------------------------------------------
    def status(self, params: dict, **who: Any) -> dict:
        return status_reply(self.worker)

    def config_get(self, params: dict, **who: Any) -> dict:
        info = self.connection_info() if self.worker.environment_is_open else {}
        return {"success": True, "msg": "", "config": {"ip_connect_info": info}}

    # -- tasks -------------------------------------------------------------------------------------
    def function_execute(self, params: dict, *, client: str | None = None, **who: Any) -> dict:
        item = params.get("item")
        try:
            lock_key = _lock_key(params)
            name, args, kwargs = _function_item(params)
            if "user_group" not in params:
                raise RequestRefused("Error: Incorrect request format: user group is not specified")
            if "user" not in params:
                raise RequestRefused("Error: Incorrect request format: user name is not specified")
            _user_name(params)
            task = self.worker.submit(
                name, args, kwargs, background=_flag(params, "run_in_background", False),
                user=params.get("user"), user_group=params.get("user_group"), lock_key=lock_key,
                origin="remote", strict_json=True, client=client,
            )
        except RequestRefused as exc:
            msg = str(exc)  # queueserver's handler prefixes every refusal of this method
            msg = msg if msg.startswith("Error: ") else f"Error: {msg}"
            return {"success": False, "msg": msg, "item": item, "task_uid": None}
        reply_item = {"name": task.name, "args": list(task.args), "kwargs": dict(task.kwargs),
                      "user": task.user, "user_group": task.user_group, "item_uid": task.uid}
        if isinstance(item, dict) and "item_type" in item:
            reply_item = {"item_type": item["item_type"], **reply_item}
        return {"success": True, "msg": "", "item": reply_item, "task_uid": task.uid}

    def script_upload(self, params: dict, *, client: str | None = None, **who: Any) -> dict:
        try:
            lock_key = _lock_key(params)
            script = params.get("script")
            if script is None:
                raise RequestRefused("Error: Required 'script' parameter is is missing in API call.")
            if not isinstance(script, str):
                raise RequestRefused("Error: Type of the 'script' parameter in API call is incorrect.")
            task = self.worker.run_script(
                script, update_lists=_flag(params, "update_lists", True),
                update_re=_flag(params, "update_re", False),
                background=_flag(params, "run_in_background", False), lock_key=lock_key,
                user=params.get("user"), user_group=params.get("user_group"),
                origin="remote", client=client,
            )
        except RequestRefused as exc:
            return {"success": False, "msg": str(exc), "task_uid": None}
        return {"success": True, "msg": "", "task_uid": task.uid}

    def task_status(self, params: dict, **who: Any) -> dict:
        uids = params.get("task_uid")
        if uids is None:
            return _task_error("Error: Required 'task_uid' parameter is missing in the API call.", None)
        if isinstance(uids, str):
            status = self.worker.statuses([uids])[uids]
            return {"success": True, "msg": "", "task_uid": uids, "status": _wire(status)}
        if not isinstance(uids, list) or not all(isinstance(u, str) for u in uids):
            return _task_error(
                f"Error: 'task_uid' must be a string or a list of strings: type(task_uid)={type(uids)!r}",
                uids)
        if len(uids) > MAX_REQUEST_ITEMS:
            return _task_error(
                f"Error: Too many task uids in one request ({len(uids)}); ask for at most "
                f"{MAX_REQUEST_ITEMS} per request.", None)
        found = self.worker.statuses(uids)
        return {"success": True, "msg": "", "task_uid": uids,
                "status": {uid: _wire(found.get(uid)) for uid in uids}}

    def task_result(self, params: dict, **who: Any) -> dict:
        uid = params.get("task_uid")
        if uid is None:
            return {**_task_error("Error: Required 'task_uid' parameter is missing in the API call.",
                                  None), "result": None}
        if not isinstance(uid, str):
            return {**_task_error(f"Error: 'task_uid' must be a string: type(task_uid)={type(uid)!r}",
                                  uid), "result": None}
        task = self.worker.engine.get(uid)
        record = None if task is not None else self.worker._log_find(uid) if len(uid) >= 36 else None
        if task is None and record is None:
            return {"success": True, "msg": "", "task_uid": uid, "status": "not_found", "result": {}}
        rec = task.to_dict() if task is not None else record
        status = TaskStatus(rec["status"])
        return {"success": True, "msg": "", "task_uid": uid, "status": status.wire,
                "result": _result_dict(rec, status, task)}

    # -- locks --------------------------------------------------------------------------------------
    def lock(self, params: dict, *, client: str | None = None, **who: Any) -> dict:
        try:
            if "lock_key" not in params:
                raise RequestRefused("Error: Lock key is not specified: 'lock_key' is a required parameter")
            if "user" not in params:
                raise RequestRefused("Error: User name is not specified: 'user' is a required parameter")
            state = self.worker.lock(
                params["lock_key"], environment=params.get("environment", False),
                queue=params.get("queue", False), note=params.get("note"), user=params["user"],
                origin="remote", client=client,
            )
        except RequestRefused as exc:  # queueserver: no lock info with a refused lock
            return {"success": False, "msg": str(exc), "lock_info": {}, "lock_info_uid": None}
        return _lock_reply(self.worker, True, "", state)

    def unlock(self, params: dict, *, client: str | None = None, **who: Any) -> dict:
        try:
            if "lock_key" not in params:
                raise RequestRefused("Error: Request contains no lock key: 'lock_key' parameter is required")
            state = self.worker.unlock(params["lock_key"], origin="remote", client=client)
        except RequestRefused as exc:
            return _lock_reply(self.worker, False, str(exc))
        return _lock_reply(self.worker, True, "", state)

    def lock_info(self, params: dict, *, client: str | None = None, **who: Any) -> dict:
        try:
            state = self.worker.lock_state(_lock_key(params), origin="remote", client=client)
        except RequestRefused as exc:
            return _lock_reply(self.worker, False, str(exc))
        if state.damaged:  # unusable lock file: counts as locked, and says how to reset it
            return _lock_reply(self.worker, False, state.damaged, state)
        return _lock_reply(self.worker, True, "", state)

    # -- control ---------------------------------------------------------------------------------------
    def kernel_interrupt(self, params: dict, *, client: str | None = None, **who: Any) -> dict:
        try:
            _flag(params, "interrupt_plan", False)
            self.worker.interrupt(interrupt_task=_flag(params, "interrupt_task", False),
                                  lock_key=_lock_key(params), origin="remote", client=client)
        except RequestRefused as exc:
            return {"success": False, "msg": str(exc)}
        return {"success": True, "msg": ""}

    def environment_open(self, params: dict, *, client: str | None = None, **who: Any) -> dict:
        return self._simple(self.worker.environment_open, params, client)

    def environment_close(self, params: dict, *, client: str | None = None, **who: Any) -> dict:
        return self._simple(self.worker.environment_close, params, client)

    def environment_destroy(self, params: dict, *, client: str | None = None, **who: Any) -> dict:
        return self._simple(self.worker.environment_destroy, params, client)

    def environment_update(self, params: dict, *, client: str | None = None, **who: Any) -> dict:
        try:
            task = self.worker.update_environment(
                background=_flag(params, "run_in_background", False), lock_key=_lock_key(params),
                origin="remote", client=client)
        except RequestRefused as exc:
            return {"success": False, "msg": str(exc), "task_uid": None}
        return {"success": True, "msg": "", "task_uid": task.uid}

    def unavailable(self, method: str) -> dict:
        """A queueserver method that needs the plan queue or a Run Engine worker."""
        return {"success": False, "msg": (
            f"Error: {method!r} is not available: this RE Worker is a qmagic kernel, without a plan "
            "queue or Run Engine manager. Run functions with function_execute; run plans in the "
            "notebook with RE(plan(...)).")}

    def _simple(self, method: Callable[..., Any], params: dict, client: str | None,
                **kwargs: Any) -> dict:
        try:
            method(lock_key=_lock_key(params), origin="remote", client=client, **kwargs)
        except RequestRefused as exc:
            return {"success": False, "msg": str(exc)}
        return {"success": True, "msg": ""}

    # -- permissions ------------------------------------------------------------------------------------
    def permissions_get(self, params: dict, **who: Any) -> dict:
        return {"success": True, "msg": "", "user_group_permissions": self.worker.permissions.to_dict()}

    def permissions_set(self, params: dict, *, client: str | None = None, **who: Any) -> dict:
        if "user_group_permissions" not in params:
            return {"success": False, "msg": "Error: Parameter 'user_group_permissions' is missing"}
        try:
            self.worker.set_permissions(params["user_group_permissions"], lock_key=_lock_key(params),
                                        origin="remote", client=client)
        except RequestRefused as exc:
            return {"success": False, "msg": str(exc)}
        except PermissionsFormatError as exc:
            return {"success": False, "msg": f"Error: {exc}"}
        return {"success": True, "msg": ""}

    def permissions_reload(self, params: dict, *, client: str | None = None, **who: Any) -> dict:
        try:
            _flag(params, "restore_plans_devices", False)
            self.worker.reload_permissions(restore=_flag(params, "restore_permissions", True),
                                           lock_key=_lock_key(params), origin="remote", client=client)
        except RequestRefused as exc:
            return {"success": False, "msg": str(exc)}
        except PermissionsFormatError as exc:
            return {"success": False, "msg": f"Error: {exc}"}
        return {"success": True, "msg": ""}

    # -- what GUIs ask for -------------------------------------------------------------------------------
    def history_clear(self, params: dict, *, client: str | None = None, **who: Any) -> dict:
        """Forget the finished tasks kept in memory (the experiment log keeps them); ``size``
        and ``item_uid`` are checked as queueserver does (there is no plan history to trim)."""
        size, item_uid = params.get("size"), params.get("item_uid")
        try:
            if size is not None and (not isinstance(size, int) or isinstance(size, bool)):
                raise RequestRefused(f"Error: The 'size' parameter must be an integer: size={size!r}")
            if item_uid is not None and not isinstance(item_uid, str):
                raise RequestRefused(f"Error: The 'item_uid' parameter must be a string: item_uid={item_uid!r}")
            if size is not None and item_uid is not None:
                raise RequestRefused("Error: Parameters 'size' and 'item_uid' are mutually exclusive.")
            self.worker.check_lock(_lock_key(params), "queue", origin="remote", client=client)
        except RequestRefused as exc:
            return {"success": False, "msg": str(exc)}
        self.worker.engine.clear_finished()
        return {"success": True, "msg": ""}

    def _group(self, params: dict) -> str:
        if "user_group" not in params:
            raise RequestRefused("Incorrect request format: user group is not specified")
        group = params["user_group"]
        if not isinstance(group, str) or group not in self.worker.permissions.groups():
            raise RequestRefused(f"Unknown user group: '{group}'")
        return group

    def plans_existing(self, params: dict, **who: Any) -> dict:
        catalog = self.worker.catalog
        plans = {n: describe_plan(n, p) for n, p in sorted(catalog.plans().items())}
        return {"success": True, "msg": "", "plans_existing": plans, "plans_existing_uid": catalog.plans_uid}

    def plans_allowed(self, params: dict, **who: Any) -> dict:
        """Every plan of the namespace, for any known group: a kernel has no plan queue, so
        the rules' plan lists are not applied (they are kept for queueserver files)."""
        try:
            self._group(params)
        except RequestRefused as exc:
            return {"success": False, "msg": str(exc), "plans_allowed": {}, "plans_allowed_uid": None}
        reply = self.plans_existing(params)
        return {"success": True, "msg": "", "plans_allowed": reply["plans_existing"],
                "plans_allowed_uid": status_reply(self.worker)["plans_allowed_uid"]}

    def devices_existing(self, params: dict, **who: Any) -> dict:
        catalog = self.worker.catalog
        devices = {n: describe_device(d) for n, d in sorted(catalog.devices().items())}
        return {"success": True, "msg": "", "devices_existing": devices,
                "devices_existing_uid": catalog.devices_uid}

    def devices_allowed(self, params: dict, **who: Any) -> dict:
        """Every device of the namespace, for any known group (see :meth:`plans_allowed`)."""
        try:
            self._group(params)
        except RequestRefused as exc:
            return {"success": False, "msg": str(exc), "devices_allowed": {}, "devices_allowed_uid": None}
        reply = self.devices_existing(params)
        return {"success": True, "msg": "", "devices_allowed": reply["devices_existing"],
                "devices_allowed_uid": status_reply(self.worker)["devices_allowed_uid"]}

    def queue_get(self, params: dict, **who: Any) -> dict:
        return {"success": True, "msg": "", "items": [], "running_item": {},
                "plan_queue_uid": self.worker.static_uid}

    def history_get(self, params: dict, **who: Any) -> dict:
        return {"success": True, "msg": "", "items": [], "plan_history_uid": self.worker.static_uid}


def _function_item(params: Mapping[str, Any]) -> tuple[str, list, dict]:
    """Validate a function item with queueserver's texts; (name, args, kwargs)."""
    prefix = "Error: Incorrect request format: "
    if "item" not in params:
        raise RequestRefused(prefix + "request contains no item info")
    item = params["item"]
    if not isinstance(item, dict):
        raise RequestRefused(prefix + f"incorrect type ('{type(item)}') of item parameter: item "
                             "parameter must have type 'dict'")
    item_type = item.get("item_type")
    if item_type is None:
        raise RequestRefused(prefix + "'item_type' key is not found")
    if item_type != "function":
        raise RequestRefused(prefix + f"unsupported 'item_type' value: '{item_type}', supported "
                             "item types ('function',)")
    if "name" not in item:
        raise RequestRefused(f"Error: Function name is not specified: {item}")
    if "args" in item and not isinstance(item["args"], (list, tuple)):
        raise RequestRefused(f"Error: Parameter 'args' is not a tuple or a list: {type(item['args'])}")
    if "kwargs" in item and not isinstance(item["kwargs"], dict):
        raise RequestRefused(f"Error: Parameter 'kwargs' is not a dictionary: {type(item['kwargs'])}")
    name = check_name(item["name"])  # a string naming a function, with queueserver's texts
    return name, list(item.get("args") or []), dict(item.get("kwargs") or {})


def _wire(status: TaskStatus | None) -> str:
    return "not_found" if status is None else status.wire


def _task_error(msg: str, uid: Any) -> dict:
    return {"success": False, "msg": msg, "task_uid": uid, "status": None}


def _lock_reply(worker: Any, success: bool, msg: str, state: Any = None) -> dict:
    if state is None:
        state = worker._locks.state()
    return {"success": success, "msg": msg, "lock_info": state.to_lock_info(),
            "lock_info_uid": state.uid}


def _result_dict(rec: Mapping[str, Any], status: TaskStatus, task: Task | None) -> dict[str, Any]:
    """task_result's ``result`` from a task's record (live or from the experiment log)."""
    time_start = rec.get("started_at") or rec.get("submitted_at")
    if not status.finished:
        return {"task_uid": rec["uid"], "time_start": time_start,
                "run_in_background": bool(rec.get("background"))}
    success, msg, value = status is TaskStatus.COMPLETED, "", None
    if success and rec.get("kind") != "script":
        value = rec.get("result")
        if isinstance(value, dict) and SUMMARY_KEY in value:
            value = None
            msg = ("The result could not be kept in full: the experiment log holds only a summary "
                   "of it (see qmagic.history()).")
        else:
            why = _json_problem(value)
            if why:
                value = None
                msg = (f"The result can not be serialized as JSON ({why}); it stays in the kernel: "
                       f"get_worker().get_task('{rec['uid']}').result()")
    elif not success:
        kind = _KIND_TEXT.get(str(rec.get("kind")), "Execute function")
        msg = f"Error occurred while executing '{kind}': {rec.get('error') or status.value}"
    return {"task_uid": rec["uid"], "success": success, "msg": msg,
            "traceback": rec.get("traceback") or "", "return_value": value,
            "time_start": time_start, "time_stop": rec.get("finished_at")}


def _json_problem(value: Any) -> str:
    import json

    try:
        json.dumps(value)
        return ""
    except (TypeError, ValueError, OverflowError) as exc:
        return str(exc)

