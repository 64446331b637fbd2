"""The package's public names stay what README documents, whatever was imported first.

Each case runs in a fresh interpreter: the bug depends on which lazy name is asked for
first, and a pytest session has imported most of qmagic already.
"""

from __future__ import annotations

import os
import pkgutil
import subprocess
import sys
import types

import pytest

import qmagic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str) -> str:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


FIRST = [
    "qmagic.history_dataframe",
    "qmagic.timeline",
    "qmagic.history",
    "__import__('qmagic._history')",
    "__import__('qmagic._timeline')",
]


@pytest.mark.parametrize("first", FIRST)
def test_history_and_timeline_stay_functions_whatever_is_asked_first(first):
    out = _run(
        "import types, qmagic\n"
        f"{first}\n"
        "names = ('history', 'history_dataframe', 'timeline')\n"
        "print(all(isinstance(getattr(qmagic, n), types.FunctionType) for n in names))\n"
    )
    assert out == "True"


def test_no_submodule_shares_a_public_name():
    # ``import qmagic.<name>`` binds the module as the package attribute ``<name>``, so a
    # submodule with a public name would replace that name after any import of it.
    submodules = {info.name for info in pkgutil.iter_modules(qmagic.__path__)}
    public_functions = {name for name in qmagic.__all__
                        if not isinstance(getattr(qmagic, name), types.ModuleType)}
    assert submodules & public_functions == set()
