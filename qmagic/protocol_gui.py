"""The queueserver methods GUIs ask for (plans, devices, RE metadata, queue, history, runs),
answered for a kernel: it has no plan queue, so queue, history and runs are empty; plans, devices
and the Run Engine's metadata are those of the namespace.  A mix-in of
:class:`qmagic.protocol.QueueserverProtocol`.
"""

from __future__ import annotations

import json
from typing import Any

from . import probe
from .catalog import describe_device, describe_plan
from .core.permissions import MSG_NO_GROUP
from .errors import PermissionRefused, RequestRefused
from .protocol_common import _lock_key, status_reply

__all__ = ["GuiMethods"]


class GuiMethods:
    """``history_clear``, ``plans_existing``/``allowed``, ``devices_existing``/``allowed``,
    ``re_metadata``, ``queue_get``, ``history_get`` and ``re_runs``."""

    worker: Any
    #: kind ("plans"/"devices") -> (the catalog's uid, descriptions) last made
    described: dict[str, tuple[str, dict]]

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
            self.worker.clear_finished(lock_key=_lock_key(params), origin="remote", client=client)
        except RequestRefused as exc:
            return {"success": False, "msg": str(exc)}
        return {"success": True, "msg": ""}

    def _group(self, params: dict) -> str:
        """The request's user group, one of the rules' (queueserver words these refusals
        without its usual "Error: ")."""
        if "user_group" not in params:
            raise RequestRefused(MSG_NO_GROUP)
        try:
            self.worker.permissions.check_group(params["user_group"])
        except PermissionRefused as exc:
            raise RequestRefused(str(exc).removeprefix("Error: ")) from None
        return params["user_group"]

    def plans_existing(self, params: dict, **who: Any) -> dict:
        """queueserver ``plans_existing``: the plans (generator functions) of the namespace."""
        return self._listing("plans", "existing", params)

    def plans_allowed(self, params: dict, **who: Any) -> dict:
        """Every plan of the namespace, for any known group: a kernel has no plan queue, so
        the rules' plan lists are not applied (they are kept for queueserver files)."""
        return self._listing("plans", "allowed", params)

    def devices_existing(self, params: dict, **who: Any) -> dict:
        """queueserver ``devices_existing``: the ophyd / ophyd-async devices of the namespace."""
        return self._listing("devices", "existing", params)

    def devices_allowed(self, params: dict, **who: Any) -> dict:
        """Every device of the namespace, for any known group (see :meth:`plans_allowed`)."""
        return self._listing("devices", "allowed", params)

    def _listing(self, kind: str, which: str, params: dict) -> dict:
        """The reply of ``{kind}_{which}``: the namespace's plans or devices, described with a
        deadline; ``allowed`` first checks the request's group."""
        key, uid_key = f"{kind}_{which}", f"{kind}_{which}_uid"
        try:
            if which == "allowed":
                self._group(params)
            uid, items = self._descriptions(kind)
        except RequestRefused as exc:
            return {"success": False, "msg": str(exc), key: {}, uid_key: None}
        if which == "allowed":
            uid = status_reply(self.worker)[uid_key]
        return {"success": True, "msg": "", key: items, uid_key: uid}

    def _descriptions(self, kind: str) -> tuple[str, dict]:
        """(the catalog's uid of ``kind``, the descriptions): kept per uid, as queueserver
        keeps its lists until they change.  Described on the probe thread with a deadline;
        a description that finishes after it is kept all the same, for the next request."""
        catalog = self.worker.catalog
        uid = getattr(catalog, f"{kind}_uid")
        kept = self.described.get(kind)
        if kept is not None and kept[0] == uid:
            return kept

        def describe() -> tuple[str, dict]:
            self.described[kind] = found = (uid, _describe_all(catalog, kind))
            return found

        return _described(kind, describe)

    def re_metadata(self, params: dict, **who: Any) -> dict:
        """queueserver ``re_metadata``: the namespace's ``RE.md`` as JSON data (read with a
        deadline: it is the namespace's own object)."""
        def reply(msg: str, md: dict | None = None) -> dict:
            return {"success": md is not None, "msg": msg, "re_metadata": md or {}}

        if not self.worker.environment_is_open:
            return reply("Environment does not exist. Cannot retrieve RE metadata.")
        run_engine = self.worker.namespace.get("RE")
        if run_engine is None:
            return reply("Error: Run Engine does not exist in worker environment")

        def read() -> tuple[dict | None, str]:
            try:
                md = dict(run_engine.md)
            except AttributeError:
                return None, "Error: Run Engine does not have a metadata attribute"
            except Exception as exc:  # noqa: BLE001 - its own code
                return None, f"Error: Failed to convert Run Engine metadata to dictionary: {exc}"
            try:
                return json.loads(json.dumps(md)), ""
            except (TypeError, ValueError, OverflowError, RecursionError) as exc:
                return None, f"Failed to serialize RE metadata with JSON: {exc}"
        try:
            md, msg = probe.read(read, METADATA_READ_S)
        except probe.ProbeTimeout:
            return reply(f"Error: Reading RE.md did not finish within {METADATA_READ_S:g} s: its own "
                         "code is slow or blocks (the kernel is fine). Ask again in a moment.")
        return reply(msg, md)

    def queue_get(self, params: dict, **who: Any) -> dict:
        """queueserver ``queue_get``: a kernel has no plan queue (always empty)."""
        return {"success": True, "msg": "", "items": [], "running_item": {},
                "plan_queue_uid": self.worker.static_uid}

    def history_get(self, params: dict, **who: Any) -> dict:
        """queueserver ``history_get``: a kernel has no plan history (always empty)."""
        return {"success": True, "msg": "", "items": [], "plan_history_uid": self.worker.static_uid}

    def re_runs(self, params: dict, **who: Any) -> dict:
        """queueserver ``re_runs``: the runs of the plan the queue runs -- none, a kernel runs no
        plan from a queue (plans run in the notebook, ``RE(plan(...))``); ``option`` is checked
        as queueserver does.  GUIs ask for it whenever ``run_list_uid`` is new to them."""
        option = params.get("option", "active")
        if option not in _RUN_LIST_OPTIONS:
            return {"success": False, "msg": (f"Error: Option '{option}' is not supported. "
                                              f"Available options: {_RUN_LIST_OPTIONS}"),
                    "run_list": [], "run_list_uid": ""}
        return {"success": True, "msg": "", "run_list": [], "run_list_uid": self.worker.static_uid}


