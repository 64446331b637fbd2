"""bluesky-queueserver's replies, over the worker: the protocol's dicts and texts.

Each method takes the request's ``params`` (already checked for unsupported names by
:mod:`qmagic.remote.dispatch`) and returns queueserver's reply dict.  Parameter types are
checked here with queueserver-style messages; true/false parameters are read as queueserver
reads them (their truth value: see ``_flag``); every rule is the worker's.  Refusals are in-band:
``{"success": False, "msg": ...}`` plus the method's other keys.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Mapping

from . import probe
from .catalog import check_name
from .core.engine import MSG_NOT_IDLE
from .core.status import TaskStatus
from .core.task import Task
from .errors import LockRefused, PermissionsFormatError, RequestRefused
from .format import SUMMARY_KEY
from .protocol_common import _flag, _lock_key, status_reply
from .protocol_gui import GuiMethods
from .result_copies import (
    BUSY,
    NOT_AT_ONCE,
    UNSURE,
    ResultCopies,
    copy_at_once,
    plain_copy,
)
from .store.lockfile import MAX_USER_CHARS, check_key
from .texts import LARGE_RESULT_NOT_SENT
from .worker import json_error

__all__ = ["MAX_REQUEST_ITEMS", "MAX_USER_CHARS", "QueueserverProtocol", "status_reply"]

#: Most uids one task_status request may ask about.
MAX_REQUEST_ITEMS = 50_000
_KIND_TEXT = {"function": "Execute function", "script": "Load script", "coroutine": "Execute function"}


class QueueserverProtocol(GuiMethods):
    """queueserver's methods for one worker (see the module docstring).

    ``client`` names who sent a request (for per-client throttling of wrong lock keys).
    """

    def __init__(self, worker: Any, connection_info: Callable[[], dict] | None = None) -> None:
        self.worker = worker
        self.connection_info = connection_info or (lambda: {})
        self.described: dict[str, tuple[str, dict]] = {}
        #: Copies of the results read last, with their JSON (kept while unchanged).
        self.result_copies = ResultCopies()

    # -- status ---------------------------------------------------------------------------------
    def status(self, params: dict, **who: Any) -> dict:
        """queueserver ``status``: the manager, kernel and lock state (see :func:`status_reply`)."""
        return status_reply(self.worker)

    def config_get(self, params: dict, **who: Any) -> dict:
        """queueserver ``config_get``: the kernel's connection info (for ``qserver``/GUIs)."""
        info = self.connection_info() if self.worker.environment_is_open else {}
        return {"success": True, "msg": "", "config": {"ip_connect_info": info}}

    # -- tasks -------------------------------------------------------------------------------------
    def function_execute(self, params: dict, *, client: str | None = None, request_bytes: int = 0,
                         **who: Any) -> dict:
        """queueserver ``function_execute``: start a namespace function as a task; returns its
        uid.  ``request_bytes``: what the request's data takes in memory (finished tasks'
        memory is bounded by it)."""
        item, key_read = params.get("item"), False
        try:
            lock_key = _lock_key(params)
            key_read = True
            name, args, kwargs = _function_item(params)
            task = self.worker.submit(
                name, args, kwargs, background=_flag(params, "run_in_background", False),
                user=params.get("user"), user_group=params.get("user_group"), lock_key=lock_key,
                origin="remote", strict_json=True, client=client, payload_bytes=request_bytes,
            )
        except RequestRefused as exc:
            msg = str(exc)  # queueserver's handler prefixes every refusal of this method
            msg = msg if msg.startswith("Error: ") else f"Error: {msg}"
            if not key_read or isinstance(exc, LockRefused):  # (queueserver checks the key before
                item = None  # it reads the item: a refusal of the key answers no item)
            return {"success": False, "msg": msg, "item": item, "task_uid": None}
        reply_item = {"name": task.name, "args": list(task.args), "kwargs": dict(task.kwargs),
                      "user": task.user, "user_group": task.user_group, "item_uid": task.uid}
        if isinstance(item, dict) and "item_type" in item:
            reply_item = {"item_type": item["item_type"], **reply_item}
        return {"success": True, "msg": "", "item": reply_item, "task_uid": task.uid}

    def script_upload(self, params: dict, *, client: str | None = None, request_bytes: int = 0,
                      **who: Any) -> dict:
        """queueserver ``script_upload``: run a script in the namespace as a task (all or nothing)."""
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
                origin="remote", client=client, payload_bytes=request_bytes,
            )
        except RequestRefused as exc:
            return {"success": False, "msg": _script_refusal(exc), "task_uid": None}
        return {"success": True, "msg": "", "task_uid": task.uid}

    def task_status(self, params: dict, **who: Any) -> dict:
        """queueserver ``task_status``: the status of one uid or a list of uids (memory, then the log)."""
        uids = params.get("task_uid")
        if uids is None:
            return _task_error("Error: Required 'task_uid' parameter is missing in the API call.", None)
        if isinstance(uids, str):
            status = self.worker.statuses([uids])[uids]
            return {"success": True, "msg": "", "task_uid": uids, "status": _wire(status)}
        if not isinstance(uids, list):
            return _task_error(
                f"Error: 'task_uid' must be a string or a list of strings: type(task_uid)={type(uids)!r}",
                uids)
        wrong = next((i for i, u in enumerate(uids) if not isinstance(u, str)), None)
        if wrong is not None:  # (the list's own type said nothing: name the item that is no string)
            return _task_error(
                "Error: 'task_uid' must be a string or a list of strings: "
                f"type(task_uid[{wrong}])={type(uids[wrong])!r}", uids)
        if len(uids) > MAX_REQUEST_ITEMS:
            return _task_error(
                f"Error: Too many task uids in one request ({len(uids)}); ask for at most "
                f"{MAX_REQUEST_ITEMS} per request.", None)
        found = self.worker.statuses(uids)
        return {"success": True, "msg": "", "task_uid": uids,
                "status": {uid: _wire(found.get(uid)) for uid in uids}}

    def task_result(self, params: dict, *, large_work: Callable[[], bool] | None = None,
                    **who: Any) -> dict:
        """queueserver ``task_result``: a task's status and result dict (memory, then the log).
        ``large_work``: asked before large work on a large result (see :func:`_plain_json`)."""
        uid = params.get("task_uid")
        if uid is None:
            return {**_task_error("Error: Required 'task_uid' parameter is missing in the API call.",
                                  None), "result": None}
        if not isinstance(uid, str):
            return {**_task_error(f"Error: 'task_uid' must be a string: type(task_uid)={type(uid)!r}",
                                  uid), "result": None}
        found = self.worker.lookup(uid)
        if found is None:
            return {"success": True, "msg": "", "task_uid": uid, "status": "not_found", "result": {}}
        task = found if isinstance(found, Task) else None
        rec = found.to_dict() if task is not None else found
        status = TaskStatus(rec["status"])
        result = _result_dict(rec, status, task, self.result_copies, large_work)
        # A result not sent *this time* fails the request (its msg says to ask again): a
        # client must not take its absence for a result of None.
        again = isinstance(result.get("msg"), _AskAgain)
        return {"success": not again, "msg": result["msg"] if again else "", "task_uid": uid,
                "status": status.wire, "result": result}

    # -- locks --------------------------------------------------------------------------------------
    def lock(self, params: dict, *, client: str | None = None, **who: Any) -> dict:
        """queueserver ``lock``: lock the environment and/or the queue with a key."""
        try:
            if "user" not in params:  # (the user first, as queueserver)
                raise RequestRefused("Error: User name is not specified: 'user' is a required parameter")
            if "lock_key" not in params:
                raise RequestRefused("Error: Lock key is not specified: 'lock_key' is a required parameter")
            state = self.worker.lock(  # (the scopes: their truth value, as queueserver's)
                params["lock_key"], environment=_flag(params, "environment", False),
                queue=_flag(params, "queue", False), note=params.get("note"), user=params["user"],
                origin="remote", client=client,
            )
        except RequestRefused as exc:  # queueserver: no lock info with a refused lock
            return {"success": False, "msg": str(exc), "lock_info": {}, "lock_info_uid": None}
        return _lock_reply(self.worker, True, "", state)

    def unlock(self, params: dict, *, client: str | None = None, **who: Any) -> dict:
        """queueserver ``unlock``: unlock with the lock key or the emergency key."""
        try:  # (a request refused for its key's form: no lock info, as queueserver's)
            if "lock_key" not in params:
                raise RequestRefused("Error: Request contains no lock key: 'lock_key' parameter is required")
            check_key(params["lock_key"])
        except RequestRefused as exc:
            return {"success": False, "msg": str(exc), "lock_info": {}, "lock_info_uid": None}
        try:
            state = self.worker.unlock(params["lock_key"], origin="remote", client=client)
        except RequestRefused as exc:  # (a key that does not open it: the lock that refused)
            return _lock_reply(self.worker, False, str(exc))
        return _lock_reply(self.worker, True, "", state)

    def lock_info(self, params: dict, *, client: str | None = None, **who: Any) -> dict:
        """queueserver ``lock_info``: the current lock (with ``lock_key``: checks it)."""
        try:
            state = self.worker.lock_state(_lock_key(params), client=client)
        except RequestRefused as exc:
            return _lock_reply(self.worker, False, str(exc))
        if state.damaged:  # unusable lock file: counts as locked, and says how to reset it
            return _lock_reply(self.worker, False, state.damaged, state)
        return _lock_reply(self.worker, True, "", state)

    # -- control ---------------------------------------------------------------------------------------
    def kernel_interrupt(self, params: dict, *, client: str | None = None, **who: Any) -> dict:
        """queueserver ``kernel_interrupt``: ■ for the kernel (the foreground task with ``interrupt_task``)."""
        try:
            self.worker.interrupt(interrupt_task=_flag(params, "interrupt_task", False),
                                  lock_key=_lock_key(params), origin="remote", client=client)
        except RequestRefused as exc:
            return {"success": False, "msg": str(exc)}
        return {"success": True, "msg": ""}

    def environment_open(self, params: dict, *, client: str | None = None, **who: Any) -> dict:
        """queueserver ``environment_open``: accept remote tasks again."""
        return self._simple(self.worker.environment_open, params, client)

    def environment_close(self, params: dict, *, client: str | None = None, **who: Any) -> dict:
        """queueserver ``environment_close``: refuse remote tasks (the notebook keeps working)."""
        return self._simple(self.worker.environment_close, params, client)

    def environment_destroy(self, params: dict, *, client: str | None = None, **who: Any) -> dict:
        """queueserver ``environment_destroy``: stop running tasks, then close the environment."""
        return self._simple(self.worker.environment_destroy, params, client)

    def environment_update(self, params: dict, *, client: str | None = None, **who: Any) -> dict:
        """queueserver ``environment_update``: rescan the namespace for functions, plans and devices."""
        try:
            task = self.worker.update_environment(
                background=_flag(params, "run_in_background", False), lock_key=_lock_key(params),
                origin="remote", client=client)
        except RequestRefused as exc:
            return {"success": False, "msg": _script_refusal(exc), "task_uid": None}
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
        """queueserver ``permissions_get``: the user group permissions in force."""
        return {"success": True, "msg": "", "user_group_permissions": self.worker.permissions.to_dict()}

    def permissions_set(self, params: dict, *, client: str | None = None, **who: Any) -> dict:
        """queueserver ``permissions_set``: replace the user group permissions (checked first)."""
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
        """queueserver ``permissions_reload``: read the permissions file (or the defaults) again."""
        try:
            self.worker.reload_permissions(restore=_flag(params, "restore_permissions", True),
                                           lock_key=_lock_key(params), origin="remote", client=client)
        except RequestRefused as exc:
            return {"success": False, "msg": str(exc)}
        except PermissionsFormatError as exc:
            return {"success": False, "msg": f"Error: {exc}"}
        return {"success": True, "msg": ""}


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


