"""nbval runs each tutorial's kernel as ``_build.py`` (and JupyterLab) would.

The stored outputs were made by ``notebooks/_build.py`` with nbclient; nbval must run the
cells the same way, or the outputs differ for reasons that have nothing to do with qmagic:

- **The kernel's environment** (``_build.kernel_env``): the checkout first on
  ``PYTHONPATH``; ``JPY_SESSION_NAME``, the notebook's path that JupyterLab gives its
  kernels (qmagic records it with every task: ``%tasks --history``'s cell column, the
  ``notebook=`` filters); the default state folder and ``IPYTHONDIR`` in a folder of the
  run, removed at the end (or by ``_scratch.py``'s watcher when pytest ends however it
  ends), so that running the tutorials leaves nothing behind.  Set only while
  nbval starts a notebook's kernel; the previous values are put back right after.
- **Counted cells**: JupyterLab and nbclient run cells with ``store_history=True`` (the
  cell becomes ``In [n]``, tracebacks say ``Cell In[n]``, the experiment log records the
  cell's number); nbval 0.11 runs them with ``store_history=False``, so every cell would
  be ``In [1]``.  Its ``RunningKernel.execute_cell_input`` is replaced by one that counts.
- **Updated displays**: JupyterLab and nbclient apply ``update_display_data`` to the output
  with its display id (a foreground task's live row becomes its static final row when the
  cell ends); nbval 0.11 ignores the message and would compare the first version.  The
  updates a cell's kernel sends are applied to its outputs before nbval compares them
  (:func:`_apply_display_updates`).
"""

from __future__ import annotations

import os
import runpy
from pathlib import Path
from types import SimpleNamespace

import pytest

_HERE = Path(__file__).resolve().parent
_run_folder: str | None = None  # made when the first notebook's kernel starts


# (run as a module of its own: its dataclasses find it in sys.modules while it runs)
_build = SimpleNamespace(**runpy.run_path(str(_HERE / "_build.py"), run_name="_qmagic_notebooks_build"))
_scratch = _build.load_scratch()


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """``-n auto`` (pyproject's addopts) with only notebooks named runs in this process, as
    named tests do: tests/conftest.py, which decides that, is not loaded then (and starting
    workers costs more than they save).  Folders: tests/conftest.py (or pytest-xdist) decides."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None
    return None if any(Path(arg.split("::")[0]).is_dir() for arg in config.args) else 0


def session_name(notebook: Path) -> str:
    """``JPY_SESSION_NAME`` of a tutorial's kernel (``_build.session_name``)."""
    return _build.session_name(notebook.name)


def _count_cells() -> None:
    try:
        from nbval.kernel import RunningKernel
    except ImportError:  # nbval not installed: nothing runs notebooks
        return
    if getattr(RunningKernel.execute_cell_input, "_qmagic_counted", False):
        return

    def execute_cell_input(self, cell_input, allow_stdin=None):
        """Run a cell as JupyterLab does: counted (``In [n]``), in the kernel's history."""
        return self.kc.execute(cell_input, store_history=True, allow_stdin=allow_stdin,
                               stop_on_error=False)

    execute_cell_input._qmagic_counted = True
    RunningKernel.execute_cell_input = execute_cell_input


_count_cells()


#: display id -> (data first shown, data of its latest update), for the outputs of the cell
#: nbval is running (nbval keeps an output's data, not its display id)
_displays: dict[str, list] = {}


def _apply_display_updates() -> None:
    """nbval sees what a notebook shows: ``update_display_data`` replaces the data of the
    output shown with that display id (see the module docstring)."""
    try:
        import nbval.plugin as plugin
        from nbval.kernel import RunningKernel
    except ImportError:  # nbval not installed: nothing runs notebooks
        return
    if getattr(RunningKernel.get_message, "_qmagic_updates", False):
        return
    get_message, coalesce = RunningKernel.get_message, plugin.coalesce_streams

    def get_message_noting_displays(self, stream, timeout=None):
        msg = get_message(self, stream, timeout=timeout)
        kind, content = msg.get("msg_type"), msg.get("content") or {}
        display_id = (content.get("transient") or {}).get("display_id")
        if display_id and kind == "display_data":
            _displays[display_id] = [content.get("data"), None]
        elif display_id and kind == "update_display_data" and display_id in _displays:
            _displays[display_id][1] = content.get("data")
        return msg

    def coalesce_with_updates(outputs):  # (called on the cell's outputs, then on the reference's)
        updates = [(shown, latest) for shown, latest in _displays.values() if latest is not None]
        _displays.clear()
        for out in outputs:
            for shown, latest in updates:
                if out.get("output_type") == "display_data" and out.get("data") == shown:
                    out["data"] = latest
        return coalesce(outputs)

    get_message_noting_displays._qmagic_updates = True
    RunningKernel.get_message = get_message_noting_displays
    plugin.coalesce_streams = coalesce_with_updates


_apply_display_updates()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    """Around the setup of a tutorial's first cell, when nbval starts its kernel."""
    global _run_folder
    notebook = getattr(item, "parent", None)
    path = getattr(notebook, "path", None)
    starting = (
        path is not None
        and path.suffix == ".ipynb"
        and path.parent == _HERE
        and hasattr(notebook, "kernel")  # nbval's IPyNbFile
        and notebook.kernel is None
    )
    if not starting:
        yield
        return
    if _run_folder is None:  # removed at the end, or when pytest ends however it ends
        _run_folder = _scratch.scratch_folder(prefix="qmagic-nbval-")
    with _build.environment(_build.kernel_env(path.name, _run_folder)):
        yield


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Remove the run's folder (every kernel has stopped by now)."""
    global _run_folder
    if _run_folder is not None:
        _scratch.remove_scratch_folder(_run_folder)
        _run_folder = None
