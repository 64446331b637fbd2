"""The worker: the Python API over one namespace, and the one place of every rule.

Magics, panels, the queueserver protocol and Python code all call these methods, so each
rule exists once: who is asking (user and group), the lock, the
permissions, which names may run, the foreground/idle rule, the JSON rule for remote
results, the environment being open.  Methods raise typed errors
(:class:`qmagic.RequestRefused` and its subclasses carry queueserver's text) and return
:class:`qmagic.Task` objects or plain values; :mod:`qmagic.protocol` turns them into
queueserver's reply dicts.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from collections.abc import Set
from typing import Any, Callable, Iterable, Mapping

from traitlets import observe

from .catalog import (
    Catalog,
    is_coroutine_function,
    is_plan,
    plan_refusal,
    submit_target,
)
from .config import QMagic
from .core.awaiting import awaitable_result, awaited_value, coroutine_name
from .core.capture import work_of
from .core.context import current_task
from .core.engine import MSG_KERNEL_BUSY, MSG_NOT_IDLE, Engine
from .core.foreground import ForegroundRunner
from .core.loops import EventLoops
from .core.permissions import require_caller
from .core.status import TaskStatus
from .core.task import INTERRUPTED, Task
from .errors import RequestRefused, TaskCancelled, one_line
from .format import busy_text
from .jsonreply import check_json
from .scripts import ScriptRunner, check_script_name, check_script_text
from .store.lockfile import user_problem
from .worker_locks import LockMixin
from .worker_lookup import LookupMixin
from .worker_state import StateMixin

__all__ = ["Worker", "ORIGINS"]

log = logging.getLogger("qmagic")

#: Where a request comes from.
ORIGINS = ("python", "magic", "remote", "panel")

#: Engine attribute kept in step with each trait.
_ENGINE_SETTINGS = {
    "max_background_tasks": "max_background",
    "max_queued_tasks": "max_queued",
    "task_retention_s": "retention_s",
    "max_finished_tasks": "max_finished",
    "max_finished_task_bytes": "max_finished_bytes",
    "max_queued_task_bytes": "max_queued_bytes",
    "task_output_limit": "output_limit",
    "cancel_grace_s": "cancel_grace_s",
}


class _TaskCall:
    """A task's code: permissions checked again for names (rules may have changed since the
    request), the name resolved if it was missing, the JSON rule for remote results.  One
    slotted object rather than closures: every object a task allocates is work for the
    garbage collector, which dominates the cost of a burst of small tasks."""

    __slots__ = ("worker", "name", "func", "args", "kwargs", "user", "group", "strict_json",
                 "by_name", "coroutine")

    def __init__(self, worker: Worker, name: str, func: Any, args: tuple, kwargs: dict, user: str,
                 group: str, strict_json: bool, by_name: bool, coroutine: bool) -> None:
        self.worker, self.name, self.func, self.args, self.kwargs = worker, name, func, args, kwargs
        self.user, self.group, self.strict_json = user, group, strict_json
        self.by_name, self.coroutine = by_name, coroutine

    def __call__(self) -> Any:
        if self.coroutine:  # everything happens on the event loop
            return self._run_coroutine()
        if self.by_name:
            self.worker._permissions.check(self.name, self.user, self.group)
        func = self.func if self.func is not None else self.worker.catalog.function(
            self.name, lambda names: self.worker._permissions.allowed_names(names, self.group))
        result = func(*self.args, **self.kwargs)
        if not self.strict_json:
            return result  # an awaitable is awaited on the loop by the engine
        return self._awaited(result) if awaitable_result(result) else self._checked(result)

    # (a coroutine returned by a coroutine fails before the JSON rule names its type)
    async def _run_coroutine(self) -> Any:
        if self.by_name:
            self.worker._permissions.check(self.name, self.user, self.group)
        return self._checked(awaited_value(await self.func(*self.args, **self.kwargs), self.name))

    async def _awaited(self, awaitable: Any) -> Any:
        return self._checked(awaited_value(await awaitable, coroutine_name(awaitable, self.name)))

    def _checked(self, result: Any) -> Any:
        error = json_error(result) if self.strict_json else None
        if error is not None:  # (chained: queueserver's traceback shows json's own error)
            raise ValueError(f"Task result can not be serialized as JSON: {error}") from error
        return result


def json_error(value: Any) -> Exception | None:
    """Why ``value`` cannot be sent as JSON (what ``json.dumps`` raises), None if it can:
    the rule for remote results.  A value nested too deeply says so."""
    try:  # (in batches: one json.dumps of 3 million floats held the GIL ~1 s, so no
        check_json(value)  # remote client had a reply meanwhile)
    except (TypeError, ValueError, OverflowError) as exc:
        return exc
    except RecursionError:
        return ValueError("it is nested too deeply")
    return None


def cancelled_line(task: Task) -> str:
    """How a cancelled foreground task ends the call that ran it (a cell): one line that says
    how it was cancelled (■, a panel's Cancel, ``%task_cancel``, a deadline)."""
    return f"{task.cancelled_text()}; it is recorded as cancelled."


def _raise_if_interrupted(task: Task) -> Task:
    """A foreground task that ■ stopped while this very call ran it: the call was
    interrupted, so it raises (a cell stops there, and Run All stops) — the task's record is
    complete.  Any other outcome returns the task."""
    if task.status is TaskStatus.CANCELLED and task.cancel_reason == INTERRUPTED:
        raise one_line(TaskCancelled(cancelled_line(task)))
    return task


def _positional(args: Any) -> tuple:
    """``submit``'s ``args`` as a tuple: a one-line TypeError for a lone value given in their
    place (``submit("scan", 3)``; a text or a dict would be taken apart into arguments)."""
    if isinstance(args, tuple):
        return args
    if args is None:
        return ()
    if isinstance(args, (str, bytes, bytearray, Mapping, Set)) or not isinstance(args, Iterable):
        raise one_line(TypeError(f"args must be a tuple or list of the function's arguments, such as "
                                 f"submit(\"scan\", (3,)) for scan(3), not {type(args).__name__}; keyword "
                                 "arguments go in kwargs."))
    return tuple(args)


class Worker(StateMixin, LockMixin, LookupMixin, QMagic):
    """Runs the functions of ``namespace`` as tracked tasks.

    ``Worker(namespace, parent=None, config=None, hidden_names=None, **settings)``: settings
    come from the ``QMagic`` config section (see :class:`qmagic.QMagic`) or keywords;
    ``hidden_names`` are never offered as functions (the shell's own: ``exit``, ``In``...).  In a kernel, ``%load_ext qmagic`` builds
    one on the kernel's namespace; get it with :func:`qmagic.get_worker`.  Without a kernel
    the worker owns a foreground thread of its own.  Call :meth:`close` when done.
    """

    def __init__(self, namespace: dict, *, parent: Any = None, config: Any = None,
                 foreground: ForegroundRunner | None = None, hidden_names: Iterable[str] | None = None,
                 **kwargs: Any) -> None:
        if not isinstance(namespace, dict):
            raise TypeError(f"Worker needs a dict as its namespace (got {type(namespace).__name__}).")
        super().__init__(parent=parent, config=config, **kwargs)
        self.namespace = namespace
        #: Names never offered as functions (the shell's own: exit, quit, In, Out, ...).
        self.hidden_names: set[str] = set(hidden_names or ())
        #: Returns the provenance of a request made now (the kernel sets it: notebook, cell).
        self.provenance_source: Callable[[], dict | None] = lambda: None
        self.engine = Engine(
            max_background=self.max_background_tasks, max_queued=self.max_queued_tasks,
            retention_s=self.task_retention_s, max_finished=self.max_finished_tasks,
            max_finished_bytes=self.max_finished_task_bytes, max_queued_bytes=self.max_queued_task_bytes,
            output_limit=self.task_output_limit, cancel_grace_s=self.cancel_grace_s,
            foreground=foreground, loops=EventLoops(self.async_loop),
            on_cancel=self._cancel_from_handle,
        )
        try:  # the engine wraps stdout/stderr: a failure from here on must undo that
            self.catalog = Catalog(namespace, hidden=lambda: self.hidden_names)
            self.scripts = ScriptRunner(namespace)
            self._remembered_key: str | None = None
            self._key_lock = threading.Lock()
            self._init_state()  # permissions, lock store, experiment log (worker_state.py)
            self.catalog.refresh()
        except BaseException:
            locks = self.__dict__.get("_locks")
            if locks is not None:
                locks.close()
            self.engine.close()
            raise

    # -- settings follow the traits ------------------------------------------------------------
    @observe(*_ENGINE_SETTINGS)
    def _engine_setting(self, change: Mapping[str, Any]) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            setattr(engine, _ENGINE_SETTINGS[change["name"]], change["new"])
            if change["name"] in ("max_finished_tasks", "max_finished_task_bytes", "task_retention_s"):
                engine.apply_limits()

    @observe("async_loop")
    def _loop_setting(self, change: Mapping[str, Any]) -> None:
        if getattr(self, "engine", None) is not None:
            self.engine.loops.policy = change["new"]

    # -- who is asking -------------------------------------------------------------------------
    def _who(self, user: Any, user_group: Any, origin: str,
             defaults: bool = False) -> tuple[str, str]:
        """The request's user and group: defaults for None (for remote requests only with
        ``defaults``: queueserver's script_upload names no user), the protocol's errors for
        missing values.  (An authenticated CurveZMQ client's claims are checked by the remote
        door before the request gets here.)"""
        if origin not in ORIGINS:
            raise ValueError(f"origin must be one of {ORIGINS}, got {origin!r}.")
        if origin != "remote" or defaults:
            user = self.default_user if user is None else user
            user_group = self.default_user_group if user_group is None else user_group
        problem = user_problem(user)
        if problem is not None and origin != "remote":  # (the lock's words: no protocol here)
            raise RequestRefused(f"Error: User name {problem}")
        require_caller(user, user_group)
        if problem is not None:
            raise RequestRefused(f"Error: Incorrect request format: user name {problem}")
        return user, user_group

    # -- starting tasks ------------------------------------------------------------------------
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
        timeout: float | None = None,
        origin: str = "python",
        strict_json: bool = False,
        client: str | None = None,
        payload_bytes: int = 0,
    ) -> Task:
        """Start ``target(*args, **kwargs)`` as a tracked task and return its :class:`Task`.

        ``target`` is the name of a function of the namespace (checked against the
        permissions) or a callable (your own code, run as given; its ``__name__`` labels the
        task, and ``user_group`` must still be a known group).  ``background=True`` runs it on a
        worker thread; ``False`` in the foreground (inline on the foreground owner thread, i.e.
        in a cell; from another thread handed to it, and refused while a cell runs).  ``async
        def`` functions run on ``QMagic.async_loop``.  ``timeout``: seconds the task may run,
        then it is cancelled ("deadline of N s passed").  Refusals raise :class:`RequestRefused`
        (or a subclass) and change nothing.  The keywords after ``timeout`` are qmagic's own.
        """
        self._check_not_closed()
        name, func = submit_target(target)
        args = _positional(args)
        if kwargs is not None and not isinstance(kwargs, Mapping):
            raise one_line(TypeError(f"kwargs must be a dict, got {type(kwargs).__name__}."))
        kwargs = dict(kwargs or {})
        if timeout is not None and (not isinstance(timeout, (int, float)) or isinstance(timeout, bool)
                                    or not 0 < timeout < math.inf):
            raise RequestRefused(f"Error: Invalid timeout {timeout!r}: give a finite number of seconds > 0, "
                                 "or none for no deadline.")
        defaulted = user_group is None
        user, user_group = self._who(user, user_group, origin)
        self.check_lock(lock_key, origin=origin, client=client)
        self._check_group(user_group, defaulted)  # (a callable's is recorded as given: it must exist)
        coroutine = False
        if func is None:  # permissions are about names; a callable is run as given
            self._permissions.check(name, user, user_group)
            try:
                func, coroutine = self.catalog.resolve(name)
            except NameError:
                func = None  # queueserver: accepted; the task fails if it is still missing
            except TypeError as exc:  # a plan, or not callable
                raise RequestRefused(f"Error: {exc}") from None
        else:
            if is_plan(func):  # (the catalog's rule, as by name)
                raise RequestRefused(f"Error: {plan_refusal(name, func)}")
            coroutine = is_coroutine_function(func)
        self._check_open(origin)
        call = _TaskCall(self, name, func, args, kwargs, user, user_group, strict_json,
                         isinstance(target, str), coroutine)
        inline = not background and self.engine.foreground.owns_current_thread()
        try:  # (not through _start: one keyword repacking less per task)
            task = self.engine.submit(
                call, name=name, args=args, kwargs=kwargs, user=user, user_group=user_group,
                background=background, origin=origin, timeout=timeout,
                provenance=self.provenance_source(), coroutine=coroutine,
                payload_bytes=payload_bytes,
            )
        except RequestRefused as exc:
            raise self._refusal(exc, origin) from None
        return _raise_if_interrupted(task) if inline else task

    def run_script(
        self,
        script: str,
        *,
        name: str | None = None,
        background: bool = False,
        update_lists: bool = True,
        update_re: bool = False,
        lock_key: str | None = None,
        user: str | None = None,
        user_group: str | None = None,
        origin: str = "python",
        client: str | None = None,
        payload_bytes: int = 0,
    ) -> Task:
        """Run ``script`` in the namespace as a task (all or nothing; see
        :mod:`qmagic.scripts`).  ``name`` labels it everywhere (e.g. its file name).
        On success ``task.namespace_changes`` lists the names added, changed and removed;
        the function catalog is refreshed unless ``update_lists`` is False.  Unless
        ``update_re``, the namespace's ``RE`` and ``db`` stay as they were (queueserver).
        ``payload_bytes``: the size of the remote request that sent the script."""
        check_script_text(script)
        self._check_not_closed()
        name = check_script_name(name)
        defaulted = user_group is None
        user, user_group = self._who(user, user_group, origin, defaults=True)
        self.check_lock(lock_key, origin=origin, client=client)
        self._check_group(user_group, defaulted)  # (recorded on the task: it must exist)
        self._check_open(origin)
        keep = () if update_re else ("RE", "db")

        def done(changes: dict[str, list[str]]) -> None:
            current_task().namespace_changes = changes  # this task: its uid and name label the script
            if update_lists:
                self.catalog.refresh()

        # (a script with a top-level await returns a coroutine: the engine awaits it)
        call = functools.partial(self.scripts.run, script, name=name, keep=keep, done=done)
        return self._start(
            call, name=name, kind="script", user=user, user_group=user_group,
            background=background, origin=origin, provenance=self.provenance_source(),
            payload_bytes=payload_bytes,
        )

    def update_environment(self, *, background: bool = False, lock_key: str | None = None,
                           origin: str = "python", client: str | None = None) -> Task:
        """Refresh the lists of functions, plans and devices as a task (queueserver's
        environment_update)."""
        self._check_not_closed()
        self.check_lock(lock_key, origin=origin, client=client)
        self._check_open(origin)
        user, group = self._who(None, None, origin, defaults=True)
        self._check_group(group, True)
        return self._start(self._refresh_catalog,
                           name="environment_update", kind="script", user=user,
                           user_group=group, background=background, origin=origin)

    def _refresh_catalog(self) -> None:  # (environment_update's task: its result is None)
        self.catalog.refresh(force=True)

    def _start(self, call: Callable[[], Any], *, origin: str, **task: Any) -> Task:
        """The engine starts the task (refusals as :meth:`_refusal` words them; a foreground
        task run here and stopped by ■ raises, as in :meth:`submit`)."""
        inline = not task["background"] and self.engine.foreground.owns_current_thread()
        try:
            started = self.engine.submit(call, origin=origin, **task)
        except RequestRefused as exc:
            raise self._refusal(exc, origin) from None
        return _raise_if_interrupted(started) if inline else started

    def _refusal(self, exc: RequestRefused, origin: str) -> RequestRefused:
        """The engine's refusal as the caller should read it: a busy foreground explained to
        notebook users in their terms (remote clients get queueserver's texts)."""
        if origin == "remote" or str(exc) not in (MSG_NOT_IDLE, MSG_KERNEL_BUSY):
            return exc
        running = self.engine.counts()["foreground"]  # (own: its code, or a thread it started)
        return RequestRefused(busy_text(str(exc) == MSG_NOT_IDLE, running, running is not None
                                        and running is work_of()))

    # -- cancelling and interrupting ---------------------------------------------------------------
    def cancel(self, task: Task | str, force: bool = False, *, lock_key: str | None = None,
               origin: str = "python", client: str | None = None) -> Task:
        """Cancel one task (a Task or a uid / unique prefix); returns it.

        Cooperative first; ``force=True`` raises TaskCancelled in a thread task after
        ``cancel_grace_s``.  Raises TaskNotFound, or RequestRefused when it already finished.
        """
        self.check_lock(lock_key, origin=origin, client=client)
        if not isinstance(task, Task):
            task = self._task_to_cancel(task)  # (in memory; else what the log knows of it)
        where = {"panel": "from the panel (Cancel button)", "magic": "with %task_cancel",
                 "remote": "by a remote client", "python": "from Python"}.get(origin, origin)
        if not self.engine.cancel(task, force=force, reason=f"Task was cancelled {where}"):
            raise RequestRefused(
                f"{task.call_text(40)} has already finished ({task.status.value}); there is "
                "nothing to cancel."
            )
        return task

    def _cancel_from_handle(self, task: Task, force: bool, reason: str) -> bool:
        """``task.cancel()``: the lock rule of :meth:`cancel` (this kernel's key stands in),
        then the engine; False if the task had already finished."""
        self.check_lock(origin="handle")
        return self.engine.cancel(task, force=force, reason=reason)

    def cancel_all(self, *, force: bool = False, lock_key: str | None = None,
                   origin: str = "python", client: str | None = None) -> list[Task]:
        """Cancel every queued and running task; returns the tasks asked to stop."""
        self.check_lock(lock_key, origin=origin, client=client)
        reason = "Task was cancelled (cancel all)"
        return [t for t in self.engine.tasks()
                if not t.done() and self.engine.cancel(t, force=force, reason=reason)]

    def interrupt(self, *, interrupt_task: bool = False, lock_key: str | None = None,
                  origin: str = "python", client: str | None = None) -> str:
        """Interrupt the kernel's main thread like ■: KeyboardInterrupt in the running cell,
        or in the running foreground task when ``interrupt_task`` (else that is refused).
        Interrupts of one task are coalesced.  Returns "interrupted", "pending" or "idle"."""
        self.check_lock(lock_key, origin=origin, client=client)
        self._check_open(origin, "Failed to interrupt IPython kernel: Worker environment does not exist")
        if self.engine.counts()["foreground"] is not None:
            if not interrupt_task:
                raise RequestRefused(
                    "Failed to interrupt IPython kernel: Not allowed to interrupt running task"
                )
            return self.engine.interrupt_foreground()
        if self.engine.foreground.user_busy():
            self.engine.foreground.interrupt()
            return "interrupted"
        return "idle"

    @property
    def foreground_runner(self) -> ForegroundRunner:
        """The runner of foreground tasks (in a kernel: the kernel's, whose interrupt guard
        the magics use while a cell waits for a task)."""
        return self.engine.foreground

    def add_context_hook(self, hook: Any) -> Callable[[], None]:
        """Carry context from the thread that submits a task to where it runs (a
        :class:`qmagic.core.hooks.ContextHook`; the kernel pins a task's output to the cell
        that started it).  Returns the function that removes the hook."""
        return self.engine.context_hooks.add(hook)

    def __repr__(self) -> str:
        counts = self.engine.counts()
        return (
            f"<qmagic.Worker: {counts['running_background']} background running, "
            f"{counts['queued_background']} queued, foreground "
            f"{'busy' if counts['foreground'] else 'idle'}>"
        )
