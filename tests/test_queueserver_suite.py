"""bluesky-queueserver's own tests, run against qmagic kernels.

The selection ``fast`` of tests/queueserver/run_qs_tests.py (one parametrisation per
behaviour of function_execute, task_status/task_result, lock, script_upload, the
environment, permissions, config_get, invalid requests, the IPython-kernel worker mode and
the qserver command line) runs in a subprocess with tests/queueserver/plugin.py, which only
replaces queueserver's manager start/stop fixtures by real qmagic kernels (never a reply).
Every selected test must pass, and the selection may not shrink silently.

queueserver's helpers hard-code 127.0.0.1:60615.  Where a private network namespace is
available, the run has one and goes on while the rest of the suite runs: started as soon as
this test is collected in one process (tests/queueserver/qs_background.py), or by this test,
first on a worker of its own, in a parallel run (tests/conftest.py); otherwise the suite
runs in one process and the selection here, and nothing else may use that port meanwhile.
``QMAGIC_QS_SELECTION=suite`` runs all in-scope tests (about half an hour).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "queueserver"))

import qs_background  # noqa: E402
import run_qs_tests  # noqa: E402

#: How many tests the `fast` selection holds (a shrinking selection is a failure too).
FAST_COUNT = 53


@pytest.mark.timeout(960)  # (the run's own limit is 900 s; the suite's default, 300 s)
def test_queueserver_selection_passes(request):
    name, env = qs_background.selection()
    run = qs_background.take(request.config) or run_qs_tests.start_selection(
        name, env=env, isolated=run_qs_tests.netns.command_prefix() is not None)
    result = run.finish(timeout=900)
    assert result["tests"], f"no test ran (rc {result['returncode']}):\n{result['tail']}"
    failed = [t for t in result["tests"] if t["outcome"] != "PASS"]
    report = "\n".join(f"{t['outcome']} {t['id']}: {t['reason']}" for t in failed)
    assert not failed, (f"{len(failed)} of {len(result['tests'])} queueserver tests failed "
                        f"against qmagic ({result['seconds']} s):\n{report}")
    if name == "fast":
        assert len(result["tests"]) == FAST_COUNT, [t["id"] for t in result["tests"]]
    print(f"\nqueueserver's own tests: {len(result['tests'])} passed in {result['seconds']} s")
