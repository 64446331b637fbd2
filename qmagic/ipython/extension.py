"""Loading and unloading qmagic in an IPython shell (``%load_ext qmagic``).

Loading builds one :class:`Session` per shell: the :class:`qmagic.Worker` on
``shell.user_ns`` (a ``QMagic`` Configurable with ``parent=shell``, so ``c.QMagic.*`` in a
profile and ``--QMagic.*=...`` on the kernel command line apply), the kernel's foreground
runner, output routing and provenance, the cell events, the magics, the completer, the
text form of a Task, the panels and the remote door.  The session records every step, so
unloading undoes each one (magics, events, formatters, threads, sockets, files); load ->
unload -> load works, and loading twice is a silent no-op.  An unload always finishes: ■
(SIGINT) is held meanwhile and raised as one line at its end.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import signal
import sys
import threading
from typing import Any, Callable

from .. import format as fmt
from .. import tracebacks
from ..core.task import Task
from ..errors import NotLoaded
from ..worker import Worker
from .context import (
    CellOutputHook,
    cell_labeler,
    kernel_connection_info,
    provenance_source,
    route_thread_displays,
)
from .request_interrupts import RequestInterrupts
from .runner import KernelForegroundRunner, interrupts_held

__all__ = ["Session", "UnloadInterrupted", "get_session", "get_worker", "load_ipython_extension", "unload_ipython_extension"]

log = logging.getLogger("qmagic")

#: Why the tasks still running when the kernel shuts down (or restarts) are cancelled.
MSG_SHUT_DOWN = "Task was cancelled: the kernel was shut down"
#: The close at exit fits before jupyter_client kills the kernel (SIGKILL 5 s after its
#: shutdown request; its SIGTERM at 2.5 s is ignored from the close on).  Tasks get
#: EXIT_TASKS_S: cancelled at once, cancelled again by force after half of it (code that
#: swallowed the first), recorded cancelled at its end if still running; then the
#: experiment log gets EXIT_LOG_S to store what is pending.  What it could not store by then
#: (another kernel holds the database) stays in its spool, and the next kernel that opens
#: the log stores it.  Then the info socket gets up to FINAL_LINGER_S (0.5 s) to send its
#: last messages (the cancelled tasks' final states).  The rest (threads, locks) takes well
#: under the remaining second.
EXIT_TASKS_S, EXIT_LOG_S = 2.0, 1.0

_sessions: dict[int, Session] = {}
_sessions_lock = threading.RLock()


MSG_UNLOAD_INTERRUPTED = ("qmagic finished unloading before the interrupt took effect; load it "
                          "again with %load_ext qmagic.")
MSG_UNLOAD_IN_TASK = ("qmagic cannot be unloaded from inside a task: run %unload_ext qmagic "
                      "in a cell of its own.")


class UnloadInterrupted(KeyboardInterrupt):
    """■ during an unload: raised once every step is undone (shown as one line)."""

    def _render_traceback_(self) -> list[str]:
        return [f"KeyboardInterrupt: {self}"]


def _ignore_sigterm() -> None:
    """Ignore SIGTERM for the rest of the process's life (from the main thread only): the
    kernel is exiting, and jupyter_client's SIGTERM, sent half-way to its SIGKILL, would only
    cut short the bounded close and the exit after it (IPython's own; daemon threads left by
    tasks that ignored their cancel can hold Python's finalisation a second or two)."""
    with contextlib.suppress(ValueError, OSError, AttributeError):  # not the main thread, no SIGTERM
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _task_text(task: Task, printer: Any, cycle: bool) -> None:
    """IPython's ``text/plain`` printer of a Task (deterministic: no uid, no times)."""
    printer.text(fmt.task_line(task))


class Session:
    """Everything qmagic added to one shell, so that :meth:`unload` can undo it."""

    def __init__(self, shell: Any) -> None:
        self.shell = shell
        self.worker: Worker | None = None
        self.runner: KernelForegroundRunner | None = None
        self.remote: Any = None
        self._undo: list[tuple[str, Callable[[], None]]] = []

    def _step(self, what: str, undo: Callable[[], None]) -> None:
        self._undo.append((what, undo))

    # -- loading -------------------------------------------------------------------------------
    def load(self) -> None:
        """Build the worker and register everything; raises if a required step fails."""
        shell = self.shell
        self.runner = runner = KernelForegroundRunner(shell)
        self._step("foreground runner", runner.close)
        interrupts = RequestInterrupts.install(shell)  # (its events first: ■ after a cell's
        if interrupts is not None:  # code is ignored in the other post_run_cell callbacks too)
            self._step("interrupts outside cells", interrupts.uninstall)
            self._event("pre_run_cell", interrupts.cell_started)
            self._event("post_run_cell", interrupts.cell_finished)
        # (before the worker, so undone after it: the tasks an unload cancels keep their
        # tracebacks' Cell In[12], not the kernel's /tmp/ipykernel_1/123.py)
        tracebacks.set_filename_labeler(cell_labeler(shell))
        self._step("traceback labels", lambda: tracebacks.set_filename_labeler(None))
        # (the remote door, made below, is also undone after the worker: its info socket
        # publishes the final states of the tasks an unload cancels, as at the kernel's exit)
        self._step("remote door", lambda: self.remote.close() if self.remote is not None else None)
        self.worker = worker = Worker(shell.user_ns, parent=shell, foreground=runner,
                                      hidden_names=getattr(shell, "user_ns_hidden", None))
        self._step("worker", worker.close)
        if isinstance(getattr(shell, "configurables", None), list):  # %config QMagic.x = v reaches it
            shell.configurables.append(worker)
            self._step("%config", lambda: _drop_configurable(shell, worker))
        atexit.register(self._close_at_exit)  # (before IPython's own exit operations)
        self._step("close at exit", lambda: atexit.unregister(self._close_at_exit))
        worker.provenance_source = provenance_source(shell)
        hook = CellOutputHook(shell)
        self._step("output routing", worker.add_context_hook(hook))
        self._step("displays of tasks' threads", route_thread_displays(shell))
        self._event("pre_run_cell", runner.cell_started)
        self._event("post_run_cell", self._post_run_cell)
        from ..remote.service import RemoteService
        from .magics import LockMagics, RemoteMagics, TaskMagics

        self.remote = RemoteService(worker, kernel_connection_info)  # (undone after the worker)
        for magics in (TaskMagics(shell, worker), LockMagics(shell, worker),
                       RemoteMagics(shell, self.remote)):
            shell.register_magics(magics)
            self._step("magics", lambda m=magics: _unregister_magics(shell, m))
        self._completer()
        self._formatter()
        self._panels()

    def _close_at_exit(self) -> None:
        """The kernel is shutting down (a restart too): running tasks are cancelled — a
        coroutine's ``finally:`` runs — and recorded so, within the time the kernel's
        manager waits for a kernel to exit (see :data:`EXIT_TASKS_S`)."""
        _ignore_sigterm()
        try:
            self.worker.close(EXIT_TASKS_S, reason=MSG_SHUT_DOWN, log_timeout=EXIT_LOG_S, exiting=True)
        except BaseException:  # noqa: BLE001 - the exit goes on whatever happens
            log.warning("qmagic: closing the worker as the kernel exits failed", exc_info=True)
        try:  # (then the remote door: the info socket sends what the close told it, the
            if self.remote is not None:  # cancelled tasks' final states, within its linger)
                self.remote.close()
        except BaseException:  # noqa: BLE001 - the exit goes on whatever happens
            log.warning("qmagic: closing the remote door as the kernel exits failed", exc_info=True)

    def _event(self, name: str, callback: Callable[..., Any]) -> None:
        self.shell.events.register(name, callback)

        def undo() -> None:
            try:
                self.shell.events.unregister(name, callback)
            except ValueError:
                pass

        self._step(f"{name} event", undo)

    def _post_run_cell(self, *_: Any) -> None:
        """After each cell: the kernel is free again; the catalog follows the namespace."""
        if self.runner is not None:
            self.runner.cell_finished()
        if self.worker is not None:
            try:
                self.worker.catalog.refresh()
            except Exception:  # noqa: BLE001 - a cell's aftermath must not fail the cell
                log.debug("qmagic: catalog refresh failed", exc_info=True)

    def _completer(self) -> None:
        completer = getattr(self.shell, "Completer", None)
        if completer is None or not hasattr(completer, "custom_matchers"):
            return
        from .magics import function_name_matcher, task_uid_matcher

        for matcher in (function_name_matcher(self.worker), task_uid_matcher(self.worker)):
            completer.custom_matchers.append(matcher)

            def undo(matcher: Any = matcher) -> None:
                if matcher in completer.custom_matchers:
                    completer.custom_matchers.remove(matcher)

            self._step("completer", undo)

    def _formatter(self) -> None:
        formatters = getattr(getattr(self.shell, "display_formatter", None), "formatters", {})
        formatter = formatters.get("text/plain")
        if formatter is None:
            return
        old = formatter.for_type(Task, _task_text)

        def undo() -> None:
            formatter.type_printers.pop(Task, None)
            if old is not None:
                formatter.for_type(Task, old)

        self._step("text form of tasks", undo)

    def _panels(self) -> None:
        """Live panels where widgets work; a failure is reported, never fatal."""
        try:
            from .. import panels

            panels.attach(self.shell, self.worker)
        except Exception as exc:  # noqa: BLE001 - the kernel works without panels
            log.warning("qmagic: the panels could not start", exc_info=True)
            print(f"qmagic: live panels are off: {exc}", file=sys.stderr)
            return
        self._step("panels", lambda: panels.detach(self.shell, self.worker))
        hook = panels.cell_row_hook(self.shell, self.worker)
        if hook is not None:  # a foreground task's live row in the cell that runs it
            self._step("live rows in cells", self.worker.add_context_hook(hook))

    # -- unloading -----------------------------------------------------------------------------------
    def unload(self) -> None:
        """Undo every step of :meth:`load` that happened, last first (safe after a partial load).

        Every step runs whatever happens in another: SIGINT is held meanwhile (main thread),
        and a step that fails or is interrupted anyway is logged and the rest still run.  An
        interrupt then raises :class:`UnloadInterrupted` (one line) at the end; another
        BaseException (SystemExit) is raised again as it was.
        """
        first: BaseException | None = None
        with interrupts_held() as held:
            while self._undo:
                what, undo = self._undo.pop()
                try:
                    undo()
                except Exception:  # noqa: BLE001 - go on undoing the rest
                    log.warning("qmagic: undoing the %s failed", what, exc_info=True)
                except BaseException as exc:  # ■ must not leave qmagic half unloaded
                    log.warning("qmagic: undoing the %s was interrupted", what, exc_info=True)
                    first = first or exc
        if first is not None and not isinstance(first, KeyboardInterrupt):
            raise first
        if first is not None or held:
            raise UnloadInterrupted(MSG_UNLOAD_INTERRUPTED) from None


def _unregister_magics(shell: Any, magics: Any) -> None:
    """IPython has no public 'unregister': remove our names from the manager's tables, and
    the instance from ``shell.configurables`` (``register_magics`` appends it there; it
    holds the worker, which would otherwise live as long as the kernel)."""
    _drop_configurable(shell, magics)
    manager = shell.magics_manager
    for kind, table in magics.magics.items():
        registered = manager.magics.get(kind, {})
        for name in table:
            current = registered.get(name)
            if current is not None and getattr(current, "__self__", None) is magics:
                del registered[name]
    if manager.registry.get(type(magics).__name__) is magics:
        del manager.registry[type(magics).__name__]


def _drop_configurable(shell: Any, obj: Any) -> None:
    """Take ``obj`` out of ``shell.configurables`` (where ``%config`` finds what it sets)."""
    configurables = getattr(shell, "configurables", None)
    if isinstance(configurables, list):
        configurables[:] = [c for c in configurables if c is not obj]


def load_ipython_extension(shell: Any) -> None:
    """Load qmagic into ``shell`` (``%load_ext qmagic``); a no-op if already loaded."""
    with _sessions_lock:
        if id(shell) in _sessions:
            return
        session = Session(shell)
        try:
            session.load()
        except BaseException:
            try:
                session.unload()
            except KeyboardInterrupt:  # the load's own error is the one to show
                pass
            raise
        _sessions[id(shell)] = session


def unload_ipython_extension(shell: Any) -> None:
    """Undo :func:`load_ipython_extension` (``%unload_ext qmagic``); a no-op if not loaded.

    It always finishes; ■ meanwhile raises a one-line ``KeyboardInterrupt`` at the end, and
    IPython's list of loaded extensions then no longer names qmagic (IPython drops it only
    when this returns), so ``%load_ext qmagic`` works again.
    """
    loaded = get_session(shell)
    worker = loaded.worker if loaded is not None else None
    if worker is not None and worker.engine.running_own_task() is not None:
        from IPython.core.error import UsageError

        raise UsageError(MSG_UNLOAD_IN_TASK)
    interrupted = False
    with interrupts_held() as held:  # ■ between the pop and the unload would undo nothing
        with _sessions_lock:
            session = _sessions.pop(id(shell), None)
        if session is not None:
            try:
                session.unload()
            except UnloadInterrupted:
                interrupted = True
    if interrupted or held:
        loaded = getattr(getattr(shell, "extension_manager", None), "loaded", None)
        if isinstance(loaded, set):
            loaded.discard("qmagic")
        raise UnloadInterrupted(MSG_UNLOAD_INTERRUPTED) from None


def get_session(shell: Any = None) -> Session | None:
    """The qmagic session of ``shell`` (default: the running IPython), or None."""
    if shell is None:
        from IPython import get_ipython

        shell = get_ipython()
        if shell is None:
            return None
    with _sessions_lock:
        return _sessions.get(id(shell))


def get_worker(shell: Any = None) -> Worker:
    """The :class:`qmagic.Worker` of this kernel (or of ``shell``).

    Raises :class:`qmagic.NotLoaded` (a RuntimeError) when qmagic is not loaded: run
    ``%load_ext qmagic`` first, or ``%reload_ext qmagic`` when IPython still lists it as
    loaded (an unload that raised); outside IPython, build a ``qmagic.Worker(namespace)``
    yourself.
    """
    if shell is None:
        from IPython import get_ipython

        shell = get_ipython()
    session = get_session(shell) if shell is not None else None
    if session is None or session.worker is None:
        manager = getattr(shell, "extension_manager", None)
        if "qmagic" in getattr(manager, "loaded", ()):
            raise NotLoaded("qmagic is not loaded in this IPython session: run "
                            "%reload_ext qmagic.")
        raise NotLoaded(
            "qmagic is not loaded in this IPython session: run %load_ext qmagic first (outside "
            "IPython, create a qmagic.Worker(namespace) instead)."
        )
    return session.worker