def _script_refusal(exc: RequestRefused) -> str:
    """A refused script_upload / environment_update as queueserver words it: its handlers
    return the busy foreground's text as it is, without the "Error: " of function_execute's."""
    msg = str(exc)
    return msg.removeprefix("Error: ") if msg == MSG_NOT_IDLE else msg


def _wire(status: TaskStatus | None) -> str:
    return "not_found" if status is None else status.wire


def _task_error(msg: str, uid: Any) -> dict:
    return {"success": False, "msg": msg, "task_uid": uid, "status": None}


def _lock_reply(worker: Any, success: bool, msg: str, state: Any = None) -> dict:
    if state is None:
        state = worker.current_lock()
    return {"success": success, "msg": msg, "lock_info": state.to_lock_info(),
            "lock_info_uid": state.uid}


#: How long task_result may spend reading a live result (its own code: a mapping's items(),
#: a subclass's methods) before it answers without it (seconds).
RESULT_READ_S = 1.0


class _AskAgain(str):
    """Why a result was not sent this time, while a later request may get it (a ``str``)."""


def _plain_json(value: Any, task: Task, copies: ResultCopies,
                large_work: Callable[[], bool] | None = None) -> tuple[Any, str | None]:
    """A live task's result as plain JSON data with its JSON (a copy: encoding the reply
    then runs none of the result's own code), or (None, why not).  A copy kept from an
    earlier request answers while the result is unchanged (:mod:`qmagic.result_copies`);
    else the copy is made -- and a check the control thread could not make quickly is made
    -- through :mod:`qmagic.probe`, with a deadline: the control thread never runs the
    result's code, nor waits long.  What was not ready in time is kept when it is, for the
    next request: else a large result could never be read.  ``large_work`` is asked before
    large work on a large result (checking its kept copy, or making a new one; see
    :meth:`ResultCopies.get`): if it says no, the client is told to ask again (many clients
    asking for large results at once held up everyone else: the control thread checked or
    copied them for each of them in turn)."""
    uid = task.uid
    try:  # (small, of exact built-in types: no deadline needed)
        copy = copy_at_once(value)
    except ValueError as exc:  # (two keys that read the same)
        return None, f"can not be serialized as JSON ({exc})"
    if copy is not NOT_AT_ONCE:
        return copies.put(task, copy), None
    kept = copies.get(uid, value, admit=large_work)
    if kept is BUSY:
        return None, _AskAgain(LARGE_RESULT_NOT_SENT)
    if kept is not None and kept is not UNSURE:
        return kept, None
    unsure = kept is UNSURE
    gave_up = threading.Event()

    def convert() -> tuple[Any, str | None]:
        if unsure:
            found = copies.get(uid, value, thorough=True)
            if found is not None:
                if gave_up.is_set():
                    copies.refresh(uid, found)
                return found, None
        try:
            copy = plain_copy(value)
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            why = json_error(value) or exc  # (the rule's own words, for a value that fails)
            return None, f"can not be serialized as JSON ({why})"
        # Its JSON is made here, under the deadline too: made on the control thread after
        # it, 3 million floats held every other client's reply ~1.3 s (a hostile test).
        kept = copies.put(task, copy)
        if gave_up.is_set():  # (nobody waits for it: the next request takes it unchecked)
            copies.refresh(uid, kept)
        return kept, None
    try:
        return probe.read(convert, RESULT_READ_S)
    except probe.ProbeTimeout:
        gave_up.set()
        return None, _AskAgain(f"could not be read within {RESULT_READ_S:g} s (it is large, or its "
                               "own code is slow or blocked): ask again in a moment")


