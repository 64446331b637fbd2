"""Cost of the environment lock's hot path, and of guessing keys (qmagic.store.locks).

Prints ONE JSON line.  Measured in the same run, in alternating rounds (medians):

- ``check``: ``LockStore.check`` with nothing changed (watched by inotify, no system call),
  unlocked and locked with this kernel's remembered key; ``baseline``: an empty function
  with the same signature.  ``check_ratio`` = check / baseline.
- ``stat_check``: the same check on a store without watcher (an ``lstat`` per check), the
  fallback where inotify is missing.
- ``busy``: calls per second from one thread while two task threads spin in Python, as a
  fraction of the quiet rate, relative to the same fraction for the empty function
  (``busy_relative``; 1.0 = the check suffers no more than any Python call; a system call in
  the check queues for the GIL behind the spinning threads).
- ``seen_ms``: from another process's ``lock()`` returning until this process's check
  refuses (the watcher's latency).
- ``guess_ms``: one wrong key at each door: ``check``, ``lock_info`` and ``lock`` of a
  healthy file (against the lock key), ``unlock`` of a healthy file (against the lock key
  and the emergency key) and of a damaged file (against the emergency key);
  ``guess_spread`` = slowest / fastest (the old code: 15 guesses/s healthy, 3,396/s
  damaged).  ``guesses_per_client`` with the default back-off: keys one client gets
  checked in its first minute and hour (throttle clock simulated), and the cost of a refusal
  in back-off and of another client's correct key meanwhile.

    python benchmarks/locks.py [--rounds N] [--checks N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import suppress
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qmagic.errors import LockRefused  # noqa: E402
from qmagic.store.keys import Throttle  # noqa: E402
from qmagic.store.locks import LockStore  # noqa: E402

TARGETS = {"check_ratio_max": 5.0, "busy_relative_min": 0.7, "seen_ms_max": 50.0,
           "guess_spread_max": 1.5, "throttled_refusal_us_max": 100.0}


def baseline(key, scope="environment", *, client=None):  # noqa: ANN001, ANN201
    """An empty function with check()'s signature."""
    return None


def per_call_ns(func, n: int) -> float:
    start = time.perf_counter_ns()
    for _ in range(n):
        func("k")
    return (time.perf_counter_ns() - start) / n


