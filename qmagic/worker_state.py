"""The worker's shared state: permissions, the lock store (opened and replaced here; its
rules are :mod:`qmagic.worker_locks`), settings that follow the traits, closing the worker,
and whether the environment is open (the experiment log's part:
:class:`qmagic.worker_log.LogMixin`).  A mix-in of :class:`qmagic.Worker` (the rules live
in one class; this module keeps worker.py to one screenful per job).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
import uuid
from typing import Any, Callable, ContextManager, Iterator, Mapping

from traitlets import observe

from .config import closest_setting, no_such_setting
from .core.engine import CLOSED_HINT, MSG_CLOSED
from .core.foreground import interrupts_held
from .core.permissions import Permissions
from .core.task import Task
from .errors import (
    PermissionRefused,
    PermissionsFormatError,
    RequestRefused,
    one_line,
)
from .store.paths import default_state_dir
from .texts import printable
from .tracebacks import is_internal_frame
from .worker_log import LogMixin, LogObserver

__all__ = ["StateMixin", "MSG_ENV_CLOSED", "MSG_ENV_STARTING", "MSG_EXITING", "MSG_WORKER_CLOSED"]

log = logging.getLogger("qmagic")

#: queueserver's text when a remote request needs the environment and it is closed.
MSG_ENV_CLOSED = "RE Worker environment is not open"
#: Why, while the kernel still runs its start-up code (after :data:`MSG_ENV_CLOSED`).
MSG_ENV_STARTING = (
    "the kernel is still starting (running its start-up code); ask again once status says "
    "manager_state 'idle'"
)
#: What requests refused while the kernel shuts down or restarts say (its exit closed the worker).
MSG_EXITING = "the kernel is shutting down (or restarting); ask again once it is back"
#: What every door says once the worker itself was closed (``worker.close()``).
MSG_WORKER_CLOSED = f"The qmagic worker was closed: no task starts; {CLOSED_HINT}."


def default_group_problem(group: str, known: list[str]) -> str | None:
    """What is wrong when ``QMagic.default_user_group`` (``group``) is none of the groups of
    the rules in force (``known``): every request that names no group is then refused; and
    what to do.  None when it is one of them."""
    if group in known:
        return None
    listed = ", ".join(printable(g, 40) for g in known[:6]) + (f" and {len(known) - 6} more" if len(known) > 6
                                                               else "")
    return (f"(the group of requests that name none) is not a group of the permission rules ({listed}): "
            f"set it to one of them, or add '{printable(group, 100)}' to the rules")


def _refuse_misspelt_setting(worker: Any, name: str) -> None:
    """AttributeError in one line for a new public attribute of ``worker`` whose name is close
    to a setting's (``w.max_background_task = 8`` would do nothing)."""
    if not name.startswith("_") and name not in worker.__dict__ and not hasattr(type(worker), name):
        meant = closest_setting(name, 0.8)
        if meant is not None:
            raise one_line(AttributeError(no_such_setting(type(worker).__name__, name, meant)))


