"""What the queueserver methods share: the ``status`` reply and the reading of request
parameters as queueserver reads them (queueserver-style messages).
"""

from __future__ import annotations

import datetime
import threading
import uuid
from collections.abc import Mapping
from typing import Any

from . import __version__, probe
from .core.task import Task
from .errors import RequestRefused
from .store.lockfile import check_key

__all__ = ["status_reply"]


def _flag(params: Mapping[str, Any], name: str, default: bool) -> bool:
    """A true/false parameter as queueserver reads it: ``default`` when absent, else its
    truth value (``bool()``: ``"yes"`` and ``1`` are true; ``null``, ``0`` and ``""`` false).
    queueserver's handlers apply ``bool()`` or test the value's truth, and its clients send
    what their caller gave: a stricter reading refused their requests.  One exception: a text
    that says false (``"false"``, ``"no"``, ``"0"``...), which ``bool()`` makes true, is
    refused: doing the opposite of what the sender wrote (run in the background, lock) is
    worse than a refusal that says what to send."""
    if name not in params:
        return default
    value = params[name]
    if isinstance(value, str) and value.strip().lower() in _FALSE_TEXTS:
        raise RequestRefused(
            f"Error: Incorrect request format: parameter {name!r} is the text {value!r}, which "
            f"would read as true: send false (JSON, not in quotes)"
        )
    return bool(value)


#: Texts that say false (``_flag`` refuses them rather than read them as true).
_FALSE_TEXTS = frozenset({"false", "no", "off", "0", "none", "null", "f", "n"})


def _lock_key(params: Mapping[str, Any]) -> str | None:
    """The request's ``lock_key``: None or text, as queueserver accepts (an empty key opens
    nothing, but is no error while nothing is locked).  Its type is refused here, before the
    other parameters, as queueserver does; its length when the lock checks it."""
    key = params.get("lock_key")
    if key is not None and not isinstance(key, str):
        check_key(key, allow_none=True)  # refuses it with queueserver's text
    return key


def _re_state(run_engine: Any) -> str | None:
    """``RE.state`` read with a deadline (the property is the namespace's code); None when
    there is no Run Engine, or it does not answer at once: status always answers."""
    if run_engine is None:
        return None
    try:
        state = probe.read(lambda: getattr(run_engine, "state", None))
    except Exception:  # noqa: BLE001 - ProbeTimeout, or the property raised
        return None
    return state if isinstance(state, str) else None


def status_reply(worker: Any) -> dict[str, Any]:
    """The queueserver ``status`` dict (every key the clients read)."""
    counts = worker.counts()
    fg: Task | None = counts["foreground"]
    busy = counts["kernel_busy"]
    state = "executing_task" if fg is not None else "idle"
    lock = worker.current_lock()
    env_open = worker.environment_is_open
    env_state = state if env_open else "closed"
    if worker.environment_starting:  # as an RE Manager whose worker runs its start-up code
        state, env_state, kernel_state, captured, background = "creating_environment", "initializing", "starting", None, 0
    elif not env_open:  # as an RE Manager without a worker
        kernel_state, captured, background = None, None, 0
    elif fg is not None:
        kernel_state, captured = "busy", bool(counts["foreground_handed_over"])
        background = counts["running_background"]
    else:
        kernel_state, captured = ("busy" if busy else "idle"), False
        background = counts["running_background"]
    re_state = _re_state(worker.namespace.get("RE")) if env_open else None
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
        "worker_environment_state": env_state,
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
_uid_lock = threading.Lock()


def _uid_of(key: Any) -> str:
    """A stable uid for a state key (the same state gives the same uid)."""
    with _uid_lock:
        uid = _uid_cache.get(key)
        if uid is None:
            if len(_uid_cache) > 256:
                _uid_cache.clear()
            uid = _uid_cache[key] = str(uuid.uuid4())
        return uid