def busy_fraction(check, seconds: float = 0.3) -> float:
    """Checks/s with two spinning threads, relative to the quiet rate."""
    def rate() -> float:
        count, end = 0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            for _ in range(100):
                check("k")
            count += 100
        return count / seconds

    quiet = rate()
    stop = threading.Event()

    def spin() -> None:
        x = 0
        while not stop.is_set():
            x += 1

    threads = [threading.Thread(target=spin) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        busy = rate()
    finally:
        stop.set()
        for t in threads:
            t.join()
    return busy / quiet


CHILD = r"""
import sys
from qmagic.store.locks import LockStore
store = LockStore(sys.argv[1], watch=False)
print("ready", flush=True)
for line in sys.stdin:
    if line.startswith("lock"):
        store.lock("child", environment=True, user="Child")
    else:
        store.unlock("child")
    print("done", flush=True)
"""


def seen_latency_ms(folder: Path, rounds: int) -> list[float]:
    store = LockStore(folder, recheck_s=3600.0)
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(folder)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    out = []
    try:
        assert child.stdout.readline().strip() == "ready"
        for _ in range(rounds):
            for command, refused in (("lock", True), ("unlock", False)):
                child.stdin.write(command + "\n")
                child.stdin.flush()
                assert child.stdout.readline().strip() == "done"
                start = time.perf_counter()
                while True:
                    try:
                        store.check(None)
                        now_refused = False
                    except LockRefused:
                        now_refused = True
                    if now_refused is refused:
                        break
                    if time.perf_counter() - start > 5:
                        raise RuntimeError("the other process's change was not seen within 5 s")
                out.append((time.perf_counter() - start) * 1000)
    finally:
        child.stdin.close()
        child.wait(timeout=30)
        store.close()
    return out


def guess_costs_ms(folder: Path, rounds: int) -> dict[str, float]:
    store = LockStore(folder, emergency_key="EK", throttle=Throttle(free_failures=10**9), watch=False)
    counter = iter(range(10**9))
    costs: dict[str, list[float]] = {}

    def timed(name: str, action) -> None:
        start = time.perf_counter()
        with suppress(LockRefused):
            action()
        costs.setdefault(name, []).append((time.perf_counter() - start) * 1000)

    for _ in range(rounds):
        store.clear()
        store.lock("lock-key", environment=True, user="A")
        timed("at check, healthy file", lambda: store.check(f"g{next(counter)}"))
        timed("at lock_info, healthy file", lambda: store.info(f"g{next(counter)}"))
        timed("at lock, healthy file", lambda: store.lock(f"g{next(counter)}", queue=True, user="B"))
        timed("at unlock (lock or emergency key), healthy file", lambda: store.unlock(f"g{next(counter)}"))
        store.path.write_text("{damaged")
        timed("at unlock (emergency key), damaged file", lambda: store.unlock(f"g{next(counter)}"))
    store.close()
    return {name: statistics.median(values) for name, values in costs.items()}


def guesses_per_client(folder: Path) -> dict[str, float]:
    class Clock:
        now = 0.0

        def __call__(self) -> float:
            return self.now

    clock = Clock()
    throttle = Throttle(clock=clock)  # the defaults: 3 free, 1 s doubling, 300 s at most
    store = LockStore(folder, throttle=throttle, watch=False)
    store.lock("right", environment=True, user="A")
    checked = {60.0: 0, 3600.0: 0}
    verified = 0
    while clock.now < 3600.0:
        wait = throttle.wait_s("mallory")
        clock.now += wait
        with suppress(LockRefused):
            store.check(f"guess{verified}", client="mallory")
        verified += 1
        for horizon in checked:
            if clock.now <= horizon:
                checked[horizon] = verified
    # now in back-off: the cost of a refusal, and of another client's correct key
    start = time.perf_counter()
    for _ in range(1000):
        with suppress(LockRefused):
            store.check("right", client="mallory")
    refusal_us = (time.perf_counter() - start) * 1000
    fresh = LockStore(folder, throttle=throttle, watch=False)  # nothing cached: one derivation
    start = time.perf_counter()
    fresh.check("right", client="alice")
    other_ms = (time.perf_counter() - start) * 1000
    store.close()
    fresh.close()
    return {"first_minute": checked[60.0], "first_hour": checked[3600.0],
            "refusal_in_backoff_us": round(refusal_us, 2), "other_client_correct_key_ms": round(other_ms, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--checks", type=int, default=200_000)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="qmagic-bench-locks-") as tmp:
        root = Path(tmp)
        watched = LockStore(root / "watched", recheck_s=3600.0)
        locked = LockStore(root / "locked", recheck_s=3600.0)
        locked.lock("k", environment=True, user="A")
        stat_store = LockStore(root / "stat", watch=False)
        if not watched.watching:
            print(json.dumps({"error": "inotify is not available here"}))
            return 1
        series: dict[str, list[float]] = {"baseline": [], "check": [], "check_locked": [],
                                          "stat_check": [], "busy_baseline": [], "busy_watched": [],
                                          "busy_stat": []}
        for _ in range(args.rounds):  # alternate the variants within every round
            series["baseline"].append(per_call_ns(baseline, args.checks))
            series["check"].append(per_call_ns(watched.check, args.checks))
            series["check_locked"].append(per_call_ns(locked.check, args.checks))
            series["stat_check"].append(per_call_ns(stat_store.check, args.checks // 4))
            series["busy_baseline"].append(busy_fraction(baseline))
            series["busy_watched"].append(busy_fraction(watched.check))
            series["busy_stat"].append(busy_fraction(stat_store.check))
        med = {name: statistics.median(values) for name, values in series.items()}
        for s in (watched, locked, stat_store):
            s.close()
        seen = seen_latency_ms(root / "seen", args.rounds)
        guesses = guess_costs_ms(root / "guess", max(3, args.rounds // 2))
        throttled = guesses_per_client(root / "throttle")

    spread = max(guesses.values()) / min(guesses.values())
    result = {
        "benchmark": "locks",
        "baseline_ns": round(med["baseline"], 1),
        "check_ns": round(med["check"], 1),
        "check_locked_ns": round(med["check_locked"], 1),
        "stat_check_ns": round(med["stat_check"], 1),
        "check_ratio": round(max(med["check"], med["check_locked"]) / med["baseline"], 2),
        "stat_check_ratio": round(med["stat_check"] / med["baseline"], 2),
        "busy_fraction_baseline": round(med["busy_baseline"], 3),
        "busy_relative_watched": round(med["busy_watched"] / med["busy_baseline"], 3),
        "busy_relative_stat": round(med["busy_stat"] / med["busy_baseline"], 3),
        "seen_ms_median": round(statistics.median(seen), 3),
        "seen_ms_max": round(max(seen), 3),
        "guess_ms": {name: round(value, 1) for name, value in guesses.items()},
        "guesses_per_s_unthrottled": round(1000 / statistics.median(guesses.values()), 1),
        "guess_spread": round(spread, 2),
        "guesses_per_client": throttled,
        "targets": TARGETS,
    }
    result["targets_met"] = (
        result["check_ratio"] <= TARGETS["check_ratio_max"]
        and result["busy_relative_watched"] >= TARGETS["busy_relative_min"]
        and result["seen_ms_median"] <= TARGETS["seen_ms_max"]
        and spread <= TARGETS["guess_spread_max"]
        and throttled["refusal_in_backoff_us"] <= TARGETS["throttled_refusal_us_max"]
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
