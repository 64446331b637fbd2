"""qmagic in real kernels (jupyter_client): interrupts, output routing, the busy rule,
handed-over foreground tasks, unload/reload, script rollback, configuration and auto-load.

One kernel is shared by the tests that do not disturb each other; every wait is on a
kernel message (or, inside the kernel, on an event or condition) with a timeout.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kernel_helpers import QMAGIC_ARGV, SETUP, assert_no_internals, one_line, plain, start_kernel
from kernel_utils import REPO_ROOT, isolated_env

pytestmark = pytest.mark.timeout(120)

AUTOLOAD_SOURCE = REPO_ROOT / "jupyter-config" / "qmagic-autoload.py"

#: Extra helpers of this module's kernel.
MORE = r'''
from qmagic.core.foreground import frame_of  # (sys._current_frames() can deadlock 3.11: see it)

def main_thread_waits_for(task):
    """True once the main thread blocks in the wait for ``task`` (a --wait cell)."""
    frame = frame_of(threading.main_thread().ident)
    while frame is not None:
        if frame.f_code.co_name == "wait" and frame.f_locals.get("self") is task:
            return True
        frame = frame.f_back
    return False

def bg_after_main_waits(name):
    """Background helper: announce once the main thread blocks waiting for this task."""
    me = qmagic.current_task()
    wait_until(lambda: main_thread_waits_for(me))
    print(f"{name} main waits", flush=True)
    return bg_wait(name)
'''


@pytest.fixture(scope="module")
def qk(tmp_path_factory):
    """The shared kernel: qmagic from --ext, a QMagic setting from the command line."""
    session = start_kernel(tmp_path_factory.mktemp("qk"), "--QMagic.default_user=Kernel User")
    session.execute(MORE, check=True)
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
    assert result.error["ename"] == "TaskCancelled"
    assert one_line(result) == (
        "TaskCancelled: fg_block() was interrupted (■ or KeyboardInterrupt); it is recorded as "
        "cancelled."
    )
    state = qk.eval(
        "(w.last_task.name, w.last_task.status.value, w.last_task.traceback.strip().splitlines(),"
        " bg_a.status.value, qs.status()['manager_state'])"
    )
    name, status, traceback, bg_status, manager = state
    assert (name, status, bg_status, manager) == ("fg_block", "cancelled", "running", "idle")
    assert traceback[-1] == "KeyboardInterrupt"
    assert any(line.strip().startswith('File "Cell In[') for line in traceback), traceback
    assert_no_internals("\n".join(traceback))
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
    uid = qk.eval("w.last_task.uid")
    assert one_line(result) == (
        "KeyboardInterrupt: stopped waiting; the background task bg_after_main_waits('e') keeps "
        f"running (stop it with %task_cancel {uid[:8]})."
    )
    assert qk.eval("w.last_task.status.value") == "running"
    assert qk.eval("events.setdefault('e', threading.Event()).set() or w.last_task.result(10)") == "e"


def test_completion_offers_function_names(qk):
    assert {"add", "bg_wait", "bg_after_main_waits"} <= set(qk.complete("%function_execute -b "))
    assert qk.complete("%function_execute --wait bg_w") == ["bg_wait"]
    assert "bg_wait" not in qk.complete("%function_execute --user bg_w")


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


def test_what_a_thread_of_a_background_task_prints_goes_to_the_cell_that_started_it(qk):
    """A background scan that reads a detector in a thread of its own: what that thread
    printed (or logged to stderr) landed in whichever cell ran at that moment -- the next
    cell the scientist ran -- and was not kept on the task.  It now goes where the task's
    own output goes, and the task keeps it."""
    first = qk.execute(
        "def reader(tag):\n"
        "    events.setdefault(tag, threading.Event()).wait(10)\n"
        "    print(tag, 'from the thread')\n"
        "    sys.stderr.write(tag + ' on stderr\\n')\n"
        "def threaded(tag):\n"
        "    th = threading.Thread(target=reader, args=(tag,))\n"
        "    th.start(); th.join(10)\n"
        "    return tag\n"
        "import sys\n"
        "th_t = %function_execute -b threaded 't'\n"
        "print('first cell')", check=True)
    second = qk.execute("events['t'].set(); th_t.wait(10); print('second cell')", check=True)
    assert qk.stream_text(second.msg_id) == "second cell\n"  # (it ended after the thread's prints)
    assert qk.stream_text(second.msg_id, "stderr") == ""
    qk.wait_for_output(first.msg_id, "t from the thread")
    qk.wait_for_output(first.msg_id, "t on stderr", name="stderr")
    assert qk.eval("th_t.output") == "t from the thread\nt on stderr\n"


def test_what_a_thread_of_a_task_displays_goes_to_the_cell_that_started_it(qk):
    """A background scan whose pool thread shows a table or a plot (``display()``,
    ``clear_output``): it landed in whichever cell ran at that moment, while the same
    thread's prints went to the task's cell.  Displays now follow the prints; once the task
    has ended, a thread it left behind displays where others do, as its prints."""
    first = qk.execute(
        "from concurrent.futures import ThreadPoolExecutor\n"
        "from IPython.display import Markdown, clear_output, display\n"
        "def shower(tag):\n"
        "    events.setdefault(tag, threading.Event()).wait(10)\n"
        "    display(Markdown(tag + ' table'))\n"
        "    clear_output(wait=True)\n"
        "    display(Markdown(tag + ' plot'), display_id=tag + '-plot')\n"
        "def shown(tag):\n"
        "    with ThreadPoolExecutor(1) as pool:\n"
        "        pool.submit(shower, tag).result(10)\n"
        "sh_d = %function_execute -b shown 'd'\n", check=True)
    second = qk.execute("events['d'].set(); sh_d.wait(10); print('second cell')", check=True)
    kinds = [m["msg_type"] for m in qk.messages(second.msg_id)]
    assert "display_data" not in kinds and "clear_output" not in kinds, kinds
    shown = [(m["msg_type"], m["content"].get("data", {}).get("text/markdown"))
             for m in qk.messages(first.msg_id) if m["msg_type"] != "stream"]
    assert shown == [("display_data", "d table"), ("clear_output", None), ("display_data", "d plot")]
    # a thread that outlives its task: after the end, what it shows goes where others' does
    left = qk.execute(
        "def leaver(tag):\n"
        "    global late\n"
        "    late = threading.Thread(target=shower, args=(tag,))\n"
        "    late.start()\n"
        "lv = %function_execute -b leaver 'late'\n"
        "lv.wait(10)", check=True)
    third = qk.execute("events['late'].set(); late.join(10)", check=True)
    assert [m["content"]["data"]["text/markdown"] for m in qk.messages(third.msg_id)
            if m["msg_type"] == "display_data"] == ["late table", "late plot"]
    assert not [m for m in qk.messages(left.msg_id) if m["msg_type"] == "display_data"]


def test_what_a_thread_of_a_task_fails_to_display_goes_to_the_cell_that_started_it(qk):
    """A scan's pool thread shows an object whose display raises (a plot with a bad label):
    IPython shows the formatter's traceback, and it landed under whichever cell ran then, a
    red error in a cell that did nothing wrong, while the rest of the plot went to the
    task's cell.  It goes to the task's cell too."""
    first = qk.execute(
        "from concurrent.futures import ThreadPoolExecutor\n"
        "from IPython.display import HTML, display\n"
        "class BadPlot:\n"
        "    def _repr_html_(self):\n"
        "        raise ValueError('bad label')\n"
        "def bad_shower(tag):\n"
        "    events.setdefault(tag, threading.Event()).wait(10)\n"
        "    display(BadPlot())\n"
        "def bad_shown(tag):\n"
        "    with ThreadPoolExecutor(1) as pool:\n"
        "        pool.submit(bad_shower, tag).result(10)\n"
        "bs = %function_execute -b bad_shown 'bad'\n", check=True)
    second = qk.execute("events['bad'].set(); bs.wait(10); print(bs.status.value)", check=True)
    assert second.stdout == "completed\n"
    assert [m["msg_type"] for m in qk.messages(second.msg_id)] == ["stream"]
    errors = [m["content"]["evalue"] for m in qk.messages(first.msg_id) if m["msg_type"] == "error"]
    assert errors == ["bad label"]


def test_an_output_widget_a_thread_of_a_task_fills_is_the_tasks_cells(qk):
    """A live plot into an ``ipywidgets.Output`` from a scan's pool thread (``with out:
    display(fig)``): the widget took the parent of whichever cell ran then while the plot
    went to the task's cell, so the plot landed below the widget and the other cell's
    output inside it.  Both are the task's cell's now."""
    first = qk.execute(
        "import ipywidgets\n"
        "from concurrent.futures import ThreadPoolExecutor\n"
        "from IPython.display import HTML, display\n"
        "live = ipywidgets.Output()\n"
        "live_ids = []\n"
        "def into_widget(tag):\n"
        "    events.setdefault(tag, threading.Event()).wait(10)\n"
        "    with live:\n"
        "        live_ids.append(live.msg_id)\n"
        "        display(HTML('in the widget'))\n"
        "def widget_scan(tag):\n"
        "    with ThreadPoolExecutor(1) as pool:\n"
        "        pool.submit(into_widget, tag).result(10)\n"
        "ws = %function_execute -b widget_scan 'widget'\n", check=True)
    qk.execute("events['widget'].set(); ws.wait(10)", check=True)
    assert qk.eval("live_ids") == [first.msg_id]
    shown = [m["content"]["data"]["text/html"] for m in qk.messages(first.msg_id)
             if m["msg_type"] == "display_data"]
    assert shown == ["in the widget"]


def test_an_output_widget_a_thread_of_a_task_fills_leaves_other_threads_output_alone(qk):
    """A scan's pool thread fills an ``ipywidgets.Output`` (its ``__enter__`` calls the
    shell's ``set_parent`` with the task's cell): ipykernel's set_parent also sets the
    kernel-wide parent that every thread without one of its own writes under, so a plain
    thread the next cell started printed and displayed into the task's cell, far above.
    Only the task's thread takes the task's cell; the others' output stays in their cell."""
    first = qk.execute(
        "import ipywidgets\n"
        "from concurrent.futures import ThreadPoolExecutor\n"
        "from IPython.display import HTML, display\n"
        "live2 = ipywidgets.Output()\n"
        "def into_widget2(tag):\n"
        "    events.setdefault(tag, threading.Event()).wait(10)\n"
        "    with live2:\n"
        "        display(HTML('in the widget'))\n"
        "def widget_scan2(tag):\n"
        "    with ThreadPoolExecutor(1) as pool:\n"
        "        pool.submit(into_widget2, tag).result(10)\n"
        "ws2 = %function_execute -b widget_scan2 'widget2'\n", check=True)
    second = qk.execute(
        "events['widget2'].set(); ws2.wait(10)\n"
        "def plain():\n"
        "    print('plain thread')\n"
        "    display(HTML('plain display'))\n"
        "plain_t = threading.Thread(target=plain); plain_t.start(); plain_t.join(10)\n"
        "sys.stdout.flush()", check=True)
    assert "plain thread" in second.stdout
    assert [m["content"]["data"]["text/html"] for m in qk.messages(second.msg_id)
            if m["msg_type"] == "display_data"] == ["plain display"]
    assert [m["content"]["data"]["text/html"] for m in qk.messages(first.msg_id)
            if m["msg_type"] == "display_data"] == ["in the widget"]


