"""The method table: which queueserver methods a qmagic kernel answers, with which
parameters, and the envelope checks every request goes through.

:func:`dispatch` takes one decoded request (``{"method": str, "params": dict}``) and
returns the reply dict; it never raises for bad input.  The methods themselves are
:class:`qmagic.protocol.QueueserverProtocol`'s.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from ..errors import QMagicError, RequestRefused
from ..format import safe_repr
from ..protocol import QueueserverProtocol
from .server import failure_text

__all__ = ["METHODS", "Method", "dispatch", "unread_refusal"]

log = logging.getLogger("qmagic")


@dataclass(frozen=True)
class Method:
    """One served method: its parameter names (None: any, ignored), the reply keys an
    error reply sets to empty values, and ``prefix``: what its handler in queueserver puts
    before an error text (``"Error: "``; ``""`` for the handlers that reply ``str(ex)``)."""

    params: tuple[str, ...] | None
    error_keys: Mapping[str, Any] = field(default_factory=dict)
    handler: str = ""
    prefix: str = "Error: "


_LOCK_KEYS = {"lock_info": {}, "lock_info_uid": None}

#: Every method the channel serves.
METHODS: dict[str, Method] = {
    "status": Method(None, handler="status"),
    "ping": Method(None, handler="status"),
    "config_get": Method((), {"config": {}}, prefix=""),
    "function_execute": Method(("item", "user_group", "user", "run_in_background", "lock_key"),
                               {"item": None, "task_uid": None}),
    "script_upload": Method(("script", "update_lists", "update_re", "run_in_background", "lock_key"),
                            {"task_uid": None}),
    "task_status": Method(("task_uid",), {"task_uid": None, "status": None}),
    "task_result": Method(("task_uid",), {"task_uid": None, "status": None, "result": None}),
    "lock": Method(("lock_key", "note", "environment", "queue", "user"), _LOCK_KEYS),
    "unlock": Method(("lock_key",), _LOCK_KEYS),
    "lock_info": Method(("lock_key",), _LOCK_KEYS),
    "kernel_interrupt": Method(("lock_key", "interrupt_task", "interrupt_plan")),
    "environment_open": Method(("lock_key",)),
    "environment_close": Method(("lock_key",)),
    "environment_destroy": Method(("lock_key",)),
    "environment_update": Method(("run_in_background", "lock_key"), {"task_uid": None}),
    "permissions_get": Method((), {"user_group_permissions": {}}),
    "permissions_set": Method(("user_group_permissions", "lock_key")),
    "permissions_reload": Method(("restore_plans_devices", "restore_permissions", "lock_key")),
    "history_clear": Method(("lock_key", "size", "item_uid")),
    "re_metadata": Method((), {"re_metadata": {}}),
    "queue_get": Method((), {"items": [], "running_item": {}, "plan_queue_uid": None}),
    "history_get": Method((), {"items": [], "plan_history_uid": None}),
    "re_runs": Method(("option",), {"run_list": [], "run_list_uid": ""}),
    "plans_existing": Method((), {"plans_existing": {}, "plans_existing_uid": None}, prefix=""),
    "plans_allowed": Method(("user_group",), {"plans_allowed": {}, "plans_allowed_uid": None}, prefix=""),
    "devices_existing": Method((), {"devices_existing": {}, "devices_existing_uid": None}, prefix=""),
    "devices_allowed": Method(("user_group",), {"devices_allowed": {}, "devices_allowed_uid": None}, prefix=""),
}


#: queueserver methods that need its plan queue or Run Engine: a clear refusal, not
#: "Unknown method" (parameters are not checked: nothing runs).
UNAVAILABLE = frozenset({
    "queue_mode_set", "queue_item_add", "queue_item_add_batch", "queue_item_update",
    "queue_item_get", "queue_item_remove", "queue_item_remove_batch", "queue_item_move",
    "queue_item_move_batch", "queue_item_execute", "queue_clear", "queue_start", "queue_stop",
    "queue_stop_cancel", "queue_autostart", "re_pause", "re_resume", "re_stop", "re_abort",
    "re_halt", "manager_stop", "manager_kill", "manager_test", "kernel_interrupt_plan",
    "function_execute_plan",
})


#: The method named at the start of a request, as queueserver's clients write it.
_METHOD_FIRST = re.compile(rb'\A\s*\{\s*"method"\s*:\s*"([A-Za-z_]{1,40})"')


def unread_refusal(head: bytes, msg: str) -> dict:
    """The reply to a request refused before it was read (too large; large while the kernel
    is busy): ``msg`` with the reply keys of its method set to empty values, as in every
    other refusal, when ``head`` (the request's first bytes) names the method first."""
    found = _METHOD_FIRST.match(head)
    spec = METHODS.get(found.group(1).decode()) if found else None
    return {"success": False, "msg": msg, **(spec.error_keys if spec is not None else {})}


def _authenticated(method: str, params: dict, identity: Any) -> dict:
    """The request's claims checked against the sender's client key (RequestRefused if not)."""
    from .auth import check_claim, check_method

    check_method(identity, method)
    if method in ("function_execute", "script_upload"):  # a script runs as its key's user
        user, group = check_claim(identity, params.get("user"), params.get("user_group"))
        return {**params, "user": user, "user_group": group}
    if method == "lock":
        user, _ = check_claim(identity, params.get("user"), None)
        return {**params, "user": user}
    return params


def _unsupported_msg(names: list[str], spec: Method) -> str:
    """queueserver's text for parameters ``spec`` does not take, with its handler's prefix."""
    shown = f"{names[0]!r}" if len(names) == 1 else f"{names}"
    return (f"{spec.prefix}API request contains unsupported parameters: {shown}. "
            f"Supported parameters: {list(spec.params or ())}")


def dispatch(protocol: QueueserverProtocol, request: Any, *, client: str | None = None,
             keys: Any = None, identity: Any = None, request_bytes: int = 0,
             large_work: Callable[[], bool] | None = None) -> dict:
    """Process one decoded request; returns the reply dict (errors in-band, never raises).

    ``keys``: the CurveZMQ client key list when one is configured; then ``identity`` is
    the sender's (None: not listed) and the request may only claim that identity's user
    and groups (:mod:`qmagic.remote.auth`).  ``request_bytes``: what the request's data
    takes in memory, passed to every method (those that start a task with what the client
    sent give it to the task).  ``large_work``: asked by a method before large work (True:
    go ahead; see :mod:`qmagic.remote.large_work`), passed to every method; None: always.
    """
    if not isinstance(request, dict):  # queueserver's text
        return {"success": False, "msg": f"Incorrect request type: {type(request)}. Dictionary is expected"}
    if "method" not in request:
        return {"success": False,
                "msg": f"Invalid request format: method is not specified: {safe_repr(request, 200)}"}
    extra = [key for key in request if key not in ("method", "params")]
    if extra:
        return {"success": False, "msg": (
            f"Request contains unexpected keys {safe_repr(extra, 200)}. Allowed keys: ('method', 'params')")}
    name = request["method"]
    spec = METHODS.get(name) if isinstance(name, str) else None
    if spec is None:
        if isinstance(name, str) and name in UNAVAILABLE:
            return protocol.unavailable(name)
        return {"success": False, "msg": f"Unknown method {safe_repr(name, 200)}"}
    params = request.get("params")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        return {"success": False, "msg": (
            f"{spec.prefix}Incorrect request format: 'params' must be a dictionary (JSON object), "
            f"got {type(params).__name__}"), **spec.error_keys}
    if spec.params is not None:
        unsupported = [key for key in params if key not in spec.params]
        if unsupported:
            return {"success": False, "msg": _unsupported_msg(unsupported, spec),
                    **spec.error_keys}
    handler = getattr(protocol, spec.handler or name)
    try:
        if keys is not None:
            params = _authenticated(name, params, identity)
        # (request_bytes: used by the methods whose task holds what the client sent;
        # large_work: by task_result; the others take them in **who)
        return handler(params, client=client, request_bytes=request_bytes, large_work=large_work)
    except RequestRefused as exc:
        return {"success": False, "msg": str(exc), **spec.error_keys}
    except QMagicError as exc:  # the state folder failed, the log is unavailable ...: its text
        log.warning("qmagic: control request %r failed: %s", name, exc)  # says what to do
        return {"success": False, "msg": f"Error: {exc}", **spec.error_keys}
    except Exception:  # noqa: BLE001 - a wrong parameter type deep inside, or a bug
        log.warning("qmagic: control request %r failed", name, exc_info=True)
        return {"success": False, "msg": failure_text(), **spec.error_keys}
