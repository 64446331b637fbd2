"""Reading a small YAML settings file safely (permission rules, client key lists).

The file must be a regular file (a FIFO or device never blocks the read) of at most 1 MiB;
``private`` files must also belong to the user (or root) and be writable by nobody else —
whoever can write a client key list can give themselves any group.
"""

from __future__ import annotations

import os
import stat
from typing import Any

import yaml

__all__ = ["load_yaml_file", "MAX_FILE_BYTES"]

MAX_FILE_BYTES = 1 << 20


def load_yaml_file(path: str | os.PathLike, what: str, error: type[Exception], *,
                   private: bool = False, hint: str = "") -> Any:
    """The YAML document in ``path``; ``error(message)`` says what is wrong (``what`` names
    the file in the message, ``hint`` is added to YAML syntax errors)."""
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"{what} does not exist: check the path.") from None
    except OSError as exc:
        raise error(f"{what} cannot be read: {exc.strerror or exc}.") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{what} cannot be read: it is not a regular file.")
        if private and hasattr(os, "geteuid") and st.st_uid not in (0, os.geteuid()):
            raise error(f"{what} belongs to another user, who could give themselves any group: "
                        "keep the file in your own account.")
        if private and st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise error(f"{what} is writable by other users, who could give themselves any group: "
                        f"run  chmod go-w '{path}'")
        if st.st_size > MAX_FILE_BYTES:
            raise error(f"{what} is larger than 1 MiB: is it the right file?")
        with os.fdopen(fd, "rb", closefd=False) as stream:
            raw = stream.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise error(f"{what} cannot be read: {exc.strerror or exc}.") from None
    finally:
        os.close(fd)
    try:
        return yaml.load(raw.decode("utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except UnicodeDecodeError as exc:
        raise error(f"{what} is not UTF-8 text: {exc}") from None
    except yaml.YAMLError as exc:
        raise error(f"{what} is not valid YAML{hint}: {exc}") from None