def test_a_setting_refused_in_a_cell_shows_one_line(qk):
    """``w.state_dir = "/no/such/folder"`` (or ``w.max_background_tasks = 0``) in a cell:
    the message said what to do, under 50-140 lines of traitlets' and qmagic's frames (and
    the chained OS errors).  A cell's own line now shows the one line; set in a function,
    the usual traceback shows where; the setting is unchanged."""
    before = qk.eval("(w.state_dir, w.max_background_tasks)")
    for code, said in (
            ("w.state_dir = '/proc/no/such/folder'", "StateFileError: Cannot create the qmagic state folder"),
            ("w.max_background_tasks = 0", "TraitError: The value of the 'max_background_tasks' trait"),
            ("w.environment_name = 'a/b'", "ValueError: Invalid environment name 'a/b'")):
        line = one_line(qk.execute(code))
        assert line.startswith(said), (code, line)
    assert qk.eval("(w.state_dir, w.max_background_tasks)") == before
    result = qk.execute("def configure():\n    w.max_background_tasks = 0\nconfigure()")
    assert result.error["ename"] == "TraitError"
    assert "configure()" in "\n".join(result.error["traceback"])  # (where: the function)


def test_config_magic_changes_a_setting_of_the_live_worker(tmp_path):
    """``%config QMagic.default_user = "Alice"`` (IPython's way to set a setting in a cell)
    was silently ignored: the worker was not among the shell's configurables.  It was kept
    for the next ``%reload_ext`` only, a refused value too, which then failed every load
    (found by the beamtime tester).  Now it applies at once; a refused value says why in one
    line, changes nothing, and is not kept for a later load."""
    k = start_kernel(tmp_path)
    try:
        k.execute("%config QMagic.default_user = 'Alice'", check=True)
        assert k.eval("(w.default_user, w.submit('add', (1,)).user)") == ("Alice", "Alice")
        refused = k.execute("%config QMagic.max_background_tasks = 0", check=True)
        assert refused.stderr.strip().startswith("The value of the 'max_background_tasks' trait")
        assert len(refused.stderr.strip().splitlines()) == 1
        assert k.eval("w.max_background_tasks") == 32
        k.execute("%reload_ext qmagic", check=True)
        assert k.eval("(qmagic.get_worker().default_user, qmagic.get_worker().max_background_tasks)") == (
            "Alice", 32)
    finally:
        k.shutdown()


