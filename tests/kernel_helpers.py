"""What the kernel-level qmagic tests share: how kernels start, the helpers defined inside
every test kernel, and the checks on what a user sees (one line, own frames, no insides).

Kernels are driven through ``tests/kernel_utils.py`` (jupyter_client); every wait is on a
kernel message, or inside the kernel on an event or condition, with a timeout.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from kernel_utils import REPO_ROOT, ExecResult, KernelSession

__all__ = [
    "QMAGIC_ARGV", "SETUP", "start_kernel", "plain", "error_text", "one_line",
    "assert_no_internals", "INTERNALS",
]

#: Test kernels load qmagic as a user does; the experiment log is on (its default), in the
#: kernel's own state folder.
QMAGIC_ARGV: list[str] = ["--ext=qmagic"]

TESTS_DIR = Path(__file__).resolve().parent

#: Run in every test kernel: the worker, a queueserver client on the real method table,
#: and functions to start.
SETUP = r'''
import sys, threading, time
import qmagic
sys.path.insert(0, %r)
from qs_helpers import QS
w = qmagic.get_worker()
qs = QS(w)
events = {}

def wait_until(predicate, timeout=20):
    """Poll a condition of the kernel's own state (another thread changes it)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.002)

def add(a, b=1):
    return a + b

def boom(x):
    raise ValueError(f"bad value {x}")

def outer(x):
    return boom(x)

def bg_wait(name):
    """Background helper: announce, wait to be released, announce again."""
    ev = events.setdefault(name, threading.Event())
    print(f"{name} started", flush=True)
    if not ev.wait(30):
        raise TimeoutError(name)
    print(f"{name} finished", flush=True)
    return name

def fg_block():
    print("fg started", flush=True)
    # sleeps, not one long lock wait: CPython may not act on a SIGINT that arrives while the
    # main thread goes to sleep on a lock until that wait returns (see the README)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(0.02)
    return "not interrupted"

spinning = threading.Event()

def spin():
    """Pure Python busy loop (holds the GIL), bounded; sets ``spinning`` once it runs."""
    print("spin started", flush=True)
    spinning.set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pass
    return "not interrupted"

def chatter():
    """Busy loop that prints and reports progress all the time (the task's lock is taken
    and given back constantly), bounded; sets ``spinning`` once it runs."""
    print("spin started", flush=True)
    spinning.set()
    deadline = time.monotonic() + 60
    i = 0
    while time.monotonic() < deadline:
        print(i)
        qmagic.report_progress(i, None, "chatting")
        i += 1
    return "not interrupted"
''' % str(TESTS_DIR)


def start_kernel(base: Path, *argv: str, env: dict | None = None, setup: bool = True) -> KernelSession:
    """A started kernel with qmagic loaded (``--ext=qmagic``) and :data:`SETUP` run."""
    session = KernelSession(base, argv=[*QMAGIC_ARGV, *argv], env=env).start()
    if setup:
        session.execute(SETUP, check=True)
    return session


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def plain(text: str) -> str:
    """``text`` without ANSI colours."""
    return _ANSI.sub("", text)


def error_text(result: ExecResult) -> list[str]:
    """The lines a failed cell showed (its traceback as the notebook renders it)."""
    assert result.status == "error", (result.status, result.stdout, result.stderr)
    return plain("\n".join(result.error["traceback"])).strip().splitlines()


def one_line(result: ExecResult) -> str:
    """The one line a failed cell showed; fails unless it showed exactly one.

    A UsageError is printed on stderr (its traceback is empty); anything else is the reply's
    traceback.
    """
    assert result.status == "error", (result.status, result.stdout, result.stderr)
    if result.error["ename"] == "UsageError":
        assert result.error["traceback"] == [], result.error
        lines = [line for line in plain(result.stderr).splitlines() if line.strip()]
    else:
        lines = error_text(result)
    assert len(lines) == 1, lines
    return lines[0]


#: What must never appear in what a user sees: qmagic's own files, the kernel's temporary
#: cell files, Python's threading and executor internals.
INTERNALS = (
    str(REPO_ROOT / "qmagic"), "qmagic/core/", "qmagic/ipython/", "qmagic/worker.py",
    "/tmp/ipykernel_", "ipykernel_", "threading.py", "concurrent/futures", "asyncio/",
)


def assert_no_internals(text: Any) -> None:
    """Fail if ``text`` shows any of :data:`INTERNALS`."""
    shown = plain(str(text))
    for marker in INTERNALS:
        assert marker not in shown, f"{marker!r} shown to the user:\n{shown}"
