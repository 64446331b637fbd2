"""Looking at tasks: live ones in the engine's memory, past ones in the experiment log,
what runs now, their events, and the functions a group may call.  A mix-in of
:class:`qmagic.Worker` (one screenful per job; the rules stay in worker.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Callable

from .core.registry import UID_LENGTH, uid_spellings
from .core.status import FINISHED_VALUES, TaskStatus
from .core.task import Task
from .errors import (
    RequestRefused,
    StateFileError,
    TaskNotFound,
    one_line,
)
from .format import record_call
from .store.reader import Filters
from .texts import printable

if TYPE_CHECKING:  # pragma: no cover
    from .core.engine import Engine
    from .core.events import Subscription

__all__ = ["LookupMixin"]

log = logging.getLogger("qmagic")


class LookupMixin:
    """``get_task``, ``find``, ``statuses``, ``tasks``, ``last_task``, ``history``,
    ``clear_finished``, ``counts``, ``subscribe`` and ``functions_available``."""

    engine: Engine
    _journal: Any
    check_lock: Any  # (LockMixin)
    catalog: Any  # (the worker's)
    _permissions: Any  # (StateMixin)
    default_user_group: str  # (QMagic)
    _closed_log: Any  # (StateMixin)
    _log_unavailable: Any  # (LogMixin: why no log answers)

    def clear_finished(self, *, lock_key: str | None = None, origin: str = "python",
                       client: str | None = None) -> None:
        """Forget the finished tasks kept in memory; the experiment log keeps their records
        (queueserver's ``history_clear``).  Raises :class:`qmagic.LockRefused` while the
        queue is locked and ``lock_key`` does not open it."""
        self.check_lock(lock_key, "queue", origin=origin, client=client)
        self.engine.clear_finished()

    def get_task(self, uid_or_prefix: str) -> Task:
        """The live :class:`Task` with this uid or unique uid prefix (>= 4 characters).

        Raises :class:`qmagic.TaskNotFound` (a KeyError) for unknown, ambiguous or
        expired uids; :meth:`find` also looks in the experiment log."""
        return self.engine.find(uid_or_prefix)

    def find(self, uid_or_prefix: str) -> Task | dict[str, Any]:
        """The task in memory, else its record in the experiment log (also of earlier
        kernels; tasks of a kernel that died read as failed).  Raises TaskNotFound."""
        try:
            return self.engine.find(uid_or_prefix)
        except TaskNotFound as exc:
            if exc.reason != "unknown":  # too short or ambiguous: the log cannot tell more
                raise
            record, several = self._log_match(uid_or_prefix)
            if record is not None:
                return record
            if several:
                raise TaskNotFound(f"Task uid prefix {uid_or_prefix!r} matches several tasks in the "
                                   "experiment log; give more characters (see %tasks --history).",
                                   "ambiguous") from None
            raise TaskNotFound(f"{exc} It is not in the experiment log either (%tasks --history lists "
                               "the tasks it holds).") from None

    def _task_to_cancel(self, uid_or_prefix: str) -> Task:
        """The task in memory that ``cancel(uid)`` names; else what the experiment log knows
        of it: RequestRefused when it ended (as for a task in memory), TaskNotFound when it
        is another kernel's."""
        found = self.find(uid_or_prefix)
        if isinstance(found, Task):
            return found
        status, call = printable(found.get("status"), 20), record_call(found, 40)
        if status in FINISHED_VALUES:
            raise RequestRefused(f"{call} has already finished ({status}; from the experiment log, it is "
                                 "no longer in this kernel's memory); there is nothing to cancel.")
        meta = found.get("journal") if isinstance(found.get("journal"), dict) else {}
        pid, host = meta.get("pid"), meta.get("host")
        where = f"process {pid} on {printable(host, 60)}, " if pid is not None and host else ""
        raise TaskNotFound(f"{call} is {status} in another kernel ({where}from the experiment log): only "
                           "that kernel can cancel it.")

    def lookup(self, uid: str) -> Task | dict[str, Any] | None:
        """The task with exactly this uid: in memory, else its record in the experiment log
        (full uids only); None when neither knows it."""
        for typed in uid_spellings(uid):  # (as typed, then a hex uid in capitals in lower case)
            found = self.engine.get(typed) or (self._log_find(typed, exact=True) if len(typed) >= UID_LENGTH else None)
            if found is not None:
                return found
        return None

    def statuses(self, uids: list[str]) -> dict[str, TaskStatus | None]:
        """Status of each uid (exact uids): memory first, then the experiment log (batched);
        None for unknown uids."""
        if isinstance(uids, (str, bytes)):  # (its characters were looked up one by one)
            raise one_line(TypeError("statuses() takes a list of uids: statuses([uid]) for one task "
                                     "(or get_task(uid).status)."))
        out: dict[str, TaskStatus | None] = {}
        missing = []
        get = self.engine.get
        for uid in uids:
            task = get(uid)
            out[uid] = task.status if task is not None else None
            if task is None:
                missing.append(uid)
        if missing:
            for uid, status in self._log_statuses(missing).items():
                out[uid] = status
        return out

    def tasks(self, status: str | TaskStatus | Iterable[str | TaskStatus] | None = None) -> list[Task]:
        """Tasks in memory, oldest first; ``status`` filters by one status or several."""
        items = self.engine.tasks()
        if status is None:
            return items
        wanted = Filters(status=status).statuses  # (the history's rule and words: one line)
        return [t for t in items if t.status.value in wanted]

    @property
    def last_task(self) -> Task | None:
        """The most recently submitted task still in memory (None if none)."""
        return self.engine.last_task

    def history(self, **filters: Any) -> list[dict[str, Any]]:
        """Records of past and present tasks from the experiment log, newest first.

        Filters: ``status``, ``user``, ``name`` and ``notebook`` (exact, or with the
        wildcards ``*`` and ``?``; brackets match themselves), ``since`` /
        ``until`` (epoch, datetime, ISO text, or "-2h"/"-7d"), ``uid`` (a prefix), ``limit``.
        Records are those of :func:`qmagic.history` (``Task.to_dict()``'s keys, times in
        epoch seconds, plus ``journal``).  A closed worker reads the log it closed.
        """
        journal = self._readable_log()
        if journal is None:
            raise self._log_unavailable()
        return journal.records(**filters)

    def _readable_log(self) -> Any:
        """The Journal that lookups and history read: the open one; once the worker is
        closed, the one its close closed (its reads go to the database, where the close
        stored every task's end).  None: the log is off."""
        journal = self._journal
        return journal if journal is not None or not self.engine.closed else self._closed_log

    # -- the experiment log's side --------------------------------------------------------------
    def _log_find(self, uid: str, exact: bool = False) -> dict[str, Any] | None:
        """The log's record of ``uid`` (else of the one task whose uid starts with it,
        unless ``exact``: a remote lookup of an unknown uid then makes no prefix search)."""
        if exact:
            return self._log_read(lambda journal: journal.get(uid), uid, None)
        return self._log_match(uid)[0]

    def _log_match(self, prefix: str) -> tuple[dict[str, Any] | None, bool]:
        """The log's ``(record, several)`` for a uid or uid prefix (Journal.match)."""
        return self._log_read(lambda journal: journal.match(prefix), prefix, (None, False))

    def _log_read(self, read: Callable[[Any], Any], uid: Any, default: Any) -> Any:
        journal = self._readable_log()
        if journal is None or not isinstance(uid, str) or not uid or not uid.isascii():
            return default  # (uids are ASCII: a lone surrogate cannot even be looked up in SQLite)
        try:
            return read(journal)
        except (StateFileError, OSError) as exc:
            log.warning("qmagic: the experiment log could not be read: %s", exc)
            return default

    def _log_statuses(self, uids: list[str]) -> dict[str, TaskStatus | None]:
        journal = self._readable_log()
        uids = [u for u in uids if isinstance(u, str) and u.isascii()]  # (as in _log_find)
        if journal is None or not uids:
            return {}
        try:
            found = journal.statuses(uids)
        except (StateFileError, OSError) as exc:
            log.warning("qmagic: the experiment log could not be read: %s", exc)
            return {}
        out: dict[str, TaskStatus | None] = {}
        for uid, status in found.items():
            try:
                out[uid] = TaskStatus(status) if status is not None else None
            except ValueError:
                out[uid] = None
        return out

    def subscribe(self, callback: Callable[..., Any]) -> Subscription:
        """Receive events of every task as ``callback(**kwargs)``.

        Keywords: ``task_uid`` always, plus one of ``status`` (str), ``progress``
        (:class:`qmagic.Progress`), ``result`` (the return value) or ``error`` (the
        exception).  Per task: queued, running, progress..., result or error, final status.
        Callbacks run on one dispatcher thread; one that raises is logged and ignored.
        A callback without ``**kwargs`` is refused with ValueError.
        """
        return self.engine.bus.subscribe(callback)

    def counts(self) -> dict[str, Any]:
        """What runs now (for status replies and panels): ``running_background``,
        ``queued_background``, ``foreground`` (the running foreground Task or None),
        ``foreground_handed_over``, ``kernel_busy`` (the kernel runs a cell), ``finished``
        (finished tasks kept in memory), ``threads`` and ``results_uid``."""
        counts = self.engine.counts()
        counts["kernel_busy"] = self.engine.foreground.user_busy()
        return counts

    def functions_available(self, user_group: str | None = None) -> dict[str, dict[str, str]]:
        """{name: {signature, doc}} of the namespace functions ``user_group`` (default:
        ``QMagic.default_user_group``) may call, as the namespace holds them now; an unknown
        group is refused as by submit."""
        group = self.default_user_group if user_group is None else user_group
        self._permissions.check_group(group)
        self.catalog.refresh()  # (a kernel's catalog follows each cell; a namespace dict given
        functions = self.catalog.functions()  # to Worker() changes under it unseen)
        allowed = set(self._permissions.allowed_names(functions, group))
        return self.catalog.describe_functions({n: f for n, f in functions.items() if n in allowed})
