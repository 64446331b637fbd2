"""Benchmark: what a TaskPanel sends during a progress storm, against a naive per-event view.

Storm: ``--tasks`` background tasks, each reporting progress ``--rate`` times per second for
``--seconds`` (paced).  Rounds alternate between two views of the same storm:

- baseline: a naive view that writes one HTML widget per progress event (what a panel
  without coalescing would send);
- qmagic: one ``TaskPanel(show="running")``.

The widgets' comms are replaced by a recording comm (as in tests/test_widgets.py), so the
numbers are the messages a browser would receive, without a kernel.  Prints one JSON line
(medians over the rounds of each kind):

- ``panel_msgs_per_s`` (target <= 10 per panel, ``QMagic.panel_update_hz``) and
  ``baseline_msgs_per_s``; ``msgs_ratio`` = panel / baseline (the coalescing);
  ``panel_msgs_max_1s``: the busiest one-second window of any panel round (target <= 20: a
  final state may borrow one tick);
- ``panel_kb_per_s``: the data those messages carry (target <= 200 kB/s, half the data budget
  of every panel of the kernel together; a message is charged one more update per
  ``qmagic.panels.base.MESSAGE_CHARS`` of text);
- ``final_delay_ms_p95`` / ``_max``: from a task's end to the first panel message showing
  its final state (target p95 <= 150: one tick of 100 ms plus scheduling);
- ``rows_exact``: every panel round ended with every row's exact final status and value/total;
- ``row_cap_ok``: a panel over 10 000 finished tasks shows the newest ``panel_max_rows``
  (200) and counts the rest;
- ``many_rows_msgs_per_s``: sixty live task rows (a loop that displays each task it starts)
  during the same storm, all their messages together (target <= 220: the process's budget
  ``qmagic.panels.pump.TOTAL_MSGS_HZ``, 200, plus final states that borrow a tick; sixty
  rows at 10 each sent 580 before it, and the Jupyter server drops IOPub traffic above
  1,000 per second);
- ``many_panels_kb_per_s``: five TaskPanels (``%tasks`` shown in five cells) during the same
  storm, the data of all their messages together, from the storm's start to the last final
  state shown (target <= 440: the process's budget ``qmagic.panels.view.TOTAL_BYTES_S``, 400
  kB/s, plus final states that borrow; each panel on its own budget sent 530-760);
  ``many_panels_share_min_max``: the least data one of them sent over the most (target >=
  0.5: they take turns); ``many_panels_final_delay_ms_p95`` (target <= 1000: five 63 kB
  rounds of final states exceed the budget, later rounds take turns: five messages take
  0.8 s of it); ``many_panels_rows_exact``: every panel ended exact;
- ``targets_met``: all of the above.

Usage: ``python benchmarks/panels.py [--tasks 100] [--rate 1000] [--seconds 2] [--rounds 3]``
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGETS = {"panel_msgs_per_s_max": 10.0, "panel_kb_per_s_max": 200.0, "panel_msgs_max_1s_max": 20, "final_delay_ms_p95_max": 150.0,
           "many_rows_msgs_per_s_max": 220.0, "many_panels_kb_per_s_max": 440.0, "many_panels_share_min_max_min": 0.5,
           "many_panels_final_delay_ms_p95_max": 1000.0}
ROWS = 60
PANELS = 5


class Recorder:
    """Every comm message the widgets send: (time, msg_type, data, comm_id)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.messages: list[tuple[float, str, dict, str]] = []

    def add(self, msg_type: str, data: dict | None, comm_id: str = "") -> None:
        with self.lock:
            self.messages.append((time.time(), msg_type, data or {}, comm_id))

    def take(self) -> list[tuple[float, str, dict, str]]:
        """The messages so far (and forget them)."""
        with self.lock:
            out, self.messages = self.messages, []
        return out


def install_probe() -> Recorder:
    """Replace the comms ipywidgets creates by recording ones; returns the recorder."""
    import comm
    from comm.base_comm import BaseComm

    recorder = Recorder()

    class ProbeComm(BaseComm):
        kernel = True

        def publish_msg(self, msg_type, data=None, metadata=None, buffers=None, **keys):
            recorder.add(msg_type, data, self.comm_id)

    comm.create_comm = lambda *a, **k: ProbeComm(*a, **k)
    return recorder


def storm_task(seconds: float, rate: int) -> int:
    """Report progress ``rate`` times per second for ``seconds`` (paced)."""
    import qmagic

    n = int(seconds * rate)
    t0 = time.monotonic()
    for i in range(n):
        qmagic.report_progress(i + 1, n)
        ahead = t0 + (i + 1) / rate - time.monotonic()
        if ahead > 0.002:
            time.sleep(ahead)
    return n


