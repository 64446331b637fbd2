"""The lock against real kernels (issue 4): it survives a restart, a wrong key is refused
with the protocol's full message, the emergency key unlocks, two kernels share one
environment, and ``qmagic-clear-lock`` frees a running kernel without a restart.

Kernels start with ``--ext=qmagic`` and share an isolated ``QMAGIC_STATE_DIR`` per test;
they are driven through the Python API (``qmagic.get_worker()``) and the magics.  Every
wait is on a kernel message or a subprocess, with a timeout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernel_utils import REPO_ROOT, ExecResult, KernelSession

pytestmark = pytest.mark.timeout(120)

EMERGENCY_KEY = "EMERG-7f3a"

#: Run in every kernel (again after a restart): a function to start, and two helpers.
SETUP = '''
import qmagic
w = qmagic.get_worker()

def double(x):
    return 2 * x

def run(key=None):
    """function_execute through the protocol door: the task's result, or the refusal msg."""
    reply = w.function_execute({"item_type": "function", "name": "double", "args": [21]},
                               run_in_background=True, lock_key=key)
    return w.get_task(reply["task_uid"]).result(10) if reply["success"] else reply["msg"]

def info():
    return w.lock_info()["lock_info"]

def refusal_within(seconds):
    """Poll run() until it is refused; the refusal msg, or None after ``seconds``."""
    import time
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        result = run()
        if result != 42:
            return result
        time.sleep(0.02)
    return None
