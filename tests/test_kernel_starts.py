"""■ landing while a magic or ``submit`` starts a task, in a real kernel.

A SIGINT (the kernel's ■) is raised at each line of qmagic's start path in turn: a trace
hook calls ``signal.raise_signal`` there, so the kernel's real handler (or qmagic's
interrupt guard) takes it exactly as it would take ■ at that moment.  Each time the call
must raise (a cell, and Run All, stops), and nothing may stay behind: no task left
"queued" for good, the foreground free for the next task.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import interrupt_points
import pytest
from kernel_helpers import one_line, start_kernel

pytestmark = pytest.mark.timeout(180)

HELPERS = Path(interrupt_points.__file__).read_text() + r'''
from qmagic.core.engine import Engine
from qmagic.core.jobs import JobRunner
from qmagic.ipython import runner as _runner

# Each line's SIGINT is a separate ■ here, not the same storm as the previous line's (the
# guard drops SIGINTs closer than COALESCE_S to the previous one).
_runner.COALESCE_S = 0.0

def interrupt_each_line(funcs, start):
    """``start()`` once per line of ``funcs``, ■ at that line; what went wrong, as a list."""
    bad, fired_any = [], []
    for func in funcs:
        for line in lines_of(func):
            fired = []
            before = set(t.uid for t in w.tasks())
            sys.settrace(sigint_at(func.__code__, line, fired))
            raised = None
            try:
                start()
            except BaseException as exc:
                raised = exc
            finally:
                sys.settrace(None)
            where = f"{func.__qualname__} line {line}"
            if not fired:
                continue
            fired_any.append(where)
            if not isinstance(raised, (KeyboardInterrupt, qmagic.TaskCancelled)):
                bad.append((where, "call did not raise", repr(raised)))
            new = [t for t in w.tasks() if t.uid not in before]
            try:
                wait_until(lambda: all(t.done() for t in new), 10)
            except TimeoutError:
                bad.append((where, "left behind", [(t.call_text(), t.status.value) for t in new if not t.done()]))
                for t in new:
                    t.cancel()
                continue
            try:
                if w.submit("add", (1,), background=False).result(10) != 2:
                    bad.append((where, "next foreground task failed"))
            except BaseException as exc:
                bad.append((where, "next foreground task refused", str(exc)))
    return bad, len(fired_any)
'''


@pytest.fixture(scope="module")
def k(tmp_path_factory):
    session = start_kernel(tmp_path_factory.mktemp("starts"))
    session.execute(HELPERS, check=True)
    yield session
    session.shutdown()


@contextlib.contextmanager
def _sigint_at_submit(k):
    """Meanwhile, a ■ (a real SIGINT) lands on the kernel's main thread as qmagic records a
    task it starts there (an engine observer)."""
    k.execute(
        "class SigintAtSubmit:\n"
        "    def task_submitted(self, task):\n"
        "        if threading.current_thread() is threading.main_thread():\n"
        "            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)\n"
        "    def task_started(self, task): pass\n"
        "    def task_finished(self, task, record): pass\n"
        "_observer = SigintAtSubmit()\n"
        "w.engine.observers.append(_observer)\n", check=True)
    try:
        yield
    finally:
        k.execute("w.engine.observers.remove(_observer)", check=True)


def test_an_interrupt_at_any_line_of_a_foreground_start_leaves_nothing_behind(k):
    """■ between the start's bookkeeping and the task's own run left the task "queued" for
    good, holding the foreground: every later foreground task was refused ("A foreground
    task is running") and remote clients read ``executing_task`` until a manual cancel."""
    bad, fired = k.eval(
        "interrupt_each_line([Engine.submit, JobRunner.run_foreground],"
        " lambda: w.submit('add', (1,), background=False))", timeout=120)
    assert fired >= 5, fired
    assert bad == [], bad


def test_an_interrupt_as_a_foreground_task_is_recorded_ends_the_cell_like_one_in_its_code(k):
    """■ while qmagic records a foreground task's start (before its code runs): the task is
    recorded as interrupted and never runs, and the cell ends with the line ■ gives during
    the task, not "the interrupt came as the foreground task was ending"."""
    with _sigint_at_submit(k):
        r = k.execute("%function_execute add 1")
    line = one_line(r)
    assert line == ("TaskCancelled: add(1) was interrupted (■ or KeyboardInterrupt); it is "
                    "recorded as cancelled."), line
    assert k.eval("(w.last_task.status.value, w.last_task.error)") == (
        "cancelled", "Task was interrupted (■ or KeyboardInterrupt)")
    assert k.execute("%function_execute add 2").check().result == "add(2)  qmagic user  foreground  completed"


def test_an_interrupt_as_a_background_task_starts_says_that_it_runs_on(k):
    """■ while qmagic records a background task's start from a cell: the cell stops, the
    task runs on, and the one line says so with the uid to stop it by (it said "the
    interrupt came as the foreground task was ending", and the task's handle was lost)."""
    with _sigint_at_submit(k):
        by_magic = k.execute('t = %function_execute -b bg_wait "s1"')
        by_python = k.execute('t = w.submit("bg_wait", ("s2",))')
    uids = k.eval("[t.uid[:8] for t in w.tasks() if t.name == 'bg_wait']")
    assert len(uids) == 2, uids
    for result, arg, uid in ((by_magic, "s1", uids[0]), (by_python, "s2", uids[1])):
        line = one_line(result)
        assert line == (f"KeyboardInterrupt: the interrupt came as bg_wait('{arg}') was starting in the "
                        f"background; it runs on (stop it with %task_cancel {uid})."), line
    assert k.eval("[t.status.value for t in w.tasks() if t.name == 'bg_wait']") == ["running", "running"]
    k.execute("events['s1'].set(); events['s2'].set()\n"
              "wait_until(lambda: all(t.done() for t in w.tasks()))", check=True)
    assert k.eval("[t.status.value for t in w.tasks() if t.name == 'bg_wait']") == ["completed", "completed"]


def test_an_interrupt_while_the_arguments_are_evaluated_is_one_line_and_starts_nothing(k):
    """■ while ``%function_execute`` evaluates a slow argument: the cell ends with one line
    that says no task was started (it showed a traceback through qmagic's argument code)."""
    k.execute(
        "def slow_value():\n"
        "    print('evaluating', flush=True)\n"
        "    deadline = time.monotonic() + 60\n"
        "    while time.monotonic() < deadline:\n"
        "        time.sleep(0.02)\n"
        "    return 1\n"
        "_before = len(w.tasks())\n", check=True)
    msg_id = k.execute_async("%function_execute -b add 1 b=(slow_value())")
    k.wait_for_output(msg_id, "evaluating")
    k.interrupt()
    line = one_line(k.wait(msg_id))
    assert line == ("KeyboardInterrupt: stopped evaluating the argument b=(slow_value()) of add; no "
                    "task was started."), line
    assert k.eval("len(w.tasks()) - _before") == 0


def test_an_interrupt_while_a_task_row_is_built_is_one_line_and_the_task_runs_on(k):
    """■ while the cell shows the live row of the background task it started (ipywidgets
    build it, tens of milliseconds): the cell ended with a traceback through qmagic's panels
    and ipywidgets, the row half built.  Now: one line, the task runs on."""
    code = (
        "from qmagic.panels.task_panel import TaskRow\n"
        "_fired = []\n"
        "sys.settrace(sigint_at(TaskRow.__init__.__code__, lines_of(TaskRow.__init__)[2], _fired))\n"
        '%function_execute -b bg_wait "r1"\n'
    )
    r = k.execute(code)
    k.execute("sys.settrace(None)", check=True)
    assert k.eval("_fired") != []
    uid = k.eval("w.last_task.uid[:8]")
    line = one_line(r)
    assert line == f"KeyboardInterrupt: stopped showing bg_wait('r1'); it runs on (stop it with %task_cancel {uid}).", line
    assert k.eval("w.last_task.status.value") == "running"
    k.execute("events['r1'].set(); w.last_task.wait(10)", check=True)
    assert k.eval("w.last_task.status.value") == "completed"


@pytest.mark.parametrize("magic, panel", [("%tasks --all", "TaskPanel"), ("%lock_info", "LockPanel")])
def test_an_interrupt_while_a_panel_is_built_is_one_line(k, magic, panel):
    """■ while ``%tasks`` or ``%lock_info`` builds its panel (``%tasks`` with 52 rows took
    0.14 s here): the cell ended with a traceback through qmagic's panels and ipywidgets,
    the panel half built.  Now: one line, no panel left behind."""
    code = (
        f"from qmagic.panels import {panel} as _Panel\n"
        "from qmagic.panels.pump import get_pump as _get_pump\n"
        "_views_before = len(_get_pump().views())\n"
        "_fired = []\n"
        "sys.settrace(sigint_at(_Panel.__init__.__code__, lines_of(_Panel.__init__)[4], _fired))\n"
        f"{magic}\n"
    )
    r = k.execute(code)
    k.execute("sys.settrace(None)", check=True)
    assert k.eval("_fired") != []
    line = one_line(r)
    assert line == "KeyboardInterrupt: stopped showing the panel; nothing else was changed.", line
    assert k.eval("len(_get_pump().views()) - _views_before") == 0


def test_an_interrupt_while_a_panel_that_fails_is_built_shows_the_error_then_stops(k):
    """■ while ``%tasks`` builds its panel, and the panel then raises: the error was shown
    and the ■ lost (the cell went on as if it had never been pressed).  Now both: the
    panel's error, then the one line of the interrupt."""
    k.execute(
        "import qmagic.panels as _panels\n"
        "_RealTaskPanel = _panels.TaskPanel\n"
        "def _failing_panel(*args, **kwargs):\n"
        "    signal.raise_signal(signal.SIGINT)  # ■ while the panel is built\n"
        "    raise ValueError('the panel broke')\n"
        "_panels.TaskPanel = _failing_panel\n", check=True)
    try:
        r = k.execute("%tasks --all\n")
    finally:
        k.execute("_panels.TaskPanel = _RealTaskPanel", check=True)
    errors = [out["content"] for out in r.outputs if out["msg_type"] == "error"]
    assert [(e["ename"], e["evalue"]) for e in errors] == [
        ("ValueError", "the panel broke"),
        ("KeyboardInterrupt", "stopped showing the panel; nothing else was changed."),
    ], errors
    assert one_line(r) == "KeyboardInterrupt: stopped showing the panel; nothing else was changed."


def test_an_interrupt_while_a_task_row_that_fails_is_built_still_stops_the_cell(k):
    """The same for the live row of a background task: its error was logged and the ■
    lost (the cell went on).  Now the error is logged and the cell stops with one line."""
    k.execute(
        "import qmagic.panels.task_panel as _task_panel\n"
        "_RealTaskRow = _task_panel.TaskRow\n"
        "def _failing_row(*args, **kwargs):\n"
        "    signal.raise_signal(signal.SIGINT)  # ■ while the row is built\n"
        "    raise ValueError('the row broke')\n"
        "_task_panel.TaskRow = _failing_row\n", check=True)
    try:
        r = k.execute('%function_execute -b bg_wait "r3"\n')
    finally:
        k.execute("_task_panel.TaskRow = _RealTaskRow", check=True)
    uid = k.eval("w.last_task.uid[:8]")
    line = one_line(r)
    assert line == f"KeyboardInterrupt: stopped showing bg_wait('r3'); it runs on (stop it with %task_cancel {uid}).", line
    assert "ValueError: the row broke" in r.stderr  # (logged, as a row that cannot be built is)
    k.execute("events['r3'].set(); w.last_task.wait(10)", check=True)
    assert k.eval("w.last_task.status.value") == "completed"
