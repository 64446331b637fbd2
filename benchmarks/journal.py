"""Cost of the experiment log through the worker: the same tasks with the log on and off.

Prints ONE JSON line of ratios against a baseline measured in the same run (two workers in
one process, each with its own state folder; the log on for one, off for the other; the
order alternates from round to round; medians over rounds):

- ``latency``: ``worker.submit(noop)`` -> ``result()`` of one background no-op task at a
  time, a worker with one background thread, log on vs off, measured with every thread
  pinned (benchmarks/placement.py): all on one CPU (``same_cpu``: the log's writer thread
  then takes its time from the tasks') and the submitter apart from the worker's threads
  (``cross_cpu``); the worse of the two is the figure.  Each worker in blocks, so its
  writer's commits fall on its own tasks.  ratio = median on / median off    [target <= 1.2]
- ``burst``: 32 threads submit no-op tasks back to back (released together by a barrier),
  then wait for them all; tasks per second until the last result.  ratio = on / off
                                                                           [target >= 0.8]
- ``rss``: resident memory growth while 100,000 tasks go through a worker (after a warm-up
  of 25,000 tasks each; the log's records all in SQLite before the second reading), in MB
  per 100k tasks, the mean of two measurements per worker (order off, on, on, off);
  ``log_mb`` = on - off is what the log adds                        [target: log_mb <= 15]

``floor``: what any log behind the engine's observer hook must cost the task path at the
least, three ways, each a worker with the log off plus one observer (the engine then builds
each task's final record and tells it three events: queued, started, ended), against the same
baseline; reported, not targets:

- ``interface``: an observer that does nothing (the hook's own cost);
- ``memory``: an observer that writes three fixed-size records (uid, event, time) into a
  preallocated shared file mapping: what survives a SIGKILL with no system call, no encoding
  and no SQLite (a design the log does not use: a file cut short by another program, or a full
  disk, would end the kernel with SIGBUS);
- ``write``: three pre-encoded lines with the log's own one-``write(2)`` append (uid durable
  before the caller sees it, the start before the code runs, the end before waiters wake).

The log of the "on" worker must hold every task, completed, once it is closed (``records``:
nothing else, nothing dropped), and an idle log must store what waits within 10 s
(``log_stalls`` counts the times it did not), or ``targets_met`` is false.  Another benchmark,
``benchmarks/journal_store.py``, measures the store alone (no worker).

    python benchmarks/journal.py [--rounds 11] [--latency 4000] [--burst 4096] [--rss-tasks 100000]
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import mmap
import os
import sqlite3
import statistics
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import orjson  # noqa: E402
import placement  # noqa: E402  (benchmarks/placement.py)
from traitlets.config import Config

from qmagic import Worker
from qmagic.store.database import database_path
from qmagic.store.records import RecordEncoder
from qmagic.store.segments import AppendFile

THREADS = 32
TARGETS = {"latency_ratio_max": 1.2, "burst_ratio_min": 0.8, "log_rss_mb_per_100k_max": 15.0}


def noop() -> None:
    return None


def make_worker(state_dir: str, log_on: bool, queue: int, **settings) -> Worker:
    config = Config()
    for key, value in settings.items():
        setattr(config.QMagic, key, value)
    config.QMagic.state_dir = state_dir
    config.QMagic.journal_enabled = log_on
    config.QMagic.max_queued_tasks = queue
    config.QMagic.journal_max_bytes = 10**12  # (retention would delete the oldest records)
    return Worker({"noop": noop}, config=config)


class Interface:
    """The ``interface`` floor: an observer (``qmagic.core.engine.TaskObserver``) doing nothing."""

    def task_submitted(self, task) -> None:
        pass

    def task_started(self, task) -> None:
        pass

    def task_finished(self, task, record) -> None:
        pass

    def close(self) -> None:
        pass


class MemoryOnly(Interface):
    """The ``memory`` floor: three fixed-size records per task in a shared file mapping."""

    SLOT = struct.Struct("<36sBd")  # uid, event (1 queued, 2 started, 3 ended), time

    def __init__(self, path: str, slots: int = 1 << 18) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.posix_fallocate(fd, 0, 64 * slots)  # (allocated: writing can't hit a full disk)
            self.map = mmap.mmap(fd, 64 * slots)
        finally:
            os.close(fd)
        self.slots, self.next = slots, itertools.count()
        self.pack = self.SLOT.pack_into

    def put(self, uid: str, event: int, at: float | None) -> None:
        self.pack(self.map, 64 * (next(self.next) % self.slots), uid.encode(), event, at or 0.0)

    def task_submitted(self, task) -> None:
        self.put(task.uid, 1, task.submitted_at)

    def task_started(self, task) -> None:
        self.put(task.uid, 2, task.started_at)

    def task_finished(self, task, record) -> None:
        self.put(task.uid, 3, record["finished_at"])

    def close(self) -> None:
        self.map.close()


class AppendsOnly(Interface):
    """The ``write`` floor: one durable ``write(2)`` append per task event, no more."""

    def __init__(self, path: str, lines: tuple[bytes, bytes, bytes]) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.out = AppendFile(fd, 1 << 40, 0)
        self.queued, self.started, self.ended = lines

    def task_submitted(self, task) -> None:
        self.out.write(self.queued)

    def task_started(self, task) -> None:
        self.out.write(self.started)

    def task_finished(self, task, record) -> None:
        self.out.write(self.ended)

    def close(self) -> None:
        os.close(self.out.fd)


def record_lines(worker: Worker) -> tuple[bytes, bytes, bytes]:
    """The log's three lines of a real no-op task (queued, started, ended)."""
    task = worker.submit("noop")
    task.result(30)
    encoder, record = RecordEncoder(), task.to_dict()
    queued = encoder.encode(dict(record, status="queued", started_at=None, finished_at=None))
    started = orjson.dumps([2, task.uid, task.started_at], option=orjson.OPT_APPEND_NEWLINE)
    return queued, started, encoder.encode(record, final=True)


