"""The lock against real kernels: it survives a restart, a wrong key is refused with the
protocol's full message (and a magic with one line), the emergency key unlocks, two kernels
share one environment, and ``qmagic-clear-lock`` frees a running kernel without a restart.

Kernels start with ``--ext=qmagic`` and share an isolated ``QMAGIC_STATE_DIR`` per test;
they are driven through the queueserver protocol (``QS(get_worker())``), the Python API and
the magics.  Every wait is on a kernel message or a subprocess, with a timeout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernel_helpers import QMAGIC_ARGV, SETUP, one_line
from kernel_utils import REPO_ROOT, ExecResult, KernelSession

pytestmark = pytest.mark.timeout(120)

EMERGENCY_KEY = "EMERG-7f3a"

#: Run in every kernel (again after a restart), after SETUP.
HELPERS = '''
def double(x):
    return 2 * x

def run(key=None):
    """A task started from this kernel's Python API (without a key: the key this kernel
    locked with); the result, or the refusal text."""
    try:
        return w.submit("double", (21,), lock_key=key).result(10)
    except qmagic.RequestRefused as exc:
        return str(exc)

def remote(key=None):
    """function_execute as a remote client sends it: the task's result, or the refusal msg
    (a remote client never gets this kernel's key)."""
    reply = qs.function_execute({"name": "double", "args": [21]}, run_in_background=True,
                                lock_key=key)
    return w.get_task(reply["task_uid"]).result(10) if reply["success"] else reply["msg"]

def info():
    return qs.lock_info()["lock_info"]

def refusal_within(seconds):
    """Poll run() until it is refused; the refusal msg, or None after ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        result = run()
        if result != 42:
            return result
        time.sleep(0.02)
    return None
'''


def _start(kernel_factory, state_dir: Path, user: str, *argv: str, **env: str) -> KernelSession:
    k = kernel_factory(argv=[*QMAGIC_ARGV, f"--QMagic.default_user={user}", *argv],
                       env={"QMAGIC_STATE_DIR": str(state_dir), **env})
    _setup(k)
    return k


def _setup(k: KernelSession) -> None:
    k.execute(SETUP, check=True)
    k.execute(HELPERS, check=True)


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


def _refusal(result: ExecResult, *parts: str, key: str | None = None) -> str:
    """The one UsageError line a refused magic showed; it names ``parts``, never the key."""
    line = one_line(result)
    assert line.startswith("UsageError: "), line
    for part in parts:
        assert part in line, (part, line)
    if key is not None:
        assert key not in line
    return line


def _clear_lock_tool(state_dir: Path, environment: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, "-m", "qmagic.store.clear_lock", "--state-dir", str(state_dir),
         "--environment", environment],
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
    assert k.eval("remote()") == expected  # a remote client must give the key
    assert k.eval("remote('K')") == 42

    k.restart()
    _setup(k)
    assert k.eval("info()") == locked  # still locked, same holder, time and note
    assert k.eval("qs.status()['lock']") == {"environment": True, "queue": False}
    # the restarted kernel no longer holds the key: refused with the protocol's full text
    assert k.eval("run()") == expected
    assert k.eval("run('wrong')") == expected
    _refusal(k.execute("%function_execute double 21"), "Alice", "Changing samples")
    assert "Changing samples" in _shown(k.execute("%lock_info"))
    _refusal(k.execute("%unlock"), "does not hold the key")
    _refusal(k.execute("%unlock --key wrong"), "Alice", key="wrong")
    assert k.eval("run('K')") == 42  # the right key passes without unlocking
    assert k.eval("run()") == expected
    assert _shown(k.execute("%unlock --key K")) == "Unlocked.\n"
    assert _shown(k.execute("%unlock --key K")) == "Not locked.\n"  # (it was not locked any more)
    assert k.eval("run()") == 42
    assert k.eval("info()['environment']") is False
    assert "Not locked." in _shown(k.execute("%lock_info"))


def test_a_lock_taken_without_a_key_can_be_undone_after_a_restart(kernel_factory, tmp_path):
    """``%lock`` without a key takes your default key, which you never saw; after a restart
    (the lock survives it) ``%unlock`` said only "give the lock key or the emergency key".
    Now it says that your default key opens it, and how to give it without ever showing it.
    So does a refused task: it said only "give the key with --lock-key KEY, or ask them to
    unlock" -- a key the scientist never saw, and "them" is themselves."""
    k = _start(kernel_factory, tmp_path / "state", "Alice")
    _shown(k.execute("%lock --note 'Changing samples'"))
    key = k.eval("qmagic.get_default_lock_key()")
    k.restart()
    _setup(k)
    mine = "It was locked with your default key; to release it: %unlock --default-key."
    for code in ("%function_execute double 21", "%%script_upload\nx = 1\n"):
        line = _refusal(k.execute(code), "Alice", "Changing samples", "--lock-key KEY", key=key)
        assert line.endswith(mine), line
    assert k.eval("run()") == _invalid_key(k.eval("info()"))  # (the protocol's text is as before)
    line = _refusal(k.execute("%unlock"), "does not hold the key", key=key)
    hint = "%unlock --default-key"
    assert line.endswith(f"It was locked with your default key: {hint}"), line
    k.execute("del qmagic")  # (the line needs nothing in the namespace)
    assert _shown(k.execute(hint)) == "Unlocked.\n"  # the line works as written
    _setup(k)
    # a lock with another key gets no such hint
    _shown(k.execute("%lock --key K2"))
    k.restart()
    _setup(k)
    line = _refusal(k.execute("%unlock"), "does not hold the key", key="K2")
    assert "default key" not in line, line
    line = _refusal(k.execute("%function_execute double 21"), "Alice", key="K2")
    assert "default key" not in line, line
    assert _shown(k.execute("%unlock --key K2")) == "Unlocked.\n"


def test_a_key_that_starts_with_a_hash_is_typed_in_a_cell_as_it_is(kernel_factory, tmp_path):
    """A remote client locked with ``#secret``; in a cell, ``--lock-key #secret`` was read as
    a comment ("--lock-key needs a value").  The word after the option is its value."""
    k = _start(kernel_factory, tmp_path / "state", "Alice")
    assert k.eval("qs.lock(lock_key='#secret', environment=True, user='Bob')['success']") is True
    _refusal(k.execute("%task_cancel --all"), "Bob")
    assert _shown(k.execute("%task_cancel --all --lock-key #secret  # Bob's key")) == (
        "Cancel requested for 0 tasks.\n")
    k.execute("t = %function_execute --lock-key #secret double 21 # as Bob", check=True)
    assert k.eval("t.result()") == 42
    assert _shown(k.execute("%unlock --key #secret")) == "Unlocked.\n"


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
    assert b.eval("qs.history_clear()['msg']") == expected  # the queue scope is locked too
    _refusal(b.execute("%unlock --key wrong"), "Alice", key="wrong")
    assert _shown(b.execute(f"%unlock --key {EMERGENCY_KEY}")) == (
        "Unlocked.\n(An emergency unlock key is set.)\n")
    assert b.eval("run()") == 42
    assert a.eval("run()") == 42
    assert a.eval("info()['environment']") is False
    for path in state.rglob("*"):  # the emergency key is never stored
        assert not path.is_file() or EMERGENCY_KEY.encode() not in path.read_bytes()


def test_two_kernels_share_one_environment(kernel_factory, tmp_path):
    state = tmp_path / "state"
    a = _start(kernel_factory, state, "Alice")
    b = _start(kernel_factory, state, "Bob")
    assert a.eval("qs.lock(lock_key='KA', environment=True, note='Changing samples',"
                  " user='Alice')['success']") is True
    locked = b.eval("info()")
    assert locked["user"] == "Alice"
    expected = _invalid_key(locked)
    # B sees A's lock at its very next request: no restart, no waiting
    assert b.eval("run()") == expected
    assert b.eval("run('KA')") == 42
    assert a.eval("run('KA')") == 42
    assert b.eval("qs.status()['lock_info_uid']") == a.eval("qs.status()['lock_info_uid']")
    refused = b.eval("qs.lock(lock_key='KB', environment=True, user='Bob')")
    assert refused["success"] is False
    assert refused["msg"].startswith("Error: RE Manager was locked with a different key: \n"
                                     "RE Manager is locked by Alice at ")
    _refusal(b.execute("%lock --key KB"), "Alice", key="KB")

    assert _shown(a.execute("%unlock --key KA")) == "Unlocked.\n"
    assert b.eval("run()") == 42
    assert _shown(b.execute("%lock --key KB -e --note 'Bob aligns the laser'")) == (
        "Locked by Bob: environment\nNote: Bob aligns the laser\n")
    assert a.eval("run()") == _invalid_key(a.eval("info()"))
    assert "Bob aligns the laser" in a.eval("run()")
    _refusal(a.execute("%function_execute double 21"), "Bob", "Bob aligns the laser", key="KB")
    assert _shown(b.execute("%unlock")) == "Unlocked.\n"  # B's remembered key
    assert a.eval("run()") == 42
    assert a.eval("qs.status()['lock']") == {"environment": False, "queue": False}


def test_clear_lock_tool_frees_running_kernels(kernel_factory, tmp_path):
    state = tmp_path / "state"
    env = "bench-2"
    holder = _start(kernel_factory, state, "Alice", f"--QMagic.environment_name={env}")
    other = _start(kernel_factory, state, "Bob", f"--QMagic.environment_name={env}")
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
    msg = other.eval("refusal_within(5)")
    assert msg is not None and "qmagic-clear-lock" in msg, msg
    assert f"--environment {env}" in msg
    assert other.eval("qs.lock_info()['msg']") == msg
    _refusal(other.execute("%function_execute double 21"), "qmagic-clear-lock")
    done = _clear_lock_tool(state, env)
    assert done.returncode == 0 and "was damaged" in done.stdout, done.stdout + done.stderr
    assert other.eval("run()") == 42
    assert json.loads((state / f"{env}.lock.json").read_text())["environment"] is False


def test_a_refused_cancel_of_a_task_handle_says_how_to_give_the_key(kernel_factory, tmp_path):
    """Bob's ``t.cancel()`` while Alice holds the lock is refused (cancelling is in the
    environment's scope); the line said "give the key with lock_key=KEY", which
    ``task.cancel()`` does not take (a TypeError next; the beamtime tester).  It names the
    call that takes it; a refused ``w.submit`` keeps its own words."""
    state = tmp_path / "state"
    a = _start(kernel_factory, state, "Alice")
    b = _start(kernel_factory, state, "Bob")
    started = b.execute("t = %function_execute -b bg_wait 'held'", check=True)
    b.wait_for_output(started.msg_id, "held started")
    try:
        a.execute("%lock --key KA --note 'hutch'", check=True)
        refused = b.execute("t.cancel()")
        assert refused.error["ename"] == "LockRefused"
        [line] = refused.error["traceback"]
        assert line.startswith("LockRefused: The environment is locked by Alice (since ")
        assert line.endswith("; note: hutch): give the key with qmagic.get_worker().cancel(task, "
                             "lock_key=KEY), or ask them to unlock.")
        [submitted] = b.execute("w.submit('double', (1,))").error["traceback"]
        assert submitted.endswith("): give the key with lock_key=KEY, or ask them to unlock.")
        assert b.eval("w.cancel(t, lock_key='KA') is t and t.cancel_requested") is True
    finally:
        a.execute("%unlock --key KA", check=True)
        b.execute("events.setdefault('held', threading.Event()).set()", check=True)
