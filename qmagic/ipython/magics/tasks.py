"""The task magics: ``%function_execute``, ``%task_status``, ``%task_result``,
``%task_cancel``, ``%tasks`` and ``%script_upload``.  Each reads its line, calls the worker's
Python API (``origin="magic"``) and shows the answer; text never shows clock times, and
uids only as the short prefixes you can type back."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments

from ... import format as fmt
from ...core.registry import MIN_UID_PREFIX
from ...core.task import Task
from ...errors import LogUnavailable, RequestRefused, TaskNotFound
from ...history_text import history_table
from ...scripts import script_name_of_file
from ...worker_state import MSG_WORKER_CLOSED
from ...yamlfile import read_small_file
from .args import parse_line, split_options, unquote
from .calls import called_name, function_call
from .common import refused, settle, show_panel, show_rich_result, wait_interruptibly

__all__ = ["TaskMagics", "DEFAULT_TASK_ROWS", "MAX_HISTORY_ROWS", "MAX_SCRIPT_BYTES"]

#: Tasks shown by ``%tasks`` without ``--all`` (newest first).
DEFAULT_TASK_ROWS = 10

#: What ``%tasks --history`` prints when the experiment log holds no task yet.
MSG_HISTORY_EMPTY = "The experiment log holds no tasks yet (each task is recorded as it starts)."

#: Most experiment-log rows ``%tasks --history N`` prints in a cell (about 150 kB; a cell's
#: output of many MB freezes JupyterLab): a larger N shows these and says how to get more.
MAX_HISTORY_ROWS = 1000

#: Largest script file ``%script_upload PATH`` reads (a larger file is refused unread).
MAX_SCRIPT_BYTES = 10_000_000


def _read_script(path: Path) -> str:
    """The text of the script file ``path``; UsageError (one line) for anything else: a FIFO
    or a device is never read (it would block the kernel, or fill its memory), nor a file
    larger than :data:`MAX_SCRIPT_BYTES` (a data file given by mistake)."""
    def cannot(why: str) -> UsageError:
        return UsageError(f"Cannot read the script {str(path)!r}: {why}")

    def refuse(kind: str, detail: str) -> UsageError:
        if kind == "missing":
            where = "" if path.is_absolute() else f" (relative paths start in the kernel's folder, {os.getcwd()})"
            return cannot(f"no such file{where}.")
        if kind == "too_large":
            size = f"{detail} bytes" if detail else f"more than {MAX_SCRIPT_BYTES:,} bytes"
            return cannot(f"it holds {size}, more than a script (at most {MAX_SCRIPT_BYTES:,}): "
                          "is it the right file?")
        return cannot({"unreadable": f"{detail.lower()}.", "folder": "it is a folder."}.get(
            kind, "it is not a regular file."))

    raw = read_small_file(path, MAX_SCRIPT_BYTES, refuse)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise cannot(f"it is not UTF-8 text (byte 0x{raw[exc.start]:02x} at position {exc.start}): "
                     "save it as UTF-8.") from None


def _request_options(magic: Any) -> Any:
    """Who asks and with which key: the same options of every magic that starts a task
    (``%function_execute``, ``%script_upload``), passed as given to the worker's rule."""
    for option in (
        argument("--lock-key", dest="lock_key", default=None, metavar="KEY", help="Key of a locked environment."),
        argument("--group", default=None, help="User group of the request, recorded on the task: a group of the "
                 "permission rules, whose function lists a function it runs by name must pass (default: "
                 "QMagic.default_user_group)."),
        argument("--user", default=None, help="User name of the request (default: QMagic.default_user)."),
    ):
        magic = option(magic)
    return magic


