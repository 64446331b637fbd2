"""Run the whole test suite several times in a row, to catch flaky tests before submitting.

    .venv/bin/python tests/repeat.py                 # 10 runs of `python -m pytest`
    .venv/bin/python tests/repeat.py -n 5 --busy     # 5 runs with every core kept busy
    .venv/bin/python tests/repeat.py -n 3 -- -x tests/test_kernel.py   # pytest arguments

Each run is the README's test command (``python -m pytest`` from the repository root, with
this interpreter) plus the arguments after ``--``, with ``--leak-check=fail`` as under CI
(files the suite leaves in /tmp, the home folder or the checkout fail the run) unless those
arguments choose another.  It stops at the first failing run and
shows the end of its output; every run's full output is kept in
``test-artifacts/repeat/run-N.log``.  ``--busy`` starts one CPU-bound process per core
for the whole time and stops them at the end; each also stops by itself once this script is
gone (killed), so none is left spinning.  The last
line is a one-line summary with the times; the exit status is 0 only if every run passed.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
LOGS = REPO_ROOT / "test-artifacts" / "repeat"


#: Spins while the process that started it lives (a killed parent leaves no spinner behind).
_SPIN = "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    pass\n"


def _sigint_as_in_a_terminal() -> None:
    """In the child before it starts: SIGINT's default action, as a terminal gives it.  A
    shell that starts this script in the background (``&``) makes it ignored, and the child
    Python then keeps it ignored: tests that press ■ in this process would see nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _busy_processes(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", _SPIN], stdin=subprocess.DEVNULL) for _ in range(count)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--count", type=int, default=10, help="number of runs (default 10)")
    parser.add_argument("--busy", action="store_true", help="keep every core busy meanwhile")
    parser.add_argument("pytest_args", nargs="*", help="arguments for pytest (after --)")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("-n must be at least 1")

    LOGS.mkdir(parents=True, exist_ok=True)
    for old in LOGS.glob("run-*.log"):
        old.unlink()
    leak_check = [] if any(a.startswith("--leak-check") for a in args.pytest_args) else ["--leak-check=fail"]
    command = [sys.executable, "-m", "pytest", *leak_check, *args.pytest_args]
    cores = os.cpu_count() or 1
    print(f"repeat: {args.count} x {' '.join(command)}"
          + (f" with {cores} busy processes" if args.busy else ""), flush=True)
    busy = _busy_processes(cores) if args.busy else []
    times: list[float] = []
    failed: int | None = None
    try:
        for run in range(1, args.count + 1):
            log = LOGS / f"run-{run}.log"
            started = time.monotonic()
            with open(log, "wb") as out:
                code = subprocess.call(command, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, preexec_fn=_sigint_as_in_a_terminal)
            times.append(time.monotonic() - started)
            lines = log.read_text(errors="replace").splitlines()
            last = lines[-1].strip("= ") if lines else "(no output)"
            print(f"run {run}/{args.count}: exit {code} in {times[-1]:.0f} s: {last}", flush=True)
            if code != 0:
                failed = run
                print("\n".join(lines[-60:]), flush=True)
                print(f"full output: {log}", flush=True)
                break
    except KeyboardInterrupt:
        print("repeat: interrupted", flush=True)
        failed = len(times) + 1
    finally:
        for process in busy:
            process.kill()
            process.wait()
    passed = len(times) - (1 if failed else 0)
    summary = (f"repeat: {passed}/{args.count} runs passed" + (f", run {failed} failed" if failed else "")
               + (" (cores busy)" if args.busy else ""))
    if times:
        summary += (f"; run time min {min(times):.0f} s, median {statistics.median(times):.0f} s, "
                    f"max {max(times):.0f} s; total {sum(times) / 60:.1f} min")
    print(summary, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
