"""Panels without a frontend: widget state, coalescing, final state, bounds, text/plain.

Widgets are real ipywidgets; their comms are replaced by a recording comm (the ``probe``),
a measurement probe that counts what a panel would send to a browser.  The last tests start
a real kernel to check what only a kernel shows: Cancel while a cell blocks the main thread
(subshell routing), the Task display formatter, and detach leaving no thread behind.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import Any, Callable

import pytest

import qmagic
from qmagic import text as qtext
from qmagic import widgets
from qmagic.panels import pump as pump_module

pytestmark = pytest.mark.timeout(120)

UID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
CLOCK_RE = re.compile(r"\d{1,2}:\d{2}(:\d{2})?|\d+(\.\d+)?\s*s\b")


# -- probe: a comm that records what would go to the frontend ----------------------------------
class Recorder:
    """Every comm message the widgets send: (time, msg_type, comm_id, data)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.messages: list[tuple[float, str, str, Any]] = []

    def add(self, msg_type: str, comm_id: str, data: Any) -> None:
        with self.lock:
            self.messages.append((time.time(), msg_type, comm_id, data))

    def of(self, msg_type: str, since: float = 0.0) -> list[tuple[float, str, str, Any]]:
        with self.lock:
            return [m for m in self.messages if m[1] == msg_type and m[0] >= since]

    def updates(self, since: float = 0.0) -> list[tuple[float, str, str, Any]]:
        return [m for m in self.of("comm_msg", since) if (m[3] or {}).get("method") == "update"]


@pytest.fixture
def probe(monkeypatch):
    import comm
    from comm.base_comm import BaseComm

    recorder = Recorder()

    class ProbeComm(BaseComm):
        kernel = True  # ipywidgets only sends when the comm has a kernel

        def publish_msg(self, msg_type, data=None, metadata=None, buffers=None, **keys):
            recorder.add(msg_type, self.comm_id, data)

    monkeypatch.setattr(comm, "create_comm", lambda *a, **k: ProbeComm(*a, **k))
    yield recorder


def _job(n: int, dt: float = 0.0, message: str = "step") -> int:
    for i in range(n):
        qmagic.report_progress(i + 1, n, f"{message} {i + 1}")
        if dt:
            qmagic.cancellable_sleep(dt)
    return n


def _burst(n: int) -> int:
    for i in range(n):
        qmagic.report_progress(i + 1, n)
    return n


def _fail() -> None:
    raise ValueError("the sample holder is empty")


def _chatty() -> dict:
    print("moving to position 3")
    logging.getLogger("lab.motor").warning("motor is warm")
    return {"x": 3}


