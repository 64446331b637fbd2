"""Panels without a frontend: widget state, coalescing, final state, bounds, text/plain.

Widgets are real ipywidgets; their comms are replaced by a recording comm (the ``probe``),
a measurement probe that counts what a panel would send to a browser.  The last tests start
real kernels to check what only a kernel shows: Cancel while a cell blocks the main thread
(subshell routing), the Task display formatter, a foreground task's live row in its own cell
(and Cancel there ending the cell like ■), and ``%unload_ext`` leaving nothing behind.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
from html.parser import HTMLParser
from typing import Any, Callable

import pytest

import qmagic
from qmagic import format as fmt
from qmagic import panels
from qmagic import probe as probe_module
from qmagic.panels import pump as pump_module
from qmagic.worker_state import MSG_WORKER_CLOSED

from polling import eventually

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
    panels.detach(None, w)
    w.close()
    pump_module.shutdown()


def started(w, name: str, timeout: float = 5.0) -> None:
    assert w.test_started.setdefault(name, threading.Event()).wait(timeout), f"{name} did not start"


def _row(html: str, task) -> str:
    start = html.rindex('<div class="qm-row', 0, html.index(f'data-task="{task.uid[:8]}" data-status'))
    end = html.find('<div class="qm-row', start + 1)
    return html[start:end if end > 0 else None]


def row_status(html: str, task) -> str | None:
    m = re.search(rf'data-task="{task.uid[:8]}" data-status="(\w+)"', html)
    return m.group(1) if m else None


class _Text(HTMLParser):
    """Text of the first element carrying CSS class ``cls`` (nested tags included)."""

    def __init__(self, cls: str) -> None:
        super().__init__()
        self.cls, self.depth, self.parts, self.done = cls, 0, [], False

    def handle_starttag(self, tag, attrs):
        if self.depth:
            self.depth += 1
        elif not self.done and self.cls in (dict(attrs).get("class") or "").split():
            self.depth = 1

    def handle_endtag(self, tag):
        if self.depth:
            self.depth -= 1
            self.done = self.done or self.depth == 0

    def handle_data(self, data):
        if self.depth:
            self.parts.append(data)


def row_field(html: str, task, cls: str) -> str:
    """Text of the element of class ``cls`` in ``task``'s row."""
    parser = _Text(cls)
    parser.feed(_row(html, task))
    return "".join(parser.parts)


def row_progress(html: str, task) -> str:
    return row_field(html, task, "qm-pt")


# -- statuses, progress, cancel buttons ---------------------------------------------------------
def test_a_row_says_when_more_lines_of_its_error_follow(probe, worker):
    """A failed task's row (the live one and the static copy a cell keeps) shows the first
    line of its error, ending ' ...' when more lines follow, as every text view of the task
    does (format.error_note): it read as the whole message, and the saved notebook kept it so."""
    from qmagic.panels.cell_rows import static_row

    def saturated():
        raise RuntimeError("detector saturated at\n channel 7 (raw 65535)")

    worker.namespace["saturated"] = saturated
    task = worker.submit("saturated")
    assert task.wait(5) and task.status.value == "failed"
    panel = panels.TaskPanel(worker, show="all")
    assert panel.flush()
    expected = "RuntimeError: detector saturated at ..."
    assert row_field(panel.row_html(), task, "qm-end") == expected
    assert row_field(static_row(task)["text/html"], task, "qm-end") == expected
    assert static_row(task)["text/plain"].endswith(f"error: {expected}")


def test_rows_show_status_mode_progress_and_cancel_only_for_active_tasks(probe, worker):
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
    w.cancel(cancelled)

    panel = panels.TaskPanel(w, show="all")
    assert panel.flush()
    html = panel.row_html()
    assert row_status(html, done) == "completed"
    assert row_status(html, failed) == "failed"
    assert row_status(html, running) == "running"
    assert row_status(html, queued) == "queued"
    assert row_status(html, cancelled) == "cancelled"
    assert row_progress(html, done) == "5/5 · step 5"  # value/total and the last message
    assert row_progress(html, running) == "3/10 · point 3"
    assert 'width:30.0%' in _row(html, running)
    # why a task ended, in its row
    assert row_field(html, failed, "qm-end") == "ValueError: the sample holder is empty"
    assert row_field(html, cancelled, "qm-end") == "cancelled from Python"
    assert all('data-mode="background"' in _row(html, t) for t in (done, running, queued))
    assert row_field(html, done, "qm-mode") == "background"
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
    assert "2 running · 1 queued · 1 completed · 1 failed · 1 cancelled" in panel.row_html()

    w.test_gates["a"].set()
    w.test_gates["b"].set()
    assert running.wait(5) and other.wait(5) and queued.wait(5)
    assert panel.flush()
    html = panel.row_html()
    assert [row_status(html, t) for t in (running, other, queued)] == ["completed"] * 3
    assert "4 completed · 1 failed · 1 cancelled" in html  # the counts follow at once
    assert all(panel.cancel_button(t) is None for t in (running, other, queued))


def test_buttons_are_drawn_over_their_rows(probe, worker):
    """The controls column shares the rows' grid cell (inside the row borders), one line per
    row of the rows' height, and the rows keep their right end free for it."""
    w = worker
    task = w.submit("wait_gate", ("l",))
    started(w, "l")
    panel = panels.TaskPanel(w)
    segment = panel._table.segments[0]
    html_widget, controls = segment.box.children
    assert html_widget is segment.html and controls is segment.grid
    assert html_widget.layout.grid_area == controls.layout.grid_area
    assert controls.layout.grid_auto_rows == f"{panels.styles.ROW_HEIGHT_PX}px"
    assert controls.layout.padding.startswith(f"{panels.styles.HEADER_PX}px")
    width = panels.styles.CONTROLS_WIDTH_PX + 2 * panels.styles.CONTROLS_MARGIN_PX
    row_rule = f".qmagic-panel .qm-row{{box-sizing:border-box;height:{panels.styles.ROW_HEIGHT_PX}px;padding:3px {width}px 3px 8px;"
    assert 'class="qm-row"' in _row(panel.row_html(), task) and row_rule in panel._style.value


def test_scripts_show_their_name_and_foreground_rows_say_so(probe, worker):
    w = worker
    script = w.run_script("calibrated = True", name="calibration.py", background=True)
    assert script.wait(5) and script.status.value == "completed"
    fg = w.submit("job", (2,), background=False)  # handed to the worker's foreground thread
    assert fg.wait(5)
    panel = panels.TaskPanel(w, show="all")
    html = panel.row_html()
    assert row_field(html, script, "qm-call") == "calibration.py (script)"
    assert row_field(html, fg, "qm-mode") == "foreground" and 'data-mode="foreground"' in _row(html, fg)
    panel.details_toggle(script).value = True
    assert panel.flush()
    assert "calibrated" in panel.details_html()  # the names the script added


def test_text_plain_is_deterministic_and_comes_from_qmagic_format(probe, worker):
    w = worker
    t1 = w.submit("job", (3,))
    t2 = w.submit("fail")
    assert t1.wait(5) and t2.wait(5)
    panel = panels.TaskPanel(w, show="all")
    bundle = panel._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert bundle["text/plain"] == fmt.task_table([t2, t1], 0)
    assert not UID_RE.search(bundle["text/plain"]) and not CLOCK_RE.search(bundle["text/plain"])
    running_panel = panels.TaskPanel(w)  # running only: finished ones are counted as hidden
    assert running_panel.text() == fmt.tasks_text(w.tasks(), running=True, limit=200) == (
        "No queued or running tasks.\n(2 finished tasks not shown; use --all)")
    row = panels.TaskRow(w, t1)
    assert row._repr_mimebundle_()["text/plain"] == fmt.task_line(t1) == repr(row)
    lock = panels.LockPanel(w)
    assert lock._repr_mimebundle_()["text/plain"] == fmt.lock_text(w.lock_state().to_lock_info()) == "Not locked."
    assert panel.text() == panel.text()  # the same text twice (no clock, no uid)


def test_elapsed_reads_the_same_running_and_finished(probe, worker):
    w = worker
    task = w.submit("wait_gate", ("e",))
    started(w, "e")
    row = panels.TaskRow(w, task)
    first = row_field(row.row_html(), task, "qm-el")
    assert re.fullmatch(r"\d\.\d s", first), first
    eventually(lambda: row_field(row.row_html(), task, "qm-el") != first,
               timeout=3.5, what="the elapsed time to advance")
    w.test_gates["e"].set()
    assert task.wait(5) and row.flush()
    shown = row_field(row.row_html(), task, "qm-el")
    assert shown == fmt.format_elapsed(task.elapsed) and re.fullmatch(r"\d\.\d s", shown)


# -- cancel ---------------------------------------------------------------------------------------
def test_cancel_button_cancels_through_the_worker_and_refusals_are_shown(probe, worker):
    w = worker
    task = w.submit("wait_gate", ("c",))
    started(w, "c")
    panel = panels.TaskPanel(w)
    button = panel.cancel_button(task)
    button.click()
    assert task.wait(5) and task.status.value == "cancelled"
    assert task.cancel_reason == "Task was cancelled from the panel (Cancel button)"
    assert panel.message == "Cancel requested: wait_gate('c')"
    assert panel.flush()
    assert row_status(panel.row_html(), task) == "cancelled"
    assert row_field(panel.row_html(), task, "qm-end") == "cancelled from the panel (Cancel button)"
    assert panel.cancel_button(task) is None
    assert "Cancel requested" in panel._message.value and panel._message.layout.display == ""
    # a stale button (clicked twice, or before the panel hid it): the worker's one rule,
    # shown calmly (nothing went wrong: a red line read as if the cancel had failed)
    button.click()
    assert panel.message == "wait_gate('c') has already finished (cancelled); there is nothing to cancel."
    assert panel.flush()
    assert "qmagic-message-info" in panel._message.value


def test_cancel_refused_by_lock_is_shown_in_the_panel(probe, worker):
    w = worker
    task = w.submit("wait_gate", ("d",))
    started(w, "d")
    other_kernel = qmagic.Worker({})  # same state dir: shares the lock
    try:
        other_kernel.lock("another-key", environment=True, note="alignment")
        assert w.lock_state().environment  # this worker has seen the lock (read from the file)
        row = panels.TaskRow(w, task)
        row.cancel_button(task).click()
        # one line that says what to do (not queueserver's multi-line text)
        assert row.message.startswith("The environment is locked by ") and "\n" not in row.message
        assert "note: alignment" in row.message
        assert f"give the key with %task_cancel {task.uid[:8]} --lock-key KEY" in row.message
        assert not task.done()
        assert row.flush()
        assert "qmagic-message-error" in row._message.value and row._message in row.children
    finally:
        other_kernel.unlock("another-key")
        other_kernel.close()


