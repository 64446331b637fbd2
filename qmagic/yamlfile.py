"""Reading small files safely (:func:`read_small_file`: scripts too), and YAML settings files
(:func:`load_yaml_file`: permission rules, client key lists).

The file must be a regular file (a FIFO or device never blocks the read) of at most 1 MiB;
``private`` files must also belong to the user (or root) and be writable by nobody else —
whoever can write a client key list can give themselves any group.
"""

from __future__ import annotations

import os
import stat
from typing import Any, Callable

import yaml

__all__ = ["load_yaml_file", "read_small_file", "MAX_FILE_BYTES"]

MAX_FILE_BYTES = 1 << 20


def read_small_file(path: str | os.PathLike, max_bytes: int,
                    refuse: Callable[[str, str], Exception], *,
                    check: Callable[[os.stat_result], None] | None = None) -> bytes:
    """The bytes of the regular file ``path``, of at most ``max_bytes``: opened without
    blocking and checked before anything is read (a FIFO or a device would block the
    reader, or fill its memory).  Else raises ``refuse(kind, detail)``, the caller's words:
    kind "missing", "unreadable" (detail: the system's reason), "folder", "not_regular" or
    "too_large" (detail: the size, when known).  ``check(stat)`` may raise its own error."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise refuse("missing", "") from None
    except OSError as exc:
        raise refuse("unreadable", exc.strerror or str(exc)) from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise refuse("folder", "")
        if not stat.S_ISREG(st.st_mode):
            raise refuse("not_regular", "")
        if check is not None:
            check(st)
        if st.st_size > max_bytes:
            raise refuse("too_large", f"{st.st_size:,}")
        with os.fdopen(fd, "rb", closefd=False) as stream:
            raw = stream.read(max_bytes + 1)
    except OSError as exc:
        raise refuse("unreadable", exc.strerror or str(exc)) from None
    finally:
        os.close(fd)
    if len(raw) > max_bytes:  # (it grew since)
        raise refuse("too_large", "")
    return raw


def load_yaml_file(path: str | os.PathLike, what: str, error: type[Exception], *,
                   private: bool = False, hint: str = "") -> Any:
    """The YAML document in ``path``; ``error(message)`` says what is wrong (``what`` names
    the file in the message, ``hint`` is added to YAML syntax errors)."""
    def refuse(kind: str, detail: str) -> Exception:
        return error({
            "missing": f"{what} does not exist: check the path.",
            "unreadable": f"{what} cannot be read: {detail}.",
            "too_large": f"{what} is larger than 1 MiB: is it the right file?",
        }.get(kind, f"{what} cannot be read: it is not a regular file."))

    def owner_only(st: os.stat_result) -> None:
        if hasattr(os, "geteuid") and st.st_uid not in (0, os.geteuid()):
            raise error(f"{what} belongs to another user, who could give themselves any group: "
                        "keep the file in your own account.")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise error(f"{what} is writable by other users, who could give themselves any group: "
                        f"run  chmod go-w '{os.fspath(path)}'")

    raw = read_small_file(path, MAX_FILE_BYTES, refuse, check=owner_only if private else None)
    try:
        return yaml.load(raw.decode("utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except UnicodeDecodeError as exc:
        raise error(f"{what} is not UTF-8 text: {exc}") from None
    except yaml.YAMLError as exc:
        raise error(f"{what} is not valid YAML{hint}: {_yaml_problem(exc)}") from None


def _yaml_problem(exc: Exception) -> str:
    """A YAML syntax error in one line: ``did not find expected node content at line 3,
    column 1 (while parsing a flow node)``.  Its ``str`` is three lines, the mark of a
    ``<unicode string>`` among them, which a cell showed under a one-line error."""
    problem, mark = getattr(exc, "problem", None), getattr(exc, "problem_mark", None)
    if not problem or mark is None:
        return " ".join(str(exc).split())
    context = getattr(exc, "context", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" + (f" ({context})" if context else "")
