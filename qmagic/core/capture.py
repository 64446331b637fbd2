"""Keep what a task prints and logs on the task, while it still reaches its usual place.

``sys.stdout`` / ``sys.stderr`` are wrapped once (reference counted over workers) by a thin
tee that copies writes made by a task's work to that task, and a handler on the root
logger copies log records emitted by it.  A task's work is the task running in the
writing thread, else the task whose work started that thread (or the thread that started
it ...) while that task runs: while installed, ``threading.Thread.start`` notes it on the
new thread (a scan reading detectors in a thread pool keeps their prints and logs) -- and
``ThreadPoolExecutor.submit`` notes it on what a pool's thread runs for it, so a pool that
tasks share (asyncio's default executor) runs each submission as its submitter's work,
whoever started its thread -- and such a thread's prints are written in the context the task's code runs in
(``Task._work_context``), so they reach the task's cell, not whichever cell runs then.
Outside tasks both are pass-through, and so once the task's end was claimed (code it
started that inherited its context -- an asyncio task it created -- may print after it
ended: a finished task's output and log never change).

Listeners (the info socket) are told which task's work wrote a text, by the same rule, as
a queueserver worker publishes whatever its threads print.
"""

from __future__ import annotations

import logging
import sys
import threading
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TextIO

from .context import _current, task_here

__all__ = ["TextBuffer", "install", "uninstall", "ensure_streams", "add_listener", "remove_listener",
           "thread_work_context", "work_of"]

_lock = threading.Lock()
_users = 0
#: Called as ``listener(task or None, text)`` for every text written to stdout/stderr
#: (in the writing thread: listeners must be quick, e.g. put the text on a queue).
_listeners: tuple = ()
#: How the names of qmagic's own threads start ("qmagic-asyncio", "qmagic-task", ...).
_OWN_THREADS = "qmagic-"


class _Patch:
    """A method replaced by ours while installed (under ``_lock``), such as another library's
    patch found then keeps working."""

    def __init__(self, owner: type, name: str, ours: Any) -> None:
        self.owner, self.name, self.ours = owner, name, ours
        self.found: Any = None  # the method as install() found it (ours calls it)
        #: uninstall() found another library's wrapper around ours (it calls ours): ours stays
        #: in that chain, passing through while not installed, and is never wrapped around it again
        self.left_in_chain = False

    def install(self) -> None:
        current = self.owner.__dict__.get(self.name)
        if self.left_in_chain and current is self.found:
            self.left_in_chain = False  # (the wrapper that held ours is gone: ours is in no chain)
        if not self.left_in_chain and current is not self.ours:
            self.found = current  # (as found: another library's patch keeps working)
            setattr(self.owner, self.name, self.ours)

    def uninstall(self) -> None:
        if self.owner.__dict__.get(self.name) is self.ours:  # (unless replaced since)
            setattr(self.owner, self.name, self.found)
        else:  # (a wrapper around ours: taking that as "the original" would recurse)
            self.left_in_chain = True


def work_of() -> Any:
    """The task whose work runs in this thread: the current task, else the one whose work
    started this thread (in a pool's thread: submitted what it runs), while that task runs
    (see the module docstring), else None.  (Once
    it has ended, a thread it happened to start -- a pool's, an event loop's -- runs other
    work: the notebook's, the next task's; and code it started that inherited its context,
    an asyncio task it created, is on its own.)"""
    task = task_here()
    return None if task is None or task._ending else task


def thread_work_context() -> Any:
    """Where what this thread shows goes, when it is a thread a task's work started (a pool's
    reading detectors) and that task runs: the context the task's code runs in
    (``Task._work_context``), to run a display call in (a copy: a context is entered by one
    thread at a time).  None elsewhere: the task's own thread has it already; other threads,
    and one the task left behind after its end, show where everyone's output goes."""
    return _work_context(work_of())


def _work_context(task: Any) -> Any:
    return task._work_context if task is not None and _current.get() is None else None


def _start_noting_the_task(thread: threading.Thread) -> None:
    """``threading.Thread.start`` that first notes on the thread whose work starts it (not on
    qmagic's own threads, started on first use: an event loop, a pool, serve every task)."""
    task = work_of() if _users else None
    if task is not None and not thread.name.startswith(_OWN_THREADS):  # (weakly: a pool's
        # thread lives on, the task and its result need not)
        try:
            thread._qmagic_started_by = weakref.ref(task)  # type: ignore[attr-defined]
        except AttributeError:  # (a Thread subclass with __slots__: it starts all the same)
            pass
    _THREAD_START.found(thread)