def test_output_of_a_background_task_no_cell_started_goes_to_no_cell(qk):
    """A remote client's background task (started on another thread, as the control channel
    does) prints while a scientist runs a cell: none of it lands in that cell; the task
    keeps it (found by a hostile test: most of the lines did)."""
    qk.execute(
        "remote = {}\n"
        "th = threading.Thread(target=lambda: remote.update(qs.function_execute(\n"
        "    {'name': 'bg_wait', 'args': ['r']}, run_in_background=True)))\n"
        "th.start(); th.join(10); rt = w.get_task(remote['task_uid'])\n"
        "wait_until(lambda: 'r started' in rt.output)",
        check=True,
    )
    cell = qk.execute("print('my cell'); events['r'].set(); rt.wait(10); print(rt.status.value)", check=True)
    assert qk.stream_text(cell.msg_id) == "my cell\ncompleted\n"
    assert qk.eval("rt.output") == "r started\nr finished\n"


def test_foreground_requests_from_threads_follow_the_busy_rule(qk):
    result = qk.execute(
        "res = {}\n"
        "def probe():\n"
        "    res['state'] = qs.status()['ip_kernel_state']\n"
        "    res['fg'] = qs.function_execute({'name': 'add', 'args': [1]})\n"
        "    res['bg'] = qs.function_execute({'name': 'add', 'args': [1]}, run_in_background=True)\n"
        "    try:\n"
        "        w.submit('add', (1,), background=False)\n"
        "    except qmagic.RequestRefused as exc:\n"
        "        res['python'] = str(exc)\n"
        "th = threading.Thread(target=probe); th.start(); th.join(10)\n"
        "print(res['state'], res['fg']['success'], res['fg']['msg'], res['bg']['success'])\n"
        "print(res['python'])\n",
        check=True,
    )
    assert result.stdout == (
        "busy False Error: Failed to start the task: IPython kernel (RE Worker) is busy. True\n"
        "Error: The kernel is running a cell: a foreground task can start once it ends; start this "
        "one in the background instead (-b, or background=True).\n"
    )  # the remote client gets queueserver's text; Python code is told what to do