@pytest.fixture
def worker():
    gates: dict[str, threading.Event] = {}
    started: dict[str, threading.Event] = {}

    def wait_gate(name: str, n: int = 10, at: int = 3) -> str:
        qmagic.report_progress(at, n, f"point {at}")
        started.setdefault(name, threading.Event()).set()
        while not gates.setdefault(name, threading.Event()).wait(0.01):
            qmagic.raise_if_cancelled()
        return name

    def stubborn(name: str) -> None:  # ignores cooperative cancel
        started.setdefault(name, threading.Event()).set()
        while True:
            time.sleep(0.01)

    ns = {"job": _job, "burst": _burst, "fail": _fail, "chatty": _chatty, "wait_gate": wait_gate,
          "stubborn": stubborn}
    w = qmagic.Worker(ns, max_finished_tasks=20_000, max_queued_tasks=20_000, cancel_grace_s=0.2)
    w.test_gates = gates
    w.test_started = started
    yield w
    for event in gates.values():
        event.set()
    widgets.detach(None, w)
    w.close()
    pump_module.shutdown()


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    """Wait for ``predicate()`` (checked every 10 ms) or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        pause.wait(0.01)


def started(w, name: str, timeout: float = 5.0) -> None:
    assert w.test_started.setdefault(name, threading.Event()).wait(timeout), f"{name} did not start"


def row_status(html: str, task) -> str | None:
    m = re.search(rf'qmagic-task-{task.uid[:8]}" data-task="{task.uid[:8]}" data-status="(\w+)"', html)
    return m.group(1) if m else None


def row_progress(html: str, task) -> str:
    start = html.index(f'data-task="{task.uid[:8]}"')
    end = html.find('class="qmagic-task-row', start)
    chunk = html[start:end if end > 0 else None]
    m = re.search(r'class="qmagic-progress-text"[^>]*>(.*?)</span></span>', chunk)
    return re.sub(r"<[^>]+>", "", m.group(1)) if m else ""


# -- statuses, progress, cancel buttons ---------------------------------------------------------
def test_rows_show_status_badge_progress_and_cancel_only_for_active_tasks(probe, worker):
    w = worker
    w.max_background_tasks = 2
    done = w.submit("job", (5,))
    failed = w.submit("fail")
    assert done.wait(5) and failed.wait(5)
    running = w.submit("wait_gate", ("a",))
    started(w, "a")
    other = w.submit("wait_gate", ("b",))
    started(w, "b")
    queued = w.submit("job", (2,))
    cancelled = w.submit("job", (2,))
    assert w.task_cancel(cancelled.uid)["success"]

    panel = widgets.TaskPanel(w, show="all")
    assert panel.flush()
    html = panel.row_html()
    assert row_status(html, done) == "completed"
    assert row_status(html, failed) == "failed"
    assert row_status(html, running) == "running"
    assert row_status(html, queued) == "queued"
    assert row_status(html, cancelled) == "cancelled"
    assert row_progress(html, done) == "5/5 · step 5"  # value/total and the last message
    assert "3/10" in row_progress(html, running) and "point 3" in row_progress(html, running)
    assert 'width:30.0%' in html[html.index(f'data-task="{running.uid[:8]}"'):][:2500]
    # newest first
    keys = re.findall(r'data-task="(\w+)" data-status', html)
    assert keys == [t.uid[:8] for t in (cancelled, queued, other, running, failed, done)]
    # Cancel only for queued and running rows; a spacer keeps finished rows aligned
    for task in (running, other, queued):
        button = panel.cancel_button(task)
        assert button is not None and button.description == "Cancel"
        assert f"qmagic-task-{task.uid[:8]}" in button._dom_classes
    for task in (done, failed, cancelled):
        assert panel.cancel_button(task) is None
    grid = panel._table.segments[0].grid
    assert len(grid.children) == 2 * 6
    assert "qmagic-status-" in html and "qmagic-badge" in html
    assert "2 running · 1 queued · 1 completed · 1 failed · 1 cancelled" in panel.row_html()

    w.test_gates["a"].set()
    w.test_gates["b"].set()
    assert running.wait(5) and other.wait(5) and queued.wait(5)
    assert panel.flush()
    html = panel.row_html()
    assert [row_status(html, t) for t in (running, other, queued)] == ["completed"] * 3
    assert "4 completed · 1 failed · 1 cancelled" in html  # the counts follow at once
    assert all(panel.cancel_button(t) is None for t in (running, other, queued))


def test_text_plain_is_deterministic_and_matches_qmagic_text(probe, worker):
    w = worker
    t1 = w.submit("job", (3,))
    t2 = w.submit("fail")
    assert t1.wait(5) and t2.wait(5)
    panel = widgets.TaskPanel(w, show="all")
    bundle = panel._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert bundle["text/plain"] == qtext.task_table([t2, t1], 0)
    assert not UID_RE.search(bundle["text/plain"]) and not CLOCK_RE.search(bundle["text/plain"])
    running_panel = widgets.TaskPanel(w)  # running only: finished ones are counted as hidden
    assert running_panel.text() == qtext.task_table([], 2)
    row = widgets.TaskRow(w, t1)
    assert row._repr_mimebundle_()["text/plain"] == qtext.task_line(t1) == repr(row)
    lock = widgets.LockPanel(w)
    assert lock._repr_mimebundle_()["text/plain"] == qtext.lock_text(w.lock_info()) == "Not locked."
    # the same text twice (no clock, no uid)
    assert panel.text() == panel.text()


# -- cancel ---------------------------------------------------------------------------------------
def test_cancel_button_cancels_and_errors_are_shown(probe, worker):
    w = worker
    task = w.submit("wait_gate", ("c",))
    started(w, "c")
    panel = widgets.TaskPanel(w)
    button = panel.cancel_button(task)
    button.click()
    assert task.wait(5) and task.status.value == "cancelled"
    assert panel.message.startswith("Cancel requested: wait_gate('c')")
    assert panel.flush()
    assert row_status(panel.row_html(), task) == "cancelled"
    assert panel.cancel_button(task) is None
    assert "Cancel requested" in panel._message.value and panel._message.layout.display == ""
    # a stale button (clicked before the panel hid it) says why nothing happened
    button.click()
    assert "has already finished (cancelled); there is nothing to cancel" in panel.message
    assert panel.flush()
    assert "qmagic-message-error" in panel._message.value


def test_cancel_refused_by_lock_is_shown_in_the_panel(probe, worker, tmp_path):
    w = worker
    task = w.submit("wait_gate", ("d",))
    started(w, "d")
    other_kernel = qmagic.Worker({})  # same state dir: shares the lock
    try:
        assert other_kernel.lock("another-key", environment=True, note="alignment")["success"]
        row = widgets.TaskRow(w, task)
        row.cancel_button(task).click()
        assert "Invalid lock key" in row.message and "alignment" in row.message
        assert not task.done()
        assert row.flush()
        assert "qmagic-message-error" in row._message.value and row._message in row.children
    finally:
        other_kernel.unlock("another-key")
        other_kernel.close()


def test_second_click_forces_a_task_that_ignores_cancel(probe, worker):
    w = worker
    task = w.submit("stubborn", ("s",))
    started(w, "s")
    row = widgets.TaskRow(w, task)
    row.cancel_button(task).click()
    assert row.flush()
    assert 'data-status="running"' in row.row_html() and ">cancelling<" in row.row_html()
    button = row.cancel_button(task)
    assert button.description == "Force stop"
    button.click()
    assert task.wait(5), "forced cancel did not stop the task"
    assert task.status.value == "cancelled"
    assert row.flush()
    assert row_status(row.row_html(), task) == "cancelled"


# -- coalescing and the final state ---------------------------------------------------------------
def test_storm_is_coalesced_and_every_row_ends_exact(probe, worker):
    w = worker
    w.max_background_tasks = 40
    panel = widgets.TaskPanel(w, show="all")
    assert panel.flush()
    start = time.time()
    n, updates = 20, 3000
    tasks = [w.submit("burst", (updates,)) for _ in range(n)]
    for task in tasks:
        assert task.wait(30)
    end = time.time()
    # the final state reaches the panel by itself, without flush()
    wait_until(lambda: all(row_status(panel.row_html(), t) == "completed" for t in tasks),
               timeout=2.0, what="every row completed")
    html = panel.row_html()
    assert all(row_progress(html, t) == f"{updates}/{updates}" for t in tasks)
    sent = probe.updates(start)
    events = n * updates
    duration = max(end - start, 0.5)
    hz = w.panel_update_hz
    # about one update message per tick, never one per event
    assert len(sent) <= hz * (duration + 1.0) + 6, (len(sent), duration)
    assert len(sent) < events / 100
    # no one-second window above twice the rate (urgent final flushes may borrow)
    times = sorted(m[0] for m in sent)
    worst = max(sum(1 for t in times if s <= t < s + 1.0) for s in times) if times else 0
    assert worst <= 2 * hz, worst


def test_final_state_is_shown_within_a_tick(probe, worker):
    w = worker
    panel = widgets.TaskPanel(w)
    assert panel.flush()
    task = w.submit("burst", (20_000,))
    assert task.wait(30)
    key = task.uid[:8]
    wait_until(lambda: row_status(panel.row_html(), task) == "completed", timeout=2.0)
    shown = [m[0] for m in probe.updates()
             if f'data-task="{key}" data-status="completed"' in str((m[3] or {}).get("state", {}))]
    assert shown, "no update message carried the final state"
    delay = shown[0] - task.finished_at
    assert delay < 0.3, f"final state shown {delay * 1000:.0f} ms after the task ended"
    assert row_progress(panel.row_html(), task) == "20000/20000"


def test_elapsed_time_advances_while_running(probe, worker):
    w = worker
    task = w.submit("wait_gate", ("e",))
    started(w, "e")
    row = widgets.TaskRow(w, task)
    first = re.search(r'qmagic-elapsed"[^>]*>([^<]*)<', row.row_html()).group(1)
    wait_until(lambda: re.search(r'qmagic-elapsed"[^>]*>([^<]*)<', row.row_html()).group(1) != first,
               timeout=3.5, what="the elapsed time to advance")


# -- bounds, filters, details ---------------------------------------------------------------------
def test_ten_thousand_finished_tasks_show_the_newest_200_and_count_the_rest(probe, worker):
    w = worker
    tasks = [w.submit("job", (1,)) for _ in range(10_000)]
    for task in tasks:
        assert task.wait(30)
    opened_before = len(probe.of("comm_open"))
    t0 = time.perf_counter()
    panel = widgets.TaskPanel(w, show="all")
    build = time.perf_counter() - t0
    assert panel.flush()
    html = panel.row_html()
    keys = re.findall(r'data-task="(\w+)" data-status', html)
    assert keys == [t.uid[:8] for t in reversed(tasks[-200:])]
    assert panel.hidden == 9800
    assert "9800 older tasks not shown: this panel shows the newest 200" in panel._footer.value
    assert panel.text().splitlines()[-1] == "(9800 more tasks not shown; use --all)"
    assert len(panel.text().splitlines()) == 1 + 200 + 1
    # widgets stay bounded: one Details toggle per shown row, no Cancel for finished rows
    opened = len(probe.of("comm_open")) - opened_before
    assert opened < 260, opened
    assert build < 2.0, build
    small = widgets.TaskPanel(w, show="all", max_rows=5)
    assert len(re.findall(r'data-status=', small.row_html())) == 5 and small.hidden == 9995
    w.panel_max_rows = 50
    assert panel.flush(), "flush"
    wait_until(lambda: len(re.findall(r'data-status=', panel.row_html())) == 50, 3.0, "50 rows")


def test_running_filter_keeps_finished_tasks_in_the_worker(probe, worker):
    w = worker
    done = w.submit("job", (1,))
    assert done.wait(5)
    active = w.submit("wait_gate", ("f",))
    started(w, "f")
    panel = widgets.TaskPanel(w, show="running", keep_finished_s=0.0)
    html = panel.row_html()
    assert row_status(html, active) == "running" and row_status(html, done) is None
    assert "1 finished task not shown: choose “All” to see them." in panel._footer.value
    panel.show = "all"
    assert panel.flush()
    assert row_status(panel.row_html(), done) == "completed"
    panel._filter.value = "running"  # what a click on "Running" does
    assert panel.flush()
    assert row_status(panel.row_html(), done) is None
    lingering = widgets.TaskPanel(w, show="running")  # recently finished tasks stay a while
    assert row_status(lingering.row_html(), done) == "completed"
    with pytest.raises(ValueError):
        widgets.TaskPanel(w, show="finished")


def test_details_show_output_log_result_and_traceback(probe, worker):
    w = worker
    ok = w.submit("chatty")
    bad = w.submit("fail")
    assert ok.wait(5) and bad.wait(5)
    panel = widgets.TaskPanel(w, show="all")
    panel.details_toggle(ok).value = True  # as a click on Details does
    panel.details_toggle(bad).value = True
    assert panel.flush()
    details = panel.details_html()
    assert "moving to position 3" in details
    assert "motor is warm" in details
    assert "{&#x27;x&#x27;: 3}" in details
    assert "ValueError: the sample holder is empty" in details and "Traceback" in details
    # rows are split around expanded rows; the details box sits right after its row
    body = panel._body.children
    assert len(panel._table.segments) == 2 and len(body) == 4
    assert body[1] is panel._table.rows[bad.uid].details
    panel.details_toggle(bad).value = False
    panel.details_toggle(ok).value = False
    assert panel.flush()
    assert panel.details_html() == "" and len(panel._body.children) == 1


# -- lock panel -----------------------------------------------------------------------------------
def test_lock_panel_locks_unlocks_and_shows_errors(probe, worker):
    w = worker
    panel = widgets.LockPanel(w)
    assert "qmagic-lock-unlocked" in panel._state.value
    panel._key.value = "k-123"
    panel._note.value = "changing samples"
    panel._queue.value = True
    panel._lock_button.click()
    assert panel.message == "Locked: environment and queue."
    info = w.lock_info()["lock_info"]
    assert info["environment"] and info["queue"] and info["note"] == "changing samples"
    assert panel.flush()
    state = panel._state.value
    assert "Environment: locked" in state and "Queue: locked" in state
    assert "changing samples" in state and "qmagic user" in state
    assert "Emergency unlock key: not set" in state and "this kernel holds the key" in state
    assert panel._key.value == "", "the key field is cleared after use"
    # a wrong key is refused, visibly
    panel._key.value = "wrong"
    panel._unlock_button.click()
    assert panel.message.startswith("Error: Invalid lock key")
    assert w.lock_info()["lock_info"]["environment"]
    assert panel.flush() and "qmagic-message-error" in panel._message.value
    # nothing selected
    panel._environment.value = False
    panel._queue.value = False
    panel._lock_button.click()
    assert panel.message == "Select what to lock: environment, queue or both."
    # the right key unlocks
    panel._key.value = "k-123"
    panel._unlock_button.click()
    assert panel.message == "Unlocked." and not w.lock_info()["lock_info"]["environment"]
    assert panel.flush() and "qmagic-lock-unlocked" in panel._state.value


def test_lock_panel_follows_other_kernels_and_emergency_key(probe, worker):
    w = worker
    w.emergency_lock_key = "EMERGENCY"
    panel = widgets.LockPanel(w)
    assert "Emergency unlock key: set" in panel._state.value
    other = qmagic.Worker({}, emergency_lock_key="EMERGENCY")
    try:
        assert other.lock("their-key", environment=True, user="Alice", note="beam time")["success"]
        wait_until(lambda: "Alice" in panel._state.value, timeout=3.0, what="the panel to see Alice's lock")
        assert "this kernel does not hold the key" in panel._state.value
        panel._unlock_button.click()  # no key typed, none remembered
        assert "Type the lock key" in panel.message
        panel._key.value = "EMERGENCY"
        panel._unlock_button.click()
        assert panel.message == "Unlocked."
        assert panel.text() == "Not locked.\n(An emergency unlock key is set.)"
    finally:
        other.close()


# -- a single row; close; detach -------------------------------------------------------------------
def test_task_row_follows_one_task(probe, worker):
    w = worker
    task = w.submit("job", (40, 0.005))
    row = widgets.TaskRow(w, task)
    assert task.wait(10)
    wait_until(lambda: row_status(row.row_html(), task) == "completed", 2.0, "the row to complete")
    assert row_progress(row.row_html(), task) == "40/40 · step 40"
    # the Cancel button leaves with the next spare message (the table HTML goes first)
    wait_until(lambda: row.cancel_button(task) is None, 2.0, "the Cancel button to go")
    assert row._table.segments[0].grid.children == (row._table._spacer, row.details_toggle(task))
    assert row._qm_period() is None  # finished: no more periodic work
    assert "qmagic-task-single" in row._dom_classes


def test_detach_closes_every_comm_and_stops_the_thread(probe, worker):
    w = worker
    task = w.submit("wait_gate", ("g",))
    started(w, "g")
    widgets.attach(None, w)
    panels = [widgets.TaskPanel(w), widgets.TaskRow(w, task), widgets.LockPanel(w)]
    panels[0].details_toggle(task).value = True
    assert all(p.flush() for p in panels)
    assert any(t.name == "qmagic-panels" for t in threading.enumerate())
    widgets.detach(None, w)
    assert all(p.closed for p in panels)
    opened = {m[2] for m in probe.of("comm_open")}
    closed = {m[2] for m in probe.of("comm_close")}
    assert opened and opened <= closed, f"{len(opened - closed)} comms left open"
    assert not any(t.name in ("qmagic-panels",) for t in threading.enumerate())
    assert pump_module.current_pump() is None
    assert not w.engine.bus._global, "the pump's subscription was not ended"
    assert panels[0].flush(timeout=0.5) is False  # closed panels do not pretend to update
    # a new panel after detach works again (the pump restarts)
    again = widgets.TaskPanel(w)
    assert again.flush()


def test_widgets_available_needs_a_kernel(ip):
    assert widgets.widgets_available(None) is False
    assert widgets.widgets_available(ip) is False  # a terminal shell has no widget frontend
    assert widgets.subshell_cancel_available(ip) is False


# -- a real kernel ----------------------------------------------------------------------------------
SETUP = """
import time, threading
import qmagic
from qmagic import widgets
w = qmagic.Worker({})
def long_measurement(n):
    for i in range(n):
        qmagic.report_progress(i + 1, n, "point")
        qmagic.cancellable_sleep(0.05)
    return n