#: queueserver's ``re_runs`` options.
_RUN_LIST_OPTIONS = ("active", "open", "closed")


#: How long re_metadata waits for ``RE.md`` (seconds).
METADATA_READ_S = 1.0
#: How long a request waits for the namespace's plans or devices to be described (seconds):
#: well within a client's patience (2 s), as every request waits on the serving thread.
DESCRIBE_TIMEOUT_S = 1.0


def _describe_all(catalog: Any, kind: str) -> dict:
    """queueserver's descriptions of the catalog's ``plans`` or ``devices``, by name."""
    if kind == "plans":
        return {n: describe_plan(n, p) for n, p in sorted(catalog.plans().items())}
    return {n: describe_device(d) for n, d in sorted(catalog.devices().items())}


def _described(what: str, describe: Any) -> Any:
    """``describe()`` read with a deadline (it runs the objects' own code: reprs,
    attributes); RequestRefused, saying what to do, when it is slow or an object blocks."""
    try:
        return probe.read(describe, DESCRIBE_TIMEOUT_S)
    except probe.ProbeTimeout:
        raise RequestRefused(
            f"Error: Listing the namespace's {what} did not finish within {DESCRIBE_TIMEOUT_S:g} s: "
            "an object's repr or attribute is slow or blocks (the kernel is fine). Ask again in a "
            "moment; if this persists, fix or remove that object."
        ) from None
