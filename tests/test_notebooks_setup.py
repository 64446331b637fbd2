"""Sanity checks of the tutorial notebooks that need no kernel (nbval runs them).

- the committed notebooks are exactly what ``notebooks/_build.py`` (and
  ``notebooks/_async_tutorial.py``) define, and were run (so an edit made in only one of the
  two places is caught);
- they follow the rules that keep them comparable by nbval: the silent load line first,
  no ignored outputs, errors only in cells tagged ``raises-exception``;
- ``python -m pytest`` from the repository root collects them with the sanitize file.
"""

from __future__ import annotations

import re
import runpy
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest depends on tomli there
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
EXPECTED = [
    "01-getting-started.ipynb",
    "02-progress-cancel-output.ipynb",
    "03-scripts-and-permissions.ipynb",
    "04-locking-for-hutch-entry.ipynb",
    "05-remote-control.ipynb",
    "06-experiment-log.ipynb",
    "07-async-tasks.ipynb",
]
LOAD_LINE = 'get_ipython().extension_manager.load_extension("qmagic")'


@pytest.fixture(scope="module")
def build():
    return SimpleNamespace(**runpy.run_path(str(NOTEBOOKS / "_build.py"), run_name="qmagic_notebooks_build"))


def test_the_seven_tutorials_exist_in_learning_order(build):
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == EXPECTED
    assert list(build.NOTEBOOKS) == EXPECTED


@pytest.mark.parametrize("name", EXPECTED)
def test_committed_notebook_matches_build_script_and_was_run(build, name):
    committed = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(committed)
    expected = build.new_notebook(name, build.NOTEBOOKS[name])
    got = [(c.cell_type, c.source, c.metadata.get("tags", [])) for c in committed.cells]
    want = [(c.cell_type, c.source, c.metadata.get("tags", [])) for c in expected.cells]
    assert got == want, f"{name} differs from notebooks/_build.py: run python notebooks/_build.py"
    code = [c for c in committed.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), (
        f"{name} was not run top to bottom: run python notebooks/_build.py"
    )


@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_follows_the_nbval_rules(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code[0].source.startswith(LOAD_LINE), "the first code cell must load qmagic silently"
    assert "%load_ext" not in "".join(c.source for c in code), "%load_ext prints 'already loaded'"
    for cell in code:
        assert "NBVAL_IGNORE_OUTPUT" not in cell.source and "NBVAL_SKIP" not in cell.source
        failed = any(
            o.output_type == "error"
            or (o.output_type == "stream" and o.name == "stderr" and o.text.startswith("UsageError"))
            for o in cell.outputs
        )
        tagged = "raises-exception" in cell.metadata.get("tags", [])
        assert failed == tagged, f"cell {cell.id}: an error must be the lesson and tagged raises-exception"


def test_sanitize_file_is_read_by_nbval():
    from nbval.plugin import get_sanitize_patterns

    text = (NOTEBOOKS / "sanitize.cfg").read_text()
    patterns = get_sanitize_patterns(text)
    assert len(patterns) == text.count("\nregex: ") >= 8
    for regex, _ in patterns:
        re.compile(regex)
    table = dict(patterns)
    sample = (
        "RE Manager is locked by Alice at 11/21/2026 16:39:40\n"
        '  File "/tmp/ipykernel_123/456.py", line 3, in f\n    return 1 / x\n           ~~^~~\n'
        "task 893078a0-3ca5-45c1-855f-f89ee2117567 on tcp://127.0.0.1:42771\n"
        "qmagic: busy_loop() (task 8c993a10) did not stop within 0.5 s; stopping it by force.\n"
        "2026-11-21 16:39:33  calibrate(0)\n"
        "Control channel: serving on tcp://127.0.0.1:1\n"
        "  client: REManagerAPI()\n"
    )
    for regex, replace in table.items():
        sample = re.sub(regex, replace, sample)
    assert sample == (
        "RE Manager is locked by Alice at <time>\n"
        '  File "<cell>", line 3, in f\n    return 1 / x\n'
        "task <uid> on tcp://127.0.0.1:<port>\n"
        "qmagic: busy_loop() (task <uid>) did not stop within <duration>; stopping it by force.\n"
        "<time>  calibrate(0)\n"
        "Control channel: serving on tcp://127.0.0.1:<port>\n"
        "  client: REManagerAPI()\n"
    )


def test_nbval_kernels_know_their_notebook_as_when_built(build):
    """``notebooks/conftest.py`` gives nbval's kernels the JPY_SESSION_NAME _build.py used
    (the experiment log's notebook column is in the stored outputs)."""
    conftest = SimpleNamespace(**runpy.run_path(str(NOTEBOOKS / "conftest.py")))
    for name in EXPECTED:
        assert conftest.session_name(NOTEBOOKS / name) == build.session_name(name) == f"notebooks/{name}"


def test_plain_pytest_collects_the_notebooks_with_nbval():
    options = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "notebooks" in options["testpaths"]
    addopts = options["addopts"].split()
    assert "--nbval" in addopts
    assert addopts[addopts.index("--nbval-sanitize-with") + 1] == "notebooks/sanitize.cfg"
