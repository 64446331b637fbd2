"""The suite's run of queueserver's own tests, started as soon as the test is collected.

tests/test_queueserver_suite.py asserts on bluesky-queueserver's selection (two minutes of
mostly waiting: kernels starting, queueserver's polling).  When a private network namespace
is available (tests/queueserver/netns.py: root, or unprivileged user namespaces), a run in
one process (``-n 0``) starts it right after collection, in its own namespace -- its
127.0.0.1:60615 is not the suite's -- and it goes on while the other tests run; the test
then waits for its result.  A parallel run (pytest-xdist) needs none of this: the test runs
first on a worker of its own (tests/conftest.py), in a namespace too.  Without one it runs
in the test itself, alone.  A run nobody took (the session
ended first) is stopped at the end of the session, with everything it started.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import netns  # noqa: E402
import run_qs_tests  # noqa: E402

__all__ = ["NODE_ID", "selection", "start_if_collected", "stop_unclaimed", "take"]

#: the test that asserts on the run
NODE_ID = "tests/test_queueserver_suite.py::test_queueserver_selection_passes"
_RUN = pytest.StashKey[run_qs_tests.SelectionRun]()


def selection() -> tuple[str, dict[str, str]]:
    """The selection the suite runs (``QMAGIC_QS_SELECTION``, default ``fast``) and the
    environment its kernels need."""
    name = os.environ.get("QMAGIC_QS_SELECTION", "fast")
    return name, {
        "QMAGIC_QS_PROFILE": "lean" if name == "fast" else "full",
        # an RE Manager starts with its environment closed: so do these kernels (fixture only)
        "QMAGIC_QS_KERNEL_ARGS": "--QMagic.environment_open_on_load=False",
    }


def start_if_collected(session: pytest.Session) -> None:
    """Start the run in the background if the test is among the session's items and a
    private network namespace is available."""
    if hasattr(session.config, "workerinput"):
        return  # a parallel run: the test runs it on its worker, started first (conftest)
    if session.config.option.collectonly or not any(item.nodeid == NODE_ID for item in session.items):
        return  # (--collect-only runs no test: nothing would take the run)
    if netns.command_prefix() is None:
        return
    name, env = selection()
    session.config.stash[_RUN] = run_qs_tests.start_selection(name, env=env, isolated=True)


def take(config: pytest.Config) -> run_qs_tests.SelectionRun | None:
    """The run started in the background (once), or None: then the test starts it itself."""
    run = config.stash.get(_RUN, None)
    if run is not None:
        del config.stash[_RUN]
    return run


def stop_unclaimed(session: pytest.Session) -> None:
    """Stop a run the test never took (the session was interrupted, or ended first)."""
    run = take(session.config)
    if run is not None:
        run.kill()
