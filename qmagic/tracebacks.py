"""Tracebacks as users see them: their own frames only, ``Cell In[12]`` for a cell's code.

Part of the formatting layer, beside :mod:`qmagic.format`: a traceback never shows qmagic's frames, nor ``threading``, ``asyncio`` or
``concurrent.futures`` internals; the kernel installs how its temporary cell files read
(:func:`set_filename_labeler`).  No IPython, widgets or zmq here.
"""

from __future__ import annotations

import os
import sys
import threading
import traceback as _tb
import types
from typing import Any, Callable

from .core.memo import Memo

__all__ = ["is_internal_frame", "set_filename_labeler", "traceback_text", "user_traceback"]

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_INTERNAL_FILES = {os.path.abspath(m.__file__) for m in (threading,) if getattr(m, "__file__", None)}
_INTERNAL_DIRS = tuple(
    os.path.dirname(os.path.abspath(m.__file__)) + os.sep
    for m in (sys.modules.get("asyncio"), sys.modules.get("concurrent.futures"))
    if m is not None and getattr(m, "__file__", None)
)
_labeler: Callable[[str], str | None] | None = None
#: Texts of recent plain tracebacks, by the labeler and what they show (:func:`_shown_as`):
#: thousands of tasks cancelled at one ``await`` (a worker's close) format one (0.5 ms each: a
#: close of 10,000 fell seconds behind its timeout).  Emptied when full.
_TEXTS: Memo[str] = Memo(256)


def set_filename_labeler(labeler: Callable[[str], str | None] | None) -> None:
    """Install how code file names read in tracebacks (the kernel maps its temporary cell
    files to ``Cell In[12]``); None removes it."""
    global _labeler
    _labeler = labeler
    _TEXTS.clear()  # (a text made meanwhile under the old labeler is kept under its key)


def is_internal_frame(filename: str) -> bool:
    """True for frames of qmagic itself and of ``threading`` / ``asyncio`` /
    ``concurrent.futures`` internals (never shown to users)."""
    path = os.path.abspath(filename) if filename and not filename.startswith("<") else filename
    return (path.startswith(_PACKAGE_DIR) or path in _INTERNAL_FILES
            or path.startswith(_INTERNAL_DIRS) or "/asyncio/" in path
            or path.endswith(("/threading.py", "/concurrent/futures/_base.py")))


def _clean(te: _tb.TracebackException, seen: set[int], labeler: Callable[[str], str | None] | None) -> None:
    if id(te) in seen:
        return
    seen.add(id(te))
    frames = [f for f in te.stack if not is_internal_frame(f.filename)]
    if labeler is not None:
        for frame in frames:
            label = labeler(frame.filename)
            if label:
                frame.filename = label
    te.stack[:] = frames
    for nxt in (te.__cause__, te.__context__, *(getattr(te, "exceptions", None) or ())):  # (a group's too)
        if nxt is not None:
            _clean(nxt, seen, labeler)


def traceback_text(exc: BaseException) -> str:
    """The traceback of ``exc`` as text, with the user's frames only (see the module
    docstring); the exception line(s) at the end, chained exceptions kept."""
    labeler, shown = _labeler, _shown_as(exc)
    key = None if shown is None else (labeler, *shown)
    text = _TEXTS.get(key) if key is not None else None
    if text is not None:
        return text
    try:
        te = _tb.TracebackException(type(exc), exc, exc.__traceback__, capture_locals=False)
        _clean(te, set(), labeler)
        text = "".join(te.format())
    except Exception:  # noqa: BLE001 - never lose the error itself
        return f"{type(exc).__name__}: {exc!r}\n"
    if key is not None:
        _TEXTS.put(key, text)
    return text


def _shown_as(exc: BaseException) -> tuple | None:
    """What the traceback text of ``exc`` shows: its type, its message and the code position of
    each frame, (the texts are forgotten when the file labels change); None (not kept) for a chained exception, one with
    notes, a group, or one whose message cannot be read."""
    if (exc.__cause__ is not None or exc.__context__ is not None or getattr(exc, "__notes__", None)
            or isinstance(exc, BaseExceptionGroup)):
        return None
    try:
        message = str(exc)
    except Exception:  # noqa: BLE001 - formatted (and shown broken) by the slow way
        return None
    positions = []
    tb = exc.__traceback__
    while tb is not None:
        positions.append((tb.tb_frame.f_code, tb.tb_lasti))
        tb = tb.tb_next
    return type(exc), message, tuple(positions)


def user_traceback(exc: BaseException) -> Any:
    """``exc.__traceback__`` with the user's frames only (for re-raising in a cell: a task's
    code that called qmagic and got its error showed qmagic's frames after its own), or the
    last frame when every frame is qmagic's."""
    kept = []
    tb = last = exc.__traceback__
    while tb is not None:
        if not is_internal_frame(tb.tb_frame.f_code.co_filename):
            kept.append(tb)
        last, tb = tb, tb.tb_next
    if not kept:
        return last
    out = None
    try:
        for item in reversed(kept):  # (a new chain: the exception's own traceback is not changed)
            out = types.TracebackType(out, item.tb_frame, item.tb_lasti, item.tb_lineno or 0)
    except Exception:  # noqa: BLE001 - never fail a task's end over its traceback's display
        return kept[0]
    return out
