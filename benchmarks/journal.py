"""Journal benchmark: cost of the experiment log per task, against the same run without it.

Prints one JSON line:
- ratio: median time of a no-op background task (function_execute until the task is
  done) with the journal on / with it off, measured in interleaved rounds in the same
  run                                                                     [target <= 1.5]
- throughput_ratio: 2000 no-op tasks submitted back to back, journal on / off (tasks per
  second; higher is better, 1.0 means free)
- encoder: "orjson" when the fast JSON encoder is installed, else "json"

Usage: python benchmarks/journal.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from traitlets.config import Config  # noqa: E402

from qmagic import Worker, journal  # noqa: E402


def noop() -> None:
    return None


def make_worker(state_dir: str, enabled: bool) -> Worker:
    config = Config()
    config.QMagic.state_dir = state_dir
    config.QMagic.journal_enabled = enabled
    config.QMagic.max_queued_tasks = 5000
    return Worker({"noop": noop}, config=config)


def one_task(worker: Worker) -> float:
    t0 = time.perf_counter()
    reply = worker.function_execute({"item_type": "function", "name": "noop"}, run_in_background=True)
    worker.get_task(reply["task_uid"]).wait(10)
    return time.perf_counter() - t0


def batch(worker: Worker, n: int) -> float:
    t0 = time.perf_counter()
    tasks = [worker.submit("noop") for _ in range(n)]
    for t in tasks:
        t.wait(30)
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts (smoke run)")
    opts = parser.parse_args()
    rounds, per_round, batch_n = (4, 100, 500) if opts.quick else (10, 300, 2000)
    with tempfile.TemporaryDirectory(prefix="qmagic-bench-") as tmp:
        workers = {False: make_worker(os.path.join(tmp, "off"), False),
                   True: make_worker(os.path.join(tmp, "on"), True)}
        try:
            for w in workers.values():
                for _ in range(200):
                    one_task(w)
            times: dict[bool, list[float]] = {False: [], True: []}
            rates: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(rounds):  # interleaved, to cancel the machine's drift
                for enabled, w in workers.items():
                    times[enabled] += [one_task(w) for _ in range(per_round)]
                    rates[enabled].append(batch(w, batch_n // rounds))
            errors = workers[True]._journal.errors
            records = len(workers[True].history())
        finally:
            for w in workers.values():
                w.close()
    off, on = statistics.median(times[False]), statistics.median(times[True])
    rate_off, rate_on = statistics.median(rates[False]), statistics.median(rates[True])
    result = {
        "benchmark": "journal",
        "median_us_off": round(off * 1e6, 1),
        "median_us_on": round(on * 1e6, 1),
        "ratio": round(on / off, 3),
        "ratio_target_max": 1.5,
        "throughput_off_per_s": round(rate_off),
        "throughput_on_per_s": round(rate_on),
        "throughput_ratio": round(rate_on / rate_off, 3),
        "encoder": "orjson" if journal._orjson is not None else "json",
        "journal_errors": errors,
        "records_written": records,
        "quick": opts.quick,
    }
    result["targets_met"] = result["ratio"] <= 1.5 and errors == 0
    print(json.dumps(result))


if __name__ == "__main__":
    main()
