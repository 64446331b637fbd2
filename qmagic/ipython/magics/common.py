"""What every magic shares: one-line refusals, ending a cell like calling the function did,
waiting, and showing a panel.

- A refused request (lock, permissions, busy kernel...) stops the cell with one
  ``UsageError`` line (the queueserver text, condensed), so Run All stops too.
- After a foreground task the cell behaves like calling the function: the task's exception
  is raised with the user's own frames only (``Cell In[9], line 3``); a task that failed
  before reaching user code (unknown name, wrong arguments) ends the cell with one line; a
  cancelled task — by ■, a panel's Cancel, ``%task_cancel`` or a deadline — ends the cell
  with one ``TaskCancelled`` line saying how.
- A SyntaxError (a script with a typo) shows the script's line and caret, and the user's
  own frames if any; never IPython's or qmagic's.
- ■ that lands in a magic's own code (reading its line, checking the request, before its
  task exists or after it ended) ends the magic with one KeyboardInterrupt line saying what
  became of the request (:func:`interrupts_in_one_line`, around every magic); one that
  reaches a task is the task's (recorded), as before.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import time
import traceback
from typing import Any, Callable, NoReturn

from IPython.core.error import UsageError

from ... import format as fmt
from ... import tracebacks
from ...core.status import TaskStatus
from ...core.task import Task, exception_text
from ...errors import TaskCancelled, one_line
from ...worker import cancelled_line
from ..runner import StopHold, held_sigint

__all__ = ["ShownGroup", "ShownSyntaxError", "refused", "settle", "wait_interruptibly", "show_panel", "WaitInterrupted",
           "interrupts_in_one_line"]


def refused(exc: BaseException | str, key_option: str = "--lock-key KEY") -> NoReturn:
    """Stop the cell with the refusal as one UsageError line; ``key_option`` is how this
    magic takes a key."""
    raise UsageError(fmt.refusal_line(exc, f"give the key with {key_option}"))


#: Magics that start tasks, and what to look at after ■ stopped one of those that change
#: something (it may have taken effect); the others only read.
_STARTS_TASKS = frozenset({"function_execute", "script_upload"})
_LOOK_AT = {"lock": "%lock_info", "unlock": "%lock_info", "task_cancel": "%tasks",
            "control_channel": "%control_channel status"}


def interrupts_in_one_line(method: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a magic: a KeyboardInterrupt (■) that lands in its own code ends it with one line
    saying what became of the request -- no task started, or its task's state -- never
    qmagic's frames; it still propagates (the cell's loop stops).  One already shown in one
    line (a task's, a wait's, one held while a task was recorded) passes unchanged.  Another
    ■ while the line is made, or right after, is the same stop (:class:`StopHold`)."""
    magic = method.__name__

    @functools.wraps(method)
    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            __tracebackhide__ = True  # noqa: F841
            StopHold.release()
            engine = getattr(getattr(self, "worker", None), "engine", None)
            before = engine.submitted_here() if engine is not None else None
            return method(self, *args, **kwargs)
        except KeyboardInterrupt as exc:
            # (no signal is taken from the ■ to the end of the hold's install: see StopHold; the
            # install stays inline: a Python function's start is where a pending signal is taken)
            StopHold.active = True
            try:
                previous = signal.signal(signal.SIGINT, held_sigint)
                if previous is not held_sigint:
                    StopHold.previous = previous
            except ValueError:  # not the main thread: no SIGINT comes here
                pass
            try:
                if hasattr(exc, "_render_traceback_"):
                    shown = exc
                else:
                    seen = locals()  # (engine and before: unset if ■ came before the method)
                    shown = one_line(KeyboardInterrupt(_stopped_line(
                        magic, seen.get("engine"), seen.get("before"), "before" not in seen)))
            finally:
                StopHold.last = time.monotonic()
                StopHold.active = False
            raise shown from None

    return run


