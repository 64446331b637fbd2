"""What the kernel knows about a request: where its output goes, which notebook cell sent
it, how cell file names read, and the kernel's connection info.

- :class:`CellOutputHook` (an engine context hook) pins a background task's output to the
  cell that started it (ipykernel >= 7.4 ``set_thread_parent``; the same per-context
  variables on older 7.x).  A background task no cell started (a remote client's, a panel
  click's) prints into no cell: its output stays on the task (``%task_output``, the info
  socket's console), never in a cell the scientist happens to be running.  Output written at
  the file-descriptor level (C code, subprocesses) still goes to whatever cell runs then.
- :func:`route_thread_displays`: what a thread a task's work started displays goes to the
  task's cell too, as its prints do.
- :func:`provenance` reads the running request: the notebook (``JPY_SESSION_NAME`` /
  ``__session__``), the cell id and execution count, a short hash of the cell's source.
- :func:`cell_labeler` turns the kernel's temporary cell file names into ``Cell In[12]``.
- :func:`kernel_connection_info` is what ``config_get`` returns.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
import sys
import threading
from typing import Any, Callable, Iterator

from ..core.capture import thread_work_context

__all__ = ["CellOutputHook", "cell_labeler", "execute_request", "kernel_connection_info", "provenance_source",
           "route_thread_displays"]


def execute_request(shell: Any) -> dict | None:
    """The shell's current parent message when it is a cell's execute_request."""
    get_parent = getattr(shell, "get_parent", None)
    if get_parent is None:
        return None
    try:
        return _if_execute(get_parent())
    except Exception:  # noqa: BLE001
        return None


def _if_execute(parent: Any) -> dict | None:
    """``parent`` if it is a cell's execute_request."""
    if isinstance(parent, dict) and (parent.get("header") or {}).get("msg_type") == "execute_request":
        return parent
    return None


class CellOutputHook:
    """Engine ``ContextHook``: a background task's output goes to the cell that started it."""

    def __init__(self, shell: Any) -> None:
        self.shell = shell

    def capture(self, task: Any) -> Any:
        """For a background task: the request of the cell that started it (on the main thread,
        the running cell; on a task's thread, that task's cell), else no cell (``{}``)."""
        if not getattr(task, "background", False):
            return None
        if threading.current_thread() is threading.main_thread():
            request = execute_request(self.shell)
        else:  # this thread's own cell only: the kernel's current one is another request's
            own = getattr(self.shell, "_parent_header", None)
            try:
                request = _if_execute(own.get()) if isinstance(own, contextvars.ContextVar) else None
            except LookupError:
                request = None
        return request if request is not None else _NO_CELL

    def apply(self, task: Any, token: Any) -> contextlib.AbstractContextManager:
        """Context manager active around the task's code (its thread or asyncio task)."""
        if token is None:
            return contextlib.nullcontext()
        return _thread_parent(self.shell, token)


#: The parent of a background task's output when no cell started it: no cell shows it.
_NO_CELL: dict = {}


def route_thread_displays(shell: Any) -> Callable[[], None]:
    """What a thread a task's work started shows (``display()``, ``clear_output``: a pool
    reading detectors plots as it goes) goes to the task's cell, as its prints do
    (:func:`qmagic.core.capture.thread_work_context`), not to whichever cell runs then: also
    the traceback IPython shows when a display raises (a plot with a bad label), and the
    request such a thread reads (``get_parent``: an ``ipywidgets.Output`` it fills takes
    the cell its displays go to) or sets (``set_parent``: ignored there, as its output
    follows the task's cell already; ipykernel's would also move the kernel-wide parent every
    thread without one of its own writes under, so a plain thread of the cell running then
    would print into the task's cell).  Wraps the shell's display publisher and those shell
    methods; returns the undo."""
    wrapped: list[tuple[Any, str, Any, Any]] = []  # (owner, name, what it had, our wrapper)
    publisher = getattr(shell, "display_pub", None)
    for owner, names in ((publisher, ("publish", "clear_output")),
                         (shell, ("_showtraceback", "get_parent", "set_parent"))):
        for name in names if owner is not None else ():
            method = getattr(owner, name, None)
            if callable(method):
                ours = _in_the_tasks_context(method, run=name != "set_parent")
                wrapped.append((owner, name, owner.__dict__.get(name, _MISSING), ours))
                setattr(owner, name, ours)

    def undo() -> None:
        for owner, name, before, ours in reversed(wrapped):
            if owner.__dict__.get(name) is not ours:
                continue  # (wrapped again since, by someone else: theirs stays)
            if before is _MISSING:
                del owner.__dict__[name]  # (the class's method again)
            else:
                setattr(owner, name, before)

    return undo


