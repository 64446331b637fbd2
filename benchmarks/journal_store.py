"""Store-level cost of the experiment log (qmagic.store.journal.Journal).

Prints ONE JSON line.  Every figure compares the same work with the log on and off, in
alternating rounds of one run (medians over rounds):

- ``latency``: submit -> result of a no-op task on a one-thread ``ThreadPoolExecutor``, one
  at a time; with the log, ``submitted()`` runs before the future is returned, ``started()``
  when the task starts and ``finished()`` before its result is set (and the two record dicts
  are built).  Measured with every thread pinned (benchmarks/placement.py: all on one CPU,
  and the submitter apart from the pool and the log's writer), each mode in blocks (the
  writer's commits fall on the log's own tasks); the worse placement.  ratio = on / off
  (target <= 1.2).
- ``burst``: 20,000 such tasks back to back, time until the last result.  ratio = throughput
  on / off (target >= 0.8).  The writer stores a burst after it (group commit); its cost is
  reported separately (``writer_cpu_us_per_task``) and in ``sustained_ratio`` (the burst
  plus ``flush()``, until every record is in SQLite).
- ``rss_growth_mb``: resident memory after 300,000 tasks through the log (and flush) minus
  before (target < 50 MB); ``peak_rss_growth_mb`` the high-water mark.
- ``caller_cpu_us_per_task``: CPU of the three journal calls on the calling threads, per
  task (records built beforehand), measured in one thread.
- ``burst_cpu_ratio``: process CPU per task of the burst, off / on (what the throughput
  ratio is on a machine that no other program loads; ``load_average`` tells how loaded
  this one was).

    python benchmarks/journal_store.py [--rounds 5] [--burst 20000] [--latency 5000] [--rss-tasks 300000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import placement  # noqa: E402  (benchmarks/placement.py)

from qmagic.store.journal import Journal

TEMPLATE = {"uid": "", "name": "noop", "kind": "function", "args": [], "kwargs": {}, "user": "alice",
            "user_group": "primary", "background": True, "origin": "python", "status": "queued",
            "submitted_at": 0.0, "started_at": None, "finished_at": None, "progress": None,
            "result": None, "error": None, "error_type": None, "traceback": None, "timeout": None,
            "namespace_changes": None,
            "provenance": {"notebook": "/home/alice/01-getting-started.ipynb", "cell_id": "9a1f",
                           "execution_count": 12, "cell_hash": "5d41402abc"}}


def noop() -> None:
    return None


def make_task(journal: Journal | None, pool: ThreadPoolExecutor, uid: str):
    """Submit one no-op task; with a journal, log it the way the engine will (without, the
    same wrapper runs, minus the journal calls and the record dicts)."""
    if journal is None:
        def bare() -> None:
            time.time()
            result = noop()
            time.time()
            return result
        time.time()
        return pool.submit(bare)
    now = time.time()
    journal.submitted(dict(TEMPLATE, uid=uid, submitted_at=now))

    def run() -> None:
        started = time.time()
        journal.started(uid, started)
        result = noop()
        journal.finished(dict(TEMPLATE, uid=uid, submitted_at=now, started_at=started,
                              finished_at=time.time(), status="completed", result=result))
        return result
    return pool.submit(run)


def latency_side(folder: str, log_on: bool) -> placement.Side:
    """One task at a time through a one-thread pool, with a journal of its own or none."""
    made = iter(range(10**6))

    def make():
        pool = ThreadPoolExecutor(max_workers=1)
        journal = Journal(os.path.join(folder, f"lat-{next(made)}"), "bench") if log_on else None

        def close() -> None:
            pool.shutdown()
            if journal is not None:
                journal.close()
        return (lambda: make_task(journal, pool, str(uuid.uuid4())).result()), close
    return make


def burst_round(journal: Journal | None, pool: ThreadPoolExecutor, uids: list[str]) -> tuple[float, float, float]:
    """(seconds until the last result, CPU seconds of the process meanwhile, seconds until
    every record is in SQLite)."""
    c0, t0 = time.process_time(), time.perf_counter()
    futures = [make_task(journal, pool, uid) for uid in uids]
    for f in futures:
        f.result()
    burst, cpu = time.perf_counter() - t0, time.process_time() - c0
    if journal is not None:
        assert journal.flush(120), journal.health()
    return burst, cpu, time.perf_counter() - t0


def rss_mb() -> tuple[float, float]:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def caller_cpu(journal: Journal, n: int, flush: bool = True) -> float:
    """CPU per task (µs) of submitted() + started() + finished() alone (records built
    beforehand); then, with ``flush``, wait until they are in SQLite."""
    now = time.time()
    work = [(uid, dict(TEMPLATE, uid=uid, submitted_at=now),
             dict(TEMPLATE, uid=uid, submitted_at=now, started_at=now, finished_at=now, status="completed"))
            for uid in (str(uuid.uuid4()) for _ in range(n))]
    t0 = time.thread_time()
    for uid, first, last in work:
        journal.submitted(first)
        journal.started(uid, now)
        journal.finished(last)
    cpu = time.thread_time() - t0
    if flush:
        journal.flush(120)
    return cpu / n * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--burst", type=int, default=20_000)
    parser.add_argument("--latency", type=int, default=5_000)
    parser.add_argument("--rss-tasks", type=int, default=300_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qmagic-bench-") as folder:
        journal = Journal(folder, "bench")
        pool = ThreadPoolExecutor()
        burst_round(journal, pool, [str(uuid.uuid4()) for _ in range(2000)])  # warm up
        burst_round(None, pool, [str(uuid.uuid4()) for _ in range(2000)])
        lat = placement.compare(latency_side(folder, False), latency_side(folder, True), args.latency)
        burst = {"on": [], "off": []}
        burst_cpu = {"on": [], "off": []}
        sustained = []
        writer_cpu = []
        for rnd in range(args.rounds):
            order = ("off", "on") if rnd % 2 == 0 else ("on", "off")
            for mode in order:
                j = journal if mode == "on" else None
                cpu0 = journal._writer.cpu
                b, cpu, s = burst_round(j, pool, [str(uuid.uuid4()) for _ in range(args.burst)])
                burst[mode].append(args.burst / b)
                burst_cpu[mode].append(cpu / args.burst)
                if j is not None:
                    sustained.append(args.burst / s)
                    writer_cpu.append((journal._writer.cpu - cpu0) / args.burst * 1e6)
        cpu_per_task = caller_cpu(journal, 20_000)
        # resident memory over many tasks through the log
        rss0, _ = rss_mb()
        done = 0
        while done < args.rss_tasks:
            n = min(20_000, args.rss_tasks - done)
            futures = [make_task(journal, pool, str(uuid.uuid4())) for _ in range(n)]
            for f in futures:
                f.result()
            done += n
        assert journal.flush(300), journal.health()
        rss1, peak = rss_mb()
        health = journal.health()
        journal.close()
        pool.shutdown()
    thr = {k: statistics.median(v) for k, v in burst.items()}
    result = {
        "benchmark": "journal_store",
        "latency_ratio": lat.pop("ratio"),
        "latency": lat,
        "burst_tasks_per_s": {"off": round(thr["off"]), "on": round(thr["on"]),
                              "ratio": round(thr["on"] / thr["off"], 3)},
        "burst_cpu_us_per_task": {k: round(statistics.median(v) * 1e6, 2) for k, v in burst_cpu.items()},
        "burst_cpu_ratio": round(statistics.median(burst_cpu["off"]) / statistics.median(burst_cpu["on"]), 3),
        "sustained_ratio": round(statistics.median(sustained) / thr["off"], 3),
        "load_average": round(os.getloadavg()[0], 1),
        "rss_growth_mb": round(rss1 - rss0, 1),
        "peak_rss_growth_mb": round(peak - rss0, 1),
        "caller_cpu_us_per_task": round(cpu_per_task, 2),
        "writer_cpu_us_per_task": round(statistics.median(writer_cpu), 2),
        "health": {k: health[k] for k in ("ok", "pending", "dropped")},
        "targets": {"latency_ratio_max": 1.2, "burst_ratio_min": 0.8, "rss_growth_mb_max": 50},
    }
    result["targets_met"] = (result["latency_ratio"] <= 1.2 and result["burst_tasks_per_s"]["ratio"] >= 0.8
                             and result["rss_growth_mb"] < 50 and health["dropped"] == 0)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