@magics_class
class TaskMagics(Magics):
    """Task magics; each delegates to ``self.worker``."""

    def __init__(self, shell: Any, worker: Any) -> None:
        super().__init__(shell)
        self.worker = worker

    # -- %function_execute ----------------------------------------------------------------------
    @magic_arguments()
    @argument("-b", "--background", action="store_true",
              help="Run in the background and return at once: in a thread (an async def function on the event "
              "loop of coroutine tasks); default: foreground, in this cell.")
    @argument("--wait", action="store_true", help="With -b: block until the task ends.")
    @argument("--timeout", type=float, default=None, metavar="SECONDS",
              help="Deadline: cancel the task if it runs longer than this many seconds.")
    @_request_options
    @argument("name", metavar="NAME",
              help="Name of a function in the namespace, or the whole call: NAME(ARG, KEY=VALUE, ...).")
    @argument("args", nargs="*", metavar="ARG | KEY=VALUE",
              help="Arguments: Python expressions evaluated in the namespace (variables and literals; "
              "quotes and brackets may contain spaces; KEY=VALUE without spaces around =).")
    @line_magic
    def function_execute(self, line: str) -> Task:
        """Start a namespace function as a tracked task and return its Task.

        Foreground (default): the function runs in this cell, on the kernel's main thread, with
        a live row (status, progress, elapsed, Cancel); its output appears here; an exception it
        raises stops the cell with its traceback; ■ or Cancel stop it (the cell then ends with
        one TaskCancelled line). Background (-b): it runs in a thread (an ``async def`` function on
        the event loop of coroutine tasks) and the Task is returned at once; output still
        appears under this cell. Options come before NAME. The call may
        also be written as in Python, alone after the options: NAME(ARG, ..., KEY=VALUE).

        Examples:

            %function_execute count_to 5
            %function_execute scan(1, 2, step=0.1)
            t = %function_execute -b scan 1 2 step=0.1 label="run 3"
            %function_execute -b --wait --timeout 60 scan start stop
        """
        __tracebackhide__ = True  # noqa: F841
        namespace = self.worker.namespace
        prefix, name, words = split_options(self.function_execute.parser, line,
                                            known=lambda word: callable(namespace.get(called_name(word))))
        if name is None:  # (an option that took the call as its value says so: --timeout scan(1))
            parse_line(self.function_execute, f"{prefix} _")
            raise UsageError("Give the function name: %function_execute [OPTIONS] NAME [ARG ...]")
        # (NAME, found above, stands as one plain word: argparse must not split a call
        # such as scan(5, -5) and read its -5 as an option)
        opts = parse_line(self.function_execute, f"{prefix} _")
        if opts.wait and not opts.background:
            raise UsageError("--wait goes with -b (a foreground task always holds the cell).")
        name, args, kwargs = function_call(self.shell, name, words, lambda word: word in namespace)
        try:
            task = self.worker.submit(
                name, args, kwargs, background=opts.background, user=unquote(opts.user),
                user_group=unquote(opts.group), lock_key=unquote(opts.lock_key),
                timeout=opts.timeout, origin="magic",
            )
        except RequestRefused as exc:
            refused(exc)
        if not task.background:
            return settle(self.shell, task)
        if opts.wait:
            wait_interruptibly(task, self.worker.foreground_runner)
            return settle(self.shell, task)
        return task

    # -- looking at tasks ------------------------------------------------------------------------
    def _find(self, uid: str | None) -> Task | dict:
        if uid is None:
            task = self.worker.last_task
            if task is None:
                raise UsageError(fmt.no_tasks_line(self.worker.log_open, start=True))
            return task
        try:
            return self.worker.find(uid)
        except TaskNotFound as exc:
            raise UsageError(str(exc)) from None

    @magic_arguments()
    @argument("uids", nargs="*", metavar="UID", help="Task uids or unique prefixes (>= 4 characters).")
    @line_magic
    def task_status(self, line: str) -> None:
        """Print the status of tasks: queued, running, completed, failed or cancelled.

        Without UID: the latest task.  A UID may be any unique prefix of at least 4 characters;
        tasks no longer in memory are looked up in the experiment log.
        """
        opts = parse_line(self.task_status, line)
        if not opts.uids:
            task = self.worker.last_task
            print(fmt.task_line(task) if task is not None else fmt.no_tasks_line(self.worker.log_open))
            return
        for uid in map(unquote, opts.uids):
            shown = uid if uid and uid.strip() == uid and uid.isprintable() else repr(uid)  # (' ', '')
            try:
                found = self.worker.find(uid)
            except TaskNotFound as exc:
                print(f"{shown}: " + {"short": f"too short: give at least {MIN_UID_PREFIX} characters of the uid",
                                    "ambiguous": "matches several tasks: give more characters",
                                    "invalid": "no uid: give a task uid (see %tasks)"}.get(
                                        exc.reason, "not found (see %tasks --history)" if self.worker.log_open
                                        else "not found (see %tasks)"))
                continue
            record = found.to_dict() if isinstance(found, Task) else found
            note = fmt.error_note(record, failed_only=True)
            print(f"{shown}: {fmt.printable(record.get('status'), 12)}"
                  + ("" if isinstance(found, Task) else " (from the experiment log)")
                  + (f"  error: {note}" if note else ""))

    @magic_arguments()
    @argument("uid", nargs="?", default=None, metavar="UID",
              help="Task uid or unique prefix (default: the latest task).")
    @line_magic
    def task_result(self, line: str) -> None:
        """Print a task's outcome: status, result (or traceback), output and log.

        Without UID: the latest task.  A UID may be any unique prefix of at least 4 characters;
        tasks no longer in memory are looked up in the experiment log.  A result with a rich
        form (a DataFrame's table, a figure) of a task in memory is also shown so, below.  The
        value itself: ``qmagic.get_worker().get_task(UID).result()``.
        """
        opts = parse_line(self.task_result, line)
        found = self._find(unquote(opts.uid))
        if isinstance(found, Task):
            print(fmt.task_detail(found))
            show_rich_result(self.shell, found)
        else:
            print(fmt.record_detail(found, source="from the experiment log"))

    # -- %task_cancel ------------------------------------------------------------------------------
    @magic_arguments()
    @argument("uid", nargs="?", default=None, metavar="UID",
              help="Task uid or unique prefix (default: the latest task).")
    @argument("--all", action="store_true", dest="all", help="Cancel every queued and running task.")
    @argument("--force", action="store_true",
              help="If the task has not stopped after QMagic.cancel_grace_s seconds, raise "
              "TaskCancelled inside its thread (a coroutine task gets a second CancelledError).")
    @argument("--lock-key", dest="lock_key", default=None, metavar="KEY", help="Key of a locked environment.")
    @line_magic
    def task_cancel(self, line: str) -> None:
        """Ask a task (the latest one without UID, or --all tasks) to stop.

        Cancelling is cooperative: a running task stops at its next ``qmagic.report_progress``,
        ``raise_if_cancelled`` or ``cancellable_sleep`` (a coroutine task at its next ``await``);
        --force also interrupts a thread task after ``QMagic.cancel_grace_s`` seconds.  This is
        how to stop background tasks (■ stops the foreground task only).
        """
        opts = parse_line(self.task_cancel, line)
        if opts.all and opts.uid is not None:
            raise UsageError("Give a UID or --all, not both: write %task_cancel [UID | --all] [--force] "
                             "[--lock-key KEY].")
        if str(unquote(opts.uid)).lower() in ("all", "*"):  # (a uid is hexadecimal: never these)
            raise UsageError("To cancel every queued and running task, write %task_cancel --all.")
        forced = " (forced if it does not stop)" if opts.force else ""
        lock_key = unquote(opts.lock_key)
        try:
            if opts.all:
                tasks = self.worker.cancel_all(force=opts.force, lock_key=lock_key, origin="magic")
                print(f"Cancel requested for {fmt.counted(len(tasks), 'task')}{forced}.")
                return
            target = self.worker.last_task if opts.uid is None else unquote(opts.uid)
            if target is None:
                raise UsageError("No tasks to cancel.")
            if isinstance(target, Task) and target.done():
                self._latest_done(target)
            task = self.worker.cancel(target, force=opts.force, lock_key=lock_key, origin="magic")
        except (RequestRefused, TaskNotFound) as exc:
            refused(exc)
        print(f"Cancel requested{forced}: {fmt.task_line(task)}")

    def _latest_done(self, latest: Task) -> None:
        """``%task_cancel`` without UID when the latest task has finished: if others still
        run, say so and how to stop them (else the worker's refusal says it)."""
        active = len(self.worker.tasks(status=("queued", "running")))
        if active:
            those = "it" if active == 1 else "them"
            raise UsageError(
                f"The latest task, {latest.call_text(40)}, has already finished ({latest.status.value}); "
                f"{active} task{' is' if active == 1 else 's are'} still queued or running: "
                f"%task_cancel --all stops {those}, %task_cancel UID one task (%tasks lists them).")

    # -- %tasks ---------------------------------------------------------------------------------------
    @magic_arguments()
    @argument("--all", action="store_true", dest="all", help="Every task kept in memory.")
    @argument("--running", action="store_true",
              help="Only queued and running tasks (a live panel also keeps, for a minute, those that just ended).")
    @argument("--history", nargs="?", const=20, type=int, default=None, metavar="N",
              help=f"The newest N tasks of the experiment log (default 20, at most {MAX_HISTORY_ROWS} in a "
              "cell), also of earlier kernels, as qmagic-history prints them: when, how long, "
              "from which notebook cell, the call and the uid.")
    @line_magic
    def tasks(self, line: str) -> None:
        """Show tasks, newest first: the latest 10 (default), --all kept in memory, or only
        --running; --history [N] lists the newest N tasks of the experiment log, also of
        earlier kernels.

        With widgets: a live panel with progress bars and Cancel buttons; otherwise a text
        table with short uids (at most 1000 rows; a line under it says how many more).  Finished tasks stay
        QMagic.task_retention_s seconds in memory; the experiment log keeps them for
        QMagic.journal_max_age_s.
        """
        opts = parse_line(self.tasks, line)
        if sum(bool(x) for x in (opts.all, opts.running, opts.history is not None)) > 1:
            raise UsageError("Give at most one of --all, --running and --history.")
        if opts.history is not None:
            if opts.history < 1:
                raise UsageError("--history N needs N >= 1 (the number of tasks to list).")
            self._history(opts.history)
            return
        show = "running" if opts.running else "all"
        max_rows = None if (opts.all or opts.running) else DEFAULT_TASK_ROWS
        self._log_note()  # above the panel or table: the log needs attention
        if show_panel(self.shell, lambda p: p.TaskPanel(self.worker, show=show, max_rows=max_rows)):
            return
        print(self._table(opts.running, max_rows))
        if self.worker.closed:  # (under the table, as the panel says it under its rows)
            print(MSG_WORKER_CLOSED)

    def _table(self, running: bool, max_rows: int | None) -> str:
        """``%tasks``' text without widgets: the newest ``max_rows`` (None: as many as a cell
        takes) of the tasks in memory, the queued and running ones only if ``running``."""
        hint = "use --all"
        if max_rows is None:  # --all, --running: as many as a cell takes (see --history)
            max_rows = MAX_HISTORY_ROWS
            hint = f"a cell shows the newest {MAX_HISTORY_ROWS}; all of them: qmagic.get_worker().tasks()"
        return fmt.tasks_text(self.worker.tasks(), running=running, limit=max_rows, hint=hint, uids=True,
                              log_on=self.worker.log_open)

    def _history(self, wanted: int) -> None:
        """The newest ``wanted`` log records (at most :data:`MAX_HISTORY_ROWS`), then a line
        saying where the rest is when the log holds more."""
        shown = min(wanted, MAX_HISTORY_ROWS)
        try:
            records = self.worker.history(limit=shown + 1)
        except LogUnavailable as exc:
            raise UsageError(str(exc)) from None
        print(history_table(records[:shown]) if records else MSG_HISTORY_EMPTY)  # (not a bare header)
        if len(records) > shown and wanted > shown:
            print(f"Only the newest {shown} are shown in a cell; for more: qmagic.history(limit={wanted}) "
                  f"or, in a terminal, qmagic-history --limit {wanted}.")
        elif len(records) > shown:
            print("Older tasks are in the experiment log: %tasks --history N lists the newest N "
                  f"(up to {MAX_HISTORY_ROWS}); all of them: qmagic.history() or, in a terminal, "
                  "qmagic-history.")
        self._log_note()

    def _log_note(self) -> None:
        note = self.worker.log_note()
        if note:
            print(note)

    # -- %script_upload ----------------------------------------------------------------------------------
    @magic_arguments()
    @argument("-b", "--background", action="store_true",
              help="Run the script in the background and return at once: in a thread (a script with a "
              "top-level await on the event loop of coroutine tasks).")
    @argument("--name", default=None,
              help="Name shown for this script in tables, panels and the log (default: the file "
              "name, or 'script').")
    @argument("--no-update-lists", dest="no_update_lists", action="store_true",
              help="Do not refresh the list of available functions afterwards.")
    @_request_options
    @argument("path", nargs="?", default=None, metavar="PATH", help="Script file (line magic only).")
    @line_cell_magic
    def script_upload(self, line: str, cell: str | None = None) -> Task:
        """Run a script in the namespace as a tracked task; returns its Task.

        ``%script_upload [OPTIONS] PATH`` runs a file (named by its file name; UTF-8 text of
        at most 10 MB, never a FIFO or device); ``%%script_upload [OPTIONS]`` runs the cell
        body; --user and --group say who runs it, as for %function_execute.  If the script
        raises, every name it added, changed or removed is restored (the namespace is
        unchanged) and the cell stops with the traceback; on success
        ``task.namespace_changes`` lists the names added, changed and removed.  Scripts never wait for each other: a background script runs
        while another script runs, so a script that never ends stalls no later upload.
        """
        __tracebackhide__ = True  # noqa: F841
        opts = parse_line(self.script_upload, line)
        name = unquote(opts.name)
        if cell is None:
            if opts.path is None:
                raise UsageError("Give the script file: %script_upload [-b] PATH (or use %%script_upload).")
            path = Path(os.path.expanduser(unquote(opts.path)))
            script = _read_script(path)
            name = name or script_name_of_file(path.name)
        else:
            if opts.path is not None:
                raise UsageError("%%script_upload runs the cell body; it takes no PATH.")
            script = cell
        try:
            task = self.worker.run_script(
                script, name=name, update_lists=not opts.no_update_lists,
                background=opts.background, lock_key=unquote(opts.lock_key), user=unquote(opts.user),
                user_group=unquote(opts.group), origin="magic",
            )
        except RequestRefused as exc:
            refused(exc)
        return task if task.background else settle(self.shell, task)