_MISSING = object()


def _in_the_tasks_context(method: Callable[..., Any], run: bool = True) -> Callable[..., Any]:
    """``method`` in a copy of the task's context in a thread its work started (not
    ``run``: not at all there), as it is elsewhere."""
    def routed(*args: Any, **kwargs: Any) -> Any:
        context = thread_work_context()
        if context is None:
            return method(*args, **kwargs)
        return context.copy().run(method, *args, **kwargs) if run else None

    routed.__wrapped__ = method  # type: ignore[attr-defined]
    return routed


@contextlib.contextmanager
def _thread_parent(shell: Any, parent: dict) -> Iterator[None]:
    setter = getattr(shell, "set_thread_parent", None)
    resetter = getattr(shell, "reset_thread_parent", None)
    if setter is not None and resetter is not None:
        tokens = setter(parent)
        try:
            yield
        finally:
            resetter(tokens)
        return
    resets = _set_context_parents(shell, parent)
    try:
        yield
    finally:
        for var, token in reversed(resets):
            var.reset(token)


def _set_context_parents(shell: Any, parent: dict) -> list[tuple[Any, Any]]:
    """ipykernel 7.0-7.3: set the per-context ``_parent_header`` variables directly."""
    try:
        from jupyter_client.session import extract_header
    except ImportError:  # pragma: no cover - jupyter_client is a kernel dependency
        return []
    header = extract_header(parent)
    objects: list[tuple[Any, Any]] = [(shell, parent)]
    for name in ("displayhook", "display_pub"):
        objects.append((getattr(shell, name, None), header))
    for stream in (sys.stdout, sys.stderr):
        objects.append((getattr(stream, "_qmagic_wrapped", stream), header))
    resets: list[tuple[Any, Any]] = []
    for obj, value in objects:
        var = getattr(obj, "_parent_header", None) if obj is not None else None
        if isinstance(var, contextvars.ContextVar):
            resets.append((var, var.set(value)))
    return resets


def provenance_source(shell: Any) -> Callable[[], dict | None]:
    """A function returning the provenance of a request made now (see the module docstring)."""

    def provenance() -> dict | None:
        notebook = os.environ.get("JPY_SESSION_NAME") or shell.user_ns.get("__session__") or None
        info: dict[str, Any] = {"notebook": notebook if isinstance(notebook, str) else None,
                                "cell_id": None, "execution_count": None, "cell_hash": None}
        if threading.current_thread() is threading.main_thread():
            request = execute_request(shell)
            if request is not None:
                cell_id = (request.get("metadata") or {}).get("cellId")
                code = (request.get("content") or {}).get("code")
                info["cell_id"] = cell_id if isinstance(cell_id, str) else None
                count = getattr(shell, "execution_count", None)
                info["execution_count"] = count - 1 if isinstance(count, int) and count > 1 else None
                if isinstance(code, str):
                    info["cell_hash"] = hashlib.sha256(code.encode("utf-8", "replace")).hexdigest()[:12]
        return info if any(v is not None for v in info.values()) else None

    return provenance


def cell_labeler(shell: Any) -> Callable[[str], str | None]:
    """Maps the kernel's cell file names (``/tmp/ipykernel_1/123.py``) to ``Cell In[12]``."""
    compiler = getattr(shell, "compile", None)

    def label(filename: str) -> str | None:
        mapping = getattr(compiler, "_filename_map", None)
        if isinstance(mapping, dict) and filename in mapping:
            return f"Cell In[{mapping[filename]}]"
        return None

    return label


def kernel_connection_info() -> dict[str, Any]:
    """This kernel's connection info (JSON-ready; the HMAC key as text), or ``{}``."""
    app_module = sys.modules.get("ipykernel.kernelapp")
    if app_module is None:
        return {}
    info: dict[str, Any] = {}
    try:
        app_class = app_module.IPKernelApp
        if not app_class.initialized():
            return {}
        app = app_class.instance()
        info = dict(app.get_connection_info())
    except Exception:  # noqa: BLE001 - fall back to the connection file
        try:
            with open(app_module.IPKernelApp.instance().abs_connection_file, encoding="utf-8") as fh:
                info = json.load(fh)
        except Exception:  # noqa: BLE001
            return {}
    key = info.get("key")
    if isinstance(key, bytes):
        info["key"] = key.decode("utf-8", "replace")
    return {k: v for k, v in info.items() if isinstance(v, (str, int, float, bool, type(None)))}
