"""Scratch folders for the tutorials, removed when the kernel stops, however it stops.

    from _scratch import scratch_folder
    w.state_dir = scratch_folder()

A kernel cannot clean up after itself in every case: JupyterLab's shutdown lets it exit
normally, but nbval and a crash kill it outright (SIGKILL, to its whole process group), so
no ``atexit`` handler or ``TemporaryDirectory`` finaliser runs.  So each folder gets a tiny
watcher process in a session of its own (a process-group kill does not reach it).  It holds
the read end of a pipe whose write end only the kernel holds; when the kernel ends in any
way, the kernel's end closes, the watcher reads end-of-file, removes the folder and exits.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

__all__ = ["scratch_folder"]

_WATCHER = (
    "import shutil, sys\n"
    "sys.stdin.buffer.read()  # returns when every holder of the pipe's write end is gone\n"
    "shutil.rmtree(sys.argv[1], ignore_errors=True)\n"
)

#: (watcher, write end) for each folder of this process: kept open until the process ends.
_watchers: list[tuple[subprocess.Popen, int]] = []


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
    _watchers.append((watcher, write_end))
    return path