def failure_message(rec: Mapping[str, Any], status: TaskStatus) -> str:
    """queueserver's text for a task that did not complete (task_result's ``msg``, and the
    line the info socket's console shows before a failed task's traceback); ``rec``: the
    task's record (:meth:`qmagic.Task.to_dict`, or the experiment log's)."""
    kind = _KIND_TEXT.get(str(rec.get("kind")), "Execute function")
    return f"Error occurred while executing '{kind}': {rec.get('error') or status.value}"


def not_started_message(rec: Mapping[str, Any]) -> str:
    """The console's line for a task cancelled while it waited in the queue (it never ran:
    nothing failed, there is no traceback); ``rec``: the task's record."""
    what = "Script" if rec.get("kind") == "script" else "Function"
    return f"{what} {rec.get('name')!r} was cancelled before it started: {rec.get('error') or 'cancelled'}"


def _holds_summary(value: Any) -> bool:
    """True if ``value``, a result read from the experiment log (plain JSON data), holds a
    summary the log kept for a part JSON cannot hold: [1.5, NaN] was sent as [1.5, {summary}]
    once the task had left the memory, as if it were the result (found by a hostile test)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if type(item) is dict:
            if SUMMARY_KEY in item:
                return True
            stack.extend(item.values())
        elif type(item) is list:
            stack.extend(item)
    return False


def _result_dict(rec: Mapping[str, Any], status: TaskStatus, task: Task | None,
                 copies: ResultCopies, large_work: Callable[[], bool] | None = None) -> dict[str, Any]:
    """task_result's ``result`` from a task's record (live or from the experiment log);
    ``copies``, ``large_work``: see :func:`_plain_json`."""
    time_start = rec.get("started_at") or rec.get("submitted_at")
    if not status.finished:
        return {"task_uid": rec["uid"], "time_start": time_start,
                "run_in_background": bool(rec.get("background"))}
    success, msg, value = status is TaskStatus.COMPLETED, "", None
    if success and rec.get("kind") != "script":
        value = rec.get("result")
        if task is None and _holds_summary(value):  # (from the log; a live result's own code never runs here)
            value = None
            msg = ("The result could not be kept in full: the experiment log holds only a summary "
                   "of it or of part of it (see qmagic.history()).")
        else:
            value, why = (_plain_json(value, task, copies, large_work) if task is not None
                          else (value, None))
            if why is not None:
                msg = (f"The result {why}; it stays in the kernel: "
                       f"qmagic.get_worker().get_task('{rec['uid']}').result()")
                if isinstance(why, _AskAgain):  # (task_result then fails the request)
                    msg = _AskAgain(msg)
    elif not success:
        msg = failure_message(rec, status)
    return {"task_uid": rec["uid"], "success": success, "msg": msg,
            "traceback": rec.get("traceback") or "", "return_value": value,
            "time_start": time_start, "time_stop": rec.get("finished_at")}