def test_handed_over_foreground_task_runs_when_idle_and_stops_on_interrupt(qk):
    cell = qk.execute(
        "replies = []\n"
        "def requester():\n"
        "    wait_until(lambda: qs.status()['ip_kernel_state'] == 'idle')\n"
        "    replies.append(qs.function_execute('fg_block'))\n"
        "threading.Thread(target=requester, daemon=True).start()\n",
        check=True,
    )
    # It runs on the main thread while the kernel is idle; its output goes to the last cell.
    qk.wait_for_output(cell.msg_id, "fg started")
    qk.interrupt()
    state = qk.eval(
        "(replies[0]['success'], w.last_task.name, w.last_task.status.value, w.last_task.origin,"
        " w.last_task.traceback.strip().splitlines()[-1], qs.status()['manager_state'])"
    )
    assert state == (True, "fg_block", "cancelled", "remote", "KeyboardInterrupt", "idle")
    # The idle kernel ignores SIGINT again (an interrupt now must not kill the kernel).
    qk.interrupt()
    assert qk.eval("1 + 1") == 2
    # And a handed-over task that is not interrupted completes.
    cell = qk.execute(
        "def requester2():\n"
        "    wait_until(lambda: qs.status()['ip_kernel_state'] == 'idle')\n"
        "    r = qs.function_execute({'name': 'add', 'args': [40, 2]})\n"
        "    t = w.get_task(r['task_uid']); t.wait(10)\n"
        "    print('handed-over result', t.result(), flush=True)\n"
        "threading.Thread(target=requester2, daemon=True).start()\n",
        check=True,
    )
    qk.wait_for_output(cell.msg_id, "handed-over result 42")


