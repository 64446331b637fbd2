"""Scratch folders for the tutorials, removed when the kernel stops, however it stops.

    from _scratch import scratch_folder
    w.state_dir = scratch_folder()

(``remove_scratch_folder(path)`` removes one earlier, as ``_build.py`` and ``conftest.py``
do with the folder of their kernels.)

A kernel cannot clean up after itself in every case: JupyterLab's shutdown lets it exit
normally, but nbval and a crash kill it outright (SIGKILL, to its whole process group), so
no ``atexit`` handler or ``TemporaryDirectory`` finaliser runs.  So each folder gets a tiny
watcher process in a session of its own (a process-group kill does not reach it).  It holds
the read end of a pipe whose write end only the kernel holds; when the kernel ends in any
way, the kernel's end closes, the watcher reads end-of-file, removes the folder and exits.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

__all__ = ["remove_scratch_folder", "scratch_folder"]

_WATCHER = (
    "import shutil, sys\n"
    "sys.stdin.buffer.read()  # returns when every holder of the pipe's write end is gone\n"
    "shutil.rmtree(sys.argv[1], ignore_errors=True)\n"
)

#: {folder: (watcher, write end)} of this process: kept open until the process ends.
_watchers: dict[str, tuple[subprocess.Popen, int]] = {}


def scratch_folder(prefix: str = "qmagic-tutorial-") -> str:
    """A new empty folder in the system's temporary folder, removed when this process ends."""
    path = tempfile.mkdtemp(prefix=prefix)
    read_end, write_end = os.pipe()  # not inherited by other programs this kernel starts
    try:
        watcher = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _WATCHER, path],
            stdin=read_end,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=os.sep,
            start_new_session=True,
        )
    except BaseException:
        os.close(write_end)
        os.rmdir(path)
        raise
    finally:
        os.close(read_end)
    _watchers[path] = (watcher, write_end)
    return path


def remove_scratch_folder(path: str, timeout: float = 10.0) -> None:
    """Remove a folder made by :func:`scratch_folder` now, and let its watcher end."""
    watcher, write_end = _watchers.pop(path, (None, None))
    if write_end is not None:
        os.close(write_end)  # the watcher reads end-of-file, removes the folder and exits
    if watcher is not None:
        try:
            watcher.wait(timeout)
        except subprocess.TimeoutExpired:
            watcher.kill()
            watcher.wait()
    shutil.rmtree(path, ignore_errors=True)