def test_cancel_becomes_force_stop_for_a_task_that_ignores_it(probe, worker):
    w = worker
    task = w.submit("stubborn", ("s",))
    started(w, "s")
    row = panels.TaskRow(w, task)
    row.cancel_button(task).click()
    assert row.flush()
    html = row.row_html()
    assert 'data-status="running"' in html and row_field(html, task, "qm-b") == "cancelling"
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
    panel = panels.TaskPanel(w, show="all")
    assert panel.flush()
    start = time.time()
    n, updates = 20, 3000
    tasks = [w.submit("burst", (updates,)) for _ in range(n)]
    for task in tasks:
        assert task.wait(30)
    end = time.time()
    # the final state reaches the panel by itself, without flush()
    eventually(lambda: all(row_status(panel.row_html(), t) == "completed" for t in tasks),
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


def test_running_rows_change_together_in_one_message_a_tick(probe, worker):
    """A storm of a hundred running tasks sent five segment messages a tick (twenty rows
    each), so a panel's ticks came every half second and the final states of the last rows
    later still; over a storm the panel sent 12.3 messages a second against its 10
    (benchmarks/panels.py).  The rows of queued and running tasks share one segment (they
    change together), and a task that ends keeps its place: its final state is that same
    message."""
    w = worker
    w.max_background_tasks = 64
    done = [w.submit("job", (1,)) for _ in range(25)]
    assert all(task.wait(10) for task in done)

    def spin(name: str) -> str:
        i = 0
        while not w.test_gates.setdefault(name, threading.Event()).is_set():
            i += 1
            qmagic.report_progress(i, None, "spinning")
            qmagic.cancellable_sleep(0.001)
        return name

    w.namespace["spin"] = spin
    tasks = [w.submit("spin", ("storm",)) for _ in range(60)]
    eventually(lambda: all(t.progress is not None for t in tasks), 10, "every task to report")
    panel = panels.TaskPanel(w, show="all")
    assert panel.flush()
    table = panel._table
    assert [len(s.uids) for s in table.segments] == [60, 20, 5]  # (the running ones, newest, first)
    sends: list[int] = []
    apply = panel._qm_apply

    def counted(*args):  # (messages a tick: their cost counts their size too)
        before = len(probe.updates())
        sent = apply(*args)
        sends.append(len(probe.updates()) - before)
        return sent

    panel._qm_apply = counted
    before = {s.html.comm.comm_id: s.html.value for s in table.segments}
    eventually(lambda: len([n for n in sends if n]) >= 3, 10, "three ticks of the storm")
    w.test_gates["storm"].set()
    assert all(task.wait(10) for task in tasks)
    eventually(lambda: all(row_status(panel.row_html(), t) == "completed" for t in tasks), 5,
               "the final states")
    assert max(sends) == 1, sends  # one message a tick: the running rows' segment
    sent = {m[2] for m in probe.updates() if "value" in ((m[3] or {}).get("state") or {})}
    assert sent == {table.segments[0].html.comm.comm_id}, "finished rows were sent again"
    assert [s.html.value for s in table.segments[1:]] == list(before.values())[1:]


def test_a_large_message_costs_more_updates_and_a_final_state_still_goes_at_the_next_tick(probe, worker):
    """Rows of running tasks share one segment, sent as one message a tick: a hundred rows
    are ~55 kB, ten times a second 550 kB/s (the Jupyter server stops a kernel's output past
    1 MB/s).  A message costs one update more per MESSAGE_CHARS of text, so a panel's data
    is bounded too; a final state still goes at the next tick (it borrows, a second's worth
    of debt at most)."""
    import ipywidgets as W

    from qmagic.panels.base import MESSAGE_CHARS, set_traits

    html = W.HTML()
    assert set_traits(html, value="x" * 10) == 1 and set_traits(html, value="x" * 10) == 0
    assert set_traits(html, value="y" * (3 * MESSAGE_CHARS + 5)) == 4
    panel = panels.TaskPanel(worker, show="all")
    assert panel.flush()
    hz = panel._qm_hz()
    pump = panel._qm_pump
    panel._qm_apply = lambda *args: 1000  # (a huge message)
    panel._qm_touch("x")
    pump.apply_view(panel, time.monotonic())
    assert panel._qm_tokens == -hz  # (a second's debt at most)
    now = time.monotonic()
    panel._qm_touch("x")
    assert panel._qm_due(now) >= now + 1.0  # (progress waits for the bucket)
    panel._qm_touch("x", final=True)
    assert panel._qm_due(now) <= panel._qm_last_apply + 1.0 / hz + 1e-6  # (a final state: the next tick)
    panel.close()


def test_running_and_finished_rows_mixed_stay_twenty_to_a_segment(probe, worker):
    """Only running rows next to each other share a segment past SEGMENT_ROWS: running and
    finished rows taking turns make segments of twenty, not one per row."""
    from qmagic.panels.task_table import SEGMENT_ROWS

    w = worker
    w.max_background_tasks = 64
    names = [f"mix{i}" for i in range(30)]
    try:
        for name in names:
            assert w.submit("job", (1,)).wait(10)
            w.submit("wait_gate", (name,))
            started(w, name)
        panel = panels.TaskPanel(w, show="all")
        assert [len(s.uids) for s in panel._table.segments] == [SEGMENT_ROWS] * 3
    finally:
        for name in names:
            w.test_gates.setdefault(name, threading.Event()).set()


def test_a_finished_row_is_not_looked_at_again_at_each_tick(probe, worker, monkeypatch):
    """Every tick made every row's signature again (its progress text, its elapsed time), the
    two hundred finished rows of an "All" panel too, ten times a second during a storm; a
    row drawn in its final state is left as it is."""
    from qmagic.panels import task_table

    w = worker
    done = [w.submit("job", (2,)) for _ in range(30)]
    assert all(task.wait(10) for task in done)
    w.submit("wait_gate", ("sig",))
    started(w, "sig")
    panel = panels.TaskPanel(w, show="all")
    assert panel.flush()
    looked: list[str] = []
    signature = task_table.render.row_signature

    def counted(task):
        looked.append(task.uid)
        return signature(task)

    monkeypatch.setattr(task_table.render, "row_signature", counted)
    for _ in range(3):
        assert panel.flush()
    finished = {task.uid for task in done}
    assert looked and not finished & set(looked), "finished rows were made again"
    assert all(row_progress(panel.row_html(), t) == "2/2 · step 2" for t in done)


def test_an_application_is_charged_when_its_messages_leave(probe, worker):
    """A slow application (a hundred new rows, two hundred buttons: 0.1 s) was charged at
    its start: its refill time was spent building rows, and the next tick's messages followed
    its own sooner than 1/panel_update_hz."""
    w = worker
    panel = panels.TaskPanel(w)
    pump = panel._qm_pump
    pump.unregister(panel)  # (out of the pump thread's hands: the test applies it)
    apply, ended = panel._qm_apply, []

    def slow(*args):
        threading.Event().wait(0.05)  # (the application's own slowness, not a wait on anything)
        sent = apply(*args)
        ended.append(time.monotonic())
        return sent

    panel._qm_apply = slow
    w.submit("job", (1,)).wait(5)
    panel._qm_touch(flag="members")
    pump.apply_view(panel, time.monotonic())
    assert panel._qm_last_apply >= ended[-1] and panel._qm_token_time >= ended[-1]
    panel.close()


def test_final_state_is_shown_after_a_burst(probe, worker):
    """After 20,000 progress updates, an update message carries the task's final state and
    the row ends showing all of its progress.  (How soon: benchmarks/panels.py, "task end
    -> panel shows it", p95 <= 150 ms; not a timed assertion here.)"""
    w = worker
    panel = panels.TaskPanel(w)
    assert panel.flush()
    task = w.submit("burst", (20_000,))
    assert task.wait(30)
    key = task.uid[:8]
    eventually(lambda: row_status(panel.row_html(), task) == "completed", timeout=2.0)
    shown = [m[0] for m in probe.updates()
             if f'data-task="{key}" data-status="completed"' in str((m[3] or {}).get("state", {}))]
    assert shown, "no update message carried the final state"
    assert row_progress(panel.row_html(), task) == "20000/20000"


def test_a_tick_sends_only_the_segments_whose_rows_changed(probe, worker):
    """A running scan's row among a hundred finished ones: every tick sent the whole table
    again (~250 kB, ten times a second), and on a loaded machine JupyterLab fell seconds
    behind (a Cancel seemed to do nothing).  Rows are drawn SEGMENT_ROWS to a segment; a
    tick sends only the segments whose rows changed."""
    from qmagic.panels.task_table import SEGMENT_ROWS

    w = worker
    finished = [w.submit("job", (1,)) for _ in range(5 * SEGMENT_ROWS)]
    for task in finished:
        assert task.wait(30)
    w.submit("wait_gate", ("segments",))
    started(w, "segments")
    panel = panels.TaskPanel(w, show="all")
    assert panel.flush()
    segments = panel._table.segments
    assert len(segments) == 6  # 101 rows, the running one first (the newest)
    total = sum(len(s.html.value) for s in segments)
    first = segments[0].html
    before, since = first.value, time.time()
    eventually(lambda: panel.flush() and first.value != before, 5.0,
               "the running row's elapsed time to move on")
    sent = [m for m in probe.updates(since) if "value" in ((m[3] or {}).get("state") or {})]
    others = {s.html.comm.comm_id for s in segments[1:]}
    assert sent and not [m for m in sent if m[2] in others], "finished rows were sent again"
    assert max(len(m[3]["state"]["value"]) for m in sent) * 4 < total


#: Most bytes of a finished task's row (how rows look is the panel's stylesheet, sent once;
#: the spaces between its fields, for a static row shown without it, are 5 of them).
ROW_BYTES = 610


def test_rows_are_small_and_a_tick_sends_one_small_segment(probe, worker):
    """Every row carried its styles inline: about 2.5 kB a row, so a tick re-sent about 50 kB
    for each block of rows with a running task in it.  Rows now carry class names and per-row
    data only; the stylesheet goes once, with the panel, in a widget of its own."""
    from qmagic.panels.task_table import SEGMENT_ROWS

    w = worker
    finished = [w.submit("job", (1,)) for _ in range(2 * SEGMENT_ROWS)]
    for task in finished:
        assert task.wait(30)
    since_open = time.time()
    w.submit("wait_gate", ("small",))
    started(w, "small")
    panel = panels.TaskPanel(w, show="all")
    assert panel.flush()
    html = panel.row_html()
    for task in finished:
        row = _row(html, task)
        assert row_status(html, task) == "completed" and row_progress(html, task) == "1/1 · step 1"
        assert len(row.encode()) <= ROW_BYTES, f"a finished row is {len(row.encode())} bytes: {row}"
    assert "style=" not in _row(html, finished[0]).replace('style="width:100.0%"', "")
    sheets = [m for m in probe.of("comm_open", since_open) if "<style" in str(m[3])]
    assert len(sheets) == 1 and panel._style.value.startswith("<style")

    first = panel._table.segments[0].html
    before, since = first.value, time.time()
    eventually(lambda: panel.flush() and first.value != before, 5.0,
               "the running row's elapsed time to move on")
    sent = [m for m in probe.updates(since) if "value" in ((m[3] or {}).get("state") or {})]
    assert sent and {m[2] for m in sent} == {first.comm.comm_id}, "only the running row's segment is sent"
    size = max(len(m[3]["state"]["value"].encode()) for m in sent)
    assert size <= SEGMENT_ROWS * ROW_BYTES + 400, f"a tick sent {size} bytes for one changed row"
    assert not [m for m in probe.updates(since_open) if "<style" in str(m[3])], "the stylesheet was sent again"


# -- bounds, filters, details ---------------------------------------------------------------------
def test_ten_thousand_finished_tasks_show_the_newest_200_and_count_the_rest(probe, worker):
    w = worker
    tasks = [w.submit("job", (1,)) for _ in range(10_000)]
    for task in tasks:
        assert task.wait(30)
    opened_before = len(probe.of("comm_open"))
    t0 = time.perf_counter()
    panel = panels.TaskPanel(w, show="all")
    build = time.perf_counter() - t0
    assert panel.flush()
    html = panel.row_html()
    keys = re.findall(r'data-task="(\w+)" data-status', html)
    assert keys == [t.uid[:8] for t in reversed(tasks[-200:])]
    assert panel.hidden == 9800
    assert "9800 older tasks not shown: this panel shows the newest 200" in panel._footer.value
    assert panel.text().splitlines()[-1] == ("(9800 more tasks not shown; a panel shows the newest 200: "
                                             "QMagic.panel_max_rows)")
    assert len(panel.text().splitlines()) == 1 + 200 + 1
    # widgets stay bounded: one Details toggle per shown row, no Cancel for finished rows,
    # a few widgets per segment of rows
    from qmagic.panels.task_table import SEGMENT_ROWS

    opened = len(probe.of("comm_open")) - opened_before
    assert opened < 230 + 4 * (200 // SEGMENT_ROWS), opened
    assert build < 5.0, build  # catches a quadratic build, not a slow machine
    small = panels.TaskPanel(w, show="all", max_rows=5)
    assert len(re.findall(r'data-status=', small.row_html())) == 5 and small.hidden == 9995
    w.panel_max_rows = 50
    assert panel.flush(), "flush"
    eventually(lambda: len(re.findall(r'data-status=', panel.row_html())) == 50, 3.0, "50 rows")


def test_text_of_a_panel_says_why_tasks_are_left_out(probe, worker):
    """The text form (a terminal, nbval) of a panel that shows every task but not all of them
    names the row limit, not --all (which it already is); a panel of the newest few, or of
    running tasks, points to --all."""
    w = worker
    tasks = [w.submit("job", (i,)) for i in range(5)]
    assert all(t.wait(5) for t in tasks)
    w.panel_max_rows = 3
    every = panels.TaskPanel(w, show="all")
    assert every.text().splitlines()[-1] == ("(2 more tasks not shown; a panel shows the newest 3: "
                                             "QMagic.panel_max_rows)")
    assert panels.TaskPanel(w, show="all", max_rows=2).text().splitlines()[-1] == (
        "(3 more tasks not shown; use --all)")
    # (as %tasks --running's text says it: one rule, format.tasks_text)
    assert panels.TaskPanel(w, show="running").text() == ("No queued or running tasks.\n"
                                                          "(5 finished tasks not shown; use --all)")


def test_a_panel_of_a_closed_worker_says_it_was_closed_and_what_to_do(probe, worker):
    """After ``worker.close()`` the panel keeps the tasks and says, under them, that no
    task starts and how to start a new worker (it read as an open worker's panel)."""
    done = worker.submit("job", (1,))
    assert done.wait(5)
    panel = panels.TaskPanel(worker, show="all")
    assert "closed" not in panel._footer.value
    worker.close()
    assert panel.flush()
    assert MSG_WORKER_CLOSED in panel._footer.value
    assert row_status(panel.row_html(), done) == "completed"
    assert MSG_WORKER_CLOSED in panels.TaskPanel(worker)._footer.value  # a new one too
    assert panel.text().splitlines()[-1] == MSG_WORKER_CLOSED  # (its text/plain says it too)


def test_running_filter_keeps_finished_tasks_in_the_worker(probe, worker):
    w = worker
    done = w.submit("job", (1,))
    assert done.wait(5)
    active = w.submit("wait_gate", ("f",))
    started(w, "f")
    panel = panels.TaskPanel(w, show="running", keep_finished_s=0.0)
    html = panel.row_html()
    assert row_status(html, active) == "running" and row_status(html, done) is None
    assert "1 finished task not shown: choose “All” to see them." in panel._footer.value
    panel.show = "all"
    assert panel.flush()
    assert row_status(panel.row_html(), done) == "completed"
    panel._filter.value = "running"  # what a click on "Running" does
    assert panel.flush()
    assert row_status(panel.row_html(), done) is None
    lingering = panels.TaskPanel(w, show="running")  # recently finished tasks stay a while
    assert row_status(lingering.row_html(), done) == "completed"
    with pytest.raises(ValueError):
        panels.TaskPanel(w, show="finished")


def test_details_show_output_log_result_and_traceback(probe, worker):
    w = worker
    ok = w.submit("chatty")
    bad = w.submit("fail")
    assert ok.wait(5) and bad.wait(5)
    panel = panels.TaskPanel(w, show="all")
    panel.details_toggle(ok).value = True  # as a click on Details does
    panel.details_toggle(bad).value = True
    assert panel.flush()
    details = panel.details_html()
    assert "moving to position 3" in details
    assert "motor is warm" in details
    assert "{&#x27;x&#x27;: 3}" in details
    assert "ValueError: the sample holder is empty" in details and "Traceback" in details
    assert "qmagic/" not in details and "threading.py" not in details  # the user's frames only
    # rows are split around expanded rows; the details box sits right after its row
    body = panel._body.children
    assert len(panel._table.segments) == 2 and len(body) == 4
    assert body[1] is panel._table.rows[bad.uid].details
    panel.details_toggle(bad).value = False
    panel.details_toggle(ok).value = False
    assert panel.flush()
    assert panel.details_html() == "" and len(panel._body.children) == 1


#: What a careless colleague's task may report, print, log, raise or return: markup, an escape
#: already escaped, a right-to-left override, a zero-width space, lone surrogates (a file
#: name that is not UTF-8), a terminal escape code and a newline.
HOSTILE = ("<img src=x onerror=alert(1)></style><script>x</script>&lt; \u202eRTL\u200b"
           "\ud800|\udcff\x1b[31m\nline2")
_ODD = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u200b\u202a-\u202e\ud800-\udfff]")


class _Markup(HTMLParser):
    """Every tag and attribute name of a piece of HTML, and its text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: set[str] = set()
        self.attributes: set[str] = set()
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.attributes.update(name for name, _ in attrs)

    def handle_data(self, data):
        self.text.append(data)


def test_hostile_task_texts_are_shown_escaped_once_printable_and_bounded(probe, worker):
    """A progress message, output, log, error and result full of markup and odd characters
    show as their text (escaped once: no tag of theirs, ``&lt;`` reads ``&lt;``), one
    printable line per field (a lone surrogate cannot be sent to the browser at all: the
    panel could not update again), and a 100,000-character progress message costs a row
    no more than a few hundred characters, in the panel and in ``%tasks``."""
    from jupyter_client.session import json_packer

    def hostile(fail: bool):
        qmagic.report_progress(1, 2, HOSTILE + "M" * 100_000)
        sys.stdout.write(HOSTILE.replace("\ud800", "").replace("\udcff", "") + "\n")
        logging.getLogger("lab.hostile").warning(HOSTILE)
        if fail:
            raise RuntimeError(HOSTILE)
        return HOSTILE

    w = worker
    w.namespace["hostile"] = hostile
    tasks = [w.submit("hostile", (fail,)) for fail in (True, False)]
    assert all(t.wait(5) for t in tasks)
    assert [t.status.value for t in tasks] == ["failed", "completed"]
    panel = panels.TaskPanel(w, show="all")
    for task in tasks:
        panel.details_toggle(task).value = True
    assert panel.flush()
    rows, details = panel.row_html(), panel.details_html()
    for html in (rows, details):
        markup = _Markup()
        markup.feed(html)
        assert markup.tags <= {"div", "span", "pre", "b", "br"}
        assert markup.attributes <= {"class", "title", "style", "data-task", "data-status", "data-mode"}
        text = "".join(markup.text)
        assert "<img src=x onerror=alert(1)></style><script>x</script>&lt; " in text  # escaped once
        assert not _ODD.search(text), _ODD.search(text)
    for task in tasks:
        row = _row(rows, task)
        assert len(row) < 2500, len(row)
        assert row_progress(rows, task).startswith("1/2 · <img src=x onerror=alert(1)>")
    assert row_field(rows, tasks[0], "qm-end").startswith("RuntimeError: <img src=x")
    assert panel.message == ""  # every update reached the frontend
    for _, _, _, data in probe.messages:
        json_packer(data).decode("utf-8")  # what ipykernel sends: valid UTF-8
    for task in tasks:
        line = fmt.task_line(task)
        assert len(line) < 300 and not _ODD.search(line) and "\n" not in line
    table = fmt.task_table(tasks).splitlines()
    assert len(table) == 4 and all(len(r) < 300 and not _ODD.search(r) for r in table)
    assert table[2].startswith("    error: RuntimeError: <img src=x")  # (under the failed task's row)


def test_details_show_a_carriage_return_progress_bar_as_a_terminal_does(probe, worker):
    """Output rewritten in place with carriage returns (tqdm, ``print(..., end="\\r")``)
    shows its last state per line, and coloured text its text, as the cell's own output and
    a terminal show them, not every state and code escaped."""
    def bar() -> None:
        for i in range(3):
            sys.stdout.write(f"\r{i * 10}%|{'#' * i}")
        sys.stdout.write("\ndone\r\n")
        print("\x1b[31mred\x1b[0m text")  # (colour codes: shown as the text they colour)
        print("saving", end="\r")  # (the last state stays)

    worker.namespace["bar"] = bar
    task = worker.submit("bar")
    assert task.wait(5) and task.output.startswith("\r0%|")
    panel = panels.TaskPanel(worker, show="all")
    panel.details_toggle(task).value = True
    assert panel.flush()
    assert "<pre>20%|##\ndone\nred text\nsaving</pre>" in panel.details_html(), panel.details_html()


def test_progress_values_that_do_not_compare_keep_the_panel_updating(probe, worker):
    """A task reporting numpy arrays as progress (``report_progress(positions, n)``): the
    panel compares what its rows show, not the values (two arrays compare element-wise, and
    a row's change check raised: the panel stopped updating while the scan ran)."""
    np = pytest.importorskip("numpy")
    reported = [threading.Event() for _ in range(3)]
    go_on = [threading.Event() for _ in range(3)]

    def positions() -> None:
        for i in range(3):
            qmagic.report_progress(np.array([i, i + 1]), 10, f"point {i}")
            reported[i].set()
            assert go_on[i].wait(5)

    worker.namespace["positions"] = positions
    task = worker.submit("positions")
    panel = panels.TaskPanel(worker, show="all")
    panel.details_toggle(task).value = True
    for i in range(3):
        assert reported[i].wait(5)
        assert panel.flush()
        assert row_progress(panel.row_html(), task) == f"[{i} {i + 1}]/10 · point {i}"
        assert panel.message == ""
        go_on[i].set()
    assert task.wait(5) and task.status.value == "completed"


class _Device:
    """A value whose repr, str and float wait until ``go`` is set (an object that asks a
    device or a server when it is shown)."""

    def __init__(self) -> None:
        self.go = threading.Event()

    def _wait(self):
        self.go.wait(60)
        return "_Device()"

    __repr__ = __str__ = _wait

    def __float__(self) -> float:
        self.go.wait(60)
        return 1.0


def test_a_value_whose_repr_blocks_never_holds_up_the_panels(probe, worker):
    """A task given an object whose repr blocks, reporting it as progress and returning it:
    its row's call, progress and (expanded) result were made on the thread that updates
    every panel of the kernel, which waited as long as the repr did (a result that asks a
    server for its contents when shown froze all panels).  They are made with a deadline
    now, and read "<repr did not finish>" past it; the other rows go on updating; and once
    the repr returns, every row and expanded row made meanwhile is made again, by itself --
    a finished task's own row too, which nothing else updates (a reviewer's findings)."""
    device = _Device()

    def hold(x: Any) -> Any:
        qmagic.report_progress(x, 10, "moving")
        return x

    worker.namespace["hold"] = hold
    worker.namespace["give"] = lambda x: x  # (no progress: nothing else of its row changes)
    task = worker.submit("hold", (device,))
    quiet = worker.submit("give", (device,))
    assert task.wait(5) and quiet.wait(5) and task.status.value == "completed"
    own_row = panels.TaskRow(worker, quiet)  # (how a finished task shows in its cell: first,
    # alone, so that its repr blocks while its row is made, after the row's signature)
    try:
        assert own_row.flush(10), "the row waited for the value's repr"
        own_row.details_toggle(quiet).value = True
        panel = panels.TaskPanel(worker, show="all")
        panel.details_toggle(task).value = True
        panel.details_toggle(quiet).value = True
        assert panel.flush(10) and own_row.flush(10), "the panels waited for the value's repr"
        html = panel.row_html()
        assert row_field(html, task, "qm-call") == "hold(...)"
        assert row_field(html, quiet, "qm-call") == "give(...)"
        assert row_field(own_row.row_html(), quiet, "qm-call") == "give(...)"
        assert row_progress(html, task) == "<repr did not finish> · moving"
        assert panel.details_html().count("&lt;repr did not finish&gt;") == 2
        other = worker.submit("job", (2,))
        assert other.wait(5)
        assert panel.flush(10)
        assert row_field(panel.row_html(), other, "qm-call") == "job(2)"
    finally:
        device.go.set()

    def made_again() -> bool:  # (no flush: the panels remake those rows by themselves)
        html, details = panel.row_html(), panel.details_html() + own_row.details_html()
        return (row_field(html, quiet, "qm-call") == "give(_Device())"
                and row_field(own_row.row_html(), quiet, "qm-call") == "give(_Device())"
                and row_progress(html, task) == "1/10 · moving" and "did not finish" not in details)

    eventually(made_again, what="the rows made with a fallback made again")
    assert row_field(panel.row_html(), task, "qm-call") == "hold(_Device())"
    assert (panel.details_html() + own_row.details_html()).count("_Device()") >= 6  # (calls and results)


def test_a_value_slower_than_the_deadline_is_read_once_and_shown(probe, worker):
    """A result whose repr always takes longer than the panels' deadline (a server that
    answers in 0.3 s): its expanded row read "<repr did not finish>", was made again when the
    repr returned, ran the repr again, fell back again, and so on for as long as it was open
    (a reviewer's finding).  The text made late is kept: the repr runs once, and shows."""
    calls: list[str] = []

    class Slow:
        def __repr__(self) -> str:
            calls.append(threading.current_thread().name)
            threading.Event().wait(3 * probe_module.TEXT_READ_S)  # (the value's own slowness)
            return "Slow()"

    task = worker.submit(lambda: Slow())
    assert task.wait(5)
    row = panels.TaskRow(worker, task)
    row.details_toggle(task).value = True
    assert row.flush(10)
    eventually(lambda: "Slow()" in row.details_html(), what="the late text shown")
    assert row.flush(10) and "did not finish" not in row.details_html()
    assert calls.count("qmagic-panel-text") == 1, calls  # (the experiment log reads it too)


# -- lock panel -----------------------------------------------------------------------------------
def test_lock_panel_locks_unlocks_and_shows_the_workers_refusals(probe, worker):
    w = worker
    panel = panels.LockPanel(w)
    assert "qmagic-lock-unlocked" in panel._state.value
    panel._key.value = "k-123"
    panel._note.value = "changing samples"
    panel._queue.value = True
    panel._lock_button.click()
    assert panel.message == "Locked: environment and queue."
    state = w.lock_state()
    assert state.environment and state.queue and state.note == "changing samples"
    assert panel.flush()
    html = panel._state.value
    assert "Environment: locked" in html and "Queue: locked" in html
    assert "changing samples" in html and "qmagic user" in html
    assert "Emergency unlock key: not set" in html and "this kernel holds the key" in html
    assert panel._key.value == "", "the key field is cleared after use"
    # a wrong key is refused, visibly
    panel._key.value = "wrong"
    panel._unlock_button.click()
    assert panel.message.startswith("The environment and queue are locked by qmagic user (since ")
    assert panel.message.endswith("note: changing samples): the key given is neither its lock key "
                                  "nor the emergency key; check the key, or ask them to unlock.")
    assert w.lock_state().environment
    assert panel.flush() and "qmagic-message-error" in panel._message.value
    # nothing selected: the worker's refusal
    panel._environment.value = False
    panel._queue.value = False
    panel._lock_button.click()
    assert "environment and/or queue must be selected" in panel.message
    # the right key unlocks
    panel._key.value = "k-123"
    panel._unlock_button.click()
    assert panel.message == "Unlocked." and not w.lock_state().environment
    assert panel.flush() and "qmagic-lock-unlocked" in panel._state.value
    panel._unlock_button.click()  # nothing to release: it says so
    assert panel.message == "Not locked." and not w.lock_state().locked


def test_lock_panel_shows_an_unexpected_error_as_one_line_that_says_what_to_do(probe, worker, monkeypatch):
    """No exception type name, no traceback in the panel: what failed and what to do."""
    panel = panels.LockPanel(worker)

    def broken(*args, **kwargs):
        raise ValueError("boom")

    monkeypatch.setattr(worker, "release_lock", broken)
    panel._unlock_button.click()
    assert panel.message == ("Could not unlock: an unexpected error (logged by the kernel). Try "
                             "again; if it persists, run %unlock in a cell to see the error.")


def test_lock_panel_tells_what_it_was_when_its_cell_ran_and_what_it_is_now(probe, worker):
    """Tutorial 04 after Run All: the panel was made under Alice's lock, a later cell
    unlocked; the panel shows both, labelled, and its text stays what it was."""
    w = worker
    w.emergency_lock_key = "EMERGENCY"
    other = qmagic.Worker({}, emergency_lock_key="EMERGENCY")
    try:
        other.lock("their-key", environment=True, user="Alice", note="beam time")
        panel = panels.LockPanel(w)
        assert not panel.changed and panel._then.layout.display == "none"
        assert "Alice" in panel._state.value and "this kernel does not hold the key" in panel._state.value
        assert "Now (live)" in panel._state.value and "changed" not in panel._state.value
        text = panel.text()
        assert text == "Locked by Alice: environment\nNote: beam time\n(An emergency unlock key is set.)"
        panel._unlock_button.click()  # no key typed, none held: the worker says what to do
        assert panel.message == ("This kernel does not hold the key of the current lock: give the lock "
                                 "key or the emergency key (type it in the Key field).")
        other.unlock("their-key")  # e.g. a later cell of the notebook
        eventually(lambda: panel.changed and "qmagic-lock-unlocked" in panel._state.value, timeout=3.0,
                   what="the panel to see the unlock")
        assert panel.flush()
        assert "Now (live) — changed since this cell ran" in panel._state.value
        assert "Not locked" in panel._state.value
        assert panel._then.layout.display == ""
        then = panel._then.value
        assert "When this cell ran" in then and "Alice" in then and "beam time" in then
        assert panel.text() == text  # the text/plain is what the cell showed
        # the other kernel locks again: seen within about a second, and the emergency key opens it
        other.lock("their-key", environment=True, user="Bob")
        eventually(lambda: "Bob" in panel._state.value, timeout=3.0, what="Bob's lock")
        panel._key.value = "EMERGENCY"
        panel._unlock_button.click()
        assert panel.message == "Unlocked." and not w.lock_state().locked
    finally:
        other.close()


def test_lock_panel_clears_a_message_about_a_lock_that_has_changed_since(probe, worker):
    """Found in JupyterLab at 3 a.m.: a wrong key typed in the panel, then ``%unlock`` in a
    later cell; the panel showed "Not locked" and, under it, the red "The environment is
    locked by ... the key given is neither its lock key ..." for good. A message is about
    the lock it answered: once the lock changes, it goes; the panel's own Lock/Unlock
    answers stay (they are about the lock they made)."""
    w = worker
    other = qmagic.Worker({})
    try:
        other.lock("their-key", environment=True, user="Alice", note="changing samples")
        panel = panels.LockPanel(w)
        panel._key.value = "wrong"
        panel._unlock_button.click()
        assert "the key given is neither its lock key nor the emergency key" in panel.message
        assert panel.flush() and "qmagic-message-error" in panel._message.value
        assert panel.flush() and panel.message, "kept while the lock is the same"
        other.unlock("their-key")  # a later cell
        eventually(lambda: "qmagic-lock-unlocked" in panel._state.value, timeout=3.0,
                   what="the panel to see the unlock")
        assert panel.flush()
        assert panel.message == "", panel.message
        assert "locked by" not in panel._message.value, panel._message.value
        # the panel's own answers stay beside the state they made
        panel._key.value = "mine"
        panel._lock_button.click()
        assert panel.message == "Locked: environment."
        panel.flush()
        assert panel.message == "Locked: environment." and "Locked: environment." in panel._message.value
        panel._unlock_button.click()
        panel.flush()
        assert panel.message == "Unlocked."
    finally:
        other.close()


def test_lock_panel_shows_a_hostile_note_and_user_as_printable_text(probe, worker):
    """Who locked and the note (anyone's text, also a remote client's) show escaped once and
    as one printable line each, now and as they were when the cell ran."""
    w = worker
    w.emergency_lock_key = "EMERGENCY"
    other = qmagic.Worker({}, emergency_lock_key="EMERGENCY")
    note = "<b>beam</b> &lt;\u202e time\nuntil 18:00\x1b[2J"
    try:
        other.lock("their-key", environment=True, user="<img src=x onerror=alert(1)>\u202e", note=note)
        panel = panels.LockPanel(w)
        other.unlock("their-key")  # the panel then shows both: when its cell ran, and now
        eventually(lambda: panel.changed, timeout=3.0, what="the panel to see the unlock")
        assert panel.flush()
        for html in (panel._then.value, render_lock(w, other, note)):
            markup = _Markup()
            markup.feed(html)
            assert markup.tags <= {"div", "span", "b"}, markup.tags
            text = "".join(markup.text)
            assert "<img src=x onerror=alert(1)>\\u202e" in text, text
            assert "<b>beam</b> &lt;\\u202e time\\nuntil 18:00\\x1b[2J" in text, text
            assert not _ODD.search(text)
    finally:
        other.close()


def render_lock(w, other, note: str) -> str:
    """The live part of a lock panel under ``other``'s lock with ``note``."""
    other.lock("their-key", environment=True, user="<img src=x onerror=alert(1)>\u202e", note=note)
    try:
        return panels.render.lock_html(w.lock_state(), holds_key=False)
    finally:
        other.unlock("their-key")


# -- a single row; close; detach -------------------------------------------------------------------
def test_task_row_follows_its_task_only(probe, worker):
    w = worker
    task = w.submit("job", (40, 0.005))
    row = panels.TaskRow(w, task)
    assert not w.engine.bus._global, "a row subscribes to its task, not to every task"
    assert task.wait(10)
    eventually(lambda: row_status(row.row_html(), task) == "completed", 2.0, "the row to complete")
    assert row_progress(row.row_html(), task) == "40/40 · step 40"
    # the Cancel button leaves with the next spare message (the table HTML goes first)
    eventually(lambda: row.cancel_button(task) is None, 2.0, "the Cancel button to go")
    assert row._table.segments[0].grid.children == (row._table._spacer, row.details_toggle(task))
    assert row._qm_period() is None  # finished: no more periodic work
    assert "qmagic-task-single" in row._dom_classes
    row.close()
    assert not task._subscribers, "closing the row ended its subscription"


def test_rows_of_finished_tasks_rest_until_something_can_change_them(probe, worker, monkeypatch):
    """2,000 rows of finished tasks raised the pump thread's CPU from 0.3 to 0.8 s per 5 s:
    it looked at every one on each pass, for good, and each kept its task subscription.  A
    finished task's row shows its final state and then rests: no pass looks at it and it
    follows no events.  What can still change it wakes it (Details opened later, a click's
    message) and it rests again; a row whose comm the frontend closed is closed and leaves."""
    w = worker
    w.max_background_tasks = 20
    tasks = [w.submit("job", (3, 0.01)) for _ in range(20)]
    rows = [panels.TaskRow(w, task) for task in tasks]
    panel = panels.TaskPanel(w)  # (a live view: the pump goes on making passes)
    pump = panel._qm_pump
    looks: dict[int, int] = {}
    due = panels.TaskRow._qm_due

    def counted(self, now):
        looks[id(self)] = looks.get(id(self), 0) + 1
        return due(self, now)

    monkeypatch.setattr(panels.TaskRow, "_qm_due", counted)
    assert all(task.wait(10) for task in tasks)
    for row, task in zip(rows, tasks):  # (no flush: the final state comes by itself)
        eventually(lambda row=row, task=task: row_status(row.row_html(), task) == "completed", 5.0,
                   "the row to show its final state")
        assert row_progress(row.row_html(), task) == "3/3 · step 3"
    eventually(lambda: not any(task._subscribers for task in tasks), 5.0,
               "the finished rows to stop following their tasks")
    assert all(row.cancel_button(task) is None for row, task in zip(rows, tasks))
    looks.clear()
    for _ in range(3):
        assert panel.flush()  # (three passes of the pump thread)
    assert not looks, f"the pump looked at finished rows {sum(looks.values())} times"
    assert not set(rows) & set(pump.awake())
    assert set(rows) <= set(pump.views())  # (still known: unloading the extension closes them)

    # Details opened later: the row wakes, shows them, and rests again
    rows[0].details_toggle(tasks[0]).value = True
    eventually(lambda: "qmagic-detail-result" in rows[0].details_html(), 5.0, "the details")
    assert re.search(r'qmagic-detail-result"><div class="qm-dt">Result</div><pre>3</pre>', rows[0].details_html())
    eventually(lambda: rows[0] not in pump.awake(), 5.0, "the row to rest again")
    # a click on a row not yet redrawn: its message shows
    rows[1]._qm_cancel(tasks[1])
    eventually(lambda: "already finished" in rows[1]._message.value.lower(), 5.0, "the click's message")
    assert rows[1]._message in rows[1].children
    # the frontend closed a row's comm (as the kernel's comm manager does)
    gone = rows[2].comm
    gone._closed = True
    gone.handle_close({"content": {"comm_id": gone.comm_id, "data": {}}})
    eventually(lambda: rows[2].closed, 5.0, "the row whose comm was closed to close")
    assert rows[2] not in pump.views()
    # ... and a live panel's
    gone = panel.comm
    gone._closed = True
    gone.handle_close({"content": {"comm_id": gone.comm_id, "data": {}}})
    eventually(lambda: panel.closed, 5.0, "the panel whose comm was closed to close")
    assert panel not in pump.views() and not w.engine.bus._global
    closed = {m[2] for m in probe.of("comm_close")}
    assert panel._body.comm is None and rows[2]._style.comm is None and len(closed) > 10


def test_a_resting_view_closed_past_its_close_leaves_the_pump(probe, worker):
    """``ipywidgets.Widget.close(row)`` drops the row's comm without the row's close() and
    without the comm's close callback: a resting row stayed in the pump's resting set, its
    widgets open, until something woke it.  Closing by any path
    closes the view and it leaves the pump."""
    import ipywidgets

    task = worker.submit("job", (1,))
    assert task.wait(10)
    row = panels.TaskRow(worker, task)
    pump = row._qm_pump
    eventually(lambda: row not in pump.awake(), 5.0, "the finished row to rest")
    ipywidgets.Widget.close(row)
    eventually(lambda: row.closed and row not in pump.views(), 5.0,
               "the row closed past its close() to leave the pump")
    assert row._style.comm is None and row._table.segments[0].html.comm is None


def test_detach_closes_every_comm_and_stops_the_thread(probe, worker):
    w = worker
    task = w.submit("wait_gate", ("g",))
    started(w, "g")
    panels.attach(None, w)
    views = [panels.TaskPanel(w), panels.TaskRow(w, task), panels.LockPanel(w)]
    views[0].details_toggle(task).value = True
    assert all(p.flush() for p in views)
    assert any(t.name == "qmagic-panels" for t in threading.enumerate())
    panels.detach(None, w)
    assert all(p.closed for p in views)
    opened = {m[2] for m in probe.of("comm_open")}
    closed = {m[2] for m in probe.of("comm_close")}
    assert opened and opened <= closed, f"{len(opened - closed)} comms left open"
    assert not any(t.name == "qmagic-panels" for t in threading.enumerate())
    assert pump_module.current_pump() is None
    assert not w.engine.bus._global and not task._subscribers, "a subscription was not ended"
    assert views[0].flush(timeout=0.5) is False  # closed panels do not pretend to update
    again = panels.TaskPanel(w)  # a new panel after detach works again (the pump restarts)
    assert again.flush()


def test_widgets_need_a_kernel_and_a_terminal_shows_text_only(ip):
    """In a terminal IPython a foreground task shows no widget: its text line only."""
    from qmagic.ipython.extension import (
        get_worker,
        load_ipython_extension,
        unload_ipython_extension,
    )

    assert panels.widgets_available(None) is False
    assert panels.widgets_available(ip) is False  # a terminal shell has no widget frontend
    assert panels.subshell_cancel_available(ip) is False
    load_ipython_extension(ip)
    try:
        w = get_worker(ip)
        assert panels.cell_row_hook(ip, w) is None
        ip.user_ns["count_to"] = lambda n: [qmagic.report_progress(i + 1, n) for i in range(n)] and n
        result = ip.run_cell("%function_execute count_to 3")
        assert result.success
        task = result.result
        assert task.status.value == "completed"
        data, _ = ip.display_formatter.format(task)
        assert data == {"text/plain": "count_to(3)  qmagic user  foreground  completed  3/3"}
        assert pump_module.current_pump() is None or not pump_module.current_pump().views()
    finally:
        unload_ipython_extension(ip)
        ip.extension_manager.loaded.discard("qmagic")


# -- a real kernel ----------------------------------------------------------------------------------
SETUP = """
import time, threading
import qmagic
from qmagic import panels
w = qmagic.Worker({})
def long_measurement(n):
    for i in range(n):
        qmagic.report_progress(i + 1, n, "point")
        qmagic.cancellable_sleep(0.05)
    return n
w.namespace["long_measurement"] = long_measurement
"""
#: Kernels with the extension (the experiment log on, in each kernel's own state folder).
EXT = ["--ext=qmagic"]
FUNCTIONS = """
import asyncio, threading
import qmagic
def measure(n, dt=0.01):
    for i in range(n):
        qmagic.report_progress(i + 1, n, f"point {i + 1} of {n}")
        qmagic.cancellable_sleep(dt)
    return n
async def ameasure(n):
    for i in range(n):
        qmagic.report_progress(i + 1, n)
        await asyncio.sleep(0.01)
    return n
def long_measurement(n=2000):
    for i in range(n):
        qmagic.report_progress(i + 1, n, "point")
        qmagic.cancellable_sleep(0.05)
    return n
"""
WIDGET = "application/vnd.jupyter.widget-view+json"


def _click(kernel, model_id: str) -> None:
    content = {"comm_id": model_id, "data": {"method": "custom", "content": {"event": "click"}}}
    kernel.kc.shell_channel.send(kernel.kc.session.msg("comm_msg", content))


def _iopub(kernel) -> list[tuple[str, dict]]:
    """Every IOPub message seen so far as (parent msg_id, message), in arrival order per parent."""
    kernel.messages("")  # drain IOPub into the session's files
    return [(parent, m) for parent, msgs in kernel._iopub.items() for m in msgs]  # the harness's files


def _comm_opens(kernel, css_class: str, parent: str | None = None) -> list[str]:
    """Model ids of widgets opened with ``css_class`` (under request ``parent`` if given)."""
    ids = []
    for p, m in _iopub(kernel):
        if m["msg_type"] == "comm_open" and (parent is None or p == parent):
            state = (m["content"].get("data") or {}).get("state") or {}
            if css_class in (state.get("_dom_classes") or ()):
                ids.append(m["content"]["comm_id"])
    return ids


def _wait_for(kernel, find: Callable[[], Any], timeout: float, what: str) -> Any:
    """Read IOPub until ``find()`` returns something true."""
    deadline = time.monotonic() + timeout
    while not (found := find()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        kernel._pump(0.2)  # read one IOPub message (or wait 0.2 s)
    return found


def _children(kernel, comm_id: str) -> list[str]:
    """Model ids of the children last sent for the container widget ``comm_id``."""
    children: list[str] = []
    for _, m in _iopub(kernel):
        data = m["content"].get("data") or {}
        if m["msg_type"] in ("comm_open", "comm_msg") and m["content"].get("comm_id") == comm_id:
            state = data.get("state") or {}
            if "children" in state:
                children = [c.replace("IPY_MODEL_", "") for c in state["children"]]
    return children


def _shown_status(kernel, key: str) -> list[str]:
    """Statuses the frontend was sent for task ``key``'s row, in order (widget updates)."""
    seen = []
    for _, m in _iopub(kernel):
        if m["msg_type"] in ("comm_msg", "comm_open"):
            value = str(((m["content"].get("data") or {}).get("state") or {}).get("value", ""))
            seen += re.findall(rf'data-task="{key}" data-status="(\w+)"', value)
    return seen


def _thread_names(kernel) -> list[str]:
    return kernel.eval("[t.name for t in threading.enumerate()]")


def test_cancel_click_is_handled_while_a_cell_blocks_the_main_thread(kernel_factory):
    k = kernel_factory()
    k.execute(SETUP, check=True)
    r = k.execute(
        "t = w.submit('long_measurement', (2000,))\n"
        "row = panels.TaskRow(w, t)\n"
        "print(row.cancel_button(t).model_id, panels.subshell_cancel_available())",
        check=True,
    )
    model_id, available = r.stdout.split()
    assert available == "True", "ipykernel 7.4 here: subshell routing must be available"
    blocking = k.execute_async("ok = t.wait(20); print('waited', t.status)")
    _click(k, model_id)
    result = k.wait(blocking, timeout=15).check()
    assert result.stdout.strip() == "waited cancelled"
    assert k.eval("row.message") == "Cancel requested: long_measurement(2000)"
    names = _thread_names(k)
    assert any(n.startswith("subshell-") for n in names) and "qmagic-panels" in names
    k.execute("panels.detach(get_ipython(), w)", check=True)
    names = _thread_names(k)
    assert not any(n.startswith("subshell-") or n == "qmagic-panels" for n in names), names


def test_without_subshell_routing_a_click_waits_for_the_cell(kernel_factory):
    """The fallback: clicks queue behind the running cell (■ is the way out)."""
    k = kernel_factory()
    k.execute(SETUP, check=True)
    r = k.execute(
        "w.panel_cancel_subshell = False\n"
        "t = w.submit('long_measurement', (2000,))\n"
        "row = panels.TaskRow(w, t)\n"
        "print(row.cancel_button(t).model_id)",
        check=True,
    )
    model_id = r.stdout.strip()
    # (with the routing on, the click is handled 0-6 ms after the cell starts: half a second
    # of the cell is long enough to show it waits)
    blocking = k.execute_async("ok = t.wait(0.5); print('waited', t.status)")
    _click(k, model_id)
    result = k.wait(blocking, timeout=15).check()
    assert result.stdout.strip() == "waited running"  # the click could not run meanwhile
    assert k.eval("(t.wait(5), t.status.value)") == (True, "cancelled")  # ...it ran right after


def test_task_displays_as_a_live_row_after_attach(kernel_factory):
    k = kernel_factory()
    k.execute(SETUP, check=True)
    k.execute("panels.attach(get_ipython(), w)", check=True)
    r = k.execute("t = w.submit('long_measurement', (2,)); t.wait(5); t", check=True)
    data = r.displayed[-1]
    assert WIDGET in data
    assert data["text/plain"] == k.eval("qmagic.format.task_line(t)")
    k.execute("panels.detach(get_ipython(), w)", check=True)
    r = k.execute("t", check=True)
    assert WIDGET not in r.displayed[-1]
    assert r.result == k.eval("repr(t)")


# -- with the extension ------------------------------------------------------------------------------
def test_a_foreground_task_shows_its_live_row_in_its_own_cell(kernel_factory):
    k = kernel_factory(argv=EXT)
    k.execute(FUNCTIONS, check=True)
    texts = []
    for _ in range(2):  # the same cell twice: the same text
        r = k.execute("%function_execute measure 5").check()
        shown = [d for d in r.displayed if WIDGET in d]
        assert len(shown) == 1, f"one live widget in the cell, got {len(shown)}: {r.displayed}"
        # the row appeared when the task started; its text is that moment's (no live values)
        assert shown[0]["text/plain"] == "measure(5)  qmagic user  foreground  running"
        # the Task the magic returns is text only in this cell
        result = [o for o in r.outputs if o["msg_type"] == "execute_result"]
        assert [o["content"]["data"] for o in result] == [
            {"text/plain": "measure(5)  qmagic user  foreground  completed  5/5 point 5 of 5"}]
        assert len(_comm_opens(k, "qmagic-task-single", parent=r.msg_id)) == 1
        key = k.eval("qmagic.get_worker().last_task.uid[:8]")
        assert _shown_status(k, key)[0] == "running"
        # when the cell ends, the row becomes a static copy of its final state
        final = _static_row(r, "measure(5)  qmagic user  foreground  completed  5/5 point 5 of 5")
        assert f'data-task="{key}" data-status="completed"' in final["text/html"]
        texts.append([o["content"]["data"]["text/plain"] for o in r.outputs
                      if o["msg_type"] in ("display_data", "execute_result", "update_display_data")])
    assert texts[0] == texts[1]
    # an async def task runs on the event loop: its row still lands in its cell, and rests there
    r = k.execute("%function_execute ameasure 3").check()
    assert [d["text/plain"] for d in r.displayed if WIDGET in d] == ["ameasure(3)  qmagic user  foreground  running"]
    _static_row(r, "ameasure(3)  qmagic user  foreground  completed  3/3")
    # a background task's Task displays as a live row (it is the only widget of its cell)
    r = k.execute("t = %function_execute -b measure 3\nt").check()
    assert len([d for d in r.displayed if WIDGET in d]) == 1


def test_a_tasks_row_shown_by_a_cell_becomes_static_once_cell_and_task_are_over(kernel_factory):
    """``t`` (a Task as a cell's result, or ``display(t)``) shows a live row, which a notebook
    reopened without its kernel showed as "model not found".  It is replaced (its display
    id) by the static final row once both its cell and its task are over: at the cell's end
    for a task already over when shown; at the task's end for one that outlives its cell;
    when the next cell starts for one that ended while its cell ran (never within that cell:
    its outputs must not depend on timing).  Each update is one of the showing cell's.  A
    display id given to ``display``/``update_display`` is the row's."""
    k = kernel_factory(argv=EXT)
    k.execute(FUNCTIONS + "import os\nw = qmagic.get_worker()\n"
              "def held(path):\n"
              "    while os.path.exists(path):\n"
              "        qmagic.cancellable_sleep(0.01)\n"
              "    return path\n", check=True)

    def shown_id(r) -> str:
        rows = [o["content"] for o in r.outputs if o["msg_type"] == "display_data" and WIDGET in o["content"]["data"]]
        assert len(rows) == 1, r.outputs
        assert not [o for o in r.outputs if o["msg_type"] == "execute_result"], r.outputs
        return rows[0]["transient"]["display_id"]

    def update_of(display_id: str, parent: str) -> dict:
        found = _wait_for(k, lambda: [m["content"] for p, m in _iopub(k) if m["msg_type"] == "update_display_data"
                                      and m["content"]["transient"]["display_id"] == display_id], 15.0,
                          f"the static row of display {display_id}")
        assert len(found) == 1, found
        assert [p for p, m in _iopub(k) if m["msg_type"] == "update_display_data"
                and m["content"]["transient"]["display_id"] == display_id] == [parent]
        data = found[0]["data"]
        assert set(data) == {"text/html", "text/plain"}, data
        assert data["text/html"].startswith('<style class="qmagic-style">'), data["text/html"][:80]
        return data

    # 1. over when shown: static when its cell ends (in that cell)
    r = k.execute("done = w.submit('measure', (2,))\ndone.wait(10)\ndone").check()
    final = update_of(shown_id(r), r.msg_id)
    assert final["text/plain"] == "measure(2)  qmagic user  background  completed  2/2 point 2 of 2"
    assert [o["msg_type"] for o in r.outputs].count("update_display_data") == 1

    # 2. outlives its cell: static when it ends, an update of the cell that showed it
    flag = k.eval("str(__import__('tempfile').mkstemp(prefix='qmagic-held-')[1])")
    try:
        r = k.execute(f"long = w.submit('held', ({flag!r},))\nlong").check()
        display_id = shown_id(r)
        assert not [o for o in r.outputs if o["msg_type"] == "update_display_data"]
        later = k.execute("print('another cell')").check()
        assert not [o for o in later.outputs if o["msg_type"] == "update_display_data"]
    finally:
        os.unlink(flag)
    final = update_of(display_id, r.msg_id)
    assert final["text/plain"].startswith("held(") and "background  completed" in final["text/plain"]

    # 3. ended while its cell ran: static when the next cell starts, as an update of its own cell
    flag = k.eval("str(__import__('tempfile').mkstemp(prefix='qmagic-held-')[1])")
    r = k.execute(f"quick = w.submit('held', ({flag!r},))\ndisplay(quick)\nos.unlink({flag!r})\n"
                  "assert quick.wait(10)").check()
    display_id = shown_id(r)
    assert not [o for o in r.outputs if o["msg_type"] == "update_display_data"], r.outputs
    k.execute("print('next')").check()
    update_of(display_id, r.msg_id)

    # 4. a display id given to display() / update_display() is the row's, as for any object
    r = k.execute("h = display(done, display_id=True)\nprint(h.display_id)").check()
    given = r.stdout.strip()
    assert shown_id(r) == given
    r = k.execute(f"from IPython.display import update_display\nupdate_display(quick, display_id={given!r})").check()
    updates = [o["content"] for o in r.outputs if o["msg_type"] == "update_display_data"]
    assert [u["transient"]["display_id"] for u in updates] == [given, given], r.outputs
    assert WIDGET in updates[0]["data"] and "text/html" in updates[1]["data"]  # (live, then static)
    assert updates[1]["data"]["text/plain"].startswith("held(")  # (the display now shows quick)


def test_static_rows_close_their_widgets_beyond_the_newest_few_unless_an_output_holds_them(kernel_factory):
    """Every row that became static kept its two dozen widgets open: a beamtime's scans grew
    the kernel by ~100 kB each (300 foreground tasks: 7,200 widgets, +28 MB, and as many
    models in the browser), for good.  Once static, only the newest ``rested.KEEP_OPEN`` rows
    keep their widgets (a tab reopened while the kernel runs draws them); older ones are
    closed, after their static copy was sent.  A row an ``ipywidgets.Output`` captured is
    never closed: the Output ignores display updates and goes on showing the live row."""
    k = kernel_factory(argv=EXT)
    k.execute(FUNCTIONS + "import ipywidgets\nfrom qmagic.panels import TaskRow, rested\n"
              "from ipywidgets.widgets import widget as _widget\n"
              "rested.KEEP_OPEN = 2\nw = qmagic.get_worker()\n", check=True)

    def row_of(r) -> str:
        rows = [o["content"] for o in r.outputs if o["msg_type"] == "display_data" and WIDGET in o["content"]["data"]
                and o["content"]["data"]["text/plain"].startswith("measure(")]
        assert len(rows) == 1, r.outputs
        assert [o for o in r.outputs if o["msg_type"] == "update_display_data"
                and o["content"]["transient"]["display_id"] == rows[0]["transient"]["display_id"]], r.outputs
        return rows[0]["data"][WIDGET]["model_id"]

    def closed() -> list[str]:
        return [m["content"]["comm_id"] for _, m in _iopub(k) if m["msg_type"] == "comm_close"]

    captured = row_of(k.execute("out = ipywidgets.Output()\ndisplay(out)\n"
                                "with out:\n    %function_execute measure 1").check())
    cells = [k.execute("%function_execute measure 1").check() for _ in range(2)]
    assert closed() == [], "no row closes while the newest two are all that rested"
    cells.append(k.execute("t = w.submit('measure', (1,))\nt.wait(10)\nt").check())  # (a Task's display)
    cells += [k.execute("%function_execute measure 1").check() for _ in range(2)]
    rows = [row_of(r) for r in cells]
    gone = _wait_for(k, lambda: (lambda c: c if set(rows[:3]) <= set(c) else None)(closed()), 15.0,
                     "the oldest rows closed (by the closer thread)")
    k.execute("assert rested.wait_closed(10)", check=True)
    gone = closed()
    assert [row in gone for row in rows] == [True, True, True, False, False], (rows, gone)
    assert captured not in gone
    opened = [m["content"]["comm_id"] for p, m in _iopub(k) if m["msg_type"] == "comm_open"
              and p in {r.msg_id for r in cells[:3]}]  # (those cells opened their row's widgets only)
    assert sorted(gone) == sorted(opened), "the oldest rows' widgets, all of them, once each"
    open_rows = k.eval("sorted(r.model_id for r in list(_widget._instances.values()) if isinstance(r, TaskRow))")
    assert open_rows == sorted([captured, *rows[3:]])
    # (300 more cells held 2,400 widgets instead of 9,600: not run here)


def _static_row(r, text: str) -> dict:
    """The cell's one live row was replaced (same display id) by its static final row."""
    shown = [o["content"] for o in r.outputs if o["msg_type"] == "display_data" and WIDGET in o["content"]["data"]]
    updates = [o["content"] for o in r.outputs if o["msg_type"] == "update_display_data"]
    assert len(shown) == 1 and len(updates) == 1, r.outputs
    assert updates[0]["transient"]["display_id"] == shown[0]["transient"]["display_id"]
    data = updates[0]["data"]
    assert set(data) == {"text/html", "text/plain"} and data["text/plain"] == text, data
    assert data["text/html"].startswith('<style class="qmagic-style">'), data["text/html"][:80]
    return data


def test_a_row_rests_in_its_cell_when_qmagic_is_unloaded_or_reloaded_there(kernel_factory):
    """``%function_execute measure 2`` then ``%unload_ext qmagic`` (or ``%reload_ext``) in one
    cell: the unload closes the row's widgets before the cell ends, and the cell's end no longer
    reaches the old worker's rows, so the finished task's row stayed a closed widget (nothing, or
    "model not found", in the saved notebook).  It becomes its static final row at the unload."""
    k = kernel_factory(argv=EXT)
    k.execute(FUNCTIONS, check=True)
    for reload in ("%unload_ext qmagic\n%load_ext qmagic", "%reload_ext qmagic"):
        r = k.execute(f"%function_execute measure 2\n{reload}").check()
        _static_row(r, "measure(2)  qmagic user  foreground  completed  2/2 point 2 of 2")
        assert not r.stderr, r.stderr


def test_cancel_in_the_cells_row_ends_the_cell_like_an_interrupt(kernel_factory):
    """Cancel on the live row while the foreground task holds the cell: the cell fails with
    one TaskCancelled line and the next queued cell (Run All) does not run."""
    k = kernel_factory(argv=EXT)
    k.execute(FUNCTIONS, check=True)
    blocking = k.execute_async("%function_execute long_measurement 2000")
    following = k.execute_async("print('the next cell ran')")
    # a frontend draws the row (and so its button) once the row is displayed: click then
    _wait_for(k, lambda: any(m["msg_type"] == "display_data" and WIDGET in m["content"]["data"]
                             for p, m in _iopub(k) if p == blocking), 15.0, "the cell's live row")
    ids = _comm_opens(k, "qmagic-cancel", parent=blocking)
    assert len(ids) == 1
    _click(k, ids[0])
    result = k.wait(blocking, timeout=20)
    assert result.status == "error"
    line = ("TaskCancelled: long_measurement(2000) was cancelled from the panel (Cancel button); "
            "it is recorded as cancelled.")
    assert result.error["ename"] == "TaskCancelled"
    assert [re.sub(r"\x1b\[[0-9;]*m", "", t) for t in result.error["traceback"]] == [line]
    assert k.wait(following, timeout=10).status == "aborted"  # Run All stops here
    assert k.eval("qmagic.get_worker().last_task.status.value") == "cancelled"
    key = k.eval("qmagic.get_worker().last_task.uid[:8]")
    _wait_for(k, lambda: "cancelled" in _shown_status(k, key), 5.0, "the row's cancelled state")


def test_panel_cancels_a_foreground_magic_task_and_unload_closes_everything(kernel_factory):
    k = kernel_factory(argv=EXT)
    k.execute(FUNCTIONS, check=True)
    r = k.execute("%tasks --running", check=True)
    assert any(WIDGET in d for d in r.displayed), r.displayed
    k.execute("%lock_info", check=True)
    grids = _comm_opens(k, "qmagic-task-controls", parent=r.msg_id)  # the panel's button column
    # a foreground task holds the main thread; the %tasks panel's Cancel still works
    blocking = k.execute_async("t = %function_execute long_measurement\nprint('ended', t.status)")
    panel_ids = _wait_for(k, lambda: [i for i in _comm_opens(k, "qmagic-cancel")
                                      if any(i in _children(k, g) for g in grids)],
                          15.0, "a Cancel button in the %tasks panel")
    _click(k, panel_ids[-1])
    result = k.wait(blocking, timeout=20)
    assert result.status == "error" and result.error["ename"] == "TaskCancelled"
    assert k.eval("qmagic.get_worker().last_task.status.value") == "cancelled"
    names = _thread_names(k)
    assert "qmagic-panels" in names and any(n.startswith("subshell-") for n in names)
    # unloading closes every panel comm and leaves no qmagic thread or subshell behind
    for attempt in range(2):  # load -> unload -> load -> unload
        k.execute("%unload_ext qmagic", check=True)
        names = _thread_names(k)
        assert not any(n.startswith(("qmagic", "subshell-")) for n in names), names
        left = k.eval("[c.comm_id for c in get_ipython().kernel.comm_manager.comms.values()]")
        assert left == [], f"{len(left)} widget comms still open after unload"
        assert k.eval("qmagic.Task in get_ipython().display_formatter.ipython_display_formatter.type_printers"
                      ) is False
        if attempt == 0:
            k.execute("%load_ext qmagic", check=True)
            r = k.execute("%function_execute measure 2").check()
            assert len([d for d in r.displayed if WIDGET in d]) == 1


def _execute_in_cell(kernel, code: str, cell_id: str):
    """Run ``code`` as JupyterLab runs a notebook cell: with the cell's id in the metadata."""
    msg = kernel.kc.session.msg("execute_request", {
        "code": code, "silent": False, "store_history": True, "user_expressions": {},
        "allow_stdin": False, "stop_on_error": True})
    msg["metadata"]["cellId"] = cell_id
    kernel.kc.shell_channel.send(msg)
    return kernel.wait(msg["header"]["msg_id"]).check()


def test_a_cell_run_again_closes_the_panels_its_earlier_run_showed(kernel_factory):
    """JupyterLab clears a cell's output when it runs again: the panels of the earlier run
    are closed (left open, each went on sending updates nobody saw: thirty re-runs of
    %tasks during a scan sent 300 messages per second); other cells' panels stay."""
    k = kernel_factory(argv=EXT)
    k.execute(FUNCTIONS + "t = qmagic.get_worker().submit('long_measurement', (2000,))", check=True)
    runs = [_execute_in_cell(k, "%tasks\n%lock_info\nt", "cell-a")]
    other = _execute_in_cell(k, "%tasks", "cell-b")
    runs += [_execute_in_cell(k, "%tasks\n%lock_info\nt", "cell-a") for _ in range(3)]
    shown = {r.msg_id: [d[WIDGET]["model_id"] for d in r.displayed if WIDGET in d] for r in (*runs, other)}
    assert [len(shown[r.msg_id]) for r in runs] == [3, 3, 3, 3] and len(shown[other.msg_id]) == 1
    views = k.eval("sorted(type(v).__name__ for v in qmagic.panels.pump.current_pump().views())")
    assert views == ["LockPanel", "TaskPanel", "TaskPanel", "TaskRow"], views
    open_ids = set(k.eval("list(get_ipython().kernel.comm_manager.comms)"))
    assert set(shown[runs[-1].msg_id]) <= open_ids and set(shown[other.msg_id]) <= open_ids
    assert not any(set(shown[r.msg_id]) & open_ids for r in runs[:-1])
    k.execute("t.cancel()", check=True)


def test_panels_of_a_cell_are_told_apart_by_run_and_by_frontend_session():
    """A reviewer's cases: a task of an earlier run of a cell displaying itself after the cell
    ran again closed the newer run's panels (now the late one is closed: the frontend drops
    it); two tabs of one notebook (two sessions, the same cell ids) closed each other's."""
    from qmagic.panels import display

    class Panel:
        closed = False

        def close(self):
            self.closed = True

    class Shell:
        parent: dict = {}

        def get_parent(self):
            return self.parent

    def show(shell, run, session="tab-1"):
        shell.parent = {"header": {"msg_type": "execute_request", "msg_id": run, "session": session},
                        "metadata": {"cellId": "cell-a"}}
        panel = Panel()
        display.shown_by_cell(shell, panel)
        return panel

    shell = Shell()
    try:
        first = show(shell, "run-1")
        second = show(shell, "run-2")
        assert first.closed and not second.closed
        late = show(shell, "run-1")  # (a task run-1 started displays itself now)
        assert late.closed and not second.closed
        other_tab = show(shell, "run-9", session="tab-2")
        assert not other_tab.closed and not second.closed
        third = show(shell, "run-3")
        assert second.closed and not third.closed and not other_tab.closed
    finally:
        display._by_cell.clear()


def test_many_live_views_share_one_budget_of_update_messages(probe, worker):
    """Each view sends about panel_update_hz messages a second; sixty live task rows (a loop
    that displays its tasks) sent 580 a second, and past 1,000 the Jupyter server drops
    IOPub messages and every panel freezes.  The views that want updates share
    pump.TOTAL_MSGS_HZ: each gets the lesser of its rate and its share, its period too."""
    w = worker
    w.max_background_tasks = 64
    names = [f"r{i}" for i in range(60)]
    tasks = [w.submit("wait_gate", (name,)) for name in names]
    for name in names:
        started(w, name)
    rows = [panels.TaskRow(w, task) for task in tasks]
    try:
        pump = rows[0]._qm_pump
        eventually(lambda: pump.share_hz <= pump_module.TOTAL_MSGS_HZ / 60, timeout=10,
                   what="the views to share the budget")
        assert all(row._qm_hz() == pump.share_hz < w.panel_update_hz for row in rows)
        # (a view's period stretches to its share: 60 views at 1 per second would be 60/s alone)
        row = rows[0]
        pump.unregister(row)  # (out of the pump's hands: it no longer applies it meanwhile)
        now = time.monotonic()
        row._qm_last_periodic = row._qm_last_apply = now
        row._qm_tokens, row._qm_token_time = 1.0, now
        due = row._qm_due(now)
        assert due >= now + 1.0 / row._qm_hz() - 1e-6  # (the budget only grows as views leave)
    finally:
        for event in (w.test_gates.setdefault(name, threading.Event()) for name in names):
            event.set()
        for row in rows:
            row.close()
    eventually(lambda: pump.share_hz > pump_module.TOTAL_MSGS_HZ / 60, timeout=10,
               what="the budget to be shared by fewer views once the rows closed")


def test_all_panels_together_keep_one_data_budget_and_busy_ones_take_turns(probe, worker):
    """The bytes were budgeted per panel only: one panel of a hundred running rows sends
    ~200 kB/s, and five of them (%tasks shown in several cells during a storm) sent 1 MB/s.
    Every view of the process shares one budget of bytes (pump.TOTAL_BYTES_S; here 100 kB/s):
    busy panels take turns, and a panel that sends little keeps its own pace beside them."""
    import json

    from qmagic.panels.base import set_traits
    from qmagic.panels.view import DATA_BORROW_S, DATA_BURST_S, DataBudget

    rate, chars = 100_000.0, 12_000  # (12 kB: one update each, 10 a second: 120 kB/s a panel)
    busy = [panels.TaskPanel(worker) for _ in range(4)]
    small = panels.TaskPanel(worker)
    views = busy + [small]
    pump = small._qm_pump
    pump.data = DataBudget(rate)

    def always_more(view: Any, size: int) -> Callable[..., int]:
        sends = iter(range(1, 1_000_000))

        def apply(*args: Any) -> int:
            view._qm_touch("more")  # (it always has more to send)
            return set_traits(view._footer, value=f"{next(sends):08d}" + "x" * size)

        return apply

    for view in views:
        view._qm_apply = always_more(view, 200 if view is small else chars)
    start = time.time()
    for view in views:
        view._qm_poke("go")
    of = {view._footer.comm.comm_id: view for view in views}

    def busy_sent() -> list:
        return [m for m in probe.updates(start) if of.get(m[2]) in busy]

    try:  # (after half a second: the first messages went at once, the budget's burst)
        eventually(lambda: sum(len(m[3]["state"]["value"]) for m in busy_sent()
                               if m[0] > start + 0.5) >= 2 * rate, 30,
                   "the busy panels to send two seconds' worth", interval=0.02)
        sent = [m for m in busy_sent() if m[0] > start + 0.5]
        first, last = start + 0.5, sent[-1][0]
        size = sum(len(json.dumps(m[3])) for m in sent)
        counts = {view: sum(1 for m in probe.updates(start) if first <= m[0] <= last and of.get(m[2]) is view)
                  for view in views}
    finally:
        for view in views:
            view.close()
    slack = rate * DATA_BURST_S + 2 * (chars + 1_000)  # (the burst saved up, a message in debt)
    assert size <= rate * (last - first) + slack, (size, last - first)
    assert min(counts[view] for view in busy) >= max(counts[view] for view in busy) // 2, counts
    assert counts[small] >= 2 * max(counts[view] for view in busy), counts
    # a debt is paid, never forgiven; a final state borrows down to DATA_BORROW_S
    bucket = DataBudget(1_000.0)
    now = bucket.time
    bucket.charge(bucket.level(now) + 1_000 + DATA_BORROW_S * 1_000, now)
    assert bucket.wait(now, borrow=False) == pytest.approx(1.0 + DATA_BORROW_S)
    assert bucket.wait(now, borrow=True) == pytest.approx(1.0)
    assert bucket.wait(now + 1.0, borrow=True) == 0.0


def test_under_a_crowded_budget_panels_keep_two_updates_a_second_and_never_exceed_the_setting(probe, worker):
    """Hundreds of live rows share the budget down to a fraction of an update a second; a task
    or lock panel keeps 2 a second (a reviewer: 500 rows left the %tasks panel 2.5 s behind),
    rows go down to 0.1, and no view goes above panel_update_hz (a 0.5 setting stays 0.5)."""
    w = worker
    panel, lock = panels.TaskPanel(w), panels.LockPanel(w)
    task = w.submit("wait_gate", ("crowd",))
    started(w, "crowd")
    row = panels.TaskRow(w, task)
    crowded = type("Crowded", (), {"share_hz": pump_module.TOTAL_MSGS_HZ / 2000})()
    try:
        for view in (panel, lock, row):
            view._qm_pump = crowded  # (as if 2,000 views wanted updates)
        assert panel._qm_hz() == lock._qm_hz() == 2.0 and row._qm_hz() == 0.1
        w.panel_update_hz = 0.5
        assert panel._qm_hz() == lock._qm_hz() == 0.5 and row._qm_hz() == 0.1
    finally:
        w.test_gates.setdefault("crowd", threading.Event()).set()
        for view in (panel, lock, row):
            view._qm_pump = pump_module.current_pump()
            view.close()


def test_a_static_row_reads_as_words_where_its_stylesheet_is_stripped(probe, worker):
    """Found reopening a beamtime notebook in JupyterLab as untrusted (another machine, a
    colleague's copy; GitHub strips <style> too): the static row's fields ran together,
    "cancelledscan(400, 0.1)backgroundqmagic user · mine.ipynb [3]5.5 s", "...point 53/400cancelled
    from the panel". Its text without any stylesheet keeps a space between the fields."""
    from qmagic.panels.cell_rows import static_row

    task = worker.submit("wait_gate", ("unstyled",))
    started(worker, "unstyled")
    task.cancel()
    assert task.wait(5) and task.status.value == "cancelled"
    html = static_row(task)["text/html"]
    body = html[html.index("</style>") + len("</style>"):]
    parser = _Text("qm-row")
    parser.feed(body)
    text = "".join(parser.parts)
    assert re.search(r"^cancelled wait_gate\('unstyled'\) background qmagic user\S* \S+ s 3/10 · point 3 "
                     r"cancelled from Python$", text.replace("\xa0", " ")), text


def test_a_static_rows_stylesheet_styles_only_static_rows():
    """A saved notebook's static row carries a <style>, which a browser applies to the whole
    page: scoped like the live panels' sheet, a notebook's static rows made by another
    qmagic version would restyle the live panels shown beside them.  Every selector of the
    static sheet names the static copy's own class."""
    import re

    from qmagic.panels import styles

    sheet = styles.row_style_html()
    selectors = [sel.strip() for rule in re.findall(r"^([^{\n]+)\{", sheet, re.M) for sel in rule.split(",")]
    assert selectors and all(sel.startswith(f".{styles.PANEL_CLASS} .{styles.STATIC_CLASS}") for sel in selectors), selectors
    assert len(sheet) < 4000  # (a row's rules only: a notebook keeps one per foreground task)


def test_shown_rows_become_static_once_whatever_the_order_of_cell_end_and_task_end(ip, worker, monkeypatch):
    """The race of a task's end (its own thread) against its cell's end (the main thread),
    landing anywhere: every row shown for a running task gets exactly one static update,
    once its task is over: from the task's end when the cell ended first, at the next cell's
    start when the task ended first (never at its own cell's end, nor before; from a thread
    of its own, not the next cell's); both orders happen.
    (What the shell's display publisher is handed is recorded; the parent of each update is
    checked in a real kernel, above.)"""
    import collections
    import random
    import uuid

    from qmagic.panels.shown_rows import ShownRows

    sent: list[tuple[str, str, bool, bool]] = []  # (display id, phase, task done, on the main thread)
    state: dict[str, Any] = {"phase": "cell", "task": None}

    def publish(data, metadata=None, source=None, *, transient=None, update=False, **kwargs):
        assert update and "text/html" in data
        sent.append((transient["display_id"], state["phase"], state["task"].done(),
                     threading.current_thread() is threading.main_thread()))

    monkeypatch.setattr(ip.display_pub, "publish", publish)
    rows = ShownRows(ip)
    rng = random.Random(29)
    orders = {"task first": 0, "cell first": 0}
    for round_ in range(150):
        gate = worker.test_gates.setdefault(f"r{round_}", threading.Event())
        task = worker.submit("wait_gate", (f"r{round_}",))
        state["task"], state["phase"] = task, "cell"
        display_id = uuid.uuid4().hex
        rows.shown(task, display_id, {"header": {"msg_id": f"cell-{round_}"}})
        # a third each: the task ends first, the cell ends first, the two race
        ender = threading.Timer(rng.uniform(0, 0.004) if round_ % 3 == 2 else 0, gate.set)
        if round_ % 3 != 1:
            ender.start()
        if round_ % 3 == 0:
            assert task.wait(10)
        threading.Event().wait(rng.uniform(0, 0.004))  # (the cell runs on a while: the other side)
        state["phase"] = "cell end"
        order = "task first" if task.done() else "cell first"  # (a task may still end before
        orders[order] += 1  # post_run_cell looks: then it too waits for the next cell)
        rows.post_run_cell()
        state["phase"] = "between"
        if round_ % 3 == 1:
            ender.start()
        assert task.wait(10)
        state["phase"] = "next cell"
        rows.pre_run_cell()
        ender.join(10)
        eventually(lambda: any(s[0] == display_id for s in sent), 10, "the row's static update")
        mine = [s for s in sent if s[0] == display_id]
        assert mine[0][2], (round_, order, mine)
        assert mine[0][1] == "next cell" if order == "task first" else mine[0][1] != "cell", (round_, order, mine)
        if mine[0][1] == "next cell":  # (sent by a thread: the next cell is neither held up nor loses its ■)
            assert not mine[0][3], (round_, order, mine)
    assert min(orders.values()) >= 50, orders
    shown = collections.Counter(s[0] for s in sent)
    assert len(shown) == 150 and set(shown.values()) == {1}, shown.most_common(3)