def test_kernel_interrupt_stops_only_the_foreground_task(qk):
    """Issue 12: the worker's interrupt(interrupt_task=True) stops the foreground task of a
    cell (and only that task), in and out of the protocol; a plain interrupt is refused."""
    qk.execute(
        "def interrupter():\n"
        "    wait_until(lambda: qs.status()['manager_state'] == 'executing_task')\n"
        "    return (qs.kernel_interrupt(), qs.kernel_interrupt(interrupt_task=True),\n"
        "            qs.kernel_interrupt(interrupt_task=True))\n"
        "def py_interrupter():\n"
        "    wait_until(lambda: qs.status()['manager_state'] == 'executing_task')\n"
        "    return w.interrupt(interrupt_task=True)\n",
        check=True,
    )
    started = qk.execute("keep = %function_execute -b bg_wait 'k'", check=True)
    qk.wait_for_output(started.msg_id, "k started")
    result = qk.execute("it = %function_execute -b interrupter\n%function_execute fg_block")
    assert one_line(result).startswith("TaskCancelled: fg_block() was interrupted")
    replies = qk.eval("it.result(10)")
    assert replies[0] == {
        "success": False,
        "msg": "Failed to interrupt IPython kernel: Not allowed to interrupt running task",
    }
    assert replies[1] == replies[2] == {"success": True, "msg": ""}  # the second is coalesced
    assert qk.eval("w.last_task.name, w.last_task.status.value") == ("fg_block", "cancelled")

    result = qk.execute("it = %function_execute -b py_interrupter\n%function_execute spin")
    assert one_line(result).startswith("TaskCancelled: spin() was interrupted")
    assert qk.eval("it.result(10)") == "interrupted"
    # Only the foreground task: the background task runs on, the kernel answers.
    assert qk.eval("keep.status.value") == "running"
    assert qk.execute("%function_execute add 1 2", check=True).result.startswith("add(1, 2)")
    assert qk.eval("events['k'].set() or keep.result(10)") == "k"


def test_failing_script_leaves_the_namespace_unchanged(qk):
    qk.execute("keep_me = 1", check=True)
    result = qk.execute("%%script_upload\nkeep_me = 2\nnew_name = 3\nraise RuntimeError('half way')\n")
    assert result.status == "error" and result.error["ename"] == "RuntimeError"
    assert qk.eval("(keep_me, 'new_name' in globals(), w.last_task.status.value)") == (1, False, "failed")
    ok = qk.execute("%%script_upload\nnew_name = 3\n", check=True)
    assert ok.result == "script  Kernel User  foreground  completed"
    assert qk.eval("new_name") == 3


def test_a_task_cannot_unload_qmagic_under_itself(qk):
    """%unload_ext / %reload_ext qmagic called by a task's code is refused in one line; qmagic
    stays whole (the task is not force-cancelled by its own unload)."""
    qk.execute("def unload_self(what='unload_ext'):\n"
               "    get_ipython().run_line_magic(what, 'qmagic')\n    return 'unloaded'\n", check=True)
    said = ("qmagic cannot be unloaded from inside a task: run %unload_ext qmagic in a cell of its own.")
    fg = qk.execute("%function_execute unload_self")
    assert fg.status == "error" and (fg.error["ename"], fg.error["evalue"]) == ("UsageError", said)
    assert qk.eval("w.last_task.status.value, w.last_task.error") == ("failed", said)
    qk.execute("t = %function_execute -b unload_self 'reload_ext'", check=True)
    assert qk.eval("t.wait(30) and (t.status.value, t.error)") == ("failed", said)
    assert qk.eval("'qmagic' in get_ipython().extension_manager.loaded and qmagic.get_worker() is w")
    assert qk.execute("%function_execute add 1", check=True).result.startswith("add(1)")


