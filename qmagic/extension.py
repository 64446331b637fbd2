"""Loading and unloading qmagic in an IPython shell (``%load_ext qmagic``).

Loading builds one :class:`Session` per shell: the :class:`qmagic.Worker` on
``shell.user_ns`` (a ``QMagic`` Configurable with ``parent=shell``, so ``c.QMagic.*`` in a
profile and ``--QMagic.*=...`` on the kernel command line apply), the kernel foreground
runner and output hook (:mod:`qmagic.kernel`), the IPython events, the magics, the
completer, the ``text/plain`` form of a Task, the panels and the control channel.  The
session remembers every step so that unloading undoes each of them; load -> unload ->
load works, and loading twice is a silent no-op.

In a terminal IPython (loaded explicitly; the auto-load file only loads in Jupyter
kernels) everything works except foreground requests from other threads, which are
refused: see :mod:`qmagic.kernel`.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any, Callable

from .kernel import CellOutputHook, KernelForegroundRunner
from .tasks import Task
from .worker import Worker

__all__ = ["Session", "get_worker", "load_ipython_extension", "unload_ipython_extension"]

log = logging.getLogger("qmagic")

_sessions: dict[int, "Session"] = {}
_sessions_lock = threading.RLock()


def _task_text(task: Task, printer: Any, cycle: bool) -> None:
    """IPython ``text/plain`` printer of a Task (deterministic: no uid, no times)."""
    from .text import task_line

    printer.text(task_line(task))


class Session:
    """Everything qmagic added to one shell, so that :meth:`unload` can undo it."""

    def __init__(self, shell: Any) -> None:
        self.shell = shell
        self.worker: Worker | None = None
        self.runner: KernelForegroundRunner | None = None
        self.hook: CellOutputHook | None = None
        self.magics: Any = None
        self.matcher: Any = None
        self._events: list[tuple[str, Callable[..., Any]]] = []
        self._formatter_old: Any = None
        self._formatter_set = False
        self._attached: list[Any] = []  # modules whose detach(shell, worker) must run
        self._catalog_key: Any = None

    # -- loading ---------------------------------------------------------------------------
    def load(self) -> None:
        """Build the worker and register everything; raises if a required step fails."""
        shell = self.shell
        self.runner = KernelForegroundRunner(shell)
        self.worker = Worker(shell.user_ns, parent=shell, foreground=self.runner)
        self.worker.hidden_names = set(getattr(shell, "user_ns_hidden", {}) or {})
        self.worker.interrupt_main = self.runner.interrupt_main
        self.worker.refresh_catalog()
        self.hook = CellOutputHook(shell)
        self.worker.engine.context_hooks.append(self.hook)

        self._register_event("pre_run_cell", self.runner.cell_started)
        self._register_event("post_run_cell", self._post_run_cell)

        from .magics import QMagicMagics, panels_module

        self.magics = QMagicMagics(shell, self.worker)
        shell.register_magics(self.magics)
        self._register_completer()
        self._register_formatter()
        self._attach(panels_module(), "panels")
        try:
            from . import control
        except ImportError as exc:
            log.debug("qmagic: control channel not available (%s)", exc)
        else:
            self._attach(control, "control channel")

    def _register_event(self, name: str, callback: Callable[..., Any]) -> None:
        self.shell.events.register(name, callback)
        self._events.append((name, callback))

    def _post_run_cell(self, *_: Any) -> None:
        """After each cell: the kernel is free again; refresh the catalog if names changed."""
        if self.runner is not None:
            self.runner.cell_finished()
        worker = self.worker
        if worker is None:
            return
        try:
            key = frozenset(
                (name, id(value)) for name, value in list(worker.namespace.items())
                if not name.startswith("_")
            )
            if key != self._catalog_key:
                self._catalog_key = key
                worker.refresh_catalog()
        except Exception:  # noqa: BLE001 - a cell's aftermath must not fail the cell
            log.debug("qmagic: catalog refresh failed", exc_info=True)

    def _register_completer(self) -> None:
        completer = getattr(self.shell, "Completer", None)
        if completer is None or not hasattr(completer, "custom_matchers"):
            return
        try:
            from .magics import function_name_matcher

            self.matcher = function_name_matcher(self.worker)
        except ImportError:  # pragma: no cover - IPython without the matcher API v2
            return
        completer.custom_matchers.append(self.matcher)

    def _register_formatter(self) -> None:
        formatter = getattr(getattr(self.shell, "display_formatter", None), "formatters", {}).get(
            "text/plain"
        )
        if formatter is None:
            return
        self._formatter_old = formatter.for_type(Task, _task_text)
        self._formatter_set = True

    def _attach(self, module: Any, what: str) -> None:
        """Call ``module.attach(shell, worker)``; a failure is reported, never fatal."""
        attach = getattr(module, "attach", None)
        if attach is None:
            return
        try:
            attach(self.shell, self.worker)
        except Exception as exc:  # noqa: BLE001 - a failing extra must not break the kernel
            log.warning("qmagic: attaching the %s failed", what, exc_info=True)
            print(f"qmagic: the {what} could not start: {exc}", file=sys.stderr)
            return
        self._attached.append(module)

    # -- unloading -------------------------------------------------------------------------
    def unload(self) -> None:
        """Undo every step of :meth:`load` that happened (safe after a partial load)."""
        shell, worker = self.shell, self.worker
        for module in reversed(self._attached):
            try:
                module.detach(shell, worker)
            except Exception:  # noqa: BLE001 - go on undoing the rest
                log.warning("qmagic: %s.detach failed", module.__name__, exc_info=True)
        self._attached.clear()
        if self._formatter_set:
            formatter = shell.display_formatter.formatters["text/plain"]
            formatter.type_printers.pop(Task, None)
            if self._formatter_old is not None:
                formatter.for_type(Task, self._formatter_old)
            self._formatter_set = False
        if self.matcher is not None:
            matchers = shell.Completer.custom_matchers
            if self.matcher in matchers:
                matchers.remove(self.matcher)
            self.matcher = None
        if self.magics is not None:
            _unregister_magics(shell, self.magics)
            self.magics = None
        for name, callback in reversed(self._events):
            try:
                shell.events.unregister(name, callback)
            except ValueError:
                pass
        self._events.clear()
        if worker is not None:
            if self.hook in worker.engine.context_hooks:
                worker.engine.context_hooks.remove(self.hook)
            worker.close()
        if self.runner is not None:
            self.runner.close()


def _unregister_magics(shell: Any, magics: Any) -> None:
    """IPython has no public 'unregister': remove our names from the manager's tables."""
    manager = shell.magics_manager
    for kind, table in magics.magics.items():
        registered = manager.magics.get(kind, {})
        for name, method in table.items():
            current = registered.get(name)
            if current is not None and getattr(current, "__self__", None) is magics:
                del registered[name]
    registry = manager.registry
    key = type(magics).__name__
    if registry.get(key) is magics:
        del registry[key]


# =========================================================================================
# the IPython extension entry points
# =========================================================================================
def load_ipython_extension(shell: Any) -> None:
    """Load qmagic into ``shell`` (``%load_ext qmagic``); a no-op if already loaded."""
    with _sessions_lock:
        if id(shell) in _sessions:
            return
        session = Session(shell)
        try:
            session.load()
        except BaseException:
            session.unload()
            raise
        _sessions[id(shell)] = session


def unload_ipython_extension(shell: Any) -> None:
    """Undo :func:`load_ipython_extension` (``%unload_ext qmagic``); a no-op if not loaded."""
    with _sessions_lock:
        session = _sessions.pop(id(shell), None)
    if session is not None:
        session.unload()


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

    Raises ``RuntimeError`` when qmagic is not loaded: run ``%load_ext qmagic`` first
    (outside IPython, build a ``qmagic.Worker(namespace)`` yourself).
    """
    session = get_session(shell)
    if session is None or session.worker is None:
        raise RuntimeError(
            "qmagic is not loaded in this IPython session: run %load_ext qmagic first "
            "(outside IPython, create a qmagic.Worker(namespace) instead)."
        )
    return session.worker