'''


def _start(kernel_factory, state_dir: Path, user: str, **env: str) -> KernelSession:
    k = kernel_factory(argv=["--ext=qmagic", f"--QMagic.default_user={user}"],
                       env={"QMAGIC_STATE_DIR": str(state_dir), **env})
    k.execute(SETUP, check=True)
    return k


def _invalid_key(info: dict, emergency: bool = False) -> str:
    """The protocol's refusal text for the lock described by ``info`` (a lock_info dict)."""
    return ("Error: Invalid lock key: \n"
            f"RE Manager is locked by {info['user']} at {info['time_str']}\n"
            f"Environment is locked: {info['environment']}\n"
            f"Queue is locked:       {info['queue']}\n"
            f"Emergency lock key:    {'set' if emergency else 'not set'}\n"
            f"Note: {info['note'] or '---'}")


def _shown(result: ExecResult) -> str:
    """What a magic showed: its printed text, or the text/plain of the panel it displayed."""
    result.check()
    return result.stdout + "".join(d.get("text/plain", "") for d in result.displayed)


def _usage_error(result: ExecResult) -> str:
    """The one-line UsageError a refused magic raised (its message)."""
    assert result.status == "error", (result.stdout, result.stderr)
    assert result.error["ename"] == "UsageError", result.error
    return result.error["evalue"]


def _clear_lock_tool(state_dir: Path, environment: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, "-m", "qmagic.locks", "--state-dir", str(state_dir), "--environment", environment],
        capture_output=True, text=True, env=env, timeout=60, cwd=state_dir)


def test_lock_survives_a_restart_and_a_wrong_key_gets_the_full_message(kernel_factory, tmp_path):
    state = tmp_path / "state"
    k = _start(kernel_factory, state, "Alice")
    assert _shown(k.execute("%lock --key K -e --note 'Changing samples'")) == (
        "Locked by Alice: environment\nNote: Changing samples\n")
    assert k.eval("run()") == 42  # this kernel remembers its key
    locked = k.eval("info()")
    assert (locked["environment"], locked["queue"], locked["user"], locked["note"]) == (
        True, False, "Alice", "Changing samples")
    expected = _invalid_key(locked)
    assert k.eval("run('wrong')") == expected

    k.restart()
    k.execute(SETUP, check=True)
    assert k.eval("info()") == locked  # still locked, same holder, time and note
    assert k.eval("w.status()['lock']") == {"environment": True, "queue": False}
    # the restarted kernel no longer holds the key: refused with the protocol's full text
    assert k.eval("run()") == expected
    assert k.eval("run('wrong')") == expected
    assert _usage_error(k.execute("%function_execute double 21")) == expected[len("Error: "):]
    assert "Changing samples" in _shown(k.execute("%lock_info"))
    assert _usage_error(k.execute("%unlock")).startswith("This kernel does not hold the key")
    assert _usage_error(k.execute("%unlock --key wrong")) == expected[len("Error: "):]
    assert k.eval("run('K')") == 42  # the right key passes without unlocking
    assert k.eval("run()") == expected
    assert _shown(k.execute("%unlock --key K")) == "Not locked.\n"
    assert k.eval("run()") == 42
    assert k.eval("info()['environment']") is False
    assert "Not locked." in _shown(k.execute("%lock_info"))


def test_emergency_key_unlocks_from_another_kernel(kernel_factory, tmp_path):
    state = tmp_path / "state"
    a = _start(kernel_factory, state, "Alice", QMAGIC_EMERGENCY_LOCK_KEY=EMERGENCY_KEY)
    b = _start(kernel_factory, state, "Bob", QMAGIC_EMERGENCY_LOCK_KEY=EMERGENCY_KEY)
    assert _shown(a.execute("%lock --key K -a --note 'Changing samples'")) == (
        "Locked by Alice: environment, queue\nNote: Changing samples\n"
        "(An emergency unlock key is set.)\n")
    locked = b.eval("info()")
    assert locked["emergency_lock_key_is_set"] is True
    expected = _invalid_key(locked, emergency=True)
    assert b.eval("run()") == expected
    assert b.eval(f"run({EMERGENCY_KEY!r})") == expected  # the emergency key only unlocks
    assert b.eval("w.history_clear()['msg']") == expected  # the queue scope is locked too
    assert _usage_error(b.execute("%unlock --key wrong")) == expected[len("Error: "):]
    assert _shown(b.execute(f"%unlock --key {EMERGENCY_KEY}")) == (
        "Not locked.\n(An emergency unlock key is set.)\n")
    assert b.eval("run()") == 42
    assert a.eval("run()") == 42
    assert a.eval("info()['environment']") is False
    for path in state.rglob("*"):  # the emergency key is never stored
        assert not path.is_file() or EMERGENCY_KEY.encode() not in path.read_bytes()


def test_two_kernels_share_one_environment(kernel_factory, tmp_path):
    state = tmp_path / "state"
    a = _start(kernel_factory, state, "Alice")
    b = _start(kernel_factory, state, "Bob")
    assert a.eval("w.lock('KA', environment=True, note='Changing samples')['success']") is True
    locked = b.eval("info()")
    assert locked["user"] == "Alice"
    expected = _invalid_key(locked)
    # B sees A's lock at its very next request: no restart, no waiting
    assert b.eval("run()") == expected
    assert b.eval("run('KA')") == 42
    assert a.eval("run()") == 42
    assert b.eval("w.status()['lock_info_uid']") == a.eval("w.status()['lock_info_uid']")
    refused = b.eval("w.lock('KB', environment=True)")
    assert refused["success"] is False
    assert refused["msg"].startswith("Error: RE Manager was locked with a different key: \n"
                                     "RE Manager is locked by Alice at ")
    assert _usage_error(b.execute("%lock --key KB")).startswith("RE Manager was locked with a different key")

    assert a.eval("w.unlock()['success']") is True  # A's remembered key
    assert b.eval("run()") == 42
    assert _shown(b.execute("%lock --key KB -e --note 'Bob aligns the laser'")) == (
        "Locked by Bob: environment\nNote: Bob aligns the laser\n")
    assert a.eval("run()") == _invalid_key(a.eval("info()"))
    assert "Bob aligns the laser" in a.eval("run()")
    assert _usage_error(a.execute("%function_execute double 21")).startswith("Invalid lock key: \n"
                                                                             "RE Manager is locked by Bob")
    assert _shown(b.execute("%unlock")) == "Not locked.\n"
    assert a.eval("run()") == 42
    assert a.eval("w.status()['lock']") == {"environment": False, "queue": False}


def test_clear_lock_tool_frees_running_kernels(kernel_factory, tmp_path):
    state = tmp_path / "state"
    env = "bench-2"
    holder = kernel_factory(argv=["--ext=qmagic", "--QMagic.default_user=Alice",
                                  f"--QMagic.environment_name={env}"],
                            env={"QMAGIC_STATE_DIR": str(state)})
    holder.execute(SETUP, check=True)
    other = kernel_factory(argv=["--ext=qmagic", "--QMagic.default_user=Bob",
                                 f"--QMagic.environment_name={env}"],
                           env={"QMAGIC_STATE_DIR": str(state)})
    other.execute(SETUP, check=True)
    assert _shown(holder.execute("%lock --key lost-key-42 -e --note 'Changing samples'")).startswith(
        "Locked by Alice")
    assert other.eval("run()").startswith("Error: Invalid lock key: \n")

    done = _clear_lock_tool(state, env)  # while both kernels run
    assert done.returncode == 0, done.stderr
    assert f"Removed the lock of environment '{env}'" in done.stdout
    assert "Alice" in done.stdout and "Changing samples" in done.stdout
    assert "lost-key-42" not in done.stdout + done.stderr
    # the very next locked call succeeds, without a restart
    assert other.eval("run()") == 42
    assert holder.eval("run()") == 42
    assert holder.eval("info()['environment']") is False
    assert "Not locked." in _shown(other.execute("%lock_info"))

    # a damaged lock file counts as locked in the running kernels; the tool resets it
    (state / f"{env}.lock.json").write_text("{ not json")
    info_msg = other.eval("w.lock_info()['msg']")  # lock_info always looks at the file
    assert "cannot be used" in info_msg and "LOCKED" in info_msg
    # a hand edit does not bump the generation counter: requests notice it at the
    # periodic look (every 0.5 s), never later
    msg = other.eval("refusal_within(5)")
    assert msg == info_msg
    assert f"qmagic-clear-lock --environment {env} --state-dir" in msg
    done = _clear_lock_tool(state, env)
    assert done.returncode == 0 and "was damaged" in done.stdout, done.stdout + done.stderr
    assert other.eval("run()") == 42
    assert json.loads((state / f"{env}.lock.json").read_text())["environment"] is False