w.namespace["long_measurement"] = long_measurement
"""


def _click(kernel, model_id: str) -> None:
    content = {"comm_id": model_id, "data": {"method": "custom", "content": {"event": "click"}}}
    kernel.kc.shell_channel.send(kernel.kc.session.msg("comm_msg", content))


def test_cancel_click_is_handled_while_a_cell_blocks_the_main_thread(kernel_factory):
    k = kernel_factory()
    k.execute(SETUP, check=True)
    r = k.execute(
        "t = w.submit('long_measurement', (2000,))\n"
        "row = widgets.TaskRow(w, t)\n"
        "print(row.cancel_button(t).model_id, widgets.subshell_cancel_available())",
        check=True,
    )
    model_id, available = r.stdout.split()
    assert available == "True", "ipykernel 7.4 here: subshell routing must be available"
    blocking = k.execute_async("ok = t.wait(20); print('waited', t.status)")
    _click(k, model_id)
    result = k.wait(blocking, timeout=15).check()
    assert result.stdout.strip() == "waited cancelled"
    assert k.eval("row.message") == "Cancel requested: long_measurement(2000)"
    names = k.eval("[t.name for t in threading.enumerate()]")
    assert any(n.startswith("subshell-") for n in names) and "qmagic-panels" in names
    k.execute("widgets.detach(get_ipython(), w)", check=True)
    names = k.eval("[t.name for t in threading.enumerate()]")
    assert not any(n.startswith("subshell-") or n == "qmagic-panels" for n in names), names


def test_without_subshell_routing_a_click_waits_for_the_cell(kernel_factory):
    """The fallback: clicks queue behind the running cell (■ is the way out)."""
    k = kernel_factory()
    k.execute(SETUP, check=True)
    r = k.execute(
        "w.panel_cancel_subshell = False\n"
        "t = w.submit('long_measurement', (2000,))\n"
        "row = widgets.TaskRow(w, t)\n"
        "print(row.cancel_button(t).model_id)",
        check=True,
    )
    model_id = r.stdout.strip()
    blocking = k.execute_async("ok = t.wait(2.0); print('waited', t.status)")
    _click(k, model_id)
    result = k.wait(blocking, timeout=15).check()
    assert result.stdout.strip() == "waited running"  # the click could not run meanwhile
    assert k.eval("(t.wait(5), t.status.value)") == (True, "cancelled")  # ...it ran right after


def test_task_displays_as_a_live_row_after_attach(kernel_factory):
    k = kernel_factory()
    k.execute(SETUP, check=True)
    k.execute("widgets.attach(get_ipython(), w)", check=True)
    r = k.execute("t = w.submit('long_measurement', (2,)); t.wait(5); t", check=True)
    data = r.displayed[-1]
    assert "application/vnd.jupyter.widget-view+json" in data
    assert data["text/plain"] == k.eval("__import__('qmagic.text').text.task_line(t)")
    k.execute("widgets.detach(get_ipython(), w)", check=True)
    r = k.execute("t", check=True)
    assert "application/vnd.jupyter.widget-view+json" not in r.displayed[-1]
    assert r.result == k.eval("repr(t)")


# -- with the extension ------------------------------------------------------------------------------
LONG = """
def long_measurement(n=2000):
    for i in range(n):
        qmagic.report_progress(i + 1, n, "point")
        qmagic.cancellable_sleep(0.05)
    return n
