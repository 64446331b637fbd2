"""Driving a worker through queueserver's protocol in tests (no sockets): the same method
table and replies a remote client gets."""

from __future__ import annotations

from typing import Any

from qmagic.protocol import QueueserverProtocol
from qmagic.remote.dispatch import dispatch

#: Every key of the queueserver status reply (the client's threads read them).
STATUS_KEYS = frozenset({
    "msg", "time", "items_in_queue", "items_in_history", "running_item_uid", "manager_state",
    "queue_stop_pending", "queue_autostart_enabled", "pause_pending",
    "worker_environment_exists", "worker_environment_state", "worker_background_tasks",
    "re_state", "ip_kernel_state", "ip_kernel_captured", "status_uid", "run_list_uid",
    "plan_queue_uid", "plan_history_uid", "devices_existing_uid", "plans_existing_uid",
    "devices_allowed_uid", "plans_allowed_uid", "task_results_uid", "lock_info_uid",
    "plan_queue_mode", "lock",
})


class QS:
    """``QS(worker).function_execute(...)``: a request as a remote client would send it."""

    def __init__(self, worker: Any, connection_info: Any = None) -> None:
        self.protocol = QueueserverProtocol(worker, connection_info)

    def call(self, method: str, *, client: str | None = None, **params: Any) -> dict:
        return dispatch(self.protocol, {"method": method, "params": params}, client=client)

    def function_execute(self, item: dict | str, *, run_in_background: bool = False,
                         user: str = "qmagic user", user_group: str = "primary", **params: Any) -> dict:
        if isinstance(item, str):
            item = {"name": item}
        if isinstance(item, dict):
            item = {"item_type": "function", **item}
        return self.call("function_execute", item=item, run_in_background=run_in_background,
                         user=user, user_group=user_group, **params)

    def __getattr__(self, method: str) -> Any:
        return lambda **params: self.call(method, **params)
