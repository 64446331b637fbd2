"""Cost of journaling one task (a "start" and an "end" line) in qmagic.journal.

Prints ONE JSON line.  Baselines, measured interleaved in the same run:

- ``engine``: a no-op background task through ``qmagic.engine.Engine`` (new_task, start,
  wait); the journaled run adds ``task.to_dict()`` + ``append("start")`` before the start
  and ``to_dict()`` + ``append("end")`` after the end, as the worker will.
  ``ratio`` = journaled / baseline (issue 7's target for the end-to-end benchmark,
  ``benchmarks/journal.py`` with the whole worker: <= 1.5).
- ``pool``: the bare minimum of a background task (hand a no-op to a pool thread, wait).

    python benchmarks/journal_store.py [--tasks N] [--fsync-tasks N] [--no-orjson]
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import qmagic.journal  # noqa: E402
from qmagic.journal import Journal  # noqa: E402


def task_dict(uid: str, status: str, now: float) -> dict:
    """A record shaped like the worker's Task.to_dict() for a small function call."""
    done = status != "running"
    return {"uid": uid, "name": "noop", "kind": "function", "args": [1, 2.5, "sample-A"],
            "kwargs": {"exposure": 0.1}, "user": "alice", "user_group": "primary",
            "background": True, "origin": "magic", "status": status, "submitted_at": now,
            "started_at": now, "finished_at": now if done else None,
            "progress": {"value": 1, "total": 1, "message": None} if done else None,
            "result": None, "error": None, "error_type": None, "traceback": None,
            "namespace_changes": None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--fsync-tasks", type=int, default=200)
    parser.add_argument("--no-orjson", action="store_true", help="encode with the json module only")
    args = parser.parse_args()
    if args.no_orjson:
        qmagic.journal._orjson = None

    jobs: queue.SimpleQueue = queue.SimpleQueue()

    def pool_thread() -> None:
        while (job := jobs.get()) is not None:
            job.set()  # the no-op task, then "finished"

    worker = threading.Thread(target=pool_thread, daemon=True)
    worker.start()

    try:
        from qmagic.engine import Engine

        engine = Engine()
    except Exception as exc:  # noqa: BLE001 - the engine is optional here
        engine, engine_error = None, f"{type(exc).__name__}: {exc}"
    else:
        engine_error = None

    def noop() -> None:
        return None

    def run_engine_task(journal: Journal | None) -> int:
        t0 = time.perf_counter_ns()
        task = engine.new_task(noop, name="noop", background=True, user="alice",
                               user_group="primary")
        if journal is not None:
            journal.append("start", task.to_dict())
        engine.start(task)
        task.wait(10)
        if journal is not None:
            journal.append("end", task.to_dict())
        return time.perf_counter_ns() - t0

    def run_task(journal: Journal | None, n: int) -> int:
        t0 = time.perf_counter_ns()
        uid = f"task-{n}"
        if journal is not None:
            journal.append("start", task_dict(uid, "running", time.time()))
        done = threading.Event()
        jobs.put(done)
        done.wait()
        if journal is not None:
            journal.append("end", task_dict(uid, "completed", time.time()))
        return time.perf_counter_ns() - t0

    with tempfile.TemporaryDirectory() as tmp:
        journal = Journal(tmp, "bench")
        synced = Journal(tmp, "bench-fsync", fsync=True)
        pair, base, with_journal, fsync_pair, e_base, e_journal = [], [], [], [], [], []
        for n in range(200):  # warm up (file creation, caches, engine threads)
            run_task(journal, -n)
            run_task(None, -n)
            if engine is not None:
                run_engine_task(journal)
                run_engine_task(None)
        for n in range(args.tasks):  # interleaved, so drift hits all alike
            base.append(run_task(None, n))
            with_journal.append(run_task(journal, n))
            if engine is not None:
                e_base.append(run_engine_task(None))
                e_journal.append(run_engine_task(journal))
            t0 = time.perf_counter_ns()
            journal.append("start", task_dict(f"p{n}", "running", time.time()))
            journal.append("end", task_dict(f"p{n}", "completed", time.time()))
            pair.append(time.perf_counter_ns() - t0)
        for n in range(args.fsync_tasks):
            t0 = time.perf_counter_ns()
            synced.append("start", task_dict(f"s{n}", "running", time.time()))
            synced.append("end", task_dict(f"s{n}", "completed", time.time()))
            fsync_pair.append(time.perf_counter_ns() - t0)
        lines = journal.path.read_bytes().splitlines()
        bytes_per_task = sum(len(line) + 1 for line in lines[-2:])
        errors = journal.errors + synced.errors
        journal.close()
        synced.close()
    jobs.put(None)
    if engine is not None:
        engine.close()

    def med_us(values: list[int]) -> float:
        return round(statistics.median(values) / 1000, 2)

    print(json.dumps({
        "benchmark": "journal_store",
        "tasks": args.tasks,
        "encoder": "json" if qmagic.journal._orjson is None else "orjson",
        "append_start_end_median_us": med_us(pair),
        "append_start_end_p90_us": round(statistics.quantiles(pair, n=10)[-1] / 1000, 2),
        "append_start_end_fsync_median_us": med_us(fsync_pair),
        "baseline_noop_engine_task_median_us": med_us(e_base) if e_base else None,
        "journaled_noop_engine_task_median_us": med_us(e_journal) if e_journal else None,
        "ratio": round(statistics.median(e_journal) / statistics.median(e_base), 2)
        if e_base else None,
        "target_ratio": 1.5,
        "engine_error": engine_error,
        "baseline_noop_pool_task_median_us": med_us(base),
        "journaled_noop_pool_task_median_us": med_us(with_journal),
        "pool_ratio": round(statistics.median(with_journal) / statistics.median(base), 2),
        "bytes_per_task": bytes_per_task,
        "errors": errors,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