def _stopped_line(magic: str, engine: Any, before: str | None, first: bool = False) -> str:
    """What ■ in ``%magic``'s own code left: its task (submitted on this thread since
    ``before``), or none (``first``: ■ came before the magic looked); what to look at for
    magics that change something."""
    uid = engine.submitted_here() if engine is not None else None
    if first:
        before = uid
    task = engine.get(uid) if uid is not None and uid != before else None
    if task is not None:
        call, uid = task.call_text(40), task.uid[:8]
        if task.done():
            return f"stopped %{magic}: its task {call} has ended ({task.status.value}); see %task_result {uid}."
        return f"stopped %{magic}: its task {call} runs on; stop it with %task_cancel {uid}."
    if uid is not None and uid != before:  # (it has left memory already)
        return f"stopped %{magic} after it started a task; %tasks --history lists it."
    if magic in _STARTS_TASKS:
        return f"stopped %{magic} before it started a task: no task was started."
    if magic in _LOOK_AT:
        return f"stopped %{magic}; it may have taken effect: {_LOOK_AT[magic]} shows what holds now."
    return f"stopped %{magic}; nothing was changed."


class WaitInterrupted(KeyboardInterrupt):
    """■ while waiting for a background task: the waiting stopped, the task runs on."""

    def _render_traceback_(self) -> list[str]:
        return [f"KeyboardInterrupt: {self}"]


def _render_once(exc: BaseException, render: Callable[[], list[str]]) -> None:
    def _render_traceback_() -> list[str]:
        try:
            del exc._render_traceback_
        except AttributeError:
            pass
        return render()

    try:
        exc._render_traceback_ = _render_traceback_  # type: ignore[attr-defined]
    except (AttributeError, TypeError):  # exceptions without a __dict__: shown as they are
        pass


def _one_line(exc: BaseException) -> BaseException:
    """``exc`` shown as one line, ``Type: message`` (as it is, if qmagic made it so for good:
    it stays so for a later ``task.result()``)."""
    if "_render_traceback_" in getattr(exc, "__dict__", ()):
        return exc
    line = f"{type(exc).__name__}: {exception_text(exc)}"
    _render_once(exc, lambda: [line])
    return exc


class ShownSyntaxError(Exception):
    """Stands in for a task's SyntaxError (IndentationError, ...) in the cell: IPython shows a
    SyntaxError with every frame it passed (IPython's and qmagic's) and ignores
    ``_render_traceback_``.  Each stand-in class is named as the error's type, so the kernel's
    reply says ``SyntaxError``; ``error`` is the original exception."""

    error: SyntaxError


class ShownGroup(Exception):
    """Stands in for a task's exception group (``asyncio.TaskGroup``'s) in the cell: IPython
    shows a group itself — every frame (IPython's and qmagic's) on stderr, none in the
    kernel's reply — and ignores ``_render_traceback_``.  Named as the group's type; ``error``
    is the group."""

    error: BaseException


_stand_ins: dict[tuple[type, type], type] = {}


def _stand_in(base: type, error: BaseException) -> Any:
    """An instance of ``base`` standing in for ``error``: its class is named as the error's
    type (the kernel's reply says ``SyntaxError``, ``ExceptionGroup``); ``.error`` is it."""
    kind = type(error)
    cls = _stand_ins.get((base, kind))
    if cls is None:
        cls = _stand_ins[(base, kind)] = type(kind.__name__, (base,), {"__qualname__": kind.__name__})
    shown = cls(str(error))  # the kernel's reply: as the error's own
    shown.error = error
    return shown


def _syntax_error(shell: Any, error: SyntaxError, tb: Any) -> ShownSyntaxError:
    """The stand-in of ``error``, shown as the script's error after the user's frames in
    ``tb`` (none for a script that did not compile)."""
    kind = type(error)
    shown = _stand_in(ShownSyntaxError, error)
    frames = [f for f in traceback.extract_tb(tb) if not tracebacks.is_internal_frame(f.filename)]
    formatter = getattr(shell, "SyntaxTB", None)
    if formatter is not None:
        _render_once(shown, lambda: formatter.structured_traceback(kind, error, frames))
    else:
        _render_once(shown, lambda: traceback.format_list(frames) + traceback.format_exception_only(error))
    return shown


