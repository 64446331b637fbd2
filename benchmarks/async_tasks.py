"""Coroutine-task benchmark: qmagic coroutine tasks against bare asyncio on the same loop.

Prints one JSON line:
- latency_ratio: median submit->result latency of a no-op ``async def`` task (2000 runs),
  qmagic ``Worker.submit(...).result()`` / ``asyncio.run_coroutine_threadsafe(...).result()``
  on qmagic's own loop thread, with every thread pinned (benchmarks/placement.py: all on
  one CPU, and the submitter apart from the loop); the worse of the two        [target <= 2.0]
- cancel_ms: median time from ``task.cancel()`` of a running coroutine task (suspended in an
  ``await``) until it reads cancelled (``task.wait()`` returned, status cancelled; 300 runs)
                                                                              [target < 10 ms]
  cancel_ratio: the same against cancelling a bare asyncio task on that loop from another
  thread (``loop.call_soon_threadsafe(atask.cancel)``) until its ``finally`` has run
  (reported, no target).

Baseline and qmagic alternate in rounds (drift cancels); medians.

Usage: python benchmarks/async_tasks.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import placement  # noqa: E402  (benchmarks/placement.py)
from traitlets.config import Config  # noqa: E402

from qmagic import TaskStatus, Worker  # noqa: E402

TIMEOUT = 10.0


async def noop() -> None:
    return None


class Parked:
    """``await parked.run()`` suspends until cancelled; ``started`` is set once it waits."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.ended = threading.Event()

    async def run(self) -> None:
        self.started.set()
        try:
            await asyncio.Event().wait()
        finally:
            self.ended.set()


def make_worker(namespace: dict) -> Worker:
    config = Config()
    config.QMagic.journal_enabled = False  # measure the engine alone
    config.QMagic.async_loop = "qmagic"  # qmagic's own loop, whatever is imported
    return Worker(namespace, config=config)


def _rounds(n: int, rounds: int) -> list[int]:
    return [n // rounds] * rounds


def asyncio_side():
    """The baseline: ``asyncio.run_coroutine_threadsafe`` on qmagic's loop thread."""
    worker = make_worker({"noop": noop})
    loop = worker.engine.loops.own_loop()
    return (lambda: asyncio.run_coroutine_threadsafe(noop(), loop).result(TIMEOUT)), worker.close


def qmagic_side():
    """qmagic: ``Worker.submit("noop").result()``, run on the same kind of loop thread."""
    worker = make_worker({"noop": noop})
    worker.engine.loops.own_loop()
    return (lambda: worker.submit("noop").result(TIMEOUT)), worker.close


def _cancel_bare(loop: asyncio.AbstractEventLoop) -> float:
    parked = Parked()
    holder: dict = {}

    def start() -> None:
        holder["task"] = loop.create_task(parked.run())

    loop.call_soon_threadsafe(start)
    if not parked.started.wait(TIMEOUT):
        raise RuntimeError("the bare coroutine never started")
    t0 = time.perf_counter()
    loop.call_soon_threadsafe(holder["task"].cancel)
    if not parked.ended.wait(TIMEOUT):
        raise RuntimeError("the bare coroutine was not cancelled")
    return time.perf_counter() - t0


def _cancel_task(worker: Worker) -> float:
    parked = Parked()
    task = worker.submit(parked.run)
    if task.kind != "coroutine":
        raise RuntimeError("not a coroutine task")
    if not parked.started.wait(TIMEOUT):
        raise RuntimeError("the coroutine task never started")
    t0 = time.perf_counter()
    task.cancel()
    if not task.wait(TIMEOUT):
        raise RuntimeError("the coroutine task was not cancelled")
    elapsed = time.perf_counter() - t0
    if task.status is not TaskStatus.CANCELLED:
        raise RuntimeError(f"the coroutine task ended {task.status.value}, not cancelled")
    return elapsed


def cancel(n: int, rounds: int = 10) -> tuple[float, float]:
    """Median cancel -> reads cancelled time: bare asyncio task, then qmagic task."""
    worker = make_worker({})
    loop = worker.engine.loops.own_loop()
    base, ours = [], []
    try:
        for _ in range(20):
            _cancel_bare(loop)
            _cancel_task(worker)
        for block in _rounds(n, rounds):
            base.extend(_cancel_bare(loop) for _ in range(block))
            ours.extend(_cancel_task(worker) for _ in range(block))
    finally:
        worker.close()
    return statistics.median(base), statistics.median(ours)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts (smoke run)")
    opts = parser.parse_args()
    scale = 10 if opts.quick else 1
    state = tempfile.TemporaryDirectory(prefix="qmagic-bench-")  # removed at exit
    os.environ.setdefault("QMAGIC_STATE_DIR", state.name)

    lat = placement.compare(asyncio_side, qmagic_side, 2000 // scale)
    cancel_base, cancel_ours = cancel(300 // scale)
    result = {
        "benchmark": "async_tasks",
        "latency_ratio": lat.pop("ratio"),
        "latency": lat,
        "latency_ratio_target_max": 2.0,
        "cancel_baseline_ms": round(cancel_base * 1e3, 3),
        "cancel_ms": round(cancel_ours * 1e3, 3),
        "cancel_ratio": round(cancel_ours / cancel_base, 3),
        "cancel_ms_target_max": 10.0,
        "quick": opts.quick,
    }
    result["targets_met"] = result["latency_ratio"] <= 2.0 and result["cancel_ms"] < 10.0
    print(json.dumps(result))


if __name__ == "__main__":
    main()
