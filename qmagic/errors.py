"""Every exception qmagic raises, in one place.

Each error derives from :class:`QMagicError` and from the builtin it behaves like, so
``except KeyError`` keeps working for a task that is not found.  Messages say what happened
and what to do about it.
"""

from __future__ import annotations

import functools
from typing import Any

__all__ = [
    "QMagicError",
    "TaskNotFound",
    "RequestRefused",
    "LockRefused",
    "PermissionRefused",
    "PermissionsFormatError",
    "InvalidTransition",
    "StateFileError",
    "TaskCancelled",
    "ControlChannelError",
    "LogUnavailable",
    "NotLoaded",
    "one_line",
]


def one_line(exc: BaseException) -> BaseException:
    """``exc``, shown by IPython as one line (its traceback holds qmagic's frames only).
    A partial of a module function, not a lambda: the exception stays picklable."""
    exc._render_traceback_ = functools.partial(_lines, f"{type(exc).__name__}: {exc}")  # type: ignore[attr-defined]
    return exc


def _lines(*lines: str) -> list[str]:
    return list(lines)


class _OneLineInCell:
    """``QMagicError._render_traceback_``: what IPython shows for a qmagic error in a cell.
    One line, ``Type: message``, when qmagic raised it for a call made at the top level of
    a cell (the message says what to do; qmagic's frames would only hide it); when the
    innermost code of the user's was a function (a task's code, a helper), no such
    attribute: IPython's usual traceback then shows where.  A non-data descriptor: an
    instance may still set its own."""

    def __get__(self, exc: BaseException | None, owner: type | None = None) -> Any:
        if exc is None:
            return self
        from .tracebacks import is_internal_frame

        tb, innermost = exc.__traceback__, None
        while tb is not None:
            if not is_internal_frame(tb.tb_frame.f_code.co_filename):
                innermost = tb.tb_frame.f_code.co_name
            tb = tb.tb_next
        if innermost not in (None, "<module>"):
            raise AttributeError("_render_traceback_")
        line = f"{type(exc).__name__}: {_cell_text(exc)}"
        return lambda: [line]


def _cell_text(exc: BaseException) -> str:
    """A refusal reads as the magics word it (:func:`qmagic.format.refusal_line`): one line,
    control characters escaped.  Its ``str`` is queueserver's multi-line text, with a lock
    note as written: a note holding ``\x1b[2J`` or ``\u202e`` reached the cell raw."""
    if isinstance(exc, RequestRefused):
        from .format import refusal_line

        return refusal_line(exc, getattr(exc, "give_key", "") or "give the key with lock_key=KEY")
    return str(exc)


class QMagicError(Exception):
    """Base class of qmagic's errors; ``str(err)`` is the message meant for the user."""

    _render_traceback_ = _OneLineInCell()

    def __str__(self) -> str:  # KeyError would otherwise show the message in quotes
        return str(self.args[0]) if self.args else self.__class__.__name__


class TaskNotFound(QMagicError, KeyError):
    """No task has this uid (or unique uid prefix): unknown, ambiguous or expired.

    ``reason``: "unknown" (no task has it), "short" (a prefix of fewer than 4 characters),
    "ambiguous" (several tasks have it) or "invalid" (not a uid at all)."""

    def __init__(self, message: str = "", reason: str = "unknown") -> None:
        super().__init__(message)
        self.reason = reason


class RequestRefused(QMagicError, RuntimeError):
    """A request was refused before anything was changed.

    ``str(err)`` is the queueserver protocol's ``msg`` for the refusal, so the same text
    reaches a notebook user, a Python caller and a remote client.
    """


class LockRefused(RequestRefused, PermissionError):
    """The environment or queue is locked and the request did not present the right key.

    ``state`` (when known) is the lock that refused: who locked what, since when, the note;
    ``key_given`` is True when the caller gave a key (a wrong one, not a missing one);
    ``unlocking`` when the request was an unlock (the emergency key would also open it);
    ``default_key`` how the request's door releases a lock that your default key opens, when
    the request gave no key and it does (a kernel restarted after ``%lock`` without a key);
    ``give_key`` how a call that takes no key gives one (``task.cancel()``), when it does not.
    """

    state = None
    key_given = False
    unlocking = False
    default_key = ""
    give_key = ""


class PermissionRefused(RequestRefused, PermissionError):
    """The user group may not call this function (or the group/user is not valid)."""


class PermissionsFormatError(QMagicError, ValueError):
    """User group permission rules (a dict or a YAML file) are malformed.

    The message names the file (if any) and the place in the rules, e.g.
    ``user_groups.primary.allowed_functions[2]: invalid regular expression ...``;
    fix that entry and load the rules again.
    """


class InvalidTransition(QMagicError, RuntimeError):
    """A task was asked to move between two statuses that the transition table forbids."""


class StateFileError(QMagicError, OSError):
    """A persistent state file (lock, experiment log) is unusable: unreadable, corrupt, a
    symlink, a FIFO, or another user's file.  The message names the file and what to do."""


class ControlChannelError(QMagicError, RuntimeError):
    """The remote control channel could not start (address in use or invalid, bad CurveZMQ key).

    The message names the address or the setting to fix; nothing was left running.
    """


class LogUnavailable(QMagicError, RuntimeError):
    """The experiment log is off or cannot be read (the message says which and what to do)."""


class NotLoaded(QMagicError, RuntimeError):
    """``qmagic.get_worker()`` in an IPython session where qmagic is not loaded (the message
    says how to load it)."""


#: The message of :class:`LogUnavailable` when the experiment log is off.
LOG_OFF = ("The experiment log is off (QMagic.journal_enabled = False): turn it on to keep a record "
           "of every task.")


class TaskCancelled(BaseException):
    """Raised inside a task to stop it after a cancel request.

    It derives from ``BaseException`` (like ``KeyboardInterrupt``) so that an
    ``except Exception`` block in a measurement loop does not swallow the cancel.
    Catch it only to clean up, then re-raise.
    """

    def __init__(self, message: str = "Task was cancelled") -> None:
        super().__init__(message)

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "Task was cancelled"


for _error in (QMagicError, TaskNotFound, RequestRefused, LockRefused, PermissionRefused,
               PermissionsFormatError, InvalidTransition, StateFileError, ControlChannelError,
               LogUnavailable, NotLoaded, TaskCancelled):
    _error.__module__ = "qmagic"  # tracebacks read "qmagic.TaskCancelled", where users import it
del _error