def settle(shell: Any, task: Task) -> Task:
    """After a foreground task (or ``--wait``): end the cell as calling the function would."""
    __tracebackhide__ = True  # noqa: F841
    if task.status is TaskStatus.CANCELLED:
        raise _one_line(TaskCancelled(cancelled_line(task))) from None
    if task.status is TaskStatus.FAILED:
        error = task._error
        if error is None:
            return task
        tb = tracebacks.user_traceback(error)
        if isinstance(error, SyntaxError):
            raise _syntax_error(shell, error, tb) from None
        if isinstance(error, BaseExceptionGroup):  # (IPython's formatter cannot: every frame, on stderr)
            text = tracebacks.traceback_text(error)  # (the user's frames, as %task_result)
            shown = _stand_in(ShownGroup, error)
            _render_once(shown, lambda: text.rstrip("\n").split("\n"))
            raise shown from None
        if tb is None or tracebacks.is_internal_frame(tb.tb_frame.f_code.co_filename):
            raise _one_line(error) from None
        formatter = getattr(shell, "InteractiveTB", None)
        if formatter is not None:
            _render_once(error, lambda: formatter.structured_traceback(type(error), error, tb))
        raise error.with_traceback(tb)
    return task


def wait_interruptibly(task: Task, runner: Any = None) -> None:
    """Wait for a background task; ■ stops the waiting only (one line says so).

    ``runner``: the kernel's foreground runner; its interrupt guard makes a storm of ■ one
    interrupt (the rest must not land in the kernel's own code while the cell ends).
    """
    __tracebackhide__ = True  # noqa: F841
    guard = getattr(runner, "guard", None)
    try:
        with guard(lambda: True) if guard is not None else contextlib.nullcontext():
            task.wait()
    except KeyboardInterrupt:
        raise WaitInterrupted(task._stopped_waiting(magic=True)) from None


def show_rich_result(shell: Any, task: Task) -> None:
    """A completed task's result, when it has a form richer than text (a DataFrame's table,
    a figure, an image): displayed as IPython would show it at the end of a cell.  A result
    whose rich form fails is left to its text (IPython shows the formatter's error)."""
    if task.status is not TaskStatus.COMPLETED:
        return
    formatter = getattr(shell, "display_formatter", None)
    if formatter is None:
        return
    data, metadata = formatter.format(task.result())
    if set(data) - {"text/plain"}:
        from IPython.display import publish_display_data

        publish_display_data(data, metadata)


def show_panel(shell: Any, make: Callable[[Any], Any]) -> bool:
    """Display ``make(panels)`` where widgets work; False to fall back to text.

    ■ while the panel is built stops the cell with one line, and no panel is left; if
    ``make`` also raised, its error is shown first, then the cell stops all the same."""
    try:
        from ... import panels
    except ImportError:
        return False
    try:
        if not panels.widgets_available(shell):
            return False
    except Exception:  # noqa: BLE001 - no panel: the text form is shown instead
        return False
    from IPython.display import display

    from ..runner import interrupts_held

    error: Exception | None = None
    with interrupts_held() as held:  # (■ amid the widgets would leave a half-built panel)
        try:
            panel = make(panels)
        except Exception as exc:  # noqa: BLE001 - raised below, after a held ■ is seen
            error, panel = exc, None
    if error is not None and not held:
        raise error.with_traceback(error.__traceback__.tb_next if error.__traceback__ else None)
    if held:  # the cell stops, as ■ asked: no panel (the builder's error shown first)
        if error is not None:
            shell.showtraceback((type(error), error, error.__traceback__))
        else:
            with interrupts_held():
                panel.close()
        raise one_line(KeyboardInterrupt("stopped showing the panel; nothing else was changed."))
    display(panel)
    panels.shown_by_cell(shell, panel)
    return True