class NaiveView:
    """The baseline: one HTML widget, one message per progress event."""

    def __init__(self, worker) -> None:
        import ipywidgets as W

        self.html = W.HTML()
        #: tasks whose last progress event arrived (the event bus merges progress a callback
        #: has not taken yet, so counting events never reached tasks x updates: each round
        #: waited its whole 120 s timeout)
        self.ended: set[str] = set()
        self.all_seen = threading.Event()
        self.expected = -1
        self.sub = worker.subscribe(self._on_event)

    def _on_event(self, task_uid: str, **event) -> None:
        progress = event.get("progress")
        if progress is not None:
            self.html.value = f"{task_uid[:8]} {progress.value}/{progress.total}"
            if progress.value == progress.total:  # (one dispatcher thread calls this)
                self.ended.add(task_uid)
                if len(self.ended) == self.expected:
                    self.all_seen.set()

    def close(self) -> None:
        """End the subscription and close the widget."""
        self.sub.unsubscribe()
        self.html.close()


def rows(html: str) -> dict[str, tuple[str, str]]:
    """{task key: (status, progress text)} of every row in a panel's HTML."""
    out = {}
    for chunk in html.split('<div class="qm-row')[1:]:
        key = re.search(r'data-task="(\w+)"', chunk).group(1)
        status = re.search(r'data-status="(\w+)"', chunk).group(1)
        progress = re.search(r'class="qm-pt"[^>]*>(.*?)</span>', chunk, re.S)
        out[key] = (status, re.sub(r"<[^>]+>", "", progress.group(1)) if progress else "")
    return out


def _window(updates: list[tuple[float, str, dict, str]], start: float, end: float) -> tuple[float, int]:
    """(messages per second between start and end, most messages in any one-second window)."""
    inside = sorted(m[0] for m in updates if start <= m[0] <= end)
    worst, first = 0, 0
    for last, t in enumerate(inside):
        while inside[first] <= t - 1.0:
            first += 1
        worst = max(worst, last - first + 1)
    return len(inside) / max(end - start, 1e-9), worst


def one_round(worker, recorder: Recorder, args, naive: bool, count: int = 1) -> dict:
    """One storm shown by the naive view or by ``count`` TaskPanels; what they sent and how fast
    (all panels together; ``share_min_max``: the least bytes one panel sent over the most)."""
    from qmagic import panels

    views = [NaiveView(worker)] if naive else [panels.TaskPanel(worker, show="running") for _ in range(count)]
    if not naive:
        for view in views:
            view.flush()
    recorder.take()
    start = time.time()
    tasks = [worker.submit("storm_task", (args.seconds, args.rate)) for _ in range(args.tasks)]
    for task in tasks:
        task.wait(120)
    end = max(t.finished_at for t in tasks)
    n = int(args.seconds * args.rate)
    result: dict = {}
    if naive:
        view = views[0]
        view.expected = args.tasks  # the naive view may still be writing a backlog of events
        if len(view.ended) == view.expected:
            view.all_seen.set()
        view.all_seen.wait(120)
        messages = recorder.take()
        updates = [m for m in messages if m[1] == "comm_msg"]
        result["msgs_per_s"], result["max_1s"] = _window(updates, start, max(m[0] for m in updates))
    else:
        keys = {t.uid[:8]: t for t in tasks}
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:  # the panels show every final state by themselves
            if all(f'data-task="{k}" data-status="completed"' in v.row_html() for v in views for k in keys):
                break
            threading.Event().wait(0.01)
        exact = all(rows(v.row_html()).get(k) == ("completed", f"{n}/{n}") for v in views for k in keys)
        messages = recorder.take()
        updates = [m for m in messages if m[1] == "comm_msg" and m[2].get("method") == "update"]
        shown: dict[tuple[str, str], float] = {}
        for when, _, data, comm_id in updates:
            value = (data.get("state") or {}).get("value")
            if isinstance(value, str):
                for key in re.findall(r'data-task="(\w+)" data-status="completed"', value):
                    if key in keys:
                        shown.setdefault((comm_id, key), when)
        # which panel sent what: the comms of each panel's widgets
        ids = {w.comm.comm_id: i for i, v in enumerate(views) for w in v._qm_owned if w.comm is not None}
        firsts: dict[tuple[int | None, str], float] = {}
        for (comm_id, key), when in shown.items():
            at = (ids.get(comm_id), key)
            firsts[at] = min(firsts.get(at, when), when)
        delays = sorted(1000.0 * (when - keys[key].finished_at) for (_, key), when in firsts.items())
        complete = len(firsts) == len(keys) * len(views)
        window_end = max(firsts.values()) if complete else end
        result["msgs_per_s"], result["max_1s"] = _window(updates, start, window_end)
        inside = [m for m in updates if start <= m[0] <= window_end]
        result["kb_per_s"] = sum(len(json.dumps(m[2])) for m in inside) / 1000.0 / max(window_end - start, 1e-9)
        per_view = [sum(len(json.dumps(m[2])) for m in inside if ids.get(m[3]) == i) for i in range(len(views))]
        result["share_min_max"] = min(per_view) / max(max(per_view), 1)
        result["final_delay_ms_p95"] = delays[int(0.95 * (len(delays) - 1))] if delays else float("inf")
        result["final_delay_ms_max"] = delays[-1] if delays else float("inf")
        result["rows_exact"] = bool(exact and complete)
        result["comm_closes"] = sum(1 for m in messages if m[1] == "comm_close")
    result["events_per_s"] = sum(int(t.progress.value) for t in tasks) / (end - start)
    for view in views:
        view.close()
    return result


