"""Benchmark: what one TaskPanel sends during a progress storm, and how late the final state is.

Storm: 100 background tasks, each reporting progress 1000 times per second for 3 s (paced),
shown in one ``TaskPanel(show="running")``.  The widgets' comms are replaced by a recording
comm (as in tests/test_widgets.py), so the numbers are the messages the panel would send to
a browser, without a kernel.  Prints one JSON line:

- ``panel_comm_msgs_per_s``: comm update messages per second sent by the panel during the
  storm (target <= 10 per panel), ``panel_comm_msgs_max_1s``: the busiest one-second window;
  ``comm_opens`` / ``comm_closes``: widgets created / closed (rows' buttons; not rate-limited
  by the Jupyter server);
- ``final_delay_ms_*``: delay between a task's last event (its end) and the first message
  showing its final state (target < 200 ms);
- ``rows_exact``: every row ends with its task's final status and exact value/total.

Usage: ``python benchmarks/panels.py [--tasks 100] [--rate 1000] [--seconds 3]``
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class Recorder:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.messages: list[tuple[float, str, dict]] = []

    def add(self, msg_type: str, data: dict | None) -> None:
        with self.lock:
            self.messages.append((time.time(), msg_type, data or {}))


def install_probe() -> Recorder:
    import comm
    from comm.base_comm import BaseComm

    recorder = Recorder()

    class ProbeComm(BaseComm):
        kernel = True

        def publish_msg(self, msg_type, data=None, metadata=None, buffers=None, **keys):
            recorder.add(msg_type, data)

    comm.create_comm = lambda *a, **k: ProbeComm(*a, **k)
    return recorder


def row_text(html: str, key: str) -> tuple[str, str]:
    """(status, progress text) of the row of task ``key`` in a panel's HTML."""
    start = html.find(f'data-task="{key}"')
    if start < 0:
        return ("", "")
    end = html.find('class="qmagic-task-row', start)
    chunk = html[start:end if end > 0 else None]
    status = re.search(r'data-status="(\w+)"', chunk)
    progress = re.search(r'class="qmagic-progress-text"[^>]*>(.*?)</span></span>', chunk, re.S)
    text = re.sub(r"<[^>]+>", "", progress.group(1)) if progress else ""
    return (status.group(1) if status else "", text)


def storm_task(seconds: float, rate: int) -> int:
    import qmagic

    n = int(seconds * rate)
    t0 = time.monotonic()
    for i in range(n):
        qmagic.report_progress(i + 1, n)
        ahead = t0 + (i + 1) / rate - time.monotonic()
        if ahead > 0.002:
            time.sleep(ahead)
    return n


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--rate", type=int, default=1000, help="progress reports per second per task")
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args(argv)

    recorder = install_probe()
    import qmagic
    from qmagic import widgets

    worker = qmagic.Worker({"storm_task": storm_task}, max_background_tasks=max(32, args.tasks))
    delivered = [0]

    def count(**event):  # how many events subscribers actually received
        if "progress" in event:
            delivered[0] += 1

    counting = worker.subscribe(count)
    panel = widgets.TaskPanel(worker, show="running")
    panel.flush()
    with recorder.lock:
        recorder.messages.clear()
    start = time.time()
    tasks = [worker.submit("storm_task", (args.seconds, args.rate)) for _ in range(args.tasks)]
    for task in tasks:
        task.wait(120)
    end = max(t.finished_at for t in tasks)

    # wait (bounded) until the panel shows every final state by itself
    n = int(args.seconds * args.rate)
    keys = {t.uid[:8]: t for t in tasks}
    deadline = time.monotonic() + 5.0
    done_re = re.compile(r'data-task="(\w+)" data-status="completed"')
    while time.monotonic() < deadline:
        if all(f'data-task="{k}" data-status="completed"' in panel.row_html() for k in keys):
            break
        threading.Event().wait(0.01)
    html = panel.row_html()
    exact = all(row_text(html, key) == ("completed", f"{n}/{n}") for key in keys)

    with recorder.lock:
        messages = list(recorder.messages)
    updates = [m for m in messages if m[1] == "comm_msg" and m[2].get("method") == "update"]
    shown: dict[str, float] = {}
    for when, _, data in updates:
        value = (data.get("state") or {}).get("value")
        if isinstance(value, str) and "data-status=\"completed\"" in value:
            for key in done_re.findall(value):
                shown.setdefault(key, when)
    delays = sorted(1000.0 * (shown[k] - t.finished_at) for k, t in keys.items() if k in shown)
    # the window: from the first submit until the panel showed the last final state
    window_end = max(shown.values()) if len(shown) == len(keys) else end
    in_storm = [m for m in updates if start <= m[0] <= window_end]
    seconds = max(window_end - start, 1e-9)
    times = [m[0] for m in in_storm]
    worst = max((sum(1 for t in times if s <= t < s + 1.0) for s in times), default=0)
    rate_limited = [m for m in messages if m[1] in ("comm_msg", "comm_close") and start <= m[0] <= window_end]
    result = {
        "benchmark": "panels",
        "tasks": args.tasks,
        "target_rate_per_task": args.rate,
        "storm_s": round(end - start, 2),
        "progress_events_per_s": round(sum(int(t.progress.value) for t in tasks) / (end - start)),
        "events_delivered_per_s": round(delivered[0] / (end - start)),
        "panel_comm_msgs_per_s": round(len(in_storm) / seconds, 1),
        "panel_comm_msgs_max_1s": worst,
        "panel_rate_limited_msgs_per_s": round(len(rate_limited) / seconds, 1),
        "panel_applications": panel.applications,
        "comm_opens": sum(1 for m in messages if m[1] == "comm_open"),
        "comm_closes": sum(1 for m in messages if m[1] == "comm_close"),
        "final_delay_ms_median": round(statistics.median(delays), 1) if delays else None,
        "final_delay_ms_p95": round(delays[int(0.95 * (len(delays) - 1))], 1) if delays else None,
        "final_delay_ms_max": round(delays[-1], 1) if delays else None,
        "final_states_shown": len(delays),
        "rows_exact": bool(exact and len(delays) == args.tasks),
        "targets": {"panel_comm_msgs_per_s": 10, "final_delay_ms": 200},
    }
    counting.unsubscribe()
    widgets.detach(None, worker)
    worker.close()
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