def _submit_noting_the_task(pool: ThreadPoolExecutor, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
    """``ThreadPoolExecutor.submit`` that notes whose work submits ``fn``: the pool's thread
    runs it as that work (or as no task's), whichever task's work happened to start that
    thread -- a pool outlives the submission that started its threads (asyncio's default
    executor serves every coroutine task of its loop)."""
    task = work_of() if _users else None
    return _POOL_SUBMIT.found(pool, _Submitted(fn, task), *args, **kwargs)


class _Submitted:
    """``fn``, run in a pool's thread as the work of the task that submitted it (None: none's)."""

    __slots__ = ("fn", "by")

    def __init__(self, fn: Any, task: Any) -> None:
        self.fn = fn
        self.by = weakref.ref(task) if task is not None else None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        thread = threading.current_thread()
        before = getattr(thread, "_qmagic_started_by", None)
        try:
            thread._qmagic_started_by = self.by  # type: ignore[attr-defined]
        except AttributeError:  # (a Thread subclass with __slots__: it runs all the same)
            return self.fn(*args, **kwargs)
        try:
            return self.fn(*args, **kwargs)
        finally:
            thread._qmagic_started_by = before  # type: ignore[attr-defined]


_THREAD_START = _Patch(threading.Thread, "start", _start_noting_the_task)
_POOL_SUBMIT = _Patch(ThreadPoolExecutor, "submit", _submit_noting_the_task)


def add_listener(listener: Any) -> None:
    """Also hand every write to ``listener(task, text)`` (``task`` None outside tasks)."""
    global _listeners
    with _lock:
        _listeners = _listeners + (listener,)


def remove_listener(listener: Any) -> None:
    """Undo :func:`add_listener` (idempotent)."""
    global _listeners
    with _lock:
        _listeners = tuple(x for x in _listeners if x is not listener)


class TextBuffer:
    """Bounded text: keeps the newest ``limit`` characters, marks what was dropped.

    Not thread-safe by itself: the owning task guards it with its lock.
    """

    __slots__ = ("_chunks", "_size", "_dropped", "limit")

    def __init__(self, limit: int) -> None:
        self._chunks: deque[str] = deque()
        self._size = 0
        self._dropped = 0
        self.limit = limit

    def write(self, text: str) -> None:
        """Append ``text``, dropping the oldest characters beyond ``limit``."""
        if not text:
            return
        self._chunks.append(text)
        self._size += len(text)
        while self._size > self.limit and self._chunks:
            excess = self._size - self.limit
            head = self._chunks[0]
            if len(head) <= excess:
                self._chunks.popleft()
                self._size -= len(head)
                self._dropped += len(head)
            else:
                self._chunks[0] = head[excess:]
                self._size -= excess
                self._dropped += excess

    def getvalue(self) -> str:
        """The kept text, preceded by a marker line when older text was dropped."""
        text = "".join(self._chunks)
        if self._dropped:
            return f"[... {self._dropped} earlier characters dropped ...]\n" + text
        return text


_in_thread = threading.local()  # .pending: what this thread keeps now, and what waits for it


def _kept(keep: Any, *args: Any) -> Any:
    """``keep(*args)`` (which takes a task's lock, or a listener's) and its result; or, when
    this thread is already keeping text, None and ``keep(*args)`` just after that: code that
    runs meanwhile in the same thread -- a finalizer the garbage collector runs, a signal
    handler -- may print or log, and the locks are not re-entrant (the thread froze).

    What waits is run even if the one in progress raises (its exception then propagates).
    Its writer has returned, so nobody can be told if it fails: an exception of it is
    ignored, as Python ignores one raised in a finalizer; ■ meanwhile is raised once all
    are done."""
    pending = getattr(_in_thread, "pending", None)
    if pending is not None:
        pending.append((keep, args))
        return None
    _in_thread.pending = pending = deque()
    try:
        return keep(*args)
    finally:
        try:
            _run_waiting(pending)
        finally:  # (here, not in _run_waiting: ■ as a function starts, before its first line,
            _in_thread.pending = None  # left every later write of this thread waiting for good)


def _run_waiting(pending: deque) -> None:
    """Run what waited for the keep in progress (see :func:`_kept`), in order."""
    interrupt: BaseException | None = None
    while pending:
        keep, args = pending.popleft()
        try:
            keep(*args)
        except Exception:  # noqa: BLE001 - its writer has returned (see _kept)
            pass
        except BaseException as exc:  # noqa: BLE001 - ■: the rest are still kept, then it is raised
            interrupt = interrupt or exc
    if interrupt is not None:
        raise interrupt


def _keep_text(text: str) -> Any:
    """A write to stdout/stderr: to the output of the task whose work wrote it (:func:`work_of`:
    also a thread that work started, while the task runs), and to the listeners.  Returns
    that task (None: no task's work, or it has ended)."""
    task = work_of()
    if task is not None and not task._write_output(text):
        task = None  # (it has ended: its output stays as it was; the text goes where others go)
    if _listeners:
        for listener in _listeners:
            listener(task, text)
    return task


class _TaskTee:
    """File-like proxy: writes go to the wrapped stream and, inside a task, to the task."""

    def __init__(self, stream: TextIO) -> None:
        self._qmagic_wrapped = stream

    def write(self, text: Any) -> int:
        if not isinstance(text, str):
            return self._qmagic_wrapped.write(text)
        # (kept and written as one: a write made meanwhile goes after this one, in both)
        written = _kept(self._keep_and_write, text)
        return len(text) if written is None else written

    def _keep_and_write(self, text: str) -> int:
        # (a thread the task's work started: its text goes where the task's goes, its cell,
        # not to whichever cell runs now; see thread_work_context)
        context = _work_context(_keep_text(text))
        if context is not None:
            return context.copy().run(self._qmagic_wrapped.write, text)
        return self._qmagic_wrapped.write(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._qmagic_wrapped, name)


class _TaskLogHandler(logging.Handler):
    """Copies records emitted inside a task to that task's log."""

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        task = work_of()  # (also a thread its work started: a pool reading detectors)
        if task is not None and not task._ending:  # (an ended task's log never changes)
            try:
                message = record.getMessage()
                line = self.format(record) + "\n"
            except Exception:  # noqa: BLE001 - a bad log call must not break the task
                self.handleError(record)
                return
            entry = {"time": record.created, "level": record.levelname, "logger": record.name,
                     "message": message}
            _kept(task._add_log_record, entry, line)
        if self._only_handler_for(record) and logging.lastResort is not None:
            # Adding this handler must not silence Python's last-resort stderr output.
            if record.levelno >= logging.lastResort.level:
                logging.lastResort.handle(record)

    def _only_handler_for(self, record: logging.LogRecord) -> bool:
        logger: logging.Logger | None = logging.getLogger(record.name)
        while logger is not None:
            if any(h is not self for h in logger.handlers):
                return False
            if not logger.propagate:
                return False
            logger = logger.parent  # type: ignore[assignment]
        return True


_handler = _TaskLogHandler()


def _wrap(name: str) -> None:
    stream = getattr(sys, name)
    if stream is not None and not isinstance(stream, _TaskTee):
        setattr(sys, name, _TaskTee(stream))


def ensure_streams() -> None:
    """Re-wrap stdout/stderr if something replaced them since :func:`install`."""
    if _users:
        if not isinstance(sys.stdout, _TaskTee) or not isinstance(sys.stderr, _TaskTee):
            with _lock:
                if _users:
                    _wrap("stdout")
                    _wrap("stderr")


def install() -> None:
    """Start copying task output and logs (one call per worker; reference counted)."""
    global _users
    with _lock:
        _users += 1
        _wrap("stdout")
        _wrap("stderr")
        _THREAD_START.install()
        _POOL_SUBMIT.install()
        root = logging.getLogger()
        if _handler not in root.handlers:
            root.addHandler(_handler)


def uninstall() -> None:
    """Undo one :func:`install`; the last one restores the streams and the logger."""
    global _users
    with _lock:
        if _users == 0:
            return
        _users -= 1
        if _users:
            return
        for name in ("stdout", "stderr"):
            stream = getattr(sys, name)
            if isinstance(stream, _TaskTee):
                setattr(sys, name, stream._qmagic_wrapped)
        _THREAD_START.uninstall()
        _POOL_SUBMIT.uninstall()
        logging.getLogger().removeHandler(_handler)
