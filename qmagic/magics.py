"""The qmagic magics: parse, delegate to the worker, show the answer.

Every magic is a thin door to a :class:`qmagic.Worker` method (``origin="magic"``).
Conventions, the same for every magic:

- bad input raises ``UsageError`` (IPython shows one line, no traceback);
- a request the worker refuses (lock, permissions, busy kernel...) also raises
  ``UsageError`` with the queueserver message (leading ``"Error: "`` dropped): one line,
  and the cell stops, so a "Run All" does not run on after a refused step;
- a foreground task behaves like calling the function in the cell: its output appears in
  the cell, an exception it raises stops the cell with its traceback, ■ / Ctrl-C stops it
  and raises ``KeyboardInterrupt`` (the task is recorded ``cancelled`` either way);
- text output is deterministic (no uids or clock times) via :mod:`qmagic.text`.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import os
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from . import text
from .errors import RequestRefused, TaskNotFound
from .tasks import Task, TaskStatus

__all__ = ["QMagicMagics", "split_words", "function_name_matcher", "DEFAULT_TASK_ROWS"]

#: Tasks shown by ``%tasks`` without ``--all`` (newest first).
DEFAULT_TASK_ROWS = 10

_PACKAGE_DIR = str(Path(__file__).resolve().parent)
_KWARG = re.compile(r"([A-Za-z_]\w*)=(?!=)(.*)\Z", re.DOTALL)
_OPEN = {"(": ")", "[": "]", "{": "}"}
_STRING_PREFIX = re.compile(r"[rRbBuUfF]{0,2}\Z")


# =========================================================================================
# splitting a line into Python expressions
# =========================================================================================
def split_words(line: str) -> list[tuple[str, int, int]]:
    """Split ``line`` at whitespace outside brackets and string literals.

    Returns ``(word, start, end)`` triples; quotes are kept (``"a b"`` stays one word with
    its quotes, ``[1, 2]`` stays one word).  Unbalanced brackets or quotes raise
    ``UsageError``.
    """
    words: list[tuple[str, int, int]] = []
    i, n = 0, len(line)
    start: int | None = None
    stack: list[str] = []
    while i < n:
        ch = line[i]
        if ch in "'\"":
            if start is None:
                start = i
            i = _skip_string(line, i)
            continue
        if ch.isspace() and not stack:
            if start is not None:
                words.append((line[start:i], start, i))
                start = None
            i += 1
            continue
        if start is None:
            start = i
        if ch in _OPEN:
            stack.append(_OPEN[ch])
        elif ch in ")]}":
            if not stack or stack.pop() != ch:
                raise UsageError(f"Unbalanced {ch!r} at position {i + 1} in: {line.strip()}")
        i += 1
    if stack:
        raise UsageError(f"Missing {stack[-1]!r} in: {line.strip()}")
    if start is not None:
        words.append((line[start:], start, n))
    return words


def _skip_string(line: str, i: int) -> int:
    """Index just after the string literal starting with the quote at ``i``."""
    quote = line[i]
    if line.startswith(quote * 3, i):
        end = line.find(quote * 3, i + 3)
        while end != -1 and _escaped(line, end):
            end = line.find(quote * 3, end + 1)
        if end == -1:
            raise UsageError(f"Unterminated string starting at position {i + 1}: {line[i:].strip()}")
        return end + 3
    j = i + 1
    while j < len(line):
        if line[j] == "\\":
            j += 2
            continue
        if line[j] == quote:
            return j + 1
        j += 1
    raise UsageError(f"Unterminated string starting at position {i + 1}: {line[i:].strip()}")


def _escaped(line: str, index: int) -> bool:
    backslashes = 0
    while index > 0 and line[index - 1] == "\\":
        backslashes += 1
        index -= 1
    return backslashes % 2 == 1


# =========================================================================================
# helpers shared by the magics
# =========================================================================================
def _refused(exc: BaseException | str) -> NoReturn:
    """Raise the refusal as a one-line UsageError (without the protocol's "Error: ")."""
    msg = str(exc)
    if msg.startswith("Error: "):
        msg = msg[len("Error: "):]
    raise UsageError(msg)


def _unquote(value: str | None) -> str | None:
    """Option values keep their quotes in IPython's splitting: ``"a b"`` -> ``a b``."""
    if value is None or len(value) < 2 or value[0] != value[-1] or value[0] not in "'\"":
        return value
    try:
        result = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value
    return result if isinstance(result, str) else value


def _interrupted(task: Task) -> bool:
    """True when a cancelled task was stopped by KeyboardInterrupt (■, Ctrl-C)."""
    tb = (task.traceback or "").strip()
    return task.status is TaskStatus.CANCELLED and bool(tb) and tb.splitlines()[-1].startswith(
        "KeyboardInterrupt"
    )


def _user_traceback(exc: BaseException) -> Any:
    """``exc``'s traceback without qmagic's own leading frames (engine, worker)."""
    tb = exc.__traceback__
    last = tb
    while tb is not None and tb.tb_frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        last = tb
        tb = tb.tb_next
    return tb if tb is not None else last


def _settle(task: Task) -> Task:
    """After a foreground task (or ``--wait``): raise what calling the function would have."""
    __tracebackhide__ = True  # noqa: F841 - IPython hides this frame
    if task.status is TaskStatus.FAILED:
        exc = task.exception()
        if exc is not None:
            raise exc.with_traceback(_user_traceback(exc))
    if _interrupted(task):
        raise KeyboardInterrupt(
            f"{task.call_text()} was interrupted; the task is recorded as cancelled."
        )
    return task


def panels_module() -> Any:
    """The panels module (``qmagic.widgets``, or the ``qmagic.panels`` package), or None
    while it is missing or cannot be imported here."""
    for name in ("widgets", "panels"):
        try:
            module = importlib.import_module(f"{__package__}.{name}")
        except ImportError:
            continue
        if hasattr(module, "widgets_available"):
            return module
    return None


def _value_actions(parser: argparse.ArgumentParser) -> dict[str, bool]:
    """{option string: takes a value} for every option of ``parser``."""
    return {
        opt: action.nargs != 0
        for action in parser._actions  # noqa: SLF001 - argparse has no public view
        for opt in action.option_strings
    }


def _split_options(parser: argparse.ArgumentParser, line: str) -> tuple[str, str | None, list[str]]:
    """Split ``[OPTIONS] NAME [ARG ...]`` into (options and name text, NAME, raw ARG words)."""
    takes_value = _value_actions(parser)
    words = split_words(line)
    i = 0
    while i < len(words):
        word = words[i][0]
        if word == "--":
            i += 1
            break
        if not word.startswith("-") or len(word) == 1 or word[1].isdigit() or word[1] == ".":
            break
        opt = word.split("=", 1)[0]
        matches = [o for o in takes_value if o == opt] or [
            o for o in takes_value if o.startswith("--") and o.startswith(opt) and opt.startswith("--")
        ]
        if len(matches) == 1 and takes_value[matches[0]] and "=" not in word:
            i += 1  # the option's value
        i += 1
    if i >= len(words):
        return line, None, []
    name, _, end = words[i]
    return line[:end], name, [w for w, _, _ in words[i + 1:]]


# =========================================================================================
# the magics
# =========================================================================================
@magics_class
class QMagicMagics(Magics):
    """Magics of the qmagic extension; each delegates to ``self.worker``."""

    def __init__(self, shell: Any, worker: Any) -> None:
        super().__init__(shell)
        self.worker = worker

    def _show_panel(self, make: Any) -> bool:
        """Display ``make(panels_module)`` when widgets work here; False to fall back to text."""
        module = panels_module()
        if module is None:
            return False
        try:
            if not module.widgets_available(self.shell):
                return False
        except Exception:  # noqa: BLE001 - no panel: the text form is shown instead
            return False
        from IPython.display import display

        display(make(module))
        return True

    # -- evaluation ------------------------------------------------------------------------
    def _eval(self, expr: str) -> Any:
        try:
            return eval(expr, self.shell.user_global_ns, self.shell.user_ns)  # noqa: S307
        except Exception as exc:  # noqa: BLE001 - reported as a usage error
            raise UsageError(
                f"Cannot evaluate argument {expr!r}: {type(exc).__name__}: {exc}. "
                "Arguments are Python expressions (write strings in quotes; put expressions "
                "with spaces in brackets)."
            ) from None

    def _call_arguments(self, words: list[str]) -> tuple[list[Any], dict[str, Any]]:
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        for word in words:
            match = _KWARG.match(word)
            if match:
                key, expr = match.groups()
                if not expr:
                    raise UsageError(f"Missing value after {key}= (write {key}=VALUE without spaces).")
                if key in kwargs:
                    raise UsageError(f"Keyword argument {key} is given twice.")
                kwargs[key] = self._eval(expr)
            else:
                if kwargs:
                    raise UsageError(
                        f"Positional argument {word!r} follows a keyword argument; put ARGs "
                        "before KEY=VALUE pairs."
                    )
                args.append(self._eval(word))
        return args, kwargs

    # -- %function_execute -------------------------------------------------------------------
    @magic_arguments()
    @argument(
        "-b", "--background", action="store_true",
        help="Run in a background thread and return at once (default: foreground, in this cell).",
    )
    @argument("--user", default=None, help="User name of the request (default: QMagic.default_user).")
    @argument(
        "--group", default=None,
        help="User group whose permissions apply (default: QMagic.default_user_group).",
    )
    @argument("--lock-key", dest="lock_key", default=None, help="Key of a locked environment.")
    @argument("--wait", action="store_true", help="With -b: block until the task ends.")
    @argument("name", help="Name of a function in the namespace.")
    @argument(
        "args", nargs="*", metavar="ARG | KEY=VALUE",
        help="Arguments: Python expressions evaluated in the namespace (variables and "
        "literals; quotes and brackets may contain spaces; KEY=VALUE without spaces around =).",
    )
    @line_magic
    def function_execute(self, line: str) -> Task:
        """Start a namespace function as a tracked task and return its Task.

        Foreground (default): the function runs in this cell on the kernel's main thread; its
        output appears here, an exception it raises stops the cell with its traceback, and
        ■ / Ctrl-C stops it (KeyboardInterrupt; the task is recorded as cancelled).
        Background (-b): it runs in a thread and the Task is returned at once; output still
        appears under this cell.  Examples::

            %function_execute count_to 5
            t = %function_execute -b scan 1 2 step=0.1 label="run 3"
            %function_execute -b --wait scan start stop
        """
        __tracebackhide__ = True  # noqa: F841
        prefix, name, words = _split_options(self.function_execute.parser, line)
        try:
            opts = parse_argstring(self.function_execute, prefix)
        except UsageError as exc:
            if name is None and "required" in str(exc):
                raise UsageError(
                    "Give the function name: %function_execute [OPTIONS] NAME [ARG ...]"
                ) from None
            raise
        if not name.isidentifier():
            raise UsageError(f"{name!r} is not a function name (expected an identifier such as scan).")
        args, kwargs = self._call_arguments(words)
        try:
            task = self.worker.submit(
                name, args, kwargs,
                background=opts.background,
                user=_unquote(opts.user),
                user_group=_unquote(opts.group),
                lock_key=_unquote(opts.lock_key),
                origin="magic",
            )
        except RequestRefused as exc:
            _refused(exc)
        if not task.background:
            return _settle(task)
        if opts.wait:
            return self._wait(task)
        return task

    def _wait(self, task: Task) -> Task:
        __tracebackhide__ = True  # noqa: F841
        try:
            task.wait()
        except KeyboardInterrupt:
            print(
                f"Stopped waiting; the background task {task.call_text()} keeps running "
                f"(uid {task.uid}; stop it with %task_cancel {task.uid[:8]}).",
                file=sys.stderr,
            )
            raise
        return _settle(task)

    # -- %task_status / %task_result ---------------------------------------------------------
    def _task(self, uid: str | None) -> Task | None:
        if uid is None:
            return self.worker.last_task
        try:
            return self.worker.get_task(uid)
        except TaskNotFound as exc:
            raise UsageError(str(exc)) from None

    @magic_arguments()
    @argument("uids", nargs="*", metavar="UID", help="Task uids or unique prefixes (>= 4 characters).")
    @line_magic
    def task_status(self, line: str) -> None:
        """Print the status of tasks (queued, running, completed, failed, cancelled).

        Without UID: the latest task.  A UID may be any unique prefix of at least 4
        characters; an unknown one prints "not found".
        """
        opts = parse_argstring(self.task_status, line)
        if not opts.uids:
            task = self.worker.last_task
            print(text.task_line(task) if task is not None else "No tasks.")
            return
        for uid in opts.uids:
            try:
                task = self.worker.get_task(uid)
            except TaskNotFound as exc:
                record = self.worker.journal_record(uid)
                if record is None:
                    print(f"{uid}: not found ({exc})")
                else:
                    print(f"{uid}: {record['status']} (from the journal)")
                continue
            print(f"{uid}: {task.status.value}")

    @magic_arguments()
    @argument("uid", nargs="?", default=None, metavar="UID", help="Task uid or unique prefix (default: the latest task).")
    @line_magic
    def task_result(self, line: str) -> None:
        """Print a task's outcome: status, result (or traceback), output and log.

        Without UID: the latest task.  The value itself: ``get_worker().get_task(UID).result()``.
        """
        opts = parse_argstring(self.task_result, line)
        if opts.uid is not None:
            try:
                self.worker.get_task(opts.uid)
            except TaskNotFound:
                record = self.worker.journal_record(opts.uid)
                if record is not None:  # a task of an earlier kernel, or one forgotten
                    print(text.record_detail(record))
                    return
        task = self._task(opts.uid)
        print(text.task_detail(task) if task is not None else "No tasks.")

    # -- %task_cancel ------------------------------------------------------------------------
    @magic_arguments()
    @argument("uid", nargs="?", default=None, metavar="UID", help="Task uid or unique prefix.")
    @argument("--all", action="store_true", dest="all", help="Cancel every queued and running task.")
    @argument(
        "--force", action="store_true",
        help="If the task has not stopped after QMagic.cancel_grace_s seconds, raise "
        "TaskCancelled inside its thread.",
    )
    @line_magic
    def task_cancel(self, line: str) -> None:
        """Ask a task (or --all tasks) to stop.

        Cancelling is cooperative: a running task stops at its next
        ``qmagic.report_progress`` / ``raise_if_cancelled`` / ``cancellable_sleep``;
        --force also interrupts it after ``QMagic.cancel_grace_s`` seconds.  This is the way
        to stop background tasks (■ only stops a foreground task).
        """
        opts = parse_argstring(self.task_cancel, line)
        if opts.all == (opts.uid is not None):
            raise UsageError("Give exactly one of UID or --all: %task_cancel UID|--all [--force]")
        forced = " (forced if it does not stop)" if opts.force else ""
        if opts.all:
            try:
                tasks = self.worker.cancel_all(force=opts.force, origin="magic")
            except RequestRefused as exc:
                _refused(exc)
            noun = "task" if len(tasks) == 1 else "tasks"
            print(f"Cancel requested for {len(tasks)} {noun}{forced}.")
            return
        reply = self.worker.task_cancel(opts.uid, force=opts.force, origin="magic")
        if not reply["success"]:
            _refused(reply["msg"])
        task = self.worker.get_task(reply["task_uid"])
        print(f"Cancel requested{forced}: {text.task_line(task)}")

    # -- %tasks ------------------------------------------------------------------------------
    @magic_arguments()
    @argument("--all", action="store_true", dest="all", help="Every task kept in memory.")
    @argument("--running", action="store_true", help="Only queued and running tasks.")
    @argument(
        "--history", nargs="?", const=20, type=int, default=None, metavar="N",
        help="The newest N tasks of the persistent journal (default 20), from this and "
        "earlier kernels, with when they were submitted.",
    )
    @line_magic
    def tasks(self, line: str) -> None:
        """Show tasks, newest first: the latest ones (default), --all, or only --running;
        --history [N] lists the experiment log (the journal), also of earlier kernels.

        With widgets: a live panel with progress bars and cancel buttons; otherwise a text
        table.  Finished tasks stay QMagic.task_retention_s seconds in memory; the journal
        keeps them for QMagic.journal_max_age_s.
        """
        opts = parse_argstring(self.tasks, line)
        if sum(bool(x) for x in (opts.all, opts.running, opts.history is not None)) > 1:
            raise UsageError("Give at most one of --all, --running and --history.")
        if opts.history is not None:
            if opts.history < 1:
                raise UsageError("--history N needs N >= 1 (the number of tasks to list).")
            try:
                records = self.worker.history(limit=opts.history)
            except RuntimeError as exc:
                raise UsageError(str(exc)) from None
            print(text.history_table(records))
            return
        show = "running" if opts.running else "all"
        max_rows = None if (opts.all or opts.running) else DEFAULT_TASK_ROWS
        if self._show_panel(lambda m: m.TaskPanel(self.worker, show=show, max_rows=max_rows)):
            return
        items = list(reversed(self.worker.tasks()))
        if opts.running:
            items = [t for t in items if not t.done()]
        hidden = 0
        if max_rows is not None and len(items) > max_rows:
            hidden = len(items) - max_rows
            items = items[:max_rows]
        print(text.task_table(items, hidden=hidden))

    # -- %script_upload ----------------------------------------------------------------------
    @magic_arguments()
    @argument("-b", "--background", action="store_true", help="Run the script in a background thread.")
    @argument(
        "--no-update-lists", dest="no_update_lists", action="store_true",
        help="Do not refresh the list of available functions afterwards.",
    )
    @argument("--lock-key", dest="lock_key", default=None, help="Key of a locked environment.")
    @argument("path", nargs="?", default=None, metavar="PATH", help="Script file (line magic only).")
    @line_cell_magic
    def script_upload(self, line: str, cell: str | None = None) -> Task:
        """Run a script in the namespace as a tracked task; returns its Task.

        ``%script_upload [-b] [--no-update-lists] [--lock-key K] PATH`` runs a file;
        ``%%script_upload [-b] [--lock-key K]`` runs the cell body.  If the script raises,
        every name it added, changed or removed is restored (the namespace is unchanged) and
        the cell stops with the traceback; on success ``task.namespace_changes`` lists the
        names added, changed and removed.
        """
        __tracebackhide__ = True  # noqa: F841
        opts = parse_argstring(self.script_upload, line)
        if cell is None:
            if opts.path is None:
                raise UsageError("Give the script file: %script_upload [-b] PATH (or use %%script_upload).")
            path = Path(os.path.expanduser(_unquote(opts.path)))
            try:
                script = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise UsageError(f"Cannot read the script {str(path)!r}: {exc}") from None
        else:
            if opts.path is not None:
                raise UsageError("%%script_upload runs the cell body; it takes no PATH.")
            script = cell
        try:
            task = self.worker.start_script(
                script,
                update_lists=not opts.no_update_lists,
                background=opts.background,
                lock_key=_unquote(opts.lock_key),
                origin="magic",
            )
        except RequestRefused as exc:
            _refused(exc)
        return task if task.background else _settle(task)

    # -- locks -------------------------------------------------------------------------------
    @magic_arguments()
    @argument("-e", "--environment", action="store_true", help="Lock the environment (the default).")
    @argument("-q", "--queue", action="store_true", help="Lock the queue (permissions, history).")
    @argument("-a", "--all", action="store_true", dest="all", help="Lock both.")
    @argument("--key", default=None, help="Lock key (default: the remembered or your default key).")
    @argument("--user", default=None, help="Name shown to others (default: QMagic.default_user).")
    @argument("--note", default=None, help="Why it is locked, shown to others.")
    @line_magic
    def lock(self, line: str) -> None:
        """Lock the environment (and/or queue) so that only holders of the key can run tasks.

        Without --key: the key this kernel used last, else your default key
        (``qmagic.get_default_lock_key()``).  This kernel remembers the key, so its magics
        and Python calls keep working; others need the key.  The key is never printed.
        """
        opts = parse_argstring(self.lock, line)
        environment = opts.environment or opts.all or not (opts.queue or opts.all)
        queue = opts.queue or opts.all
        reply = self.worker.lock(
            _unquote(opts.key), environment=environment, queue=queue, note=_unquote(opts.note),
            user=_unquote(opts.user),
            origin="magic",
        )
        if not reply.get("success"):
            _refused(reply.get("msg", "Lock failed."))
        print(text.lock_text(reply))

    @magic_arguments()
    @argument("--key", default=None, help="Lock key or emergency key (default: the remembered key).")
    @line_magic
    def unlock(self, line: str) -> None:
        """Unlock the environment and queue (with the lock key, or the emergency key)."""
        opts = parse_argstring(self.unlock, line)
        if opts.key is None and not self.worker.remembered_lock_key:
            reply = self.worker.lock_info(origin="magic")
            info = reply.get("lock_info") or {}
            if info.get("environment") or info.get("queue"):
                raise UsageError(
                    "This kernel does not hold the key of the current lock; give it: "
                    "%unlock --key KEY (or the emergency key)."
                )
        else:
            reply = self.worker.unlock(_unquote(opts.key), origin="magic")
        if not reply.get("success"):
            _refused(reply.get("msg", "Unlock failed."))
        print(text.lock_text(reply))

    @line_magic
    def lock_info(self, line: str) -> None:
        """Show the lock: who locked what, and the note (a live panel when widgets work)."""
        if line.strip():
            raise UsageError("%lock_info takes no arguments.")
        if self._show_panel(lambda m: m.LockPanel(self.worker)):
            return
        reply = self.worker.lock_info(origin="magic")
        if not reply.get("success"):
            _refused(reply.get("msg", "Cannot read the lock."))
        print(text.lock_text(reply))


# =========================================================================================
# completion
# =========================================================================================
def function_name_matcher(worker: Any) -> Any:
    """A completer matcher offering namespace function names after
    ``%function_execute``'s options (IPython Matcher API v2)."""
    from IPython.core.completer import SimpleCompletion, context_matcher

    parser = QMagicMagics.function_execute.parser
    takes_value = _value_actions(parser)

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
            opt = word.split("=", 1)[0]
            if takes_value.get(opt) and "=" not in word:
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
