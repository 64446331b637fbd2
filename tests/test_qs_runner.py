"""tests/queueserver/run_qs_tests.py: a selection's run leaves nothing behind."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "queueserver"))

import run_qs_tests  # noqa: E402


def test_a_run_stopped_while_its_result_is_awaited_leaves_nothing_behind():
    """pytest-timeout (or ■) landing in the wait for a selection's result left its pytest
    process (and its kernels) running and its folder behind: only a timeout of the wait
    itself stopped the run."""
    tmp = tempfile.mkdtemp(prefix="qs-run-")
    run = run_qs_tests.SelectionRun(
        "x", [sys.executable, "-c", "import time; time.sleep(60)"], dict(os.environ), tmp)
    real_wait, calls = run.proc.wait, []

    def wait(timeout=None):
        if not calls:  # the first wait: the test's, where the interrupt lands
            calls.append(timeout)
            raise KeyboardInterrupt
        return real_wait(timeout)

    run.proc.wait = wait
    with pytest.raises(KeyboardInterrupt):
        run.finish(timeout=30)
    assert run.proc.poll() is not None, "the run's process still runs"
    assert not os.path.exists(tmp), "the run's folder is left"
