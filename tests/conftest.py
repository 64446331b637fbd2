"""Shared fixtures.  Keep this file generic: module-specific fixtures live in the test files.

- every test gets its own ``QMAGIC_STATE_DIR`` (locks, journal) under ``tmp_path``;
- ``ip``: an in-process IPython shell (no kernel), with qmagic unloaded after the test;
- ``kernel`` / ``kernel_factory``: real kernels, see ``tests/kernel_utils.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_TESTS = Path(__file__).resolve().parent
if str(_TESTS.parent) not in sys.path:  # the package is not installed while developing
    sys.path.insert(0, str(_TESTS.parent))
if str(_TESTS) not in sys.path:
    sys.path.insert(0, str(_TESTS))

from kernel_utils import kernel, kernel_factory  # noqa: E402,F401 - fixtures re-exported

#: pytest runs with --nbval (pyproject): the browser test's notebook is driven by that test
#: in JupyterLab, not compared by nbval.
collect_ignore_glob = ["browser/*.ipynb"]


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
def ip(_shell):
    """An in-process IPython shell; qmagic (if a test loaded it) is unloaded afterwards."""
    yield _shell
    try:
        from qmagic.extension import unload_ipython_extension
    except ImportError:  # pragma: no cover - before the extension exists
        return
    unload_ipython_extension(_shell)
    _shell.extension_manager.loaded.discard("qmagic")
