"""Session set-up and shared fixtures.  Keep this file generic: module-specific fixtures
live in the test files.

- the whole session runs in one folder that is removed at the end (``tests/session_sandbox.py``):
  HOME, IPYTHONDIR, XDG_*, JUPYTER_*_DIR, QMAGIC_STATE_DIR, TMPDIR and pytest's basetemp
  point into it from ``pytest_configure`` on, so kernels, nbval, JupyterLab and chromium
  write there; what the session leaves behind is listed and fails it (``--leak-check``);
- every test gets its own ``QMAGIC_STATE_DIR`` (locks, journal) under ``tmp_path``;
- ``ip``: an in-process IPython shell (no kernel), with qmagic unloaded after the test;
- ``kernel`` / ``kernel_factory``: real kernels, see ``tests/kernel_utils.py``.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

_TESTS = Path(__file__).resolve().parent
if str(_TESTS.parent) not in sys.path:  # the package is not installed while developing
    sys.path.insert(0, str(_TESTS.parent))
if str(_TESTS) not in sys.path:
    sys.path.insert(0, str(_TESTS))

if str(_TESTS / "queueserver") not in sys.path:
    sys.path.insert(0, str(_TESTS / "queueserver"))

import qs_background  # noqa: E402
from kernel_utils import kernel, kernel_factory  # noqa: E402, F401 - fixtures re-exported
from session_sandbox import LeakReport, SessionSandbox  # noqa: E402
from xdist_reports import pytest_runtest_makereport  # noqa: E402, F401 - a lone surrogate in a report

#: pytest runs with --nbval (pyproject): the browser test's notebook is driven by that test
#: in JupyterLab, not compared by nbval.
collect_ignore_glob = ["browser/*.ipynb"]

_SANDBOX_KEY = pytest.StashKey[SessionSandbox]()
_MAX_LISTED = 25  # paths listed per section
_LEAKS_KEY = pytest.StashKey[LeakReport]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--leak-check",
        choices=("auto", "fail", "warn", "off"),
        default="auto",
        help="what to do with files the session left outside its own folder (in /tmp, the "
        "home folder, the checkout): fail, warn, or off; auto (default) fails under CI "
        "(CI set) and warns elsewhere.  Leftovers inside the session folder always fail.",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Move every per-user folder into the session folder before anything starts."""
    if hasattr(config, "workerinput"):  # pragma: no cover - an xdist worker: its controller did it
        return
    sandbox = SessionSandbox()
    sandbox.start()
    config.stash[_SANDBOX_KEY] = sandbox
    if config.option.basetemp is None:  # read by pytest's tmpdir plugin, configured after us
        config.option.basetemp = str(sandbox.basetemp)


def _check_outside(config: pytest.Config) -> str:
    mode = config.getoption("--leak-check", "auto")
    if mode == "auto":
        mode = "fail" if os.environ.get("CI") else "warn"
    return mode


#: Files that take longest (queueserver's selection: two minutes; the browsers: half a minute
#: each): a parallel run starts them first, so no worker is left with one of them at the end.
_LONGEST_FIRST = ("tests/test_queueserver_suite.py", "tests/test_browser.py", "tests/test_panels_browser.py")


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """``-n auto`` (pyproject's addopts): two workers for the suite or a folder of it; one run
    in this process for named files or tests (starting workers would cost more than they
    save), on one core, or where queueserver's selection cannot have a network namespace of
    its own (its helpers hard-code 127.0.0.1:60615, qmagic's default control address).
    ``-n N`` or PYTEST_XDIST_AUTO_NUM_WORKERS still decide."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None
    if not any(Path(arg.split("::")[0]).is_dir() for arg in config.args):
        return 0
    import netns  # tests/queueserver: on sys.path above

    return 2 if (os.cpu_count() or 1) >= 2 and netns.command_prefix() is not None else 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In a parallel run (pytest-xdist, ``--dist loadfile --no-loadscope-reorder``): the
    longest files first, then files with more tests before files with fewer, each file's
    tests in their own order (a module's kernel and a notebook's cells stay on one worker)."""
    if not hasattr(config, "workerinput"):
        return
    count: dict[str, int] = {}
    for item in items:
        count[item.nodeid.split("::")[0]] = count.get(item.nodeid.split("::")[0], 0) + 1

    def rank(item: pytest.Item) -> tuple[int, int]:
        path = item.nodeid.split("::")[0]
        first = _LONGEST_FIRST.index(path) if path in _LONGEST_FIRST else len(_LONGEST_FIRST)
        return first, -count[path]

    items.sort(key=rank)  # stable: a file's tests keep their order


