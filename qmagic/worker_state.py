"""The worker's shared state: permissions, the lock store (opened and replaced here; its
rules are :mod:`qmagic.worker_locks`), the experiment log, and whether the environment is
open.  A mix-in of :class:`qmagic.Worker` (the rules live in one class; this module keeps
worker.py to one screenful per job).
"""

from __future__ import annotations

import contextlib
import logging
import platform
import threading
import uuid
from typing import Any, Callable, ContextManager, Iterator, Mapping

from traitlets import HasTraits, observe

from . import format as fmt
from .core.foreground import interrupts_held
from .core.permissions import Permissions
from .core.task import Task
from .errors import (
    LOG_OFF,
    LogUnavailable,
    PermissionsFormatError,
    RequestRefused,
    StateFileError,
)
from .store.paths import default_state_dir
from .worker_log import LogObserver, run_value_code

__all__ = ["StateMixin", "MSG_ENV_CLOSED"]

log = logging.getLogger("qmagic")

#: queueserver's text when a remote request needs the environment and it is closed.
MSG_ENV_CLOSED = "RE Worker environment is not open"


class StateMixin(HasTraits):
    """Permissions, the lock store, experiment log and environment state of a worker."""

    # -- set up and tear down ------------------------------------------------------------------
    def _init_state(self) -> None:
        self._state_lock = threading.RLock()
        self._permissions = self._load_permissions()
        self.permissions_uid = str(uuid.uuid4())
        self._locks = self._open_locks()
        self._journal: Any = None
        self._log_observer: LogObserver | None = None
        self._draining: set[LogObserver] = set()  # logs switched off, closing once their tasks end
        self._swap_log(self._new_log())
        self._environment_open = bool(self.environment_open_on_load)
        self.environment_uid = str(uuid.uuid4())
        #: For queueserver uids of things a kernel does not have (plan queue, plan history).
        self.static_uid = str(uuid.uuid4())

    def _close_state(self) -> None:
        with self._state_lock:
            journal, self._journal = self._journal, None
            draining, self._draining = list(self._draining), set()
            locks = self._locks
        if journal is not None:
            journal.close()
        for observer in draining:
            observer.close()
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

    def _new_log(self) -> LogObserver | None:
        """Store what the log in force holds (other kernels see those tasks; an interrupt in
        this wait changes nothing yet), then open a log for the current settings: its
        observer, or None when the log is off or cannot be opened (a warning says why)."""
        from . import __version__

        current = self._journal
        if current is not None:
            current.flush()
        if not self.journal_enabled:
            return None
        try:
            from .store.journal import Journal

            journal = Journal(
                self._state_dir(), self.environment_name,
                max_age_s=self.journal_max_age_s, max_bytes=self.journal_max_bytes,
                summary_chars=self.journal_summary_chars, fsync=self.journal_fsync,
                pending_limit=self.journal_pending_limit,
                session_info={"qmagic_version": __version__,
                              "python_version": platform.python_version()},
                run_value_code=run_value_code,
            )
        except (StateFileError, OSError, ImportError) as exc:
            log.warning("qmagic: the experiment log is off: %s", exc)
            return None
        return LogObserver(journal)

    def _swap_log(self, observer: LogObserver | None) -> None:
        """Put ``observer``'s log in force (None: no log).  The old one drains
        (:mod:`qmagic.worker_log`): it logs no new task, its tasks' records end as the tasks
        do (never "kernel stopped" because a setting changed or the log was switched off),
        then it closes.  Never waits."""
        with self._state_lock:  # (one swap: a task submitted meanwhile is logged by one of them)
            old = self._log_observer
            if old is not None:
                self._draining.add(old)  # (stays with the engine until it has drained)
            if observer is not None:  # (newest first: see LogObserver.drain)
                self.engine.observers = [observer, *self.engine.observers]
            self._journal = observer.journal if observer is not None else None
            self._log_observer = observer
        if old is not None:
            old.drain(self._drained, lambda: self._log_observer)

    def _drained(self, observer: LogObserver) -> None:
        """A drained log has closed: the engine forgets its observer."""
        with self._state_lock:
            self._draining.discard(observer)
            self.engine.observers = [o for o in self.engine.observers if o is not observer]

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

    @observe("journal_enabled", "journal_max_bytes", "journal_max_age_s", "journal_fsync",
             "journal_summary_chars", "journal_pending_limit")
    def _journal_setting(self, change: Mapping[str, Any]) -> None:
        def apply(commit: Callable[[], ContextManager[None]]) -> None:
            observer = self._new_log()
            try:
                with commit():
                    self._swap_log(observer)
            except BaseException:
                if observer is not None and self._log_observer is not observer:
                    observer.journal.close()
                raise

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
            raise PermissionsFormatError(f"User group permissions: Invalid type '{type(rules)}', "
                                         "must be 'dict'")  # (queueserver's text)
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
    def environment_is_open(self) -> bool:
        """False after environment_close/destroy: remote tasks and scripts are refused."""
        return self._environment_open

    def _check_open(self, origin: str, refusal: str = MSG_ENV_CLOSED) -> None:
        """The environment rule: a remote request needs it open (``refusal`` otherwise)."""
        if origin == "remote" and not self._environment_open:
            raise RequestRefused(refusal)

    def environment_open(self, *, lock_key: str | None = None, origin: str = "python",
                         client: str | None = None) -> None:
        """Open the environment for remote tasks (``QMagic.environment_open_on_load``)."""
        self.check_lock(lock_key, origin=origin, client=client)
        with self._state_lock:  # (checked and changed at once: two doors never both succeed)
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
            if not self._environment_open:
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
            if not self._environment_open:
                raise RequestRefused("RE environment does not exist")
            self._environment_open = False
            self.environment_uid = str(uuid.uuid4())
        if self.engine.counts()["foreground"] is not None:
            self.engine.interrupt_foreground()
        reason = "Task was cancelled: the environment was destroyed"
        return [t for t in self.engine.tasks()
                if not t.done() and self.engine.cancel(t, force=True, reason=reason)]

    # -- the experiment log ----------------------------------------------------------------------------
    @property
    def log_open(self) -> bool:
        """True while the experiment log is open: ``journal_enabled``, and it could be
        opened (else a warning said why: a read-only state folder...)."""
        return self._journal is not None

    def log_health(self) -> dict[str, Any]:
        """The experiment log's state: ok, pending and dropped records, last error.  A log
        switched off or replaced while its tasks run counts too until it closes (its faults,
        its records waiting or lost); ``draining`` says how many such logs there are."""
        with self._state_lock:
            journal = self._journal
            draining = [observer.journal for observer in self._draining]
        healths = [journal.health()] if journal is not None else []
        for old in draining:
            try:
                healths.append(old.health())
            except Exception:  # noqa: BLE001 - it closed meanwhile: nothing of it to count
                continue
        if not healths:
            raise LogUnavailable(LOG_OFF)
        health = dict(healths[0], draining=len(draining))
        for other in healths[1:]:
            health["ok"] = health["ok"] and other["ok"]
            for key in ("pending", "in_memory", "dropped"):
                health[key] += other[key]
            health["last_error"] = health["last_error"] or other["last_error"]
        return health

    def log_note(self) -> str | None:
        """One line when the experiment log needs attention (a fault, or records lost; see
        :func:`qmagic.format.log_health_note`), for the views that mention it; None while it
        is healthy or off."""
        try:
            health = self.log_health()
        except LogUnavailable:  # the log is off: nothing to say
            return None
        return fmt.log_health_note(health)
