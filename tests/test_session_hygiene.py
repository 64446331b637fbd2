"""The test session leaves nothing behind, and neither do the tutorials' scratch folders.

- the session folder (``tests/session_sandbox.py``) holds every per-user location;
- its end-of-session check finds files, kernel connection files and processes left behind;
- ``notebooks/_scratch.py``: a tutorial's scratch folder is removed when its kernel stops,
  whether it is shut down (JupyterLab) or killed with its process group (nbval, a crash).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from kernel_utils import REPO_ROOT
from session_sandbox import SessionSandbox

NOTEBOOKS = REPO_ROOT / "notebooks"


def _gone(path: Path, timeout: float = 10.0) -> bool:
    """Wait (bounded) until ``path`` no longer exists; True if it went."""
    deadline = time.monotonic() + timeout
    while path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)  # polling a condition (the folder is gone), bounded by ``timeout``
    return True


def test_every_per_user_folder_is_inside_the_session_folder(tmp_path):
    root = Path(os.environ[SessionSandbox.MARKER])
    assert root.name.startswith("qmagic-tests-") and root.is_dir()
    for name in SessionSandbox.FOLDERS:
        if name in ("QMAGIC_STATE_DIR", "XDG_CONFIG_HOME"):  # each test has its own (conftest)
            assert Path(os.environ[name]).is_relative_to(tmp_path)
        else:
            assert Path(os.environ[name]).parent == root, name
    assert Path(tempfile.gettempdir()) == root / "tmp"
    assert tmp_path.is_relative_to(root)
    assert Path.home() == root / "home"
    from hypothesis.configuration import storage_directory  # its example database and caches

    assert storage_directory("examples", intent_to_write=False).path.is_relative_to(root)


def test_the_end_of_session_check_lists_and_stops_what_was_left(tmp_path):
    # A session inside this one: its "outside" is this session's TMPDIR and HOME.
    inner = SessionSandbox(cleanup_grace=0.5)
    root = inner.start()
    try:
        (root / "tmp" / "forgotten.txt").write_text("x")
        (root / "jupyter-runtime" / "kernel-123.json").write_text("{}")
        sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        outside = Path(inner.outer_tmp) / "left-outside-by-a-test"
        outside.mkdir()
    finally:
        report = inner.finish(check_outside=True)
    try:
        assert sleeper.wait(10) != 0  # killed by the check
        assert any(p.endswith("forgotten.txt") for p in report.inside), report
        assert any(p.endswith("kernel-123.json") for p in report.inside), report
        assert any(p.startswith(f"process {sleeper.pid}:") for p in report.inside), report
        assert str(outside) in report.outside
        assert not root.exists()
        assert os.environ[SessionSandbox.MARKER] != str(root)  # the environment is restored
    finally:
        outside.rmdir()


def _scratch_in_kernel(kernel_factory) -> tuple[object, Path]:
    k = kernel_factory()
    path = k.eval(f"__import__('sys').path.insert(0, {str(NOTEBOOKS)!r}) or "
                  "__import__('_scratch').scratch_folder()")
    path = Path(path)
    assert path.is_dir() and path.name.startswith("qmagic-tutorial-")
    assert path.is_relative_to(tempfile.gettempdir())
    return k, path


def test_scratch_folder_goes_when_the_kernel_is_killed_with_its_group(kernel_factory):
    k, path = _scratch_in_kernel(kernel_factory)
    k.km.shutdown_kernel(now=True)  # what nbval does: SIGKILL to the kernel's process group
    assert _gone(path), f"{path} outlived its killed kernel"


def test_scratch_folder_goes_when_the_kernel_shuts_down(kernel_factory):
    k, path = _scratch_in_kernel(kernel_factory)
    k.kc.stop_channels()
    k.kc = None
    k.km.shutdown_kernel(now=False)  # what JupyterLab does: a shutdown request
    assert _gone(path), f"{path} outlived its kernel"


def test_scratch_folder_stays_while_the_kernel_runs(kernel_factory):
    k, path = _scratch_in_kernel(kernel_factory)
    k.execute("import subprocess, sys; subprocess.run([sys.executable, '-c', 'pass'])", check=True)
    assert k.eval(f"__import__('os').path.isdir({str(path)!r})") is True  # a child's exit is not the kernel's
    k.shutdown()
    assert _gone(path)


@pytest.mark.parametrize("tutorial", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_every_tutorial_uses_the_scratch_helper(tutorial):
    text = (NOTEBOOKS / tutorial).read_text()
    assert "_scratch.scratch_folder()" in text and "TemporaryDirectory" not in text


def test_session_folders_of_killed_runs_are_removed_and_live_ones_kept(tmp_path):
    """A killed test run cannot remove its session folder: the next run removes it, and
    never the folder of a run that is still going (or only starting)."""
    import fcntl
    import session_sandbox

    def folder(name: str, lock: bool) -> Path:
        path = tmp_path / (session_sandbox.PREFIX + name)
        (path / "tmp").mkdir(parents=True)
        (path / "tmp" / "left.txt").write_text("x")
        if lock:
            (path / session_sandbox.LOCK_NAME).write_text("")
        return path

    dead = folder("dead", lock=True)  # its lock file is there, nobody holds it
    live = folder("live", lock=True)
    starting = folder("starting", lock=False)  # made a moment ago, not locked yet
    old = folder("old", lock=False)
    an_hour_ago = time.time() - session_sandbox.UNLOCKED_GRACE_S - 60
    os.utime(old, (an_hour_ago, an_hour_ago))
    other = tmp_path / "someone-else"
    other.mkdir()
    held = os.open(live / session_sandbox.LOCK_NAME, os.O_RDONLY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)  # as the live session's process holds it
        removed = session_sandbox.remove_stale_sandboxes(tmp_path)
    finally:
        os.close(held)
    assert sorted(removed) == [dead.name, old.name]
    assert not dead.exists() and not old.exists()
    assert live.is_dir() and starting.is_dir() and other.is_dir()
    # and this session's own folder is locked: a run starting now would leave it alone
    own = Path(os.environ[SessionSandbox.MARKER])
    assert own.is_dir() and not session_sandbox._lock_is_free(own / session_sandbox.LOCK_NAME)


def test_a_parallel_run_starts_the_longest_files_first_and_keeps_each_file_together(monkeypatch, pytestconfig):
    """pyproject's ``-n auto --dist loadfile --no-loadscope-reorder``: conftest orders the
    items a worker collects -- queueserver's selection and the browsers first, then files
    with more tests before files with fewer, each file's tests in their own order -- and
    chooses two workers for the suite or a folder, or none (one process) for named files or
    tests, where the selection would need port 60615 alone (no private network namespace) or
    on one core."""
    import types

    import netns

    here = str(Path(__file__).with_name("conftest.py"))  # (notebooks/ has a conftest.py too)
    conftest = next(m for m in pytestconfig.pluginmanager.get_plugins() if getattr(m, "__file__", None) == here)

    ids = ["tests/test_a.py::one", "tests/test_b.py::one", "tests/test_b.py::two",
           "tests/test_browser.py::lab", "notebooks/01.ipynb::Cell 0", "notebooks/01.ipynb::Cell 1",
           "notebooks/01.ipynb::Cell 2", "tests/test_queueserver_suite.py::test_queueserver_selection_passes"]
    items = [types.SimpleNamespace(nodeid=i) for i in ids]
    conftest.pytest_collection_modifyitems(types.SimpleNamespace(), items)  # one process: kept
    assert [i.nodeid for i in items] == ids
    conftest.pytest_collection_modifyitems(types.SimpleNamespace(workerinput={}), items)
    assert [i.nodeid for i in items] == [ids[7], ids[3], *ids[4:7], ids[1], ids[2], ids[0]]

    monkeypatch.delenv("PYTEST_XDIST_AUTO_NUM_WORKERS", raising=False)
    monkeypatch.chdir(REPO_ROOT)
    suite = types.SimpleNamespace(args=["tests", "notebooks"])  # (pyproject's testpaths)
    for prefix, cpus, workers in ((("unshare", "-n"), 2, 2), (("unshare", "-n"), 16, 2),
                                  (None, 2, 0), (("unshare", "-n"), 1, 0)):
        monkeypatch.setattr(netns, "command_prefix", lambda prefix=prefix: prefix)
        monkeypatch.setattr(os, "cpu_count", lambda cpus=cpus: cpus)
        assert conftest.pytest_xdist_auto_num_workers(suite) == workers, (prefix, cpus)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(netns, "command_prefix", lambda: ("unshare", "-n"))
    for args, workers in ((["notebooks"], 2), (["tests/queueserver", "tests/test_kernel.py"], 2),
                          (["tests/test_kernel.py"], 0), (["tests/test_kernel.py::test_x", "notebooks/x.ipynb"], 0)):
        assert conftest.pytest_xdist_auto_num_workers(types.SimpleNamespace(args=args)) == workers, args
    monkeypatch.setenv("PYTEST_XDIST_AUTO_NUM_WORKERS", "3")
    assert conftest.pytest_xdist_auto_num_workers(suite) is None  # xdist reads it


#: A pytest run in a subprocess with pytest-xdist and no other installed plugin (loading every
#: one, Hypothesis, anyio, nbval..., took 16 s of such a test here; 1.3 s so).
_ONLY_PLUGINS = ("-p", "no:cacheprovider", "-p", "xdist.plugin", "-p", "xdist.looponfail")


def _plugins_named() -> dict[str, str]:
    """This environment, plugins loaded only when named (``-p``), -n auto left to the hooks."""
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_XDIST_AUTO_NUM_WORKERS"}
    return {**env, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}


def test_a_named_notebook_runs_in_one_process(monkeypatch):
    """``pytest notebooks/01-getting-started.ipynb``: pyproject's ``-n auto`` started a
    worker per core (tests/conftest.py, which runs named tests in one process, is not loaded
    for a notebook: notebooks/conftest.py is), 20 s of starting workers for one notebook.
    It runs in this process; a folder is left to tests/conftest.py (or pytest-xdist)."""
    import runpy
    import types

    hook = runpy.run_path(str(NOTEBOOKS / "conftest.py"))["pytest_xdist_auto_num_workers"]
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.delenv("PYTEST_XDIST_AUTO_NUM_WORKERS", raising=False)
    for args, workers in ((["notebooks/01-getting-started.ipynb"], 0),
                          (["notebooks/01-getting-started.ipynb::Cell 0", "notebooks/02-progress-cancel-output.ipynb"], 0),
                          (["notebooks"], None), (["tests", "notebooks"], None)):
        assert hook(types.SimpleNamespace(args=args)) == workers, args
    monkeypatch.setenv("PYTEST_XDIST_AUTO_NUM_WORKERS", "3")
    assert hook(types.SimpleNamespace(args=["notebooks/01-getting-started.ipynb"])) is None


def test_a_failure_showing_a_lone_surrogate_is_reported_by_a_worker(tmp_path):
    """A parallel run's test failing on a hostile text (``assert name == "a\\udc80"``): the
    worker could not send the failure (UTF-8) and stopped; the run ended with pytest-xdist's
    "Unexpectedly no active workers available", the failure and the tests after it unseen.
    The failure is reported, the character escaped, and the next test runs."""
    (tmp_path / "test_hostile.py").write_text(
        "def test_hostile():\n    print('out \\udc80')\n    assert 'a\\udc80' == 'b'\n\n"
        "def test_next():\n    pass\n")
    env = {**_plugins_named(), "PYTHONPATH": str(Path(__file__).parent)}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", *_ONLY_PLUGINS, "-p", "xdist_reports",
                          "-n", "1", "-c", os.devnull, "--rootdir", str(tmp_path), "--basetemp", str(tmp_path / "base"),
                          str(tmp_path / "test_hostile.py")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert "1 failed, 1 passed" in run.stdout, run.stdout + run.stderr
    assert "\\udc80" in run.stdout