def pytest_collection_finish(session: pytest.Session) -> None:
    """bluesky-queueserver's selection starts now if its test was collected, and goes on
    while the other tests run (tests/queueserver/qs_background.py)."""
    qs_background.start_if_collected(session)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """Check what the session left, remove its folder; leftovers fail the run (a
    queueserver run nobody took is stopped first)."""
    qs_background.stop_unclaimed(session)
    sandbox = session.config.stash.get(_SANDBOX_KEY, None)
    if sandbox is None or sandbox.root is None:
        return
    mode = _check_outside(session.config)
    report = sandbox.finish(check_outside=mode != "off")
    session.config.stash[_LEAKS_KEY] = report
    if report.inside or (report.outside and mode == "fail"):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    sandbox = config.stash.get(_SANDBOX_KEY, None)
    if sandbox is not None and sandbox.removed_stale:
        terminalreporter.line(
            f"Removed {len(sandbox.removed_stale)} session folder(s) of earlier test runs that were "
            f"killed: {', '.join(sandbox.removed_stale)}")
    report = config.stash.get(_LEAKS_KEY, None)
    if report is None or not (report.inside or report.outside):
        return
    tr = terminalreporter
    if report.inside:
        tr.section("LEFT BEHIND by this test session (the run fails)", sep="!", red=True, bold=True)
        for path in report.inside:
            tr.line(f"  {path}", red=True)
        tr.line("Left in the session's TMPDIR or JUPYTER_RUNTIME_DIR, or still running with its "
                "environment (then killed), when it ended: a temporary file, a tutorial scratch "
                "folder, a kernel connection file or a process that nobody removed or stopped.")
    if report.outside:
        fails = _check_outside(config) == "fail"
        tr.section("NEW in /tmp, the home folder or the checkout during this session"
                   + (" (the run fails)" if fails else " (warning)"), sep="!", red=fails, yellow=not fails,
                   bold=True)
        for path in report.outside[:_MAX_LISTED]:
            tr.line(f"  {path}", red=fails, yellow=not fails)
        if len(report.outside) > _MAX_LISTED:
            tr.line(f"  ... and {len(report.outside) - _MAX_LISTED} more", red=fails, yellow=not fails)
        tr.line("Written outside the session folder by the tests, or by another program on this "
                "machine meanwhile (QMAGIC_TEST_LEAK_IGNORE='glob ...' names those; "
                "--leak-check=fail|warn|off).")


@pytest.fixture(autouse=True)
def _isolated_qmagic_state(tmp_path, monkeypatch):
    """Each test writes its lock, journal and default lock key into its own folders."""
    monkeypatch.setenv("QMAGIC_STATE_DIR", str(tmp_path / "qmagic-state"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))  # default lock key
    monkeypatch.delenv("QMAGIC_EMERGENCY_LOCK_KEY", raising=False)
    monkeypatch.delenv("QMAGIC_NO_AUTOLOAD", raising=False)


@pytest.fixture(scope="session")
def _shell():
    """The process-wide in-process InteractiveShell (history off)."""
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    if InteractiveShell.initialized():
        return InteractiveShell.instance()
    config = Config()
    config.HistoryManager.enabled = False
    return InteractiveShell.instance(config=config)


@pytest.fixture
def sigint_as_in_a_cell():
    """SIGINT raises KeyboardInterrupt meanwhile, as in a kernel running a cell, even when
    pytest inherited it ignored (a background job of a non-interactive shell, ``cmd &`` in
    a script, starts with SIGINT ignored, and Python then keeps it so)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.fixture
def ip(_shell, sigint_as_in_a_cell):
    """An in-process IPython shell, SIGINT as in a cell; qmagic (if a test loaded it) is
    unloaded afterwards."""
    yield _shell
    from qmagic.ipython.extension import unload_ipython_extension  # (an ImportError must fail)

    unload_ipython_extension(_shell)
    _shell.extension_manager.loaded.discard("qmagic")
