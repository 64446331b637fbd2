"""Where qmagic keeps its persistent state, and which environment names are allowed.

Shared by the lock store and the experiment log, so both agree on the folder and the names.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["STATE_DIR_ENV", "default_state_dir", "not_utf8", "validate_environment_name"]

#: Environment variable that overrides the default state folder.
STATE_DIR_ENV = "QMAGIC_STATE_DIR"


def default_state_dir() -> Path:
    """The folder for qmagic's lock and journal files.

    ``$QMAGIC_STATE_DIR`` when set (``~`` is expanded), else a ``qmagic`` folder in the
    Jupyter data directory (``jupyter --data-dir``).  The folder is not created here.
    Raises ValueError (one line) when ``$QMAGIC_STATE_DIR`` is not UTF-8 text (a byte
    that cannot be read as UTF-8 reaches Python as a lone surrogate): the lock's and the
    log's records carry the folder's path as UTF-8 text, as ``QMagic.state_dir`` requires.
    """
    env = os.environ.get(STATE_DIR_ENV)
    if env:
        shown = not_utf8(env)
        if shown is not None:
            raise ValueError(f"${STATE_DIR_ENV} must be a folder's path in UTF-8 text; "
                             f"'{shown}' is not: choose a folder whose name is.")
        return Path(env).expanduser()
    from jupyter_core.paths import jupyter_data_dir

    return Path(jupyter_data_dir()) / "qmagic"


#: Longest environment name, in UTF-8 bytes: its longest file name (a spool segment,
#: ``<name>.journal.<session>.<n>.spool``, or a lock file's temporary copy) adds up to 70
#: bytes, and a file name holds at most 255 (a longer name left the log unwritable: the
#: kernel said the folder could not be written, and kept every record in memory).
MAX_ENVIRONMENT_NAME_BYTES = 150


def not_utf8(path: str) -> str | None:
    """None when ``path`` is UTF-8 text; else the path as a message shows it, whole, each lone
    surrogate (a byte UTF-8 cannot read) as its escape: ``/data/st\\udcff``."""
    return None if _encodes(path) else path.encode("utf-8", "backslashreplace").decode("utf-8")


def _encodes(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def validate_environment_name(name: object) -> str:
    """Return ``name`` if it can name an environment's files, else raise ``ValueError``.

    A valid name is a non-empty string without path separators, control characters, lone
    surrogates or a leading dot, of at most :data:`MAX_ENVIRONMENT_NAME_BYTES` bytes in UTF-8
    (``default``, ``beamline-1``, ``lab 3``), because it becomes part of file names in the
    state folder.
    """
    bad = None
    if not isinstance(name, str) or not name.strip():
        bad = "it must be a non-empty string"
    elif any(sep in name for sep in ("/", "\\", os.sep, os.altsep or "/")):
        bad = "it must not contain '/' or '\\'"
    elif name.startswith("."):
        bad = "it must not start with '.'"
    elif any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        bad = "it must not contain control characters"
    elif not _encodes(name):
        bad = "it must be text a file name can hold (it holds a lone surrogate)"
    elif len(name.encode("utf-8")) > MAX_ENVIRONMENT_NAME_BYTES:
        bad = (f"it is too long: at most {MAX_ENVIRONMENT_NAME_BYTES} bytes in UTF-8 (its files' "
               "names add up to 70 more, and a file name holds 255)")
    if bad is not None:
        raise ValueError(
            f"Invalid environment name {name!r}: {bad}. Use a plain name such as "
            "'default' or 'beamline-1' (QMagic.environment_name)."
        )
    return name