"""


def _comm_opens(kernel, css_class: str) -> list[str]:
    """Model ids of widgets opened with ``css_class`` seen on IOPub so far (any parent)."""
    kernel.messages("")  # drain IOPub into the kernel session's files
    ids = []
    for msgs in kernel._iopub.values():  # noqa: SLF001 - the harness keeps IOPub by parent
        for m in msgs:
            if m["msg_type"] == "comm_open":
                state = (m["content"].get("data") or {}).get("state") or {}
                if css_class in state.get("_dom_classes", ()):
                    ids.append(m["content"]["comm_id"])
    return ids


def test_panel_cancels_a_foreground_magic_task_and_unload_closes_everything(kernel_factory):
    k = kernel_factory(argv=["--ext=qmagic"])
    k.execute("import qmagic, threading\n" + LONG, check=True)
    r = k.execute("%tasks", check=True)
    assert any("application/vnd.jupyter.widget-view+json" in d for d in r.displayed), r.displayed
    k.execute("%lock_info", check=True)
    # a foreground task holds the main thread; the panel's Cancel still works
    blocking = k.execute_async("t = %function_execute long_measurement\nprint('ended', t.status)")
    deadline = time.monotonic() + 15
    while not (ids := _comm_opens(k, "qmagic-cancel")) and time.monotonic() < deadline:
        k._pump(0.2)  # noqa: SLF001 - wait for the panel to draw the new row's button
    assert ids, "the panel never showed a Cancel button for the foreground task"
    _click(k, ids[-1])
    result = k.wait(blocking, timeout=20)
    assert result.check().stdout.strip() == "ended cancelled"  # long before its 100 s
    assert k.eval("qmagic.get_worker().last_task.status.value") == "cancelled"
    names = k.eval("[t.name for t in threading.enumerate()]")
    assert "qmagic-panels" in names and any(n.startswith("subshell-") for n in names)
    # unloading closes every panel comm and leaves no panel thread or subshell behind
    k.execute("%unload_ext qmagic", check=True)
    names = k.eval("[t.name for t in threading.enumerate()]")
    assert not any(n == "qmagic-panels" or n.startswith("subshell-") for n in names), names
    left = k.eval("[c.comm_id for c in get_ipython().kernel.comm_manager.comms.values()]")
    assert left == [], f"{len(left)} widget comms still open after unload"