def test_refusals_of_the_python_api_show_one_line_in_a_cell(qk):
    """A refusal of the Python API in a cell (an unknown task, a wrong user group, a bad
    timeout) showed 13 to 40 lines of qmagic's frames (found by a hostile test)."""
    cases = {
        "w.get_task('zzzz')": "TaskNotFound",
        "w.submit('add', (1,), user_group='nobody-here')": "PermissionRefused",
        "w.unlock('wrong-key')": None,  # (not locked: nothing to refuse)
    }
    for code, ename in cases.items():
        result = qk.execute(code)
        if ename is None:
            assert result.status == "ok", code
            continue
        assert result.status == "error" and result.error["ename"] == ename, (code, result.error)
        shown = result.error["traceback"]
        assert len(shown) == 1 and shown[0].startswith(f"{ename}: "), (code, shown)
        assert_no_internals("\n".join(shown))
    # raised through a function of the user's: the usual traceback says where
    qk.execute("def look_up(uid):\n    return w.get_task(uid)\n", check=True)
    result = qk.execute("look_up('zzzz')")
    assert result.error["ename"] == "TaskNotFound" and "look_up" in "\n".join(result.error["traceback"])


def test_a_lock_refusal_of_the_python_api_shows_one_line_with_the_note_escaped(qk):
    """``w.submit(..., lock_key="wrong")`` in a cell showed queueserver's six-line text,
    the lock's note as written: an escape sequence in it coloured (or cleared) what
    followed, a newline made a line of its own (found by the beamtime tester).  The cell
    shows the line the magics show, control characters escaped; ``str(exc)`` stays
    queueserver's text."""
    qk.execute("w.lock('k-note', note='sample\\x1b[31m change\\nline 2 \\u202e')", check=True)
    try:
        for code, said in (
                ("w.submit('add', (1,), lock_key='wrong')", "the key given does not open it"),
                ("w.unlock('wrong')", "the key given is neither its lock key nor the emergency key")):
            result = qk.execute(code)
            assert result.status == "error" and result.error["ename"] == "LockRefused", result.error
            [shown] = result.error["traceback"]
            assert "\n" not in shown and "\x1b" not in shown and "\u202e" not in shown, shown
            assert shown.startswith("LockRefused: The environment is locked by ") and said in shown
            assert "note: sample\\x1b[31m change\\nline 2 \\u202e)" in shown
        qk.execute("try:\n    w.submit('add', (1,), lock_key='wrong')\n"
                   "except qmagic.LockRefused as exc:\n    refused_text = str(exc)\n", check=True)
        assert qk.eval("refused_text.splitlines()[0]") == "Error: Invalid lock key: "
    finally:
        qk.execute("w.unlock('k-note')", check=True)


def test_a_task_that_gets_qmagics_error_shows_its_own_frames_only(qk):
    """A foreground task whose code waited on another task and timed out showed qmagic's
    frames after its own (core/task.py; found by a hostile test)."""
    qk.execute("def wait_other(uid):\n    return w.get_task(uid).result(timeout=0.05)\n", check=True)
    qk.execute("t = %function_execute -b bg_wait 'frames'", check=True)
    try:
        for code in ("%function_execute wait_other t.uid", "%function_execute -b --wait wait_other t.uid"):
            result = qk.execute(code)
            assert result.status == "error" and result.error["ename"] == "TimeoutError", (code, result.error)
            shown = "\n".join(result.error["traceback"])
            assert "wait_other" in shown, shown  # (the task's own frame)
            assert_no_internals(shown)
    finally:
        qk.execute("events.setdefault('frames', threading.Event()).set()", check=True)


def test_unload_removes_everything_and_reload_works(qk):
    assert qk.eval("bool([t for t in threading.enumerate() if t.name.startswith('qmagic')])") is True
    # %config reaches the live worker (it set the shell's config only: the next load read it)
    qk.execute("%config QMagic.task_output_limit = 100001", check=True)
    assert qk.eval("(w.task_output_limit, w.engine.output_limit)") == (100001, 100001)
    workers = "[type(c).__name__ for c in get_ipython().configurables].count('Worker')"
    assert qk.eval(workers) == 1
    qk.execute("%unload_ext qmagic", check=True)
    assert qk.eval(workers) == 0  # (the unloaded worker is not kept alive by %config's list)
    gone = qk.execute("%function_execute add 1")
    assert gone.status == "error" and "not found" in gone.error["evalue"]
    assert qk.execute("qmagic.get_worker()").error["ename"] == "NotLoaded"  # (a RuntimeError)
    threads = qk.eval(
        "wait_until(lambda: not [t for t in threading.enumerate() if t.name.startswith('qmagic')])"
        " or [t.name for t in threading.enumerate() if t.name.startswith('qmagic')]"
    )
    assert threads == []
    assert qk.eval("type(sys.stdout).__name__") == "OutStream"
    refused = qk.execute("w.submit('add', (1,))")
    assert refused.error["ename"] == "RequestRefused"

    qk.execute("%load_ext qmagic", check=True)
    again = qk.execute("w = qmagic.get_worker(); qs = QS(w)\n%function_execute add 5", check=True)
    assert again.result.startswith("add(5)")
    assert qk.eval(f"({workers}, w.task_output_limit)") == (1, 100001)
    bg = qk.execute("bg_d = %function_execute -b bg_wait 'd'", check=True)
    qk.wait_for_output(bg.msg_id, "d started")
    assert qk.eval("events['d'].set() or bg_d.result(10)") == "d"