class StateMixin(LogMixin):
    """Permissions, the lock store, settings and environment state of a worker (with the
    experiment log of :class:`~qmagic.worker_log.LogMixin`)."""

    def __setattr__(self, name: str, value: Any) -> None:
        """A setting refused in a cell's own line (``w.state_dir = "/no/such"``, ``w.max_background_tasks
        = 0``) shows as the one line that says why, not traitlets' and qmagic's frames; set
        in a function, the usual traceback shows where.  A new name like a setting's is refused."""
        _refuse_misspelt_setting(self, name)
        try:
            super().__setattr__(name, value)
        except Exception as exc:
            caller = sys._getframe(1).f_code
            if caller.co_name == "<module>" and not is_internal_frame(caller.co_filename) and self.has_trait(name):
                raise one_line(exc) from None
            raise

    # -- set up and tear down ------------------------------------------------------------------
    def _init_state(self) -> None:
        self._state_lock = threading.RLock()
        self._permissions = self._load_permissions()
        self.permissions_uid = str(uuid.uuid4())
        self._locks = self._open_locks()
        self._journal: Any = None
        self._closed_log: Any = None  # the log close() closed: lookups and history read it still
        self._log_observer: LogObserver | None = None
        self._draining: set[LogObserver] = set()  # logs switched off, closing once their tasks end
        self._swap_log(self._new_log())
        self._environment_open = bool(self.environment_open_on_load)
        self._exiting = False  # (closed by the kernel's exit: see close)
        self.environment_uid = str(uuid.uuid4())
        #: For queueserver uids of things a kernel does not have (plan queue, plan history).
        self.static_uid = str(uuid.uuid4())
        self._default_group_warned: tuple | None = None
        self._warn_default_group()  # (every trait of the configuration is set by now, in any order)

    def close(self, timeout: float = 5.0, *, reason: str | None = None, log_timeout: float | None = None,
              exiting: bool = False) -> None:
        """Stop every task and thread within ``timeout`` seconds (queued ones cancelled; ``reason``: the cancel
        reason), then close the experiment log (every task's end recorded first; ``log_timeout``: the most seconds
        it waits to store what is pending; what is left is stored by the next process that opens the log) and the
        lock.  From then on :attr:`closed` is True.  Refused (:class:`qmagic.RequestRefused`) inside one of its own
        tasks: it would wait for itself.  ``exiting``: the kernel is shutting down or restarting;
        requests refused from then on say so (:data:`MSG_EXITING`), not to load qmagic again."""
        self._exiting = exiting
        self.engine.close(timeout, *(() if reason is None else (reason,)))
        self._close_state(log_timeout)

    def _close_state(self, log_timeout: float | None = None) -> None:
        with self._state_lock:
            journal, self._journal = self._journal, None
            if journal is not None:  # (a closed Journal reads the database)
                self._closed_log = journal
            draining, self._draining = list(self._draining), set()
            locks = self._locks
        deadline = None if log_timeout is None else time.monotonic() + log_timeout
        if journal is not None:
            journal.close(log_timeout)
        for observer in draining:  # (logs switched off while tasks ran: the time that is left)
            observer.close(None if deadline is None else max(0.0, deadline - time.monotonic()))
        locks.close()

    def _state_dir(self) -> Any:
        return self.state_dir or default_state_dir()

    def _open_locks(self) -> Any:
        """The lock store for the current settings (an unset emergency key: the store reads
        the environment variables)."""
        from .store.keys import Throttle
        from .store.locks import LockStore

        return LockStore(
            self._state_dir(), self.environment_name, emergency_key=self.emergency_lock_key,
            throttle=Throttle(self.lock_wrong_keys_allowed,  # (the first wait is a wait too)
                              min(self.lock_backoff_s, self.lock_backoff_max_s), self.lock_backoff_max_s),
            recheck_s=self.lock_recheck_s,
        )

    # -- settings follow the traits ---------------------------------------------------------------
    # Each change builds the new objects first, then swaps them in within ``commit()``; if
    # anything before the swap fails, the setting goes back to its old value (the error
    # propagates): never a trait that says one thing while the worker does another.  ■ is
    # held during the swap (a few statements, no wait) and delivered right after it: the
    # change then stands.
    def _apply_setting(self, change: Mapping[str, Any],
                       apply: Callable[[Callable[[], ContextManager[None]]], None]) -> None:
        try:  # (first: ■ on any line of this method reverts the setting, up to the swap)
            if getattr(self, "_locks", None) is None or self.__dict__.get("_reverting"):
                return
            committed: list[bool] = []

            @contextlib.contextmanager
            def commit() -> Iterator[None]:
                with interrupts_held() as held:
                    yield
                    committed.append(True)
                if held:
                    raise KeyboardInterrupt

            apply(commit)
        except BaseException:
            if not locals().get("committed"):  # (unbound: ■ came before it was)
                self._reverting = True
                try:
                    self.set_trait(change["name"], change["old"])
                finally:
                    self._reverting = False
            raise

    @observe("user_group_permissions", "user_group_permissions_file", "permissions_match_timeout")
    def _permissions_setting(self, change: Mapping[str, Any]) -> None:
        def apply(commit: Callable[[], ContextManager[None]]) -> None:
            rules = self._load_permissions()
            with commit():
                self._set_rules(rules)

        self._apply_setting(change, apply)

    @observe("state_dir", "environment_name", "emergency_lock_key", "lock_wrong_keys_allowed",
             "lock_backoff_s", "lock_backoff_max_s", "lock_recheck_s")
    def _lock_setting(self, change: Mapping[str, Any]) -> None:
        moves_log = change["name"] in ("state_dir", "environment_name")

        def apply(commit: Callable[[], ContextManager[None]]) -> None:
            self._check_not_closed(task=False)  # (no new lock store, nor log: the setting goes back)
            new = self._open_locks()
            observer = old = None
            try:  # (the log's wait, the old log storing what it holds, comes before any swap)
                observer = self._new_log() if moves_log else None
                with commit():
                    if moves_log:
                        self._swap_log(observer)
                    with self._state_lock:
                        old, self._locks = self._locks, new
            except BaseException:
                if old is None:  # (not swapped in: nothing of it stays)
                    new.close()
                    if observer is not None:
                        observer.journal.close()
                raise
            finally:
                if old is not None:
                    old.close()

        self._apply_setting(change, apply)

    # -- permissions -------------------------------------------------------------------------------
    def _load_permissions(self, *, file_first: bool = False) -> Permissions:
        """The configured rules: the dict trait, else the YAML file, else the defaults
        (``file_first``: the file wins, as queueserver's permissions_reload reads it)."""
        timeout = self.permissions_match_timeout
        if self.user_group_permissions_file and (file_first or not self.user_group_permissions):
            return Permissions.from_file(self.user_group_permissions_file, match_timeout=timeout)
        return Permissions(self.user_group_permissions or None, match_timeout=timeout)

    def _set_rules(self, rules: Permissions) -> None:
        with self._state_lock:  # (one writer at a time: rules and uid always change together)
            self._permissions = rules
            self.permissions_uid = str(uuid.uuid4())
        self._warn_default_group()

    # -- the default group and the rules: one line when they disagree ------------------------------
    @observe("default_user_group")
    def _default_group_setting(self, change: Mapping[str, Any]) -> None:
        if "_default_group_warned" in self.__dict__:  # (set up: the rules are there)
            self._warn_default_group()

    def _warn_default_group(self) -> None:
        """One warning when the setting or the rules change so that they disagree (not again
        while the same setting and the same groups stand)."""
        problem = default_group_problem(self.default_user_group, self._permissions.groups())
        seen = None if problem is None else (self.default_user_group, tuple(self._permissions.groups()))
        if seen is not None and seen != self._default_group_warned:
            log.warning("qmagic: QMagic.default_user_group '%s' %s; until then every request that names no "
                        "group is refused.", printable(self.default_user_group, 100), problem)
        self._default_group_warned = seen

    def _check_group(self, group: str, defaulted: bool) -> None:
        """A request's group must be one of the rules' (queueserver's refusal); a group that
        came from ``QMagic.default_user_group`` names that setting and what to do."""
        problem = (default_group_problem(group, self._permissions.groups())
                   if defaulted and group == self.default_user_group else None)
        if problem is not None:
            raise PermissionRefused(f"Error: Unknown user group: '{printable(group, 100)}': QMagic.default_user_group "
                                    f"{problem}.")
        self._permissions.check_group(group)

    @property
    def permissions(self) -> Permissions:
        """The permission rules in force (immutable; replace them with :meth:`set_permissions`)."""
        return self._permissions

    def set_permissions(self, rules: dict, *, lock_key: str | None = None, origin: str = "python",
                        client: str | None = None) -> Permissions:
        """Replace the permission rules (queue-lockable); invalid rules change nothing.
        ``rules`` must be a dict (None is refused: :meth:`reload_permissions` goes back to
        the configured rules)."""
        self.check_lock(lock_key, "queue", origin=origin, client=client)
        if not isinstance(rules, dict):  # (Permissions(None) means the defaults: never silently)
            hint = (": to read the rules from a file, set QMagic.user_group_permissions_file and call "
                    "reload_permissions()" if isinstance(rules, (str, os.PathLike)) and origin == "python" else "")
            raise PermissionsFormatError(f"User group permissions: Invalid type '{type(rules)}', "
                                         f"must be 'dict'{hint}")  # (queueserver's text, remotely)
        new = Permissions(rules, match_timeout=self.permissions_match_timeout)  # validates first
        if new.to_dict() != self._permissions.to_dict():  # the same rules change nothing
            self._set_rules(new)
        return self._permissions

    def reload_permissions(self, *, restore: bool = True, lock_key: str | None = None,
                           origin: str = "python", client: str | None = None) -> Permissions:
        """Read the rules again from the configuration (the YAML file, if one is set),
        replacing rules set with :meth:`set_permissions`; ``restore=False`` keeps the rules
        in force (queueserver's ``restore_permissions``).  Queue-lockable."""
        self.check_lock(lock_key, "queue", origin=origin, client=client)
        self._set_rules(self._load_permissions(file_first=True) if restore else self._permissions)
        return self._permissions

    # -- the environment -----------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran (``qmagic.get_worker().close()``, or qmagic unloaded): every door
        refuses new tasks and scripts in one line; the tasks in memory and the log stay readable."""
        return self.engine.closed

    @property
    def environment_is_open(self) -> bool:
        """False after environment_close/destroy, once the worker is :attr:`closed`, and
        while :attr:`environment_starting`: remote tasks and scripts are refused."""
        return self._environment_open and not self.engine.closed and not self.engine.foreground.starting()

    @property
    def environment_starting(self) -> bool:
        """True while the kernel runs its start-up code (startup files, ``exec_lines``) with
        the environment set to open: it opens for remote requests once the kernel is ready, as
        an RE Manager's once its worker's start-up code ran (``creating_environment``)."""
        return self._environment_open and not self.engine.closed and self.engine.foreground.starting()

    def _check_not_closed(self, *, task: bool = True) -> None:
        """The first check of every request that starts a task (before keys and permissions:
        a key given would not help), changes the lock, opens the environment, or changes a
        setting that opens the lock store or the log: a closed worker starts and changes
        nothing, and opens no file again (a new worker may own its state folder).  ``task``
        False: said as :data:`MSG_WORKER_CLOSED` (for what starts no task)."""
        if self.engine.closed:
            exiting = f"Error: Failed to start the task: {MSG_EXITING}." if task else f"The {MSG_EXITING[4:]}."
            raise RequestRefused(exiting if self._exiting else MSG_CLOSED if task else MSG_WORKER_CLOSED)

    def _check_open(self, origin: str, refusal: str = MSG_ENV_CLOSED) -> None:
        """The environment rule: a remote request needs it open (``refusal`` otherwise)."""
        if origin == "remote" and not self.environment_is_open:
            raise RequestRefused(f"{refusal}: {MSG_ENV_STARTING}" if self.environment_starting else refusal)

    def environment_open(self, *, lock_key: str | None = None, origin: str = "python",
                         client: str | None = None) -> None:
        """Open the environment for remote tasks (``QMagic.environment_open_on_load``)."""
        self.check_lock(lock_key, origin=origin, client=client)
        self._check_not_closed(task=False)  # (its threads are gone: only a new worker runs tasks)
        with self._state_lock:  # (checked and changed at once: two doors never both succeed)
            if self.environment_starting:
                raise RequestRefused("Manager is already in the process of creating the RE Worker environment.")
            if self._environment_open:
                raise RequestRefused("RE Worker environment already exists.")
            self._environment_open = True
            self.environment_uid = str(uuid.uuid4())

    def environment_close(self, *, lock_key: str | None = None, origin: str = "python",
                          client: str | None = None) -> None:
        """Close the environment: remote tasks and scripts are refused until it is opened
        again; running remote background tasks are asked to stop.  The notebook, its
        namespace and its own tasks are untouched (the kernel is the user's)."""
        self.check_lock(lock_key, origin=origin, client=client)
        with self._state_lock:
            if not self.environment_is_open:
                raise RequestRefused("RE Worker environment does not exist.")
            if self.engine.counts()["foreground"] is not None:
                raise RequestRefused("Foreground task execution is in progress.")
            if self.engine.foreground.user_busy():
                raise RequestRefused("Worker IPython kernel is busy")
            self._environment_open = False
            self.environment_uid = str(uuid.uuid4())
        for task in self.engine.tasks():
            if task.origin == "remote" and not task.done():
                self.engine.cancel(task, reason="Task was cancelled: the environment was closed")

    def environment_destroy(self, *, lock_key: str | None = None, origin: str = "python",
                            client: str | None = None) -> list[Task]:
        """Stop every task — cancelled and forced after the grace time; a foreground task is
        interrupted like ■ — then close the environment."""
        self.check_lock(lock_key, origin=origin, client=client)
        with self._state_lock:
            if not self.environment_is_open:
                raise RequestRefused("RE environment does not exist")
            self._environment_open = False
            self.environment_uid = str(uuid.uuid4())
        if self.engine.counts()["foreground"] is not None:
            self.engine.interrupt_foreground()
        reason = "Task was cancelled: the environment was destroyed"
        return [t for t in self.engine.tasks()
                if not t.done() and self.engine.cancel(t, force=True, reason=reason)]
