"""qmagic in real kernels (jupyter_client): interrupts, output routing, the busy rule,
unload/reload, script rollback, configuration and auto-load.

One kernel is shared by the tests that do not disturb each other; every wait is on a
kernel message (or, inside the kernel, on a condition) with a timeout.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kernel_utils import REPO_ROOT, KernelSession, isolated_env

AUTOLOAD_SOURCE = REPO_ROOT / "jupyter-config" / "qmagic-autoload.py"

SETUP = r'''
import threading, time
import qmagic
w = qmagic.get_worker()
events = {}

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
    threading.Event().wait(60)
    return "not interrupted"

def add(a, b=1):
    return a + b

def main_thread_in_task_wait():
    import sys
    frame = sys._current_frames().get(threading.main_thread().ident)
    while frame is not None:
        if frame.f_code.co_name == "wait" and frame.f_code.co_filename.endswith("tasks.py"):
            return True
        frame = frame.f_back
    return False

def bg_after_main_waits(name):
    """Background helper: announce once the main thread blocks in Task.wait (--wait)."""
    wait_until(main_thread_in_task_wait)
    print(f"{name} main waits", flush=True)
    return bg_wait(name)

def wait_until(predicate, timeout=20):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.005)
'''


@pytest.fixture(scope="module")
def qk(tmp_path_factory):
    """The shared kernel: qmagic from --ext, a QMagic setting from the command line."""
    session = KernelSession(
        tmp_path_factory.mktemp("qk"),
        argv=["--ext=qmagic", "--QMagic.default_user=Kernel User"],
    ).start()
    session.execute(SETUP, check=True)
    yield session
    session.shutdown()


def test_loaded_from_argv_with_command_line_config(qk):
    assert qk.eval("(w.default_user, type(w.engine.foreground).__name__)") == (
        "Kernel User", "KernelForegroundRunner",
    )
    result = qk.execute("%function_execute add 2 b=3", check=True)
    assert result.result == "add(2, b=3)  Kernel User  foreground  completed"


def test_interrupt_stops_the_foreground_task_and_spares_background_tasks(qk):
    started = qk.execute("bg_a = %function_execute -b bg_wait 'a'", check=True)
    qk.wait_for_output(started.msg_id, "a started")
    fg = qk.execute_async("%function_execute fg_block")
    qk.wait_for_output(fg, "fg started")
    qk.interrupt()
    result = qk.wait(fg)
    assert result.status == "error" and result.error["ename"] == "KeyboardInterrupt"
    state = qk.eval(
        "(w.last_task.name, w.last_task.status.value,"
        " w.last_task.traceback.strip().splitlines()[-1], bg_a.status.value,"
        " w.status()['manager_state'])"
    )
    assert state == ("fg_block", "cancelled", "KeyboardInterrupt", "running", "idle")
    assert qk.eval("events['a'].set() or bg_a.result(10)") == "a"


def test_interrupt_while_idle_touches_no_background_task(qk):
    started = qk.execute("bg_b = %function_execute -b bg_wait 'b'", check=True)
    qk.wait_for_output(started.msg_id, "b started")
    qk.interrupt()  # the kernel is idle: SIGINT is ignored
    assert qk.eval("bg_b.status.value") == "running"
    qk.interrupt()
    assert qk.eval("events['b'].set() or (bg_b.result(10), bg_b.status.value)") == ("b", "completed")


def test_interrupting_wait_leaves_the_background_task_running(qk):
    cell = qk.execute_async("%function_execute -b --wait bg_after_main_waits 'e'")
    qk.wait_for_output(cell, "e main waits")
    qk.interrupt()
    result = qk.wait(cell)
    assert result.status == "error" and result.error["ename"] == "KeyboardInterrupt"
    assert "Stopped waiting; the background task bg_after_main_waits('e') keeps running" in result.stderr
    assert qk.eval("w.last_task.status.value") == "running"
    assert qk.eval("events.setdefault('e', threading.Event()).set() or w.last_task.result(10)") == "e"


def test_completion_offers_function_names(qk):
    assert {"add", "bg_wait", "bg_after_main_waits"} <= set(qk.complete("%function_execute -b "))
    assert qk.complete("%function_execute --wait bg_w") == ["bg_wait"]


def test_background_output_goes_to_the_cell_that_started_it(qk):
    first = qk.execute(
        "bg_c = %function_execute -b bg_wait 'c'\nprint('first cell')", check=True
    )
    qk.wait_for_output(first.msg_id, "c started")
    second = qk.execute("events['c'].set(); bg_c.wait(10); print('second cell')", check=True)
    qk.wait_for_output(first.msg_id, "c finished")
    assert "c finished" not in qk.stream_text(second.msg_id)
    assert qk.stream_text(second.msg_id) == "second cell\n"
    assert qk.eval("bg_c.output") == "c started\nc finished\n"


def test_foreground_requests_from_threads_follow_the_busy_rule(qk):
    result = qk.execute(
        "res = {}\n"
        "def probe():\n"
        "    res['state'] = w.status()['ip_kernel_state']\n"
        "    res['fg'] = w.function_execute({'name': 'add', 'args': [1]}, origin='remote')\n"
        "    res['bg'] = w.function_execute({'name': 'add', 'args': [1]},\n"
        "                                   run_in_background=True, origin='remote')\n"
        "th = threading.Thread(target=probe); th.start(); th.join(10)\n"
        "print(res['state'], res['fg']['success'], res['fg']['msg'], res['bg']['success'])\n",
        check=True,
    )
    assert result.stdout == (
        "busy False Error: Failed to start the task: IPython kernel (RE Worker) is busy. True\n"
    )


def test_handed_over_foreground_task_runs_when_idle_and_stops_on_interrupt(qk):
    cell = qk.execute(
        "replies = []\n"
        "def requester():\n"
        "    wait_until(lambda: w.status()['ip_kernel_state'] == 'idle')\n"
        "    replies.append(w.function_execute({'name': 'fg_block'}, origin='remote'))\n"
        "threading.Thread(target=requester, daemon=True).start()\n",
        check=True,
    )
    # It runs on the main thread while the kernel is idle; its output goes to the last cell.
    qk.wait_for_output(cell.msg_id, "fg started")
    qk.interrupt()
    state = qk.eval(
        "(replies[0]['success'], w.last_task.name, w.last_task.status.value,"
        " w.last_task.traceback.strip().splitlines()[-1], w.status()['manager_state'])"
    )
    assert state == (True, "fg_block", "cancelled", "KeyboardInterrupt", "idle")
    # The idle kernel ignores SIGINT again (an interrupt now must not kill the kernel).
    qk.interrupt()
    assert qk.eval("1 + 1") == 2
    # And a handed-over task that is not interrupted completes.
    cell = qk.execute(
        "def requester2():\n"
        "    wait_until(lambda: w.status()['ip_kernel_state'] == 'idle')\n"
        "    r = w.function_execute({'name': 'add', 'args': [40, 2]}, origin='remote')\n"
        "    t = w.get_task(r['task_uid']); t.wait(10)\n"
        "    print('handed-over result', t.result(), flush=True)\n"
        "threading.Thread(target=requester2, daemon=True).start()\n",
        check=True,
    )
    qk.wait_for_output(cell.msg_id, "handed-over result 42")


def test_kernel_interrupt_needs_interrupt_task_while_a_foreground_task_runs(qk):
    qk.execute(
        "def interrupter():\n"
        "    wait_until(lambda: w.status()['manager_state'] == 'executing_task')\n"
        "    return w.kernel_interrupt(), w.kernel_interrupt(interrupt_task=True)\n",
        check=True,
    )
    result = qk.execute("it = %function_execute -b interrupter\n%function_execute fg_block")
    assert result.status == "error" and result.error["ename"] == "KeyboardInterrupt"
    assert qk.eval("it.result(10)") == (
        {"success": False,
         "msg": "Failed to interrupt IPython kernel: Not allowed to interrupt running task"},
        {"success": True, "msg": ""},
    )
    assert qk.eval("w.last_task.name, w.last_task.status.value") == ("fg_block", "cancelled")


def test_failing_script_leaves_the_namespace_unchanged(qk):
    qk.execute("keep = 1", check=True)
    result = qk.execute("%%script_upload\nkeep = 2\nnew_name = 3\nraise RuntimeError('half way')\n")
    assert result.status == "error" and result.error["ename"] == "RuntimeError"
    assert qk.eval("(keep, 'new_name' in globals(), w.last_task.status.value)") == (1, False, "failed")
    ok = qk.execute("%%script_upload\nnew_name = 3\n", check=True)
    assert ok.result == "<script>  Kernel User  foreground  completed"
    assert qk.eval("new_name") == 3


def test_unload_removes_everything_and_reload_works(qk):
    qk.execute("%unload_ext qmagic", check=True)
    gone = qk.execute("%function_execute add 1")
    assert gone.status == "error" and "not found" in gone.error["evalue"]
    assert qk.execute("qmagic.get_worker()").error["ename"] == "RuntimeError"
    threads = qk.eval(
        "wait_until(lambda: not [t for t in threading.enumerate() if t.name.startswith('qmagic')])"
        " or [t.name for t in threading.enumerate() if t.name.startswith('qmagic')]"
    )
    assert threads == []
    assert qk.eval("type(__import__('sys').stdout).__name__") == "OutStream"
    refused = qk.execute("w.submit('add', (1,))")
    assert refused.error["ename"] == "RequestRefused"

    qk.execute("%load_ext qmagic", check=True)
    again = qk.execute("w = qmagic.get_worker()\n%function_execute add 5", check=True)
    assert again.result.startswith("add(5)")
    bg = qk.execute("bg_d = %function_execute -b bg_wait 'd'", check=True)
    qk.wait_for_output(bg.msg_id, "d started")
    assert qk.eval("events['d'].set() or bg_d.result(10)") == "d"


def test_interrupt_in_message_mode(kernel_factory):
    k = kernel_factory(argv=["--ext=qmagic"], interrupt_mode="message")
    k.execute(SETUP, check=True)
    fg = k.execute_async("%function_execute fg_block")
    k.wait_for_output(fg, "fg started")
    k.interrupt()
    result = k.wait(fg)
    assert result.error["ename"] == "KeyboardInterrupt"
    assert k.eval("w.last_task.status.value") == "cancelled"


# =========================================================================================
# auto-load (the startup file, without installing the package)
# =========================================================================================
def _autoload_base(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("autoload")
    startup = base / "ipython" / "profile_default" / "startup"
    startup.mkdir(parents=True)
    shutil.copy(AUTOLOAD_SOURCE, startup / "50-qmagic-autoload.py")
    return base


LOADED = (
    "('function_execute' in get_ipython().magics_manager.magics['line'],"
    " 'qmagic' in get_ipython().extension_manager.loaded,"
    " [n for n in ('_qmagic_autoload', 'qmagic') if n in globals()])"
)


AUTOLOAD_ON = {"QMAGIC_NO_AUTOLOAD": None}


def test_autoload_in_a_fresh_kernel(kernel_factory, tmp_path_factory):
    k = kernel_factory(base=_autoload_base(tmp_path_factory), env=AUTOLOAD_ON)
    assert k.eval(LOADED) == (True, True, [])
    result = k.execute(
        "def triple(x):\n    return 3 * x\nt = %function_execute -b --wait triple 'ab'\nt.result()",
        check=True,
    )
    assert result.result == "'ababab'"


def test_autoload_can_be_turned_off(kernel_factory, tmp_path_factory):
    k = kernel_factory(base=_autoload_base(tmp_path_factory), env={"QMAGIC_NO_AUTOLOAD": "1"})
    assert k.eval(LOADED) == (False, False, [])


def test_autoload_never_breaks_kernel_start(kernel_factory, tmp_path_factory):
    base = _autoload_base(tmp_path_factory)
    broken = base / "broken" / "qmagic"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise RuntimeError('simulated broken install')\n")
    k = kernel_factory(base=base, env={"PYTHONPATH": str(broken.parent), **AUTOLOAD_ON})
    assert k.eval(LOADED) == (False, False, [])


def test_terminal_ipython_is_left_alone(tmp_path_factory):
    base = _autoload_base(tmp_path_factory)
    code = f"print('RESULT', {LOADED})"
    proc = subprocess.run(
        [sys.executable, "-m", "IPython", "--no-banner", "--colors=nocolor", "-c", code],
        env=isolated_env(base, AUTOLOAD_ON),
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr
    assert "RESULT (False, False, [])" in proc.stdout, proc.stdout + proc.stderr


def test_the_installed_startup_file_autoloads_in_every_kernel(kernel_factory, tmp_path_factory):
    """The wheel's shared-data puts the startup file in {sys.prefix}/etc/ipython/startup
    (pip install, also editable): a plain kernel of the environment loads qmagic."""
    installed = Path(sys.prefix) / "etc" / "ipython" / "startup" / "50-qmagic-autoload.py"
    assert installed.is_file(), (
        f"{installed} is missing: install the package (pip install -e '.[test]') before "
        "running the tests, as the README's test command does."
    )
    assert installed.read_text() == AUTOLOAD_SOURCE.read_text()
    k = kernel_factory(base=tmp_path_factory.mktemp("installed"), env=AUTOLOAD_ON)
    assert k.eval(LOADED) == (True, True, [])
    off = kernel_factory(base=tmp_path_factory.mktemp("installed-off"))  # QMAGIC_NO_AUTOLOAD=1
    assert off.eval(LOADED) == (False, False, [])