def test_interrupt_in_message_mode(kernel_factory):
    k = kernel_factory(argv=QMAGIC_ARGV, interrupt_mode="message")
    k.execute(SETUP, check=True)
    fg = k.execute_async("%function_execute fg_block")
    k.wait_for_output(fg, "fg started")
    k.interrupt()
    result = k.wait(fg)
    assert one_line(result).startswith("TaskCancelled: fg_block() was interrupted")
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
    assert result.stderr == ""


def test_autoload_can_be_turned_off(kernel_factory, tmp_path_factory):
    k = kernel_factory(base=_autoload_base(tmp_path_factory),
                       env={"QMAGIC_NO_AUTOLOAD": "1"})
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
    off = kernel_factory(base=tmp_path_factory.mktemp("installed-off"))
    assert off.eval(LOADED) == (False, False, [])


def _usage_words(line: str) -> tuple[set[str], set[str]]:
    """The options and the placeholders (NAME, UID, start, ...) of a usage line, the value
    name after an option left out (the README may abbreviate it)."""
    words = re.sub(r"[\[\]|{}(),]|\.\.\.", " ", line).split()[1:]
    options, places, value_next = set(), set(), False
    for word, after in zip(words, [*words[1:], ""]):
        if value_next:
            value_next = False
        elif word.startswith("-"):
            options.add(word)
            value_next = after.isupper()
        else:
            places.add(word)
    return options, places


def test_every_magics_help_and_the_readme_write_it_alike(qk):
    """Each registered magic's %magic? (read in the kernel, as a user reads it) against the
    README's usage line: the same options and placeholders.  %control_channel? showed
    argparse's '[{start,stop,status}] [address]' and %function_execute? 'name' where the
    README and the magics' own errors write 'start|stop|status', ADDRESS and NAME; the help
    said a start without address took QMagic.zmq_control_address, else the default port,
    where it takes the address it last served on."""
    names = qk.eval("sorted({('%%' if kind == 'cell' else '%') + name for kind, table in "
                    "get_ipython().magics_manager.magics.items() for name, f in table.items() "
                    "if type(getattr(f, '__self__', None)).__module__.startswith('qmagic.')})")
    assert len(names) == 11, names
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("\n## Magics\n", 1)[1].split("\n## ", 1)[0]
    usages = [re.split(r"\s{2,}", line)[0] for line in section.splitlines() if re.match(r"%%?[a-z_]+( |$)", line)]
    helps = {}
    for name in names:
        reply = qk.execute(f"{name}?", check=True).reply
        helps[name] = plain("".join(p["data"]["text/plain"] for p in reply["payload"]))
        text = helps[name].split("Docstring:", 1)[1].strip()
        written = [u for u in usages if u.split()[0] == name]
        assert written, f"README has no usage line of {name}"
        if not text.startswith(f"%{name.lstrip('%')} "):  # (%%script_upload? shows %script_upload's line)
            assert name == "%lock_info" and written == ["%lock_info"], (name, text.splitlines()[0])
            continue
        help_options, help_places = _usage_words(text.splitlines()[0])
        for usage in written:
            options, places = _usage_words(usage)
            assert help_options <= options | ({"-b"} & help_options), (name, usage)
            assert all(o in help_options or f", {o}" in text for o in options), (name, usage)
            assert places <= help_places and (name.startswith("%%") or places == help_places), (name, usage)
    for text in (helps["%control_channel"], readme):
        assert "else the address it last served on" in " ".join(text.split())