FLOORS = ("interface", "memory", "write")


def with_floor(worker: Worker, floor: str, path: str) -> Worker:
    """``worker`` (log off) with the observer of ``floor``; it closes with the worker."""
    observer = (Interface() if floor == "interface" else MemoryOnly(path) if floor == "memory"
                else AppendsOnly(path, record_lines(worker)))
    worker.engine.observers.append(observer)
    close = worker.close

    def close_both() -> None:
        close()
        observer.close()
    worker.close = close_both  # type: ignore[method-assign]
    return worker


def latency_side(root: str, mode: str) -> placement.Side:
    """A worker with one background thread and its own state folder, for placement.compare;
    ``mode``: "off", "on" or one of FLOORS."""
    made = iter(range(10**6))

    def make():
        folder = os.path.join(root, f"{mode}-{next(made)}")
        worker = make_worker(folder, mode == "on", 1000, max_background_tasks=1)
        if mode in FLOORS:
            with_floor(worker, mode, folder + ".floor")
        return (lambda: worker.submit("noop").result(30)), worker.close
    return make


def burst(worker: Worker, n: int) -> float:
    """Tasks per second: THREADS threads submit n tasks in all, then wait for theirs."""
    per_thread = n // THREADS
    barrier = threading.Barrier(THREADS + 1)
    failures: list[BaseException] = []

    def submitter() -> None:
        try:
            barrier.wait(30)
            tasks = [worker.submit("noop") for _ in range(per_thread)]
            for t in tasks:
                t.result(60)
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [threading.Thread(target=submitter) for _ in range(THREADS)]
    for th in threads:
        th.start()
    barrier.wait(30)
    t0 = time.perf_counter()
    for th in threads:
        th.join(120)
    elapsed = time.perf_counter() - t0
    if failures:
        raise RuntimeError(f"burst failed: {failures[0]!r}")
    return per_thread * THREADS / elapsed


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


#: How often an idle log kept records waiting longer than STALL_S (should be never: an
#: idle log stores what waits within 2 s plus the time to store it).
STALLS = [0]
STALL_S = 10.0


def settle(worker: Worker) -> None:
    """Wait until the log (if on) has stored everything (at most STALL_S); collect garbage."""
    if worker.journal_enabled:
        deadline = time.monotonic() + STALL_S
        while worker.log_health()["pending"]:
            if time.monotonic() > deadline:
                STALLS[0] += 1
                break
            time.sleep(0.01)
    gc.collect()


def run_many(worker: Worker, n: int) -> None:
    """n tasks, in batches of 10,000."""
    done = 0
    while done < n:
        tasks = [worker.submit("noop") for _ in range(min(10_000, n - done))]
        for t in tasks:
            t.result(60)
        done += len(tasks)