def many_rows(worker, recorder: Recorder, args) -> float:
    """Messages per second of ROWS live task rows during a storm, all together."""
    from qmagic import panels

    tasks = [worker.submit("storm_task", (args.seconds, args.rate)) for _ in range(ROWS)]
    views = [panels.TaskRow(worker, task) for task in tasks]
    recorder.take()
    start = time.time()
    for task in tasks:
        task.wait(120)
    end = time.time()
    updates = [m for m in recorder.take() if m[1] == "comm_msg" and start <= m[0] <= end]
    for view in views:
        view.close()
    return len(updates) / (end - start)


def row_cap(worker) -> bool:
    """10 000 finished tasks: the newest 200 rows, the rest counted."""
    from qmagic import panels

    tasks = [worker.submit("storm_task", (0.0, 1)) for _ in range(10_000)]
    for task in tasks:
        task.wait(60)
    panel = panels.TaskPanel(worker, show="all")
    panel.flush()
    shown = len(re.findall(r'data-status="', panel.row_html()))
    ok = shown == 200 and panel.hidden == len(worker.tasks()) - 200 and "older tasks not shown" in panel._footer.value
    panel.close()
    return ok


def main(argv: list[str] | None = None) -> dict:
    """Run the rounds and print the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--rate", type=int, default=1000, help="progress reports per second per task")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each kind (alternating)")
    args = parser.parse_args(argv)
    state = tempfile.TemporaryDirectory(prefix="qmagic-bench-")  # removed at exit
    os.environ.setdefault("QMAGIC_STATE_DIR", state.name)

    recorder = install_probe()
    import qmagic
    from qmagic import panels

    worker = qmagic.Worker({"storm_task": storm_task}, max_background_tasks=max(32, args.tasks),
                           max_finished_tasks=20_000, max_queued_tasks=20_000, journal_enabled=False)
    base, ours = [], []
    try:
        for _ in range(args.rounds):
            base.append(one_round(worker, recorder, args, naive=True))
            ours.append(one_round(worker, recorder, args, naive=False))
        together = [one_round(worker, recorder, args, naive=False, count=PANELS) for _ in range(args.rounds)]
        cap_ok = row_cap(worker)
        crowd = statistics.median(many_rows(worker, recorder, args) for _ in range(args.rounds))
    finally:
        panels.detach(None, worker)
        worker.close()

    def med(rounds: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in rounds)

    result = {
        "benchmark": "panels",
        "rounds": args.rounds,
        "tasks": args.tasks,
        "rate_per_task": args.rate,
        "storm_s": args.seconds,
        "events_per_s": round(med(ours, "events_per_s")),
        "baseline_msgs_per_s": round(med(base, "msgs_per_s"), 1),
        "panel_msgs_per_s": round(med(ours, "msgs_per_s"), 1),
        "panel_kb_per_s": round(med(ours, "kb_per_s"), 1),
        "msgs_ratio": round(med(ours, "msgs_per_s") / med(base, "msgs_per_s"), 5),
        "panel_msgs_max_1s": max(r["max_1s"] for r in ours),
        "final_delay_ms_p95": round(med(ours, "final_delay_ms_p95"), 1),
        "final_delay_ms_max": round(max(r["final_delay_ms_max"] for r in ours), 1),
        "rows_exact": all(r["rows_exact"] for r in ours),
        "row_cap_ok": cap_ok,
        "many_rows_msgs_per_s": round(crowd, 1),
        "many_panels_kb_per_s": round(med(together, "kb_per_s"), 1),
        "many_panels_share_min_max": round(min(r["share_min_max"] for r in together), 2),
        "many_panels_final_delay_ms_p95": round(med(together, "final_delay_ms_p95"), 1),
        "many_panels_rows_exact": all(r["rows_exact"] for r in together),
        "targets": TARGETS,
    }
    result["targets_met"] = bool(
        result["panel_msgs_per_s"] <= TARGETS["panel_msgs_per_s_max"]
        and result["panel_kb_per_s"] <= TARGETS["panel_kb_per_s_max"]
        and result["panel_msgs_max_1s"] <= TARGETS["panel_msgs_max_1s_max"]
        and result["final_delay_ms_p95"] <= TARGETS["final_delay_ms_p95_max"]
        and result["rows_exact"] and result["row_cap_ok"]
        and result["many_rows_msgs_per_s"] <= TARGETS["many_rows_msgs_per_s_max"]
        and result["many_panels_kb_per_s"] <= TARGETS["many_panels_kb_per_s_max"]
        and result["many_panels_share_min_max"] >= TARGETS["many_panels_share_min_max_min"]
        and result["many_panels_final_delay_ms_p95"] <= TARGETS["many_panels_final_delay_ms_p95_max"]
        and result["many_panels_rows_exact"]
    )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
