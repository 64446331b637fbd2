"""The experiment log during its faults: what its calls cost the tasks, before and during.

Prints ONE JSON line.  For each fault, the CPU of the calling thread per task
(``submitted()`` + ``started()`` + ``finished()``, records built beforehand:
``journal_store.caller_cpu``) with a healthy log and during the fault, in the same run;
``ratio`` = median during / median before over the rounds (target <= 1.5: "tasks keep their
normal speed"; the tests check the mechanism: during a fault the calls try the disk, and wake
the log's writer, at most once per back-off period, never for every line):

- ``db_locked``: another process holds the database's write lock (``BEGIN EXCLUSIVE``); the
  calls go on into the spool while the writer waits;
- ``disk_full``: the state folder is a small tmpfs, filled up; the lines wait in memory;
- ``read_only``: a read-only tmpfs; the lines wait in memory from the start;
  ``kb_per_held_line``: resident memory per line waiting (a record's line is ~0.5 kB here;
  target <= 2).

The last two mount file systems in a private mount namespace (root and util-linux's
``unshare``; without them they are null and ``skipped`` says why).

    python benchmarks/journal_faults.py [--rounds 3] [--tasks 3000]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from journal_store import caller_cpu  # noqa: E402  (benchmarks/journal_store.py)

from qmagic.store.database import database_path  # noqa: E402
from qmagic.store.journal import Journal  # noqa: E402

TARGET = {"fault_ratio_max": 1.5, "kb_per_held_line_max": 2.0}
_IN_NAMESPACE = "QMAGIC_BENCH_MOUNT_NAMESPACE"
LOCKER = """
import sqlite3, sys
c = sqlite3.connect(sys.argv[1], isolation_level=None)
c.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()
"""


def wait_for_fault(journal: Journal, timeout: float = 30.0) -> None:
    """Until the log's health says it is in a fault (its writer met it)."""
    deadline = time.monotonic() + timeout
    while journal.health()["ok"]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"no fault within {timeout} s: {journal.health()}")
        journal.flush(0.1)


def figure(before: list[float], during: list[float]) -> dict:
    b, d = statistics.median(before), statistics.median(during)
    return {"before_us": round(b, 2), "during_us": round(d, 2), "ratio": round(d / b, 3)}


def db_locked(root: Path, rounds: int, n: int) -> dict:
    before, during = [], []
    with Journal(root / "locked", "bench") as journal:
        caller_cpu(journal, n)  # (warm-up: the database made, caches filled)
        for _ in range(rounds):
            before.append(caller_cpu(journal, n))
            locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(database_path(root / "locked", "bench"))],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            try:
                assert locker.stdout.readline().strip() == "locked"
                caller_cpu(journal, 100, flush=False)
                wait_for_fault(journal)
                during.append(caller_cpu(journal, n, flush=False))
            finally:
                locker.communicate("\n", timeout=30)
            assert journal.flush(60), journal.health()
    return figure(before, during)


def mount_tmpfs(folder: Path, size: str, read_only: bool = False) -> None:
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(folder)], check=True)
    if read_only:
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)


def fill(path: Path) -> None:
    """Take the room left on the file system of ``path`` (none may be left already)."""
    try:
        with open(path, "wb") as f:
            while True:
                f.write(b"x" * 65536)
                f.flush()
    except OSError:
        pass


def disk_full(root: Path, rounds: int, n: int) -> dict:
    folder = root / "full"
    mount_tmpfs(folder, "256m")
    before, during = [], []
    try:
        with Journal(folder, "bench", pending_limit=10 * n) as journal:
            caller_cpu(journal, n)
            for _ in range(rounds):
                before.append(caller_cpu(journal, n))
                fill(folder / "filler")
                caller_cpu(journal, 100, flush=False)
                wait_for_fault(journal)
                during.append(caller_cpu(journal, n, flush=False))
                (folder / "filler").unlink(missing_ok=True)
                assert journal.flush(60), journal.health()
    finally:
        subprocess.run(["umount", str(folder)], check=True)
    return figure(before, during)


def read_only(root: Path, rounds: int, n: int) -> dict:
    writable, frozen = root / "rw", root / "ro"
    mount_tmpfs(writable, "64m")
    mount_tmpfs(frozen, "64m", read_only=True)
    before, during, kb_per_line = [], [], []
    try:
        for rnd in range(rounds):
            with Journal(writable, f"bench-{rnd}") as journal:
                caller_cpu(journal, n)
                before.append(caller_cpu(journal, n))
            journal = Journal(frozen, f"bench-{rnd}", pending_limit=10 * n)
            try:
                caller_cpu(journal, n, flush=False)
                gc.collect()  # (the first round: no memory freed by an earlier one to reuse)
                rss, held = rss_kb(), journal.health()["in_memory"]
                during.append(caller_cpu(journal, n, flush=False))
                if rnd == 0:
                    kb_per_line.append((rss_kb() - rss) / (journal.health()["in_memory"] - held))
            finally:
                journal.close(timeout=1)  # (what waits in memory is dropped: nowhere to write it)
    finally:
        for folder in (writable, frozen):
            subprocess.run(["umount", str(folder)], check=True)
    return dict(figure(before, during), kb_per_held_line=round(kb_per_line[0], 2))


def rss_kb() -> int:
    return int(next(line for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith("VmRSS:")).split()[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=3000, help="tasks per measurement")
    args = parser.parse_args()
    can_mount = os.geteuid() == 0 and shutil.which("unshare") is not None
    if can_mount and not os.environ.get(_IN_NAMESPACE):  # (mounts visible to this process only)
        env = dict(os.environ, **{_IN_NAMESPACE: "1"})
        return subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, *sys.argv],
                              env=env, check=False).returncode
    faults: dict[str, Callable[[Path, int, int], dict]] = {"db_locked": db_locked}
    if can_mount:
        faults.update(disk_full=disk_full, read_only=read_only)
    result: dict = {"benchmark": "journal_faults"}
    with tempfile.TemporaryDirectory(prefix="qmagic-bench-") as tmp:
        for name, measure in faults.items():
            result[name] = measure(Path(tmp), args.rounds, args.tasks)
    if not can_mount:
        result.update(disk_full=None, read_only=None, skipped="disk_full and read_only need root and unshare")
    result.update(rounds=args.rounds, tasks=args.tasks, load_average=round(os.getloadavg()[0], 1),
                  targets=TARGET)
    result["targets_met"] = all(result[k]["ratio"] <= TARGET["fault_ratio_max"]
                                for k in ("db_locked", "disk_full", "read_only") if result.get(k)) and (
        not result.get("read_only") or result["read_only"]["kb_per_held_line"] <= TARGET["kb_per_held_line_max"])
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
