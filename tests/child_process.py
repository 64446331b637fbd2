"""A server run in a child process by a memory test: its memory, and its end.

The remote memory tests (test_remote_memory, test_remote_connections, test_remote_info_limits)
run the server in a process of its own, so that its peak memory (``VmHWM``) is the server's
alone, and stop it by closing its stdin.
"""

from __future__ import annotations

import subprocess


def memory_kb(pid: int, field: str) -> int:
    """A memory figure of process ``pid`` from /proc (``VmRSS``, ``VmHWM``...), in kB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def end_child(child: subprocess.Popen, timeout: float) -> None:
    """Close the child's stdin (it ends then) and wait for it; killed if it does not end."""
    child.stdin.close()
    try:
        child.wait(timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait(timeout)
