"""Latency of two executors compared with their threads *placed*, not left to the scheduler.

Why.  On these 2-vCPU virtual machines a submit->result round trip costs about 17 µs when
the submitting thread and the worker thread share a CPU, and 45-65 µs when they do not (a
wake-up that crosses vCPUs makes the hypervisor wake a halted one).  Where the kernel's
scheduler puts the worker thread is not decided by the executor under test: measured here,
alternating blocks of two *identical* ``ThreadPoolExecutor`` s put the second one's thread on
the submitter's CPU 59 % of the time and the first one's 0 % (medians 26.6 vs 50.8 µs: a
"ratio" of 1.9 between identical executors).  A ratio of unplaced medians therefore says
which side the scheduler favoured, not what either side costs.

How.  Each placement is measured on its own, every thread of both sides pinned:

- ``same_cpu``: the submitter and the executors' threads on one CPU (each side pays its own
  work and a context switch);
- ``cross_cpu``: the submitter on one CPU, the executors' threads (started while the
  submitter was pinned to the other one, so they inherit that) on another (each side pays
  its work and two wake-ups across CPUs).

The two sides alternate in rounds (drift cancels); medians.  An A/A check measures the
baseline against a second copy of itself the same way: its ratio should be 1.0, and says how
far the method can be trusted on this machine.  Linux only (``os.sched_setaffinity``);
elsewhere, or with one CPU, the placements that cannot be made are ``None``.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any, Callable

#: A side of the comparison: ``make()`` returns (call, close); ``call()`` is one round trip.
Side = Callable[[], "tuple[Callable[[], Any], Callable[[], None]]"]

PLACEMENTS = ("same_cpu", "cross_cpu")


def cpus() -> list[int]:
    """The CPUs this process may use, or [] where affinity cannot be set."""
    if not hasattr(os, "sched_setaffinity"):
        return []
    return sorted(os.sched_getaffinity(0))


def _pin(cpu_set: set[int]) -> None:
    os.sched_setaffinity(0, cpu_set)  # (Linux: the calling thread; new threads inherit it)


def measure(placement: str, base: Side, ours: Side, n: int, *, rounds: int = 10,
            warmup: int = 300) -> tuple[float, float] | None:
    """Median seconds per round trip (base, ours) in ``placement``, or None if this machine
    cannot make it.  Both sides are made and warmed up inside the placement, so that every
    thread they start is pinned (executors measured here must not start threads later:
    give them one worker thread)."""
    available = cpus()
    if placement == "same_cpu" and available:
        workers_on = submitter_on = {available[0]}
    elif placement == "cross_cpu" and len(available) >= 2:
        submitter_on, workers_on = {available[0]}, {available[1]}
    else:
        return None
    original = set(available)
    made: list[tuple[Callable[[], Any], Callable[[], None]]] = []
    try:
        _pin(workers_on)
        for side in (base, ours):
            made.append(side())
            for _ in range(warmup):
                made[-1][0]()  # (starts the side's threads here, pinned to workers_on)
        _pin(submitter_on)
        return _alternate(made[0][0], made[1][0], n, rounds)
    finally:
        for _call, close in made:
            close()
        _pin(original)


def unplaced(base: Side, ours: Side, n: int, *, rounds: int = 10, warmup: int = 200
             ) -> tuple[float, float]:
    """The same without pinning: what the scheduler happened to do (a diagnostic)."""
    made: list[tuple[Callable[[], Any], Callable[[], None]]] = []
    try:
        for side in (base, ours):
            made.append(side())
        for _ in range(warmup):
            made[0][0]()
            made[1][0]()
        return _alternate(made[0][0], made[1][0], n, rounds)
    finally:
        for _call, close in made:
            close()


def _alternate(base: Callable[[], Any], ours: Callable[[], Any], n: int, rounds: int
               ) -> tuple[float, float]:
    b: list[float] = []
    o: list[float] = []
    clock = time.perf_counter
    for rnd in range(rounds):
        pair = ((base, b), (ours, o)) if rnd % 2 == 0 else ((ours, o), (base, b))
        for call, samples in pair:
            for _ in range(n // rounds):
                t0 = clock()
                call()
                samples.append(clock() - t0)
    return statistics.median(b), statistics.median(o)


def compare(base: Side, ours: Side, n: int, *, aa: bool = True) -> dict[str, Any]:
    """Every placement this machine can make, plus the unplaced diagnostic; ``ratio`` is the
    worst placed ratio (ours / base), or the unplaced one if none could be made."""
    out: dict[str, Any] = {}
    for placement in PLACEMENTS:
        measured = measure(placement, base, ours, n)
        if measured is None:
            out[placement] = None
            continue
        entry = _entry(*measured)
        if aa:
            entry["aa_ratio"] = round(_ratio(measure(placement, base, base, n)), 3)
        out[placement] = entry
    loose = _entry(*unplaced(base, ours, n))
    if aa:
        loose["aa_ratio"] = round(_ratio(unplaced(base, base, n)), 3)
    out["unplaced_diagnostic"] = loose
    placed = [out[p]["ratio"] for p in PLACEMENTS if out[p] is not None]
    out["ratio"] = max(placed) if placed else loose["ratio"]
    return out


def _ratio(pair: tuple[float, float] | None) -> float:
    assert pair is not None
    return pair[1] / pair[0]


def _entry(base: float, ours: float) -> dict[str, Any]:
    return {"baseline_us": round(base * 1e6, 1), "ours_us": round(ours * 1e6, 1),
            "ratio": round(ours / base, 3)}