def rss_growth(worker: Worker, n: int) -> float:
    """MB of resident memory gained while n tasks ran."""
    settle(worker)
    before = rss_mb()
    run_many(worker, n)
    settle(worker)
    return rss_mb() - before


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--latency", type=int, default=4000, help="tasks per side and placement")
    parser.add_argument("--burst", type=int, default=4096, help="tasks per burst")
    parser.add_argument("--rss-tasks", type=int, default=100_000)
    args = parser.parse_args()
    queue = max(args.burst, 10_000) + 1000
    with tempfile.TemporaryDirectory(prefix="qmagic-bench-") as tmp:
        workers = {"off": make_worker(os.path.join(tmp, "off"), False, queue),
                   "on": make_worker(os.path.join(tmp, "on"), True, queue)}
        for floor in FLOORS:
            workers[floor] = with_floor(make_worker(os.path.join(tmp, floor), False, queue),
                                        floor, os.path.join(tmp, floor + ".floor"))
        ran = 0  # tasks run by the "on" worker
        try:
            lat = placement.compare(latency_side(tmp, "off"), latency_side(tmp, "on"), args.latency)
            floor_lat = {floor: placement.compare(latency_side(tmp, "off"), latency_side(tmp, floor),
                                                  args.latency, aa=False) for floor in FLOORS}
            for w in workers.values():  # warm up: threads, caches, the database
                burst(w, 4 * THREADS * 20)
            ran += 4 * THREADS * 20
            rate: dict[str, list[float]] = {mode: [] for mode in workers}
            for rnd in range(args.rounds):
                order = ("off", "on", *FLOORS)
                order = order if rnd % 2 == 0 else order[::-1]
                for mode in order:
                    settle(workers[mode])  # (the previous burst's records stored first)
                    rate[mode].append(burst(workers[mode], args.burst))
                ran += args.burst // THREADS * THREADS
            for mode in ("off", "on"):  # the process's heap reaches its size for this load
                run_many(workers[mode], args.rss_tasks // 4)
            growths: dict[str, list[float]] = {"off": [], "on": []}
            for mode in ("off", "on", "on", "off"):  # (both orders: the first one pays more)
                growths[mode].append(rss_growth(workers[mode], args.rss_tasks))
            growth = {mode: statistics.mean(v) for mode, v in growths.items()}
            ran += args.rss_tasks // 4 + 2 * args.rss_tasks
            settle(workers["on"])
            health = workers["on"].log_health()
        finally:
            for w in workers.values():
                w.close()
        # (read once the log is closed: a record whose end was lost reads as failed now)
        db = sqlite3.connect(database_path(Path(tmp, "on"), "default"))
        try:
            records = dict(db.execute("SELECT status, count(*) FROM tasks GROUP BY status").fetchall())
        finally:
            db.close()
    med_rate = {k: statistics.median(v) for k, v in rate.items()}
    per_100k = {k: v * 100_000 / args.rss_tasks for k, v in growth.items()}
    result = {
        "benchmark": "journal",
        "latency_ratio": lat.pop("ratio"),
        "latency": lat,
        "burst_tasks_per_s": {"off": round(med_rate["off"]), "on": round(med_rate["on"]),
                              "ratio": round(med_rate["on"] / med_rate["off"], 3), "threads": THREADS},
        "rss_mb_per_100k": {"off": round(per_100k["off"], 1), "on": round(per_100k["on"], 1),
                            "log_mb": round(per_100k["on"] - per_100k["off"], 1)},
        "records": {"ran": ran, "completed_in_log": records.get("completed", 0),
                    "other_in_log": sum(records.values()) - records.get("completed", 0),
                    "pending_before_close": health["pending"], "dropped": health["dropped"]},
        "floor": {floor: {"latency_ratio": floor_lat[floor].pop("ratio"),
                          "latency": {p: floor_lat[floor][p] for p in placement.PLACEMENTS},
                          "burst_ratio": round(med_rate[floor] / med_rate["off"], 3)}
                  for floor in FLOORS},
        "log_stalls": STALLS[0],
        "rounds": args.rounds,
        "load_average": round(os.getloadavg()[0], 1),
        "targets": TARGETS,
    }
    result["targets_met"] = (
        result["latency_ratio"] <= TARGETS["latency_ratio_max"]
        and result["burst_tasks_per_s"]["ratio"] >= TARGETS["burst_ratio_min"]
        and result["rss_mb_per_100k"]["log_mb"] <= TARGETS["log_rss_mb_per_100k_max"]
        and records == {"completed": ran} and health["dropped"] == 0 and health["ok"] and STALLS[0] == 0
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
