"""The worker: bluesky-queueserver's RE Worker API over one namespace.

Every door — magics, the Python API, the 0MQ control channel, panel buttons — calls these
methods, so every rule (lock check, permission check, foreground/idle rule, JSON rule) is
implemented once, here or in the module the rule belongs to (locks, permissions, engine).

Protocol methods (``function_execute``, ``script_upload``, ``task_status``, ``task_result``,
``status``, ``lock``...) return the queueserver reply dicts; the Python-friendly layer
(``submit``, ``get_task``, ``tasks``...) returns :class:`qmagic.Task` objects.
"""

from __future__ import annotations

import _thread
import datetime
import inspect
import json
import linecache
import logging
import threading
import uuid
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from traitlets import observe

from . import __version__
from .config import QMagic
from .engine import Engine, ForegroundRunner
from .errors import RequestRefused, TaskNotFound
from .events import Subscription
from .tasks import Task, TaskStatus

if TYPE_CHECKING:  # pragma: no cover
    from .journal import Journal

__all__ = ["Worker"]

log = logging.getLogger("qmagic")

ORIGINS = ("python", "magic", "remote", "panel")
_MISSING = object()
_KIND_TEXT = {"function": "Execute function", "script": "Load script"}


def _json_ok(value: Any) -> tuple[bool, str]:
    try:
        json.dumps(value)
        return True, ""
    except (TypeError, ValueError, OverflowError) as exc:
        return False, str(exc)


