"""The qmagic magics: thin doors to the worker's Python API.

Every magic checks its input (bad input raises ``UsageError``: one line, no traceback),
calls the worker with ``origin="magic"`` and prints deterministic text (or shows a live
panel).  ``%magic?`` shows each one's full help.
"""

from __future__ import annotations

from typing import Any

from IPython.core.error import UsageError

from .args import split_words, value_options
from .common import interrupts_in_one_line
from .helptext import tidy_help
from .locks import LockMagics
from .remote import RemoteMagics
from .tasks import DEFAULT_TASK_ROWS, TaskMagics

__all__ = ["TaskMagics", "LockMagics", "RemoteMagics", "DEFAULT_TASK_ROWS", "function_name_matcher",
           "task_uid_matcher"]

for _magics in (TaskMagics, LockMagics, RemoteMagics):
    tidy_help(_magics)  # %magic? as plain text
    for _method in {**_magics.magics["line"], **_magics.magics["cell"]}.values():
        setattr(_magics, _method, interrupts_in_one_line(getattr(_magics, _method)))
del _magics, _method


def function_name_matcher(worker: Any) -> Any:
    """A completer matcher offering the namespace's functions after ``%function_execute``'s
    options (IPython's Matcher API v2)."""
    from IPython.core.completer import SimpleCompletion, context_matcher

    takes_value = value_options(TaskMagics.function_execute.parser)

    @context_matcher(identifier="qmagic.function_execute")
    def qmagic_function_matcher(context: Any) -> dict:
        empty = {"completions": [], "suppress": False}
        line = context.text_until_cursor.lstrip()
        if not line.startswith("%function_execute"):
            return empty
        rest = line[len("%function_execute"):]
        if rest and not rest[0].isspace():
            return empty
        token = context.token
        before = rest[: len(rest) - len(token)] if token else rest
        try:
            words = [w for w, _, _ in split_words(before)]
        except UsageError:
            return empty
        i = 0
        while i < len(words):  # every word before the token must be an option (or its value)
            word = words[i]
            if not word.startswith("-"):
                return empty
            if takes_value.get(word.split("=", 1)[0]) and "=" not in word:
                i += 1
                if i == len(words):  # the token is this option's value
                    return empty
            i += 1
        if token.startswith("-"):
            return empty
        try:
            names = worker.functions_available()
        except Exception:  # noqa: BLE001 - completion must never raise
            return empty
        completions = [SimpleCompletion(n, type="function") for n in names if n.startswith(token)]
        return {"completions": completions, "suppress": bool(completions)}

    return qmagic_function_matcher


#: The magics that take task uids, and whether they take unfinished tasks only (a cancel).
_UID_MAGICS = {"%task_status": False, "%task_result": False, "%task_cancel": True}


def task_uid_matcher(worker: Any) -> Any:
    """A completer matcher offering the uids (their first 8 characters, as ``%tasks``
    shows them) of the tasks in this kernel's memory after ``%task_status``,
    ``%task_result`` and ``%task_cancel`` (unfinished tasks only), newest first."""
    from IPython.core.completer import SimpleCompletion, context_matcher

    @context_matcher(identifier="qmagic.task_uid")
    def qmagic_uid_matcher(context: Any) -> dict:
        magic, space, _ = context.text_until_cursor.lstrip().partition(" ")
        token = context.token
        if magic not in _UID_MAGICS or not space or token.startswith("-"):
            return {"completions": [], "suppress": False}
        try:
            tasks = worker.tasks()
        except Exception:  # noqa: BLE001 - completion must never raise
            return {"completions": [], "suppress": False}
        uids = [t.uid[:8] for t in reversed(tasks)
                if t.uid.startswith(token) and not (_UID_MAGICS[magic] and t.done())]
        return {"completions": [SimpleCompletion(u, type="task") for u in uids], "suppress": bool(uids)}

    return qmagic_uid_matcher
