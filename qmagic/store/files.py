"""Opening qmagic's state files safely.

Everything qmagic keeps on disk (the lock, the experiment log, spool files) lives in one
state folder that other processes of the same user can also write.  A file placed there by
mistake or on purpose must never hang, crash or redirect the kernel, so every state file is

- opened with ``O_NOFOLLOW`` (a symlink is refused, never followed), ``O_NONBLOCK`` (a FIFO
  or device cannot block the open) and ``O_CLOEXEC``;
- checked after opening: a regular file owned by the current user, else refused;
- replaced atomically when rewritten (temporary file in the same folder, fsync,
  ``os.replace``), so a reader sees the old or the new content, never half of it.

Problems raise :class:`qmagic.errors.StateFileError` with a message that names the file
and says what to do.  This module does not import IPython, ipykernel, ipywidgets or zmq.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
from contextlib import suppress
from pathlib import Path

from ..errors import StateFileError

__all__ = [
    "read_fd",
    "unusable",
    "ensure_state_dir",
    "open_state_file",
    "read_state_file",
    "replace_state_file",
    "remove_dead_replacements",
    "check_state_path",
    "fsync_dir",
]

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def _owner_ok(st: os.stat_result) -> bool:
    geteuid = getattr(os, "geteuid", None)
    return geteuid is None or st.st_uid == geteuid()


def ensure_state_dir(path: str | os.PathLike[str]) -> Path:
    """Create the state folder (mode 0700) if needed and return it as a Path.

    The folder itself may be a symlink chosen by the user (``QMagic.state_dir``); it must be
    a directory owned by the current user and not writable by others.
    """
    folder = Path(path).expanduser()
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.stat(folder)
    except OSError as exc:
        raise StateFileError(
            f"Cannot create the qmagic state folder {str(folder)!r}: {exc}. Choose a writable "
            "folder (QMagic.state_dir or $QMAGIC_STATE_DIR)."
        ) from exc
    if not stat.S_ISDIR(st.st_mode):
        raise StateFileError(
            f"The qmagic state folder {str(folder)!r} is not a folder. Choose another path "
            "(QMagic.state_dir or $QMAGIC_STATE_DIR)."
        )
    if not _owner_ok(st) or st.st_mode & 0o002:
        raise StateFileError(
            f"The qmagic state folder {str(folder)!r} belongs to another user or is writable by "
            "everybody; qmagic keeps its lock and log only in a folder of your own. Choose "
            "another path (QMagic.state_dir or $QMAGIC_STATE_DIR)."
        )
    return folder


def check_state_path(path: str | os.PathLike[str]) -> os.stat_result | None:
    """``lstat`` of a state file: None if it does not exist; StateFileError unless it is a
    regular file (not a symlink, FIFO, device or folder) owned by the current user.

    For files that qmagic cannot open itself (SQLite opens its database): check first.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise unusable("access", path, exc) from exc
    _check_stat(path, st)
    return st


def unusable(verb: str, path: str | os.PathLike[str], exc: OSError) -> StateFileError:
    """The error for a state file the system refused to ``verb``: what happened, what to do."""
    return StateFileError(
        f"Cannot {verb} the qmagic state file {str(path)!r}: {exc}. Check its permissions and "
        "its folder's, or choose another folder (QMagic.state_dir or $QMAGIC_STATE_DIR)."
    )


def _check_stat(path: str | os.PathLike[str], st: os.stat_result) -> None:
    if stat.S_ISLNK(st.st_mode):
        what = "a symbolic link"
    elif not stat.S_ISREG(st.st_mode):
        what = "not a regular file"
    elif not _owner_ok(st):
        what = "owned by another user"
    else:
        return
    raise StateFileError(
        f"The qmagic state file {str(path)!r} is {what}; qmagic only uses its own regular "
        "files there. Move that file away (or choose another QMagic.state_dir), then try again."
    )


def open_state_file(path: str | os.PathLike[str], flags: int, mode: int = 0o600) -> int:
    """``os.open`` for a state file, safely (see the module docstring); returns the descriptor.

    ``flags`` as for ``os.open`` (``O_RDONLY``, ``O_RDWR | O_CREAT``, ``O_APPEND`` ...).
    Raises :class:`FileNotFoundError` when the file is missing and ``O_CREAT`` is not given,
    :class:`StateFileError` for a symlink, FIFO, device, another user's file or any other
    refusal.
    """
    try:
        fd = os.open(path, flags | _NOFOLLOW | _NONBLOCK | _CLOEXEC, mode)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if os.path.islink(path):
            _check_stat(path, os.lstat(path))
        raise unusable("open", path, exc) from exc
    try:
        _check_stat(path, os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_fd(fd: int, most: int, chunk: int = 16 << 20) -> bytes:
    """Up to ``most`` bytes from ``fd`` (fewer at the end of the file), read in chunks."""
    chunks, got = [], 0
    while got < most:
        data = os.read(fd, min(most - got, chunk))
        if not data:
            break
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


def read_state_file(path: str | os.PathLike[str], limit: int) -> bytes | None:
    """The content of a state file (at most ``limit`` + 1 bytes, so callers can tell "too
    large"), or None when it does not exist."""
    try:
        fd = open_state_file(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:  # (never asks for more than the file holds: no huge buffer for a small file)
        return read_fd(fd, min(os.fstat(fd).st_size + 1, limit + 1))
    except OSError as exc:
        raise unusable("read", path, exc) from exc
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a folder so that a rename in it survives a power loss (best effort)."""
    with suppress(OSError):
        fd = os.open(path, os.O_RDONLY | _CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_REPLACEMENT_SUFFIX = ".tmp"


def _replacement_prefix(target: Path) -> str:
    """The start of the temporary file's name that :func:`replace_state_file` renames over ``target``."""
    return f".{target.name}."


def remove_dead_replacements(path: str | os.PathLike[str]) -> None:
    """Remove the temporary files that :func:`replace_state_file` left for ``path`` when its
    process was killed before the rename (they stay for good otherwise).  Call it only while
    no other process can be replacing ``path`` (holding the lock that serialises its writers)."""
    target = Path(path)  # (mkstemp's names: the prefix, 8 characters, the suffix)
    dead = re.compile(re.escape(_replacement_prefix(target)) + r"[a-z0-9_]{8}" + re.escape(_REPLACEMENT_SUFFIX))
    with suppress(OSError):
        for name in os.listdir(target.parent):
            if dead.fullmatch(name):
                with suppress(OSError):
                    os.unlink(target.parent / name)


def replace_state_file(path: str | os.PathLike[str], data: bytes, *, fsync: bool = True) -> None:
    """Write ``data`` to a new file next to ``path`` and rename it over ``path`` (atomic).

    A symlink at ``path`` is replaced by the file, never followed.  The new file has mode 0600.
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=_replacement_prefix(target), suffix=_REPLACEMENT_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise
    if fsync:
        fsync_dir(target.parent)