class _JournalObserver:
    """Appends every task's record to the journal (the experiment log)."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    def task_queued(self, task: Task) -> None:
        with task._mutex:  # never after the task's "end" record
            if task.status is TaskStatus.QUEUED:
                self.journal.append("queued", task.to_dict_locked())

    def task_started(self, task: Task) -> None:
        self.journal.append("start", task.to_dict())

    def task_finished(self, task: Task, record: dict) -> None:
        self.journal.append("end", record)


class Worker(QMagic):
    """Runs the functions of ``namespace`` as tracked tasks (an RE-Worker-shaped API).

    ``Worker(namespace, parent=None, config=None)``: settings come from the ``QMagic``
    config section (see :class:`qmagic.QMagic`).  In a kernel, ``%load_ext qmagic`` builds
    one on the kernel's namespace; get it with :func:`qmagic.get_worker`.  Without a kernel
    the worker owns a foreground thread of its own.  Call :meth:`close` when done.
    """

    def __init__(
        self,
        namespace: dict,
        *,
        parent: Any = None,
        config: Any = None,
        foreground: ForegroundRunner | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(namespace, dict):
            raise TypeError(
                f"Worker needs a dict as its namespace (got {type(namespace).__name__})."
            )
        super().__init__(parent=parent, config=config, **kwargs)
        self.namespace = namespace
        #: Names never offered as functions (IPython's own: In, Out, exit, ...).
        self.hidden_names: set[str] = set()
        #: Called by kernel_interrupt: raises KeyboardInterrupt in the foreground thread.
        self.interrupt_main: Callable[[], None] = _thread.interrupt_main
        self.engine = Engine(
            max_background=self.max_background_tasks,
            max_queued=self.max_queued_tasks,
            retention_s=self.task_retention_s,
            max_finished=self.max_finished_tasks,
            output_limit=self.task_output_limit,
            cancel_grace_s=self.cancel_grace_s,
            foreground=foreground,
        )
        self._lock = threading.Lock()
        self._ns_lock = threading.RLock()
        self._remembered_key: str | None = None
        self._catalog: dict[str, dict[str, str]] = {}
        self._catalog_uid = str(uuid.uuid4())
        self._permissions_uid = str(uuid.uuid4())
        self._static_uid = str(uuid.uuid4())
        self._status_key: tuple | None = None
        self._status_uid = str(uuid.uuid4())
        self._permissions = self._load_permissions()
        self._locks = self._make_lock_store()
        self._journal: Journal | None = None
        self._journal_observer: _JournalObserver | None = None
        self._open_journal()
        self.refresh_catalog()

    # =====================================================================================
    # settings follow the traits
    # =====================================================================================
    @observe(
        "max_background_tasks",
        "max_queued_tasks",
        "task_retention_s",
        "max_finished_tasks",
        "task_output_limit",
        "cancel_grace_s",
    )
    def _engine_setting_changed(self, change: Mapping[str, Any]) -> None:
        engine = getattr(self, "engine", None)
        if engine is None:
            return
        attr = {
            "max_background_tasks": "max_background",
            "max_queued_tasks": "max_queued",
            "task_retention_s": "retention_s",
            "max_finished_tasks": "max_finished",
            "task_output_limit": "output_limit",
            "cancel_grace_s": "cancel_grace_s",
        }[change["name"]]
        setattr(engine, attr, change["new"])

    @observe("user_group_permissions", "user_group_permissions_file")
    def _permissions_changed(self, change: Mapping[str, Any]) -> None:
        if getattr(self, "engine", None) is not None:
            self._permissions = self._load_permissions()
            self._permissions_uid = str(uuid.uuid4())

    @observe("state_dir", "environment_name", "emergency_lock_key")
    def _lock_setting_changed(self, change: Mapping[str, Any]) -> None:
        if getattr(self, "engine", None) is not None:
            self._locks = self._make_lock_store()
            if change["name"] != "emergency_lock_key":
                self._open_journal()

    @observe("journal_enabled", "journal_max_bytes", "journal_max_age_s", "journal_fsync",
             "journal_summary_chars")
    def _journal_setting_changed(self, change: Mapping[str, Any]) -> None:
        if getattr(self, "engine", None) is not None:
            self._open_journal()

    def _open_journal(self) -> None:
        """(Re)open the journal for the current settings; the old one is closed."""
        from .journal import Journal
        from .store.paths import default_state_dir

        old, old_observer = self._journal, self._journal_observer
        journal = None
        if self.journal_enabled:
            journal = Journal(
                self.state_dir or default_state_dir(),
                self.environment_name,
                max_bytes=self.journal_max_bytes,
                max_age_s=self.journal_max_age_s,
                fsync=self.journal_fsync,
                summary_chars=self.journal_summary_chars,
            )
        observer = _JournalObserver(journal) if journal is not None else None
        observers = [o for o in self.engine.observers if o is not old_observer]
        self.engine.observers = observers + ([observer] if observer is not None else [])
        self._journal, self._journal_observer = journal, observer
        if old is not None:
            old.close()
        if journal is not None:
            threading.Thread(
                target=self._prepare_journal, args=(journal,), name="qmagic-journal", daemon=True
            ).start()

    @staticmethod
    def _prepare_journal(journal: Journal) -> None:
        """Mark tasks of dead kernels as failed and index the journal (in the background)."""
        from .errors import StateFileError

        try:
            count = journal.mark_orphans()
            if count:
                log.warning(
                    "qmagic: %d task(s) were queued or running when their kernel stopped; "
                    "they are recorded as failed (see %%tasks --history).",
                    count,
                )
            journal.load()
        except (StateFileError, OSError) as exc:
            log.warning("qmagic: the task journal could not be read: %s", exc)

    def _load_permissions(self):
        from .permissions import Permissions

        if self.user_group_permissions:  # {} and None both mean "not set"
            return Permissions(self.user_group_permissions)
        if self.user_group_permissions_file:
            return Permissions.from_file(self.user_group_permissions_file)
        return Permissions(None)

    def _make_lock_store(self):
        from .locks import LockStore, default_state_dir

        return LockStore(
            self.state_dir or default_state_dir(),
            self.environment_name,
            emergency_key=self.emergency_lock_key,
        )

    # =====================================================================================
    # shared rules
    # =====================================================================================
    def _who(self, user: Any, user_group: Any) -> tuple[str, str]:
        """Defaults for None; the protocol's errors for empty or non-string values."""
        user = self.default_user if user is None else user
        user_group = self.default_user_group if user_group is None else user_group
        if not isinstance(user, str) or not user:
            raise RequestRefused("Error: Incorrect request format: user name is not specified")
        if not isinstance(user_group, str) or not user_group:
            raise RequestRefused("Error: Incorrect request format: user group is not specified")
        return user, user_group

    def _key(self, lock_key: Any, origin: str) -> Any:
        """The remembered key stands in for a missing one, except for remote callers."""
        if lock_key is None and origin != "remote":
            return self._remembered_key
        return lock_key

    def _check_lock(self, lock_key: Any, origin: str, scope: str = "environment") -> None:
        """Raise LockRefused unless ``scope`` is unlocked or the key opens it."""
        self._check_origin(origin)
        self._locks.check(self._key(lock_key, origin), scope)

    def _lock_refusal(self, lock_key: Any, origin: str, scope: str = "environment") -> dict | None:
        """The protocol's failure reply when the lock refuses the call, else None."""
        try:
            self._check_lock(lock_key, origin, scope)
        except RequestRefused as exc:
            return {"success": False, "msg": str(exc)}
        return None

    def _check_origin(self, origin: str) -> None:
        if origin not in ORIGINS:
            raise ValueError(f"origin must be one of {ORIGINS}, got {origin!r}.")

    # =====================================================================================
    # starting tasks
    # =====================================================================================
    def submit(
        self,
        target: str | Callable[..., Any],
        args: Iterable[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        background: bool = True,
        user: str | None = None,
        user_group: str | None = None,
        lock_key: str | None = None,
        strict_json: bool = False,
        origin: str = "python",
    ) -> Task:
        """Start ``target(*args, **kwargs)`` as a tracked task and return its :class:`Task`.

        ``target`` is a namespace name (resolved when the task starts) or a callable (its
        ``__name__`` is checked against the permissions).  ``background=True`` runs it on a
        worker thread; ``False`` runs it in the foreground (inline when called on the
        foreground owner thread, i.e. a cell; otherwise handed to it).  Refusals raise
        :class:`qmagic.RequestRefused` (or its subclasses for locks and permissions) and
        change nothing.
        """
        if isinstance(target, str):
            name, func = target, None
        elif callable(target):
            name, func = getattr(target, "__name__", type(target).__name__), target
        else:
            raise TypeError(
                f"submit() needs a namespace function name or a callable, got {target!r}."
            )
        if not isinstance(args, (list, tuple)):
            args = tuple(args)
        if kwargs is not None and not isinstance(kwargs, Mapping):
            raise TypeError(f"kwargs must be a dict, got {type(kwargs).__name__}.")
        return self._start_function(
            name, func, tuple(args), dict(kwargs or {}), background, user, user_group,
            lock_key, strict_json, origin,
        )

    def _start_function(
        self, name, func, args, kwargs, background, user, user_group, lock_key, strict_json, origin
    ) -> Task:
        user, user_group = self._who(user, user_group)
        self._check_lock(lock_key, origin)
        self._permissions.check(name, user, user_group)

        def call() -> Any:
            # Checked again when the task starts: the rules or the namespace may have changed.
            self._permissions.check(name, user, user_group)
            target = func if func is not None else self._resolve(name)
            return target(*args, **kwargs)

        task = self.engine.new_task(
            call,
            name=name,
            args=args,
            kwargs=kwargs,
            user=user,
            user_group=user_group,
            background=bool(background),
            origin=origin,
            kind="function",
            strict_json=strict_json,
        )
        return self.engine.start(task)

    def _resolve(self, name: str) -> Callable[..., Any]:
        try:
            target = self.namespace[name]
        except KeyError:
            raise NameError(
                f"Function '{name}' is not defined in the worker namespace. Define it in the "
                "kernel (or upload a script that does), then start the task again."
            ) from None
        if not callable(target):
            raise TypeError(
                f"'{name}' in the worker namespace is a {type(target).__name__}, not a function."
            )
        return target

    def function_execute(
        self,
        item: Mapping[str, Any],
        *,
        run_in_background: bool = False,
        user: str | None = None,
        user_group: str | None = None,
        lock_key: str | None = None,
        strict_json: bool = False,
        origin: str = "python",
    ) -> dict[str, Any]:
        """Start the function named in ``item`` ({"name", "args", "kwargs"}); queueserver reply.

        Returns ``{"success", "msg", "item", "task_uid"}``; on success ``item`` carries the
        user, group and ``item_uid`` (equal to ``task_uid``).  ``strict_json=True`` (set by
        the remote channel) fails tasks whose result JSON cannot encode, as queueserver does.
        """
        try:
            name, args, kwargs = self._parse_item(item)
            task = self._start_function(
                name, None, args, kwargs, run_in_background, user, user_group, lock_key,
                strict_json, origin,
            )
        except RequestRefused as exc:
            return {"success": False, "msg": str(exc), "item": item, "task_uid": None}
        reply_item = {
            "name": task.name,
            "args": list(task.args),
            "kwargs": dict(task.kwargs),
            "user": task.user,
            "user_group": task.user_group,
            "item_uid": task.uid,
        }
        if isinstance(item, Mapping) and "item_type" in item:
            reply_item["item_type"] = item["item_type"]
        return {"success": True, "msg": "", "item": reply_item, "task_uid": task.uid}

    @staticmethod
    def _parse_item(item: Any) -> tuple[str, tuple, dict]:
        bad = "Error: Incorrect request format: "
        if not isinstance(item, Mapping):
            raise RequestRefused(
                bad + f"'item' must be a dict like {{'name': 'f', 'args': [], 'kwargs': {{}}}}, "
                f"got {type(item).__name__}"
            )
        item_type = item.get("item_type", "function")
        if item_type != "function":
            raise RequestRefused(
                bad + f"item type {item_type!r} is not supported: only 'function' items can be executed"
            )
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise RequestRefused(bad + "function name is not specified ('name' must be a non-empty string)")
        args = item.get("args") or []
        kwargs = item.get("kwargs") or {}
        if not isinstance(args, (list, tuple)):
            raise RequestRefused(bad + f"'args' must be a list, got {type(args).__name__}")
        if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
            raise RequestRefused(bad + "'kwargs' must be a dict with string keys")
        return name, tuple(args), dict(kwargs)

    # -------------------------------------------------------------------------------------
    def script_upload(
        self,
        script: str,
        *,
        update_lists: bool = True,
        update_re: bool = False,
        run_in_background: bool = False,
        lock_key: str | None = None,
        user: str | None = None,
        user_group: str | None = None,
        origin: str = "python",
    ) -> dict[str, Any]:
        """Run ``script`` in the namespace as a task; queueserver reply ``{"success", "msg", "task_uid"}``.

        Unlike queueserver, a script that raises leaves the namespace exactly as it was
        (every name it added, changed or removed is restored; objects it mutated in place
        cannot be restored).  On success ``task.namespace_changes`` lists the names added,
        changed and removed, and (``update_lists``) the function catalog is refreshed.
        ``update_re`` is accepted for compatibility; there is no Run Engine to update.
        """
        try:
            task = self.start_script(
                script,
                update_lists=update_lists,
                background=run_in_background,
                lock_key=lock_key,
                user=user,
                user_group=user_group,
                origin=origin,
            )
        except RequestRefused as exc:
            return {"success": False, "msg": str(exc), "task_uid": None}
        return {"success": True, "msg": "", "task_uid": task.uid}

    def start_script(
        self,
        script: str,
        *,
        update_lists: bool = True,
        background: bool = False,
        lock_key: str | None = None,
        user: str | None = None,
        user_group: str | None = None,
        origin: str = "python",
    ) -> Task:
        """Like :meth:`script_upload` but returns the :class:`Task` (raises on refusal)."""
        if not isinstance(script, str):
            raise RequestRefused("Error: Required 'script' parameter is is missing in API call.")
        user, user_group = self._who(user, user_group)
        self._check_lock(lock_key, origin)
        holder: dict[str, Task] = {}

        def call() -> None:
            task = holder["task"]
            task.namespace_changes = self._exec_script(script, task.uid)
            if update_lists:
                self.refresh_catalog()
            return None

        task = self.engine.new_task(
            call,
            name="<script>",
            user=user,
            user_group=user_group,
            background=bool(background),
            origin=origin,
            kind="script",
        )
        holder["task"] = task
        return self.engine.start(task)

    def _exec_script(self, script: str, uid: str) -> dict[str, list[str]]:
        filename = f"<qmagic script {uid[:8]}>"
        linecache.cache[filename] = (len(script), None, script.splitlines(True), filename)
        ns = self.namespace
        with self._ns_lock:
            before = dict(ns)
            try:
                exec(compile(script, filename, "exec"), ns)  # noqa: S102 - the purpose
            except BaseException:
                for name in [k for k in ns if k not in before]:
                    del ns[name]
                for name, value in before.items():
                    if ns.get(name, _MISSING) is not value:
                        ns[name] = value
                raise
            added = sorted(k for k in ns if k not in before and k != "__builtins__")
            removed = sorted(k for k in before if k not in ns)
            changed = sorted(k for k in before if k in ns and ns[k] is not before[k])
        return {"added": added, "changed": changed, "removed": removed}

    # =====================================================================================
    # looking at tasks
    # =====================================================================================
    def get_task(self, uid_or_prefix: str) -> Task:
        """The :class:`Task` with this uid or unique uid prefix (>= 4 characters).

        Raises :class:`qmagic.TaskNotFound` (a KeyError) for unknown, ambiguous or
        expired uids.
        """
        return self.engine.find(uid_or_prefix)

    def tasks(self, status: str | TaskStatus | Iterable[str | TaskStatus] | None = None) -> list[Task]:
        """Tasks in memory, oldest first; ``status`` filters by one status or several."""
        items = self.engine.tasks()
        if status is None:
            return items
        wanted = {TaskStatus(status)} if isinstance(status, str) else {TaskStatus(s) for s in status}
        return [t for t in items if t.status in wanted]

    @property
    def last_task(self) -> Task | None:
        """The most recently started task still in memory (None if none)."""
        return self.engine.last_task

    def task_status(self, task_uid: str | list[str]) -> dict[str, Any]:
        """queueserver reply ``{"success", "msg", "task_uid", "status"}``.

        ``status`` is "running" (queued or running), "completed" (any finished status) or
        "not_found"; a ``{uid: status}`` dict when ``task_uid`` is a list.
        """
        if isinstance(task_uid, str):
            return {"success": True, "msg": "", "task_uid": task_uid, "status": self._wire_status(task_uid)}
        if isinstance(task_uid, (list, tuple)) and all(isinstance(u, str) for u in task_uid):
            status = {uid: self._wire_status(uid) for uid in task_uid}
            return {"success": True, "msg": "", "task_uid": list(task_uid), "status": status}
        return {
            "success": False,
            "msg": f"Error: Incorrect request format: 'task_uid' must be a string or a list of "
            f"strings, got {type(task_uid).__name__}",
            "task_uid": task_uid,
            "status": None,
        }

    def _wire_status(self, uid: str) -> str:
        try:
            return self.get_task(uid).status.wire
        except TaskNotFound:
            record = self.journal_record(uid)
            return "not_found" if record is None else TaskStatus(record["status"]).wire

    def journal_record(self, uid: str) -> dict[str, Any] | None:
        """The journal's record of a task, also of earlier kernels: by uid, or by a unique
        uid prefix of at least 4 characters.

        None when the journal is off, unreadable, or does not know the uid (or the prefix
        is ambiguous).  Tasks that were queued or running when their kernel died read as
        failed with the reason "kernel stopped while the task was running".
        """
        from .engine import MIN_UID_PREFIX
        from .errors import StateFileError

        if self._journal is None or not isinstance(uid, str) or not uid:
            return None
        try:
            record = self._journal.get(uid)
            if record is None and len(uid) >= MIN_UID_PREFIX:
                matches = self._journal.records(uid=uid, limit=2)
                record = matches[0] if len(matches) == 1 else None
            return record
        except StateFileError as exc:
            log.warning("qmagic: the task journal could not be read: %s", exc)
            return None

    def history(self, **filters: Any) -> list[dict[str, Any]]:
        """Records of past and present tasks from the journal, newest first.

        Filters: ``status`` (one or several), ``user``, ``name`` (exact or glob),
        ``since`` / ``until`` (epoch, datetime, ISO text, or "-2h"/"-7d"), ``uid`` (a prefix),
        ``limit``.  Raises RuntimeError when the journal is off.
        """
        if self._journal is None:
            raise RuntimeError(
                "The task journal is off (QMagic.journal_enabled = False): turn it on to keep "
                "an experiment log."
            )
        return self._journal.records(**filters)

    def task_result(self, task_uid: str) -> dict[str, Any]:
        """queueserver reply ``{"success", "msg", "task_uid", "status", "result"}``.

        A finished task's ``result`` holds success, msg, traceback, return_value (when JSON
        can encode it; otherwise the msg says the value stays in the kernel), time_start and
        time_stop.
        """
        if not isinstance(task_uid, str):
            return {
                "success": False,
                "msg": f"Error: Incorrect request format: 'task_uid' must be a string, "
                f"got {type(task_uid).__name__}",
                "task_uid": task_uid,
                "status": None,
                "result": None,
            }
        try:
            task = self.get_task(task_uid)
        except TaskNotFound:
            record = self.journal_record(task_uid)
            if record is None:
                return {"success": True, "msg": "", "task_uid": task_uid, "status": "not_found", "result": {}}
            status = TaskStatus(record["status"])
            return {
                "success": True,
                "msg": "",
                "task_uid": task_uid,
                "status": status.wire,
                "result": self._journal_result_dict(record, status),
            }
        return {
            "success": True,
            "msg": "",
            "task_uid": task.uid,
            "status": task.status.wire,
            "result": self._result_dict(task),
        }

    def _result_dict(self, task: Task) -> dict[str, Any]:
        time_start = task.started_at if task.started_at is not None else task.submitted_at
        if not task.done():
            return {"task_uid": task.uid, "time_start": time_start, "run_in_background": task.background}
        success, msg, value = True, "", None
        if task.status is TaskStatus.COMPLETED:
            value = task._result
            if task.kind == "script":
                value = None
            else:
                ok, why = task._json_checked or _json_ok(value)
                task._json_checked = (ok, why)
                if not ok:
                    value = None
                    msg = (
                        f"The result can not be serialized as JSON ({why}); it stays in the kernel: "
                        f"get_worker().get_task('{task.uid}').result()"
                    )
        else:
            success = False
            if task.status is TaskStatus.CANCELLED:
                exc = task._exception
                why = task._cancel_reason or "Task was cancelled"
                if why == "KeyboardInterrupt" or isinstance(exc, KeyboardInterrupt):
                    why = "Task was interrupted (KeyboardInterrupt)"
            else:
                why = str(task._exception) or type(task._exception).__name__
            msg = f"Error occurred while executing '{_KIND_TEXT[task.kind]}': {why}"
        return {
            "task_uid": task.uid,
            "success": success,
            "msg": msg,
            "traceback": task.traceback or "",
            "return_value": value,
            "time_start": time_start,
            "time_stop": task.finished_at,
        }

    @staticmethod
    def _journal_result_dict(record: dict[str, Any], status: TaskStatus) -> dict[str, Any]:
        """task_result's ``result`` for a task known only from the journal."""
        from .journal import SUMMARY_KEY

        time_start = record.get("started_at") or record.get("submitted_at")
        if not status.finished:  # another live kernel's task
            return {
                "task_uid": record["uid"],
                "time_start": time_start,
                "run_in_background": bool(record.get("background")),
            }
        kind = _KIND_TEXT.get(record.get("kind", "function"), "Execute function")
        success, msg, value = status is TaskStatus.COMPLETED, "", None
        if success:
            value = record.get("result")
            if record.get("kind") == "script":
                value = None
            elif isinstance(value, dict) and SUMMARY_KEY in value:
                value = None
                msg = (
                    "The result could not be kept in full: the journal holds only a summary "
                    "of it (see qmagic.history())."
                )
        else:
            msg = f"Error occurred while executing '{kind}': {record.get('error') or status.value}"
        return {
            "task_uid": record["uid"],
            "success": success,
            "msg": msg,
            "traceback": record.get("traceback") or "",
            "return_value": value,
            "time_start": time_start,
            "time_stop": record.get("finished_at"),
        }

    # =====================================================================================
    # cancelling
    # =====================================================================================
    def task_cancel(
        self, task_uid: str, *, force: bool = False, lock_key: str | None = None, origin: str = "python"
    ) -> dict[str, Any]:
        """Cancel one task; reply ``{"success", "msg", "task_uid", "status"}``.

        Cooperative first; ``force=True`` raises ``TaskCancelled`` in the task's thread
        after ``cancel_grace_s`` (see :meth:`qmagic.Task.cancel`).  Environment-lockable.
        """
        try:
            self._check_lock(lock_key, origin)
            task = self.get_task(task_uid)
        except (RequestRefused, TaskNotFound) as exc:
            return {"success": False, "msg": str(exc), "task_uid": task_uid, "status": None}
        if not self.engine.cancel_task(task, force=force, reason=f"Task was cancelled ({origin})"):
            return {
                "success": False,
                "msg": f"Task {task.uid} ({task.name}) has already finished "
                f"({task.status.value}); there is nothing to cancel.",
                "task_uid": task.uid,
                "status": task.status.value,
            }
        return {"success": True, "msg": "", "task_uid": task.uid, "status": task.status.value}

    def cancel_all(
        self, *, force: bool = False, lock_key: str | None = None, origin: str = "python"
    ) -> list[Task]:
        """Cancel every queued and running task; returns the tasks asked to stop."""
        self._check_lock(lock_key, origin)
        active = [t for t in self.engine.tasks() if not t.done()]
        reason = f"Task was cancelled ({origin}, cancel all)"
        return [t for t in active if self.engine.cancel_task(t, force=force, reason=reason)]

    # =====================================================================================
    # events
    # =====================================================================================
    def subscribe(self, callback: Callable[..., Any]) -> Subscription:
        """Receive events of every task as ``callback(**kwargs)``.

        Keywords: ``task_uid`` always, plus one of ``status`` (str), ``progress``
        (:class:`qmagic.Progress`), ``result`` (the return value) or ``error`` (the
        exception).  Per task: queued, running, progress..., result or error, final status.
        Callbacks run on one dispatcher thread; one that raises is logged and ignored.
        A callback without ``**kwargs`` is refused with ValueError.
        """
        return self.engine.bus.subscribe(callback)

    # =====================================================================================
    # namespace catalog and permissions
    # =====================================================================================
    def refresh_catalog(self) -> dict[str, dict[str, str]]:
        """Rebuild the catalog of callables in the namespace (signature, first doc line)."""
        catalog: dict[str, dict[str, str]] = {}
        for name, obj in list(self.namespace.items()):
            if name.startswith("_") or name in self.hidden_names or not callable(obj):
                continue
            try:
                signature = str(inspect.signature(obj))
            except (TypeError, ValueError):
                signature = "(...)"
            doc = (inspect.getdoc(obj) or "").strip().splitlines()
            catalog[name] = {"signature": signature, "doc": doc[0] if doc else ""}
        with self._lock:
            if catalog != self._catalog:
                self._catalog = catalog
                self._catalog_uid = str(uuid.uuid4())
        return catalog

    def functions_available(self, user_group: str | None = None) -> dict[str, dict[str, str]]:
        """Catalog of namespace functions the group may call: {name: {signature, doc}}."""
        group = user_group or self.default_user_group
        with self._lock:
            catalog = dict(self._catalog)
        allowed = set(self._permissions.allowed_names(catalog, group))
        return {name: info for name, info in sorted(catalog.items()) if name in allowed}

    def permissions_get(self) -> dict[str, Any]:
        """queueserver reply ``{"success", "msg", "user_group_permissions"}``."""
        return {"success": True, "msg": "", "user_group_permissions": self._permissions.to_dict()}

    def permissions_set(
        self, user_group_permissions: dict, *, lock_key: str | None = None, origin: str = "python"
    ) -> dict[str, Any]:
        """Replace the permissions (queue-lockable); invalid rules change nothing."""
        from .permissions import Permissions

        try:
            self._check_lock(lock_key, origin, "queue")
            Permissions(user_group_permissions)  # validate before applying
        except (RequestRefused, ValueError) as exc:
            return {"success": False, "msg": str(exc)}
        self.user_group_permissions = user_group_permissions
        return {"success": True, "msg": ""}

    def permissions_reload(self, *, lock_key: str | None = None, origin: str = "python") -> dict[str, Any]:
        """Read the permissions again from the configuration / file (queue-lockable)."""
        try:
            self._check_lock(lock_key, origin, "queue")
            permissions = self._load_permissions()
        except (RequestRefused, ValueError, OSError) as exc:
            return {"success": False, "msg": str(exc)}
        self._permissions = permissions
        self._permissions_uid = str(uuid.uuid4())
        return {"success": True, "msg": ""}

    # =====================================================================================
    # locks
    # =====================================================================================
    def lock(
        self,
        lock_key: str | None = None,
        *,
        environment: bool = False,
        queue: bool = False,
        note: str | None = None,
        user: str | None = None,
        origin: str = "python",
    ) -> dict[str, Any]:
        """Lock the environment and/or queue with a key; queueserver reply.

        From this kernel (not remote) a missing key means the remembered key of an earlier
        lock, else :func:`qmagic.get_default_lock_key`.  The key is remembered so that this
        kernel's magics and Python calls pass it automatically.
        """
        self._check_origin(origin)
        if lock_key is None and origin != "remote":
            lock_key = self._remembered_key
            if lock_key is None:
                from .locks import get_default_lock_key

                lock_key = get_default_lock_key()
        user = self.default_user if user is None and origin != "remote" else user
        reply = self._locks.lock(lock_key, environment=environment, queue=queue, note=note, user=user)
        if reply.get("success") and origin != "remote":
            self._remembered_key = lock_key
        return reply

    def unlock(self, lock_key: str | None = None, *, origin: str = "python") -> dict[str, Any]:
        """Unlock (the lock key or the emergency key); queueserver reply."""
        self._check_origin(origin)
        key = self._key(lock_key, origin)
        reply = self._locks.unlock(key)
        if reply.get("success") and origin != "remote":
            self._remembered_key = None
        return reply

    def lock_info(self, lock_key: str | None = None, *, origin: str = "python") -> dict[str, Any]:
        """Current lock state; queueserver reply ``{"success", "msg", "lock_info", "lock_info_uid"}``."""
        self._check_origin(origin)
        return self._locks.info(lock_key)

    @property
    def remembered_lock_key(self) -> bool:
        """True when this worker holds the key of the current lock (the key is not shown)."""
        return self._remembered_key is not None

    def history_clear(self, *, lock_key: str | None = None, origin: str = "python") -> dict[str, Any]:
        """Forget finished tasks kept in memory (queue-lockable); the journal keeps them."""
        refusal = self._lock_refusal(lock_key, origin, "queue")
        if refusal is not None:
            return refusal
        self.engine.clear_finished()
        return {"success": True, "msg": ""}

    # =====================================================================================
    # the environment is the kernel itself
    # =====================================================================================
    def environment_open(self, *, lock_key: str | None = None, origin: str = "python") -> dict[str, Any]:
        """queueserver reply; the environment (this namespace) always exists (environment-lockable)."""
        refusal = self._lock_refusal(lock_key, origin)
        return refusal or {"success": False, "msg": "RE Worker environment already exists."}

    def environment_close(self, *, lock_key: str | None = None, origin: str = "python") -> dict[str, Any]:
        """queueserver reply; refused: the environment is the kernel (environment-lockable)."""
        return self._lock_refusal(lock_key, origin) or {
            "success": False,
            "msg": "The RE Worker environment is this IPython kernel: it cannot be closed "
            "remotely. Shut the kernel down (or restart it) from Jupyter instead.",
        }

    # =====================================================================================
    # interrupt and status
    # =====================================================================================
    def kernel_interrupt(
        self,
        interrupt_task: bool = False,
        interrupt_plan: bool = False,
        lock_key: str | None = None,
        *,
        origin: str = "python",
    ) -> dict[str, Any]:
        """Interrupt the foreground thread (KeyboardInterrupt); queueserver reply.

        Refused while a foreground task runs unless ``interrupt_task=True``.
        ``interrupt_plan`` is accepted for compatibility (there are no plans).
        """
        refusal = self._lock_refusal(lock_key, origin)
        if refusal is not None:
            return refusal
        if self.engine.counts()["foreground"] is not None and not interrupt_task:
            return {
                "success": False,
                "msg": "Failed to interrupt IPython kernel: Not allowed to interrupt running task",
            }
        self.interrupt_main()
        return {"success": True, "msg": ""}

    def status(self) -> dict[str, Any]:
        """The queueserver status dict (every key the client reads)."""
        counts = self.engine.counts()
        fg: Task | None = counts["foreground"]
        busy = self.engine.foreground.user_busy()
        state = "executing_task" if fg is not None else "idle"
        lock_scopes, lock_uid = self._locks.snapshot()
        key = (
            state, busy, counts["running_background"], counts["results_uid"], lock_uid,
            self._catalog_uid, self._permissions_uid,
        )
        with self._lock:
            if key != self._status_key:
                self._status_key = key
                self._status_uid = str(uuid.uuid4())
            status_uid = self._status_uid
        if fg is not None:
            kernel_state, captured = "busy", bool(counts["foreground_handed_over"])
        else:
            kernel_state, captured = ("busy" if busy else "idle"), False
        return {
            "msg": f"RE Manager v{__version__} (qmagic)",
            "time": datetime.datetime.now().isoformat(),
            "items_in_queue": 0,
            "items_in_history": counts["finished"],
            "running_item_uid": None,
            "manager_state": state,
            "queue_stop_pending": False,
            "queue_autostart_enabled": False,
            "pause_pending": False,
            "worker_environment_exists": True,
            "worker_environment_state": state,
            "worker_background_tasks": counts["running_background"],
            "re_state": None,
            "ip_kernel_state": kernel_state,
            "ip_kernel_captured": captured,
            "status_uid": status_uid,
            "run_list_uid": self._static_uid,
            "plan_queue_uid": self._static_uid,
            "plan_history_uid": self._static_uid,
            "devices_existing_uid": self._static_uid,
            "plans_existing_uid": self._catalog_uid,
            "devices_allowed_uid": self._static_uid,
            "plans_allowed_uid": self._permissions_uid,
            "task_results_uid": counts["results_uid"],
            "lock_info_uid": lock_uid,
            "plan_queue_mode": {"loop": False, "ignore_failures": False},
            "lock": {"environment": bool(lock_scopes["environment"]), "queue": bool(lock_scopes["queue"])},
        }

    # =====================================================================================
    def close(self, timeout: float = 5.0) -> None:
        """Stop every task and thread of this worker (queued tasks are cancelled) and close
        the journal (every task's end is recorded first)."""
        self.engine.close(timeout)
        if self._journal is not None:
            self._journal.close()

    def __repr__(self) -> str:
        counts = self.engine.counts()
        return (
            f"<qmagic.Worker: {counts['running_background']} background running, "
            f"{counts['queued_background']} queued, foreground "
            f"{'busy' if counts['foreground'] else 'idle'}>"
        )
